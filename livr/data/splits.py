"""The run's data: train/val/test rows for the configured tasks, from synthetic data, the hub or a directory."""
from __future__ import annotations

import hashlib
import json
import os

import datasets

from livr.data.blink import load_blink
from livr.data.loader import Rows
from livr.data.synthetic import make_synthetic


def synthetic_dir(cfg) -> str:
    d = cfg.data
    key = json.dumps([d.train_size, d.val_size, d.test_size, d.seed, d.image_size, d.options], sort_keys=True)
    return os.path.join(os.path.expanduser(d.cache_dir), "synthetic-" + hashlib.sha1(key.encode()).hexdigest()[:10])


def load_splits(cfg, progress: bool = False, only: list[str] | None = None) -> dict[str, Rows]:
    """{"train"|"val"|"test": rows}; splits named in cfg.data map onto these keys, tasks concatenated.
    The test split loads from cfg.data.test_source when set (e.g. train on a local dir, test on hub BLINK val).
    Rows stay in their memory-mapped Arrow tables (`Rows`): an image is decoded only when its row is read."""
    d = cfg.data
    names = {"train": d.train_split, "val": d.val_split, "test": d.test_split}
    sizes = {"train": d.train_size, "val": d.val_size, "test": d.test_size}
    out: dict[str, list] = {k: [] for k in names}
    source_of = {k: (d.test_source or d.source) if k == "test" else d.source for k in names}
    by_source: dict[str, list[str]] = {}
    for key in only or list(names):
        by_source.setdefault(source_of[key], []).append(key)
    for source, keys in by_source.items():
        if source == "synthetic":  # every synthetic split at once (one cached request per task)
            root = synthetic_dir(cfg)
            gen = {names[k]: sizes[k] for k in names if source_of[k] == "synthetic"}
            paths = make_synthetic(root, d.tasks, gen, seed=d.seed,
                                   image_size=d.image_size, progress=progress, **d.options)
            for task in d.tasks:
                dd = datasets.load_from_disk(paths[task])
                for key in keys:
                    out[key].append(dd[names[key]])
            continue
        for task in d.tasks:
            for key in keys:
                out[key].append(load_blink(task, names[key], source, limit=sizes[key] or None))
    return {k: Rows(parts) for k, parts in out.items()}
