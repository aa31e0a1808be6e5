"""The sequence a run trains on, for `livr plan`: image tokens from the backbone's real processor classes (no
pixels encoded) and text tokens from its tokenizer, for the configured data or N images of W×H.
(See `livr/tools/plan.py` for how these figures enter the memory model.)"""
from __future__ import annotations

import os

from livr.backbones.preflight import backbone_config, plan_family

MIB = 1024**2
# A BLINK-like multiple-choice prompt (for --images N --image-size WxH, where there are no rows to read)
DEFAULT_PROMPT = ("Given the images, which option best answers the question about the objects, their positions "
                  "and their appearance? Look at every image carefully before answering.\nSelect from the "
                  "following choices.\n(A) the first option\n(B) the second option\n(C) the third option\n"
                  "(D) the fourth option")



def config_model(family, config, trust_remote_code: bool = False):
    """The family's model class built from `config` (under the caller's device context; meta for counting); an
    Auto class (a declared family) resolves the class, remote code included, from the config."""
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    cls = family.model_class
    if issubclass(cls, _BaseAutoModelClass):
        return cls.from_config(config, trust_remote_code=trust_remote_code)
    return cls._from_config(config)


def backbone_io(cfg) -> dict:
    """The backbone's family, config, image processor and tokenizer for counting tokens (no weights), and where
    each came from. data.min_pixels / data.max_pixels are applied to a Qwen-style image processor."""
    from transformers import AutoTokenizer

    from livr.backbones import preset_parts
    from livr.backbones.registry import _chat_template, is_preset

    name, n = cfg.model.backbone, getattr(cfg.model, "num_layers", 0)
    if is_preset(name):
        config, tok, ip = preset_parts(name, n)
        family = plan_family(cfg, config)
        ip_src = tok_src = f"preset {name}"
    else:
        remote = cfg.model.trust_remote_code
        config, _ = backbone_config(name, cfg.model.cache_dir, n, remote)
        family = plan_family(cfg, config)
        path = os.path.expanduser(name)
        where = os.path.abspath(path) if os.path.isdir(path) else name
        try:
            ip, ip_src = family.image_processor_class.from_pretrained(where), where
        except OSError:
            if family.hub_id == name:
                ip = family.image_processor_class(**family.image_processor_defaults)
                ip_src = f"{name}'s preprocessor_config (shipped)"
            else:
                ip, ip_src = family.image_processor_class(), f"{family.image_processor_class.__name__} defaults"
        try:
            tok, tok_src = AutoTokenizer.from_pretrained(where, trust_remote_code=remote), where
            template = _chat_template(where, tok)
            if template and not tok.chat_template:
                tok.chat_template = template
        except (OSError, ValueError):
            tok = family.size_parts()[1]
            tok_src = "the offline BPE of the family's size preset (over-counts text: the real tokenizer is denser)"
    lo, hi = getattr(cfg.data, "min_pixels", 0), getattr(cfg.data, "max_pixels", 0)
    if lo or hi:
        from livr.model.build import set_pixel_limits

        set_pixel_limits(ip, lo, hi)
    return {"family": family, "config": config, "image_processor": ip, "tokenizer": tok,
            "image_processor_source": ip_src, "tokenizer_source": tok_src}


def processor_summary(ip) -> str:
    size = ip.size
    if getattr(size, "longest_edge", None) is not None:  # Qwen-style pixel budget
        return (f"patch {ip.patch_size}, merge {ip.merge_size} (one token per {ip.patch_size * ip.merge_size}² px), "
                f"min_pixels {size.shortest_edge:,}, max_pixels {size.longest_edge:,}")
    return f"{size.height}×{size.width} views, anyres over {len(ip.image_grid_pinpoints)} grid pinpoints"


def image_cost(io: dict, width: int, height: int, images_in_row: int) -> tuple[int, int]:
    """(image tokens, bytes of its fp32 pixel_values) of one width×height image, from the processor classes."""
    return io["family"].image_cost(io, width, height, images_in_row)


