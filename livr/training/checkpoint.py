"""Checkpoints that are safe to load, checked before use and exact to resume from; and the run's final artifacts.

A training checkpoint (`<run>/checkpoints/last`, or the copy Ray Train hands back) is a directory of
safetensors + JSON only — nothing in it is ever unpickled:

    trainable.safetensors  every trainable parameter (LoRA + the latent rows) by name, whole; under DeepSpeed
                           the fp32 master copy, gathered from the ZeRO partitions
    optimizer.safetensors  per trainable parameter `<name>.exp_avg`, `<name>.exp_avg_sq`, `<name>.step`, whole
    optimizer.json         the param groups: their hyper-parameters and the parameter names each holds
    rng.json               every rank's RNG states (Python `random`, NumPy, torch CPU, CUDA if present), by rank
    state.json             stage, step, global step, best, history, …, world_size and global_batch
    manifest.json          written last: each file above with its size and sha256

Rank 0 writes (after every rank took part in the gathers); every rank reads and re-shards. Before anything
is read, the manifest is checked: a missing, truncated or altered file is a one-line `CheckpointError`
naming it. Files the manifest does not name (e.g. a planted `*.pt`) are never opened.

The training loop writes `last.tmp-<step>`, then renames `last` -> `last.old` and `last.tmp-<step>` -> `last`.
`recover_last` repairs a crash between the two renames: with `last` missing it puts the newest verified
leftover in place. The best selection is `best.safetensors` + `best.json` (its sha256 and what it is: val
accuracy, stage, epoch, global step); the selection it replaced is kept as `best.prev.*`, and
`select_best` falls back to the better of that and the final weights when `best` does not verify.
"""
from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import json
import os
import random
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from livr.training.nonfinite import refuse_nonfinite
from livr.utils.atomic import atomic_dir, atomic_file, clean_failure, write_failed  # noqa: F401 - atomic_dir: re-exported

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.json", "state.json")
MANIFEST = "manifest.json"
OPT_KEYS = ("exp_avg", "exp_avg_sq", "step")


class CheckpointError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- files
def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_file(path, write)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry(path: str) -> dict:
    return {"size": os.path.getsize(path), "sha256": _sha256(path)}


def _check_file(path: str, want: dict, fix: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {os.path.dirname(path)} is incomplete: {os.path.basename(path)} is missing; {fix}")
    size = os.path.getsize(path)
    if size != want["size"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt ({size} bytes, its manifest says {want['size']}); {fix}")
    if _sha256(path) != want["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt (its sha256 differs from the manifest's); {fix}")


def _fix(path: str) -> str:
    return f"move {path} away (the run then starts again from step 0) or set train.resume=false"


def verify_checkpoint(path: str) -> dict:
    """Check every file against `manifest.json`; return the manifest. One-line CheckpointError otherwise."""
    fix = _fix(path)
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        present = [f for f in CHECKPOINT_FILES if os.path.isfile(os.path.join(path, f))]
        what = "was written by an older livr" if present else "is empty"
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing (it {what}, or its write "
                              f"was cut short); {fix}")
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {manifest} is corrupt ({type(e).__name__}); {fix}") from None
    missing = [f for f in CHECKPOINT_FILES if f not in files]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: {missing[0]} is not in its manifest; {fix}")
    for name in CHECKPOINT_FILES:
        _check_file(os.path.join(path, name), files[name], fix)
    return files


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({str(e).splitlines()[0]})") from None


def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(e).__name__})") from None


