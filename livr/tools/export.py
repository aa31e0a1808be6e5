"""`livr export --run RUN --out DIR`: a finished run as a standalone Hugging Face checkpoint.

DIR holds the backbone with the LoRA merged into its weights and the trained latent rows in the embedding (an
untied head keeps its latent rows too), the tokenizer with the latent tokens, the image processor, and a chat
template whose generation prompt ends with the K latents and the delimiter, exactly where livr inserts them
(right after the assistant header, LIVR_SPEC §1). So a stock runtime answers as `livr eval --run RUN` does, with
no livr code:

    model = AutoModelForImageTextToText.from_pretrained(DIR)
    processor = AutoProcessor.from_pretrained(DIR)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)

`generation_config.json` stops at the family's end-of-turn token, as livr's decoding does. The directory is also
logged to the run's MLflow run as the artifact `export/` (when the run has one). `--adapter-only`
copies today's adapter layout (adapter/, latents.safetensors, tokenizer/, vocab.json, config.yaml) instead.
Written atomically: DIR appears complete or not at all.
"""
from __future__ import annotations

import json
import os
import shutil

from livr.training.checkpoint import CheckpointError, atomic_dir

ADAPTER_FILES = ("adapter", "latents.safetensors", "tokenizer", "vocab.json", "config.yaml")


def latent_chat_template(template: str, latent_text: str) -> str:
    """`template` whose generation prompt is followed by `latent_text` (the latents and the delimiter): appended
    after everything the template renders, which with add_generation_prompt ends with the assistant header."""
    if not latent_text:
        return template
    return template + "{%- if add_generation_prompt %}{{- '" + latent_text + "' }}{%- endif %}"


def processor_note(processor_class: type) -> str | None:
    """Why stock `AutoProcessor.from_pretrained(DIR)` cannot load this export here, or None: the family's stock
    processor builds a video processor (Qwen2.5-VL, Qwen3-VL, Qwen3.5, LLaVA-OneVision), which needs torchvision, and
    this environment has none (the CPU stack: PyPI's torchvision 0.28.0 is built against CUDA torch and does not load
    against torch 2.13.0+cpu, measured). Gemma 3's processor has no video processor and loads without it."""
    import importlib.util
    import inspect

    if "video_processor" not in inspect.signature(processor_class).parameters:
        return None
    if importlib.util.find_spec("torchvision") is not None:
        return None
    return (f"stock AutoProcessor.from_pretrained(DIR) needs torchvision here ({processor_class.__name__} builds a "
            "video processor) and this environment has none; install torchvision==0.28.0 (CUDA stack: PyPI; CPU "
            "stack: --index-url https://download.pytorch.org/whl/cpu), or load AutoTokenizer and AutoImageProcessor "
            "from DIR; the model, tokenizer, image processor and chat template load as they are")


def export_run(run_dir: str, out_dir: str, *, adapter_only: bool = False) -> dict:
    """Write the export of `run_dir` to `out_dir` (replacing it); returns what livr_export.json records."""
    if adapter_only:
        missing = [f for f in ADAPTER_FILES if not os.path.exists(os.path.join(run_dir, f))]
        if missing:
            raise CheckpointError(f"run directory {run_dir} is incomplete (missing {', '.join(missing)})")
        with atomic_dir(out_dir) as tmp:
            for f in ADAPTER_FILES:
                src, dst = os.path.join(run_dir, f), os.path.join(tmp, f)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
        return {"run": os.path.abspath(run_dir), "layout": "adapter"}
    from livr.training.runs import load_run

    cfg, lm = load_run(run_dir)
    template = latent_chat_template(lm.tokenizer.chat_template, lm.builder.latent_text)
    model = lm.model.merge_and_unload()  # LoRA into the weights, the latent rows into the embedding (and head)
    gen = model.generation_config
    eot = lm.tokenizer.convert_tokens_to_ids(lm.family.end_of_turn)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    gen.eos_token_id = [eot, *[e for e in eos if e is not None and e != eot]]
    gen.pad_token_id = lm.tokenizer.pad_token_id
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None  # greedy, as livr eval
    info = {"run": os.path.abspath(run_dir), "layout": "merged", "family": lm.family.name,
            "backbone": cfg.model.backbone, "mode": cfg.train.mode, "num_latents": cfg.latents.num_latents,
            "latent_tokens": lm.tokenizer.convert_ids_to_tokens(lm.latent_ids), "end_of_turn": lm.family.end_of_turn}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # safetensors
        lm.tokenizer.chat_template = template
        processor = lm.backbone.processor
        processor.chat_template = template
        processor.save_pretrained(tmp)  # tokenizer (+ latent tokens, + template) and image processor
        with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
            f.write(template)
        with open(os.path.join(tmp, "processor_config.json"), "w") as f:  # what AutoProcessor passes to __init__
            json.dump({"processor_class": lm.family.processor_class.__name__,
                       **lm.family.processor_kwargs(model.config)}, f, indent=1)
        with open(os.path.join(tmp, "livr_export.json"), "w") as f:
            json.dump(info, f, indent=1)
    info["mlflow_run_id"] = log_export(cfg, run_dir, out_dir)
    note = processor_note(lm.family.processor_class)
    if note:
        info["processor_note"] = note
    return info


def log_export(cfg, run_dir: str, out_dir: str) -> str | None:
    """The exported checkpoint as the run's MLflow artifact `export/` (a Hugging Face directory that
    `from_pretrained` loads once downloaded); skipped, with a line, when the run has no MLflow record. A tracking
    failure never loses the export: it is already written."""
    from livr.tracking.tracker import recorded_run_id, tracking_uri

    run_id = recorded_run_id(cfg, run_dir, "export")
    if run_id is None:
        return None
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri(cfg)).log_artifacts(run_id, out_dir, artifact_path="export")
    except Exception as e:  # noqa: BLE001 - tracking is best effort here; the files are the export
        print(f"livr export: could not log {out_dir} to MLflow run {run_id} ({type(e).__name__}: {e}); files only")
        return None
    return run_id