def row_cost(io: dict, sizes: list[tuple[int, int]], prompt: str, answer: str, num_latents: int) -> dict:
    """Token counts and pixel bytes of one example: [template + prompt][images][latents + delimiter][answer]."""
    tok, family = io["tokenizer"], io["family"]
    content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": prompt}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    image_id = tok.convert_tokens_to_ids(family.image_token)
    text_tokens = len(ids) - sum(i == image_id for i in ids)
    labelled = len(tok(answer + family.end_of_turn, add_special_tokens=False)["input_ids"])
    costs = [image_cost(io, w, h, len(sizes)) for w, h in sizes]
    image_tokens, pixel_bytes = sum(c[0] for c in costs), sum(c[1] for c in costs)
    latents = num_latents + 1 if num_latents > 0 else 0
    return {"seq_len": text_tokens + image_tokens + latents + labelled, "text": text_tokens, "image": image_tokens,
            "latents": latents, "labelled": labelled, "images": len(sizes), "pixel_bytes": pixel_bytes,
            "per_image": [c[0] for c in costs]}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def sample_rows(cfg, sample: int) -> tuple[list[dict], dict]:
    """Up to `sample` rows per task of the configured train split (evenly spaced), and the dataset's size:
    {"bytes", "mapped" (memory-mapped Arrow = page cache) , "where"}."""
    import io as _io

    from livr.data.blink import load_blink
    from livr.data.sequence import images_of
    from livr.data.splits import synthetic_dir
    from livr.data.synthetic import _opts_per_task, generate_task

    d = cfg.data
    rows, nbytes, mapped, where = [], 0, True, d.source
    if d.source == "synthetic":
        root, opts = synthetic_dir(cfg), _opts_per_task(d.tasks, d.options)
        for task in d.tasks:
            got = generate_task(task, min(sample, d.train_size or sample), seed=d.seed, split=d.train_split,
                                image_size=d.image_size, **opts[task])
            rows += got
            if os.path.isdir(os.path.join(root, task)):
                nbytes += _dir_bytes(os.path.join(root, task))
            else:  # not generated yet: PNG bytes of the sample, scaled to train + val + test
                png = 0
                for r in got:
                    for im in images_of(r):
                        buf = _io.BytesIO()
                        im.save(buf, format="PNG")
                        png += buf.tell()
                nbytes += png / max(1, len(got)) * (d.train_size + d.val_size + d.test_size)
        return rows, {"bytes": nbytes, "mapped": True, "where": f"synthetic ({root})"}
    for task in d.tasks:
        ds = load_blink(task, d.train_split, d.source, validate=False)
        n = len(ds) if not d.train_size else min(d.train_size, len(ds))
        picks = sorted({int(i * n / min(sample, n)) for i in range(min(sample, n))}) if n else []
        rows += [ds[i] for i in picks]
        files = [f["filename"] for f in ds.cache_files]
        if files:
            nbytes += sum(os.path.getsize(f) for f in set(files))
        else:  # parquet read into memory
            nbytes += ds.data.nbytes
            mapped = False
    return rows, {"bytes": nbytes, "mapped": mapped, "where": where}


def sequence_plan(cfg, *, images: int = 0, image_size: tuple[int, int] | None = None, sample: int = 16) -> dict:
    """L (the longest example) and its parts, from `images` × `image_size` or from a sample of the train rows."""
    from livr.data.prompts import format_prompt, target_text

    io = backbone_io(cfg)
    k = cfg.latents.num_latents
    out = {"processor": processor_summary(io["image_processor"]), "processor_source": io["image_processor_source"],
           "tokenizer_source": io["tokenizer_source"], "dataset": None}
    if images:
        w, h = image_size or (1024, 768)
        answer = "A" if cfg.data.answer_format == "letter" else "(A)"
        rows = [row_cost(io, [(w, h)] * images, DEFAULT_PROMPT, answer, k)]
        out["source"] = f"--images {images} --image-size {w}x{h} (a BLINK-like 4-choice prompt)"
    else:
        from livr.data.sequence import images_of

        raw, out["dataset"] = sample_rows(cfg, sample)
        if not raw:
            raise ValueError("no rows")
        rows = [row_cost(io, [im.size for im in images_of(r)], format_prompt(r),
                         target_text(r, cfg.data.answer_format), k) for r in raw]
        out["source"] = f"{len(raw)} sampled train rows of {', '.join(cfg.data.tasks)} ({out['dataset']['where']})"
    longest = max(rows, key=lambda r: r["seq_len"])
    out.update(longest)
    out["rows"] = len(rows)
    out["mean_seq_len"] = sum(r["seq_len"] for r in rows) / len(rows)
    out["labelled"] = max(r["labelled"] for r in rows)
    out["pixel_bytes"] = max(r["pixel_bytes"] for r in rows)
    return out


# ----------------------------------------------------------------------------- memory