# ----------------------------------------------------------------------------- write / read a checkpoint
def write_checkpoint(path: str, trainable: dict, optimizer: dict, opt_meta: dict, state: dict, rngs: list) -> None:
    """Write the files of a checkpoint into the directory `path` (created), `manifest.json` last; nan/inf refused."""
    refuse_nonfinite({**trainable, **optimizer}, path)
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, os.path.join(path, "trainable.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in optimizer.items()}, os.path.join(path, "optimizer.safetensors"))
    write_json(os.path.join(path, "optimizer.json"), opt_meta)
    write_json(os.path.join(path, "rng.json"), {"world_size": len(rngs), "ranks": rngs})
    write_json(os.path.join(path, "state.json"), state)
    write_json(os.path.join(path, MANIFEST), {"files": {f: _entry(os.path.join(path, f)) for f in CHECKPOINT_FILES}})


def read_checkpoint(path: str) -> dict:
    """{trainable, optimizer, opt_meta, rng, state} of a verified checkpoint."""
    verify_checkpoint(path)
    j = lambda f: _load_json(os.path.join(path, f))
    return {"trainable": _load_tensors(os.path.join(path, "trainable.safetensors")),
            "optimizer": _load_tensors(os.path.join(path, "optimizer.safetensors")),
            "opt_meta": j("optimizer.json"), "rng": j("rng.json"), "state": j("state.json")}


def check_batch(state: dict, path: str, micro: int, accum: int, world: int) -> None:
    """Resuming under another world size is exact when the global batch is the same; otherwise refuse."""
    was = state.get("global_batch")
    if was is not None and was != micro * accum * world:
        raise CheckpointError(
            f"checkpoint {path} was written with global batch {was} (world_size {state.get('world_size')}); now "
            f"train.micro_batch_size {micro} x train.grad_accum {accum} x {world} workers = {micro * accum * world}: "
            f"set them so that the global batch is {was}, or train.resume=false")


def recover_last(last: str) -> str | None:
    """After a crash between `last` -> `last.old` and `last.tmp-N` -> `last`: with `last` missing, put the newest
    leftover whose manifest verifies in place (a `last.tmp-N` before `last.old` of the same step), remove the
    others, and return its name. Nothing to do if `last` exists or nothing is left over."""
    if os.path.exists(last):
        return None
    tmps = [p for p in glob.glob(glob.escape(last) + ".tmp-*") if os.path.isdir(p)]
    found = tmps + [p for p in [last + ".old"] if os.path.isdir(p)]
    if not found:
        return None
    good, errors = [], []
    for p in found:
        try:
            verify_checkpoint(p)
            step = _load_json(os.path.join(p, "state.json"))["global_step"]
            good.append((step, p != last + ".old", p))
        except (CheckpointError, KeyError, TypeError) as e:
            errors.append(str(e))
    if not good:
        raise CheckpointError(f"{last} is missing and no leftover verifies ({errors[0]})")
    _, _, pick = max(good)
    os.replace(pick, last)
    for p in found:
        if p != pick:
            shutil.rmtree(p, ignore_errors=True)
    print(f"[livr] {last} was missing (a crash while swapping checkpoints): recovered it from "
          f"{os.path.basename(pick)} (global step {max(good)[0]})", flush=True)
    return pick


def swap_into_place(tmp: str, last: str) -> None:
    """`last` -> `last.old`, `tmp` -> `last`, then remove `last.old` and any stale `last.tmp-*`."""
    old = f"{last}.old"
    if os.path.exists(last):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(last, old)
    os.replace(tmp, last)
    shutil.rmtree(old, ignore_errors=True)
    for p in glob.glob(glob.escape(last) + ".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- model and torch optimizer
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


def group_meta(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict:
    """The param groups as JSON: hyper-parameters and the names of their parameters."""
    groups = []
    for g in opt.param_groups:
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
        groups.append({"names": [names[id(p)] for p in g["params"]],
                       **{k: v for k, v in hyper.items() if isinstance(v, (int, float, str, bool, list, type(None)))}})
    return {"param_groups": groups}


def optimizer_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW's moments and step count per trainable parameter name, and the group metadata."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for g in opt.param_groups:
        for p in g["params"]:
            for k, v in opt.state.get(p, {}).items():
                if k in OPT_KEYS:
                    tensors[f"{names[id(p)]}.{k}"] = torch.as_tensor(v, dtype=torch.float32) if k == "step" else v
    return tensors, group_meta(opt, names)


def load_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict, source: str) -> None:
    """Put each parameter's saved moments and step into `opt` (cast to its parameter's device and dtype)."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = opt.state_dict()
    state, i = {}, 0
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            if f"{n}.step" in tensors:
                state[i] = {k: tensors[f"{n}.{k}"] for k in OPT_KEYS}
            elif tensors:
                raise CheckpointError(f"checkpoint {source} has no optimizer state for {n}; it belongs to another model")
            i += 1
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def save_checkpoint(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """One process: the whole checkpoint (this process's RNG included) atomically at `path`."""
    tensors, meta = optimizer_tensors(model, opt)
    with atomic_dir(path) as tmp:
        write_checkpoint(tmp, trainable_state(model), tensors, meta, state, [rng_state()])


def load_checkpoint(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer | None, rank: int = 0,
                    world: int = 1) -> dict:
    """Verify, then load weights, optimizer state (if `opt`) and this rank's RNG; return state.json."""
    ck = read_checkpoint(path)
    load_trainable_state(model, ck["trainable"], path)
    if opt is not None:
        load_optimizer(model, opt, ck["optimizer"], path)
    restore_rng(ck["rng"], rank, world)
    return ck["state"]


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """This process's Python, NumPy, torch CPU (and CUDA) RNG states as JSON."""
    py = random.getstate()
    npst = np.random.get_state()
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode()
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
           "torch": b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        out["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def seed_rng(seed: int) -> None:
    """Python, NumPy and torch (every device) RNGs from `seed` alone."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(s: dict) -> None:
    t = lambda b: torch.frombuffer(bytearray(base64.b64decode(b)), dtype=torch.uint8)
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(t(s["torch"]))
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t(b) for b in s["cuda"]])


def gather_rng(world: int, device: torch.device) -> list[dict]:
    """Every rank's `rng_state()`, in rank order, on every rank (a collective when world > 1; no pickle)."""
    if world == 1:
        return [rng_state()]
    data = json.dumps(rng_state()).encode()
    n = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    buf = torch.zeros(int(max(sizes).item()), dtype=torch.uint8, device=device)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    out = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(out, buf)
    return [json.loads(bytes(o[: int(s.item())].cpu().numpy())) for o, s in zip(out, sizes)]


def restore_rng(rng: dict, rank: int, world: int) -> None:
    """This rank's saved RNG states; under another world size rank r takes saved rank r mod N (warned)."""
    ranks = rng["ranks"]
    if len(ranks) != world and rank == 0:
        print(f"[livr] warning: resuming {len(ranks)} rank(s)' RNG states on {world}: they cannot map 1:1, rank r "
              f"continues from saved rank r mod {len(ranks)} (dropout masks differ from an uninterrupted run)",
              file=sys.stderr, flush=True)
    set_rng_state(ranks[rank % len(ranks)])


# ----------------------------------------------------------------------------- the best selection
def save_best(ckpt_dir: str, tensors: dict, info: dict) -> None:
    """`best.safetensors` + `best.json` (sha256, size, info); a verified previous best becomes `best.prev.*`."""
    base, prev = os.path.join(ckpt_dir, "best"), os.path.join(ckpt_dir, "best.prev")
    refuse_nonfinite(tensors, base + ".safetensors")
    new = base + ".safetensors.tmp"
    with clean_failure(base + ".safetensors", new, base + ".json.tmp"):  # written in full before anything moves
        os.makedirs(ckpt_dir, exist_ok=True)
        save_file(tensors, new)
        write_json(base + ".json.tmp", {**_entry(new), **info})
    try:
        read_best(ckpt_dir, "best")
        for ext in (".safetensors", ".json"):
            os.replace(base + ext, prev + ext)
    except CheckpointError:
        pass  # none yet, or unusable: never kept as a fallback
    os.replace(new, base + ".safetensors")
    os.replace(base + ".json.tmp", base + ".json")


def read_best(ckpt_dir: str, name: str = "best") -> tuple[dict, dict]:
    """(tensors, info) of `<name>.safetensors`, checked against `<name>.json`."""
    path, side = os.path.join(ckpt_dir, name + ".safetensors"), os.path.join(ckpt_dir, name + ".json")
    if not os.path.isfile(side):
        raise CheckpointError(f"{side} is missing")
    info = _load_json(side)
    _check_file(path, info, "")
    return _load_tensors(path), info


def select_best(ckpt_dir: str, state: dict) -> dict | None:
    """The best selection's tensors, or None to keep the final weights. If `best` does not verify: the better
    (by validation accuracy) of `best.prev` and the final weights (the last validation's), with a warning;
    `state["best"]`/`state["best_at"]` then describe what was selected."""
    if state.get("best_at") is None:
        return None  # no validation ran: the final weights
    try:
        return read_best(ckpt_dir, "best")[0]
    except CheckpointError as e:
        why = str(e).split(";")[0]
    last = state["history"][-1] if state.get("history") else None
    pick, tensors = None, None
    with contextlib.suppress(CheckpointError):
        tensors, info = read_best(ckpt_dir, "best.prev")
        pick = info
    if pick is None or (last is not None and last["val_accuracy"] > pick["val_accuracy"]):
        pick, tensors = (last or {"val_accuracy": -1.0, "stage": None, "epoch": None}), None
        what = "the final weights"
    else:
        what = "best.prev.safetensors"
    print(f"[livr] warning: the best selection cannot be used ({why}); selecting {what} instead (val accuracy "
          f"{pick['val_accuracy']}, {pick['stage']} epoch {pick['epoch']})", file=sys.stderr, flush=True)
    state["best"], state["best_at"] = pick["val_accuracy"], {"stage": pick["stage"], "epoch": pick["epoch"]}
    return tensors


# ----------------------------------------------------------------------------- run artifacts
def save_run_artifacts(lm, run_dir: str) -> None:
    """adapter/ (stock PEFT), latents.safetensors, tokenizer/ and vocab.json in the run directory (nan/inf refused)."""
    refuse_nonfinite(trainable_state(lm.model), os.path.join(run_dir, "adapter"))
    with atomic_dir(os.path.join(run_dir, "adapter")) as tmp:
        lm.model.save_pretrained(tmp)
    emb = lm.model.get_input_embeddings()
    if lm.latent_ids:
        ids = torch.tensor(lm.latent_ids)
        delta = getattr(getattr(emb, "token_adapter", None), "trainable_tokens_delta", {}).get("default")
        rows = delta if delta is not None else emb(ids.to(lm.device))  # the trained rows (not Gemma's scaled output)
        rows = rows.detach().float().cpu().contiguous()
        atomic_file(os.path.join(run_dir, "latents.safetensors"), lambda tmp: save_file({"latent_ids": ids, "rows": rows}, tmp))
    with atomic_dir(os.path.join(run_dir, "tokenizer")) as tmp:
        lm.tokenizer.save_pretrained(tmp)
    text_cfg = lm.model.get_base_model().config.get_text_config()
    vocab = {"base_vocab": lm.base_vocab, "vocab": text_cfg.vocab_size, "latent_ids": lm.latent_ids}
    write_json(os.path.join(run_dir, "vocab.json"), vocab)
