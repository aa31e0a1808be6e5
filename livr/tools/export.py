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

No torchvision is needed: the Qwen processors (Qwen2.5-VL, Qwen3-VL, Qwen3.5) build a video processor, which
needs torchvision (the CPU stack has none), so DIR names transformers' image-only `PaddleOCRVLProcessor`, which
expands `<|image_pad|>` by the same rule (checked at export: its inputs for a two-image prompt equal livr's, or the
family's processor is kept). LLaVA-OneVision has no image-only stock equivalent: DIR carries a ten-line
`processing_livr_export.py` (no livr import) for `AutoProcessor.from_pretrained(DIR, trust_remote_code=True)`;
plain loading needs torchvision there. Gemma 3's processor has no video processor.

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


# Stock processors with a video processor (which needs torchvision) -> a stock image-only processor class with the
# same image-token rule (`image_grid_thw.prod() // merge_size**2` copies of the tokenizer's image token).
IMAGE_ONLY = {"Qwen2VLProcessor": "PaddleOCRVLProcessor", "Qwen2_5_VLProcessor": "PaddleOCRVLProcessor",
              "Qwen3VLProcessor": "PaddleOCRVLProcessor"}
REMOTE_MODULE = "processing_livr_export"
REMOTE_CODE = '''"""Written by `livr export`: {stock} without a video processor (transformers builds one, which needs
torchvision), for AutoProcessor.from_pretrained(DIR, trust_remote_code=True). Images only; no livr import."""
from transformers import {stock} as _Stock


class ImageOnly{stock}(_Stock):
    @classmethod
    def get_attributes(cls):
        return [a for a in super().get_attributes() if a != "video_processor"]
'''


def has_video_processor(processor_class: type) -> bool:
    import inspect

    return "video_processor" in inspect.signature(processor_class).parameters


def processor_note(processor_class: type, written: str | None = None) -> str | None:
    """How stock transformers loads this export's processor where it is not plain `AutoProcessor.from_pretrained(DIR)`
    (DIR names `written`, by default what write_processor_config names: a video-processor class, in an environment
    without torchvision: PyPI's torchvision 0.28.0 is built against CUDA torch and does not load against torch
    2.13.0+cpu, measured), or None."""
    import importlib.util

    written = written or IMAGE_ONLY.get(processor_class.__name__, processor_class.__name__)
    if not has_video_processor(processor_class) or written != processor_class.__name__:
        return None
    if importlib.util.find_spec("torchvision") is not None:
        return None
    return (f"stock AutoProcessor.from_pretrained(DIR) needs torchvision for {processor_class.__name__} (it builds a "
            "video processor) and this environment has none: load it with AutoProcessor.from_pretrained(DIR, "
            f"trust_remote_code=True) (DIR/{REMOTE_MODULE}.py, the stock class without the video processor)")


def write_processor_config(tmp: str, family, model_config, processor) -> str:
    """processor_config.json (what AutoProcessor reads), for loading without torchvision; returns the class it names.
    A video-processor family: its image-only stock equivalent if it gives the same inputs as `processor`, else the
    family's class plus the remote-code module without the video processor (auto_map, for trust_remote_code=True)."""
    stock = family.processor_class.__name__
    kwargs = family.processor_kwargs(model_config)
    if stock in IMAGE_ONLY:
        _write_json(os.path.join(tmp, "processor_config.json"), {"processor_class": IMAGE_ONLY[stock], **kwargs})
        path = os.path.join(tmp, "tokenizer_config.json")
        with open(path) as f:
            tok = json.load(f)
        extra = tok.get("extra_special_tokens") if isinstance(tok.get("extra_special_tokens"), dict) else {}
        tok["extra_special_tokens"] = {**extra, "image_token": family.image_token}  # -> tokenizer.image_token(_id)
        _write_json(path, tok)
        if _same_inputs(tmp, processor):
            return IMAGE_ONLY[stock]
        _write_json(path, {k: v for k, v in tok.items() if k != "extra_special_tokens"} if not extra
                    else {**tok, "extra_special_tokens": extra})
    config = {"processor_class": stock, **kwargs}
    if has_video_processor(family.processor_class):
        with open(os.path.join(tmp, REMOTE_MODULE + ".py"), "w") as f:
            f.write(REMOTE_CODE.format(stock=stock))
        config["auto_map"] = {"AutoProcessor": f"{REMOTE_MODULE}.ImageOnly{stock}"}
    _write_json(os.path.join(tmp, "processor_config.json"), config)
    return stock


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _same_inputs(out_dir: str, processor) -> bool:
    """Whether AutoProcessor.from_pretrained(out_dir) turns a two-image prompt (two sizes) into the inputs
    `processor` (livr's) makes."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    stock = AutoProcessor.from_pretrained(out_dir)
    images = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 96), (20, 90, 220))]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "probe"}]}]
    text = stock.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if text != processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False):
        return False
    a = stock(text=[text], images=[images], return_tensors="pt")
    b = processor(text=[text], images=[images], return_tensors="pt")
    return set(a) <= set(b) and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


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
        info["processor_class"] = write_processor_config(tmp, lm.family, model.config, processor)
        with open(os.path.join(tmp, "livr_export.json"), "w") as f:
            json.dump(info, f, indent=1)
    info["mlflow_run_id"] = log_export(cfg, run_dir, out_dir)
    note = processor_note(lm.family.processor_class, info["processor_class"])
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
