"""Atomic checkpoints (safetensors + JSON) and the run's final artifacts.

A training checkpoint is a directory with `trainable.safetensors` (every trainable parameter by name),
`optimizer.safetensors` + `optimizer.json` and `state.json` (stage, epoch, step, best accuracy, …).
Directories are written next to their destination and renamed into place, so a crash never leaves a
half-written checkpoint where a complete one was.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "state.json")


class CheckpointError(RuntimeError):
    pass


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yield a temporary directory that replaces `final` only if the block completes."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(final):
        old = f"{tmp}.old"
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint {source} does not match the model: missing {missing[0]} (and {len(missing) - 1} more)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.device, p.dtype))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = []
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(idx)].append(k)
    return tensors, meta


def save_checkpoint(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), os.path.join(tmp, "trainable.safetensors"))
        tensors, meta = _optimizer_tensors(opt)
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "optimizer.json"), "w") as f:
            json.dump(meta, f)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)


def check_complete(path: str) -> None:
    missing = [f for f in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete (missing {', '.join(missing)}); move it away or set train.resume=false"
        )


def load_checkpoint(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> dict:
    check_complete(path)
    try:
        load_trainable_state(model, load_file(os.path.join(path, "trainable.safetensors")), path)
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        if opt is not None:
            with open(os.path.join(path, "optimizer.json")) as f:
                meta = json.load(f)
            tensors = load_file(os.path.join(path, "optimizer.safetensors"))
            st = {int(i): {k: tensors[f"{i}.{k}"] for k in keys} for i, keys in meta["state"].items()}
            opt.load_state_dict({"state": st, "param_groups": meta["param_groups"]})
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    return state


def save_run_artifacts(lm, run_dir: str) -> None:
    """adapter/ (stock PEFT), latents.safetensors, tokenizer/ and vocab.json in the run directory."""
    with atomic_dir(os.path.join(run_dir, "adapter")) as tmp:
        lm.model.save_pretrained(tmp)
    emb = lm.model.get_input_embeddings()
    if lm.latent_ids:
        ids = torch.tensor(lm.latent_ids)
        rows = emb(ids.to(lm.device)).detach().float().cpu().contiguous()  # the trained rows
        tmp = os.path.join(run_dir, "latents.safetensors.tmp")
        save_file({"latent_ids": ids, "rows": rows}, tmp)
        os.replace(tmp, os.path.join(run_dir, "latents.safetensors"))
    with atomic_dir(os.path.join(run_dir, "tokenizer")) as tmp:
        lm.tokenizer.save_pretrained(tmp)
    text_cfg = lm.model.get_base_model().config.get_text_config()
    vocab = {"base_vocab": lm.base_vocab, "vocab": text_cfg.vocab_size, "latent_ids": lm.latent_ids}
    with open(os.path.join(run_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
