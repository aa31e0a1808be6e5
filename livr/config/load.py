"""Building a Config from YAML and `key=value` overrides, and writing it back (`load_config`, `save_config`)."""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

import yaml

from livr.config.checks import check_paths, validate
from livr.config.schema import Config, ConfigError


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # a single value given for a list
            value = [value]
        if isinstance(value, (list, tuple)):
            return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif tp is dict and isinstance(value, dict):
        return dict(value)
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config: {key} must be {name}, got {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config: {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"config: unknown key '{prefix}{key}' (valid under {prefix.rstrip('.') or 'the root'}: {', '.join(names)})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(prefix + key, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config: '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def _declared_type(dotted: str) -> Any:
    """The declared type of a dotted Config key (`train.mode` -> str), or None for an unknown key."""
    cls: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(part)
    return cls


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=1", "c=[x, y]"]` -> nested dict; values are parsed as YAML scalars/lists, except for a str-typed key,
    which keeps the text as typed (`name=off`, `name=null`, `name=1e3`; a quoted YAML string loses its quotes)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config: override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if _declared_type(key.strip()) is str and not isinstance(value, str):
            value = raw  # YAML 1.1 would make off/yes a bool, null None, 0x10 an int, 1.50 the float 1.5
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        replace = k == "search_space"  # a given search space replaces the default one (no merged dimensions)
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and not replace else v
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """A validated Config from a (partial) dict. Touches no file: Ray workers and Tune trials build theirs here."""
    cfg = _build(Config, _merge(to_dict(Config()), data))
    return validate(cfg)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config: file not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a mapping at the top level")
    return check_paths(from_dict(_merge(data, parse_overrides(overrides or []))))


def save_config(cfg: Config, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": v}; used for MLflow params and search-space keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not (prefix + k).endswith(("options", "search_space")):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
