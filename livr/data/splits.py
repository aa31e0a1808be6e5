"""The run's data: train/val/test rows for the configured tasks, from synthetic data, the hub or a directory."""
from __future__ import annotations

import hashlib
import json
import os

import datasets

from livr.data.blink import load_blink
from livr.data.synthetic import make_synthetic


def synthetic_dir(cfg) -> str:
    d = cfg.data
    key = json.dumps([d.train_size, d.val_size, d.test_size, d.seed, d.image_size, d.options], sort_keys=True)
    return os.path.join(os.path.expanduser(d.cache_dir), "synthetic-" + hashlib.sha1(key.encode()).hexdigest()[:10])


def load_splits(cfg, progress: bool = False, only: list[str] | None = None) -> dict[str, list[dict]]:
    """{"train"|"val"|"test": rows}; splits named in cfg.data map onto these keys, tasks concatenated."""
    d = cfg.data
    names = {"train": d.train_split, "val": d.val_split, "test": d.test_split}
    sizes = {"train": d.train_size, "val": d.val_size, "test": d.test_size}
    out: dict[str, list[dict]] = {k: [] for k in names}
    keys = only or list(names)
    if d.source == "synthetic":
        root = synthetic_dir(cfg)
        paths = make_synthetic(root, d.tasks, {names[k]: sizes[k] for k in names}, seed=d.seed,
                               image_size=d.image_size, progress=progress, **d.options)
        for task in d.tasks:
            dd = datasets.load_from_disk(paths[task])
            for key in keys:
                out[key].extend(dd[names[key]])
        return out
    for task in d.tasks:
        for key in keys:
            ds = load_blink(task, names[key], d.source, limit=sizes[key] or None)
            out[key].extend(ds)
    return out
