"""`tune.search_space` parsed and validated against the config tree (`parse_space`), Tune's param_space from it, and
a trial's config from a sampled point (`apply_params`, `trial_config`). Every error is one line naming the key."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from ray import tune

from livr.config import Config, ConfigError, flatten, from_dict, to_dict

KINDS = ("grid", "choice", "loguniform", "uniform", "randint")
NOT_SEARCHABLE = ("name", "output_dir")  # and everything under tune.


@dataclass
class Dim:
    key: str  # as written in tune.search_space (may name several comma-separated config keys)
    keys: list[str]
    kind: str
    values: list  # grid/choice: the values; distributions: [lo, hi]


def _err(key: str, why: str) -> ConfigError:
    return ConfigError(f"config: tune.search_space['{key}']: {why}")


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree[p]
    tree[leaf] = value


def _plain(v):
    """numpy scalars (Tune's samplers) -> Python values, so the typed config accepts them."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def apply_params(base: dict, params: dict) -> dict:
    """A config dict with the sampled `params` (search-space keys -> values) set."""
    out = copy.deepcopy(base)
    for key, value in params.items():
        keys = [k.strip() for k in key.split(",")]
        values = json.loads(value) if len(keys) > 1 and isinstance(value, str) else ([value] if len(keys) == 1 else value)
        for k, v in zip(keys, values):
            _set(out, k, _plain(v))
    return out


def _number(v):
    if isinstance(v, str):
        try:
            return int(v) if v.strip().lstrip("+-").isdigit() else float(v)
        except ValueError:
            return v
    return v


def parse_space(cfg: Config) -> list[Dim]:
    """Validate `tune.search_space` against the config tree; every error is one line naming the key."""
    space = cfg.tune.search_space
    if not isinstance(space, dict) or not space:
        raise ConfigError("config: tune.search_space must be a non-empty mapping of config keys to distributions")
    base = to_dict(cfg)
    leaves = flatten(base)
    dims = []
    for key, spec in space.items():
        keys = [k.strip() for k in str(key).split(",")]
        for k in keys:
            if k not in leaves:
                raise _err(key, f"'{k}' is not a config key (e.g. latents.num_latents, optim.lr, lora.r)")
            if k in NOT_SEARCHABLE or k.startswith("tune."):
                raise _err(key, f"'{k}' cannot be searched")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise _err(key, f"must be one of {{grid: [...]}}, {{choice: [...]}}, {{loguniform|uniform|randint: [lo, hi]}}; got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, (list, tuple)) or not values:
            raise _err(key, f"{kind} needs a non-empty list, got {values!r}")
        values = list(values)
        if kind in ("grid", "choice"):
            if len(keys) > 1 and any(not isinstance(v, (list, tuple)) or len(v) != len(keys) for v in values):
                raise _err(key, f"each {kind} value must be a list of {len(keys)} values (one per key), got {values!r}")
            numeric = [isinstance(leaves[k], (int, float)) and not isinstance(leaves[k], bool) for k in keys]
            rows = [list(v) if len(keys) > 1 else [v] for v in values]  # YAML 1.1 reads 1e-5 as a string:
            rows = [[_number(x) if n else x for x, n in zip(row, numeric)] for row in rows]  # numbers for numbers
            values = rows if len(keys) > 1 else [row[0] for row in rows]
            candidates = [list(v) if len(keys) > 1 else [v] for v in values]
        else:
            if len(keys) > 1:
                raise _err(key, "several keys can only be searched together with grid or choice")
            values = [_number(v) for v in values]  # YAML 1.1 reads 1e-5 as a string
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise _err(key, f"{kind} needs [lo, hi] (two numbers), got {values!r}")
            lo, hi = values
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise _err(key, f"randint needs integer bounds, got {values!r}")
            if not lo < hi:
                raise _err(key, f"{kind} needs lo < hi, got {values!r}")
            if kind == "loguniform" and lo <= 0:
                raise _err(key, f"loguniform needs lo > 0, got {values!r}")
            candidates = [[lo], [hi]]
        for cand in candidates:  # every value must make a valid config
            try:
                from_dict(apply_params(base, {k: v for k, v in zip(keys, cand)}))
            except ConfigError as e:
                raise _err(key, str(e).removeprefix("config: ")) from None
        dims.append(Dim(str(key), keys, kind, values))
    return dims


def param_space(dims: list[Dim], searcher: str) -> dict:
    """Tune's param_space: grid -> grid_search (a categorical under Optuna), several keys -> JSON strings."""
    out = {}
    for d in dims:
        vals = [json.dumps(list(v)) for v in d.values] if len(d.keys) > 1 else d.values
        if d.kind == "grid" and searcher != "optuna":
            out[d.key] = tune.grid_search(vals)
        elif d.kind in ("grid", "choice"):
            out[d.key] = tune.choice(vals)
        elif d.kind == "loguniform":
            out[d.key] = tune.loguniform(*d.values)
        elif d.kind == "uniform":
            out[d.key] = tune.uniform(*d.values)
        else:
            out[d.key] = tune.randint(d.values[0], d.values[1] + 1)  # Ray's upper bound is exclusive
    return out


def expected_trials(cfg: Config, dims: list[Dim]) -> int:
    n = cfg.tune.num_samples
    if cfg.tune.searcher != "optuna":
        for d in dims:
            n *= len(d.values) if d.kind == "grid" else 1
    return n


def trial_config(setup: dict, params: dict, trial_id: str) -> Config:
    d = apply_params(setup["base"], params)
    d["name"], d["output_dir"] = f"trial_{trial_id}", setup["sweep_dir"]
    d["tracking"]["run_name"] = f"{setup['sweep_name']}/trial_{trial_id}"
    d["distributed"]["num_workers"] = setup["workers"]
    return from_dict(d)
