"""The one config loader: typed dataclass sections filled from YAML, then ``key=value``
command-line overrides (dotted paths: ``optim.blr=1e-4 data.batch_size=64``). Unknown keys are
an error naming the key; values are converted to the field's type. Floats must be finite (NaN or
inf in a config is never meant: ``optim.lr=nan`` reached torch as "Invalid learning rate: nan"),
and a fixed-length tuple (``optim.betas``) must have exactly its length."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config file or override (one line)."""


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # `float | None`: the float's own error says more than "does not fit"
            return _convert(value, candidates[0], where)
        for a in candidates:
            try:
                return _convert(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: exactly two
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({list(value)!r})")
            return tuple(_convert(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [_convert(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if isinstance(value, bool) and tp is not str:
                raise ValueError
            if tp is int and isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            out = tp(value)  # PyYAML reads "1e-4" as a string: float("1e-4") converts it
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is float and not math.isfinite(out):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return out
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {(where + '.' if where else '') + unknown[0]}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set(tree: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value != "" else ""


def load(cls, path: str | None = None, overrides: list[str] = ()):
    """``cls`` filled from the YAML file (if any), then the ``key=value`` overrides."""
    tree: dict = {}
    if path:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        _set(tree, key.strip(), value)
    return from_dict(cls, tree)


def non_finite_values(cfg):
    """``section.key must be a finite number`` for every NaN / inf float of a sectioned config
    (configs built in Python skip the loader's own check)."""
    import dataclasses
    import math

    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if any(isinstance(v, float) and not math.isfinite(v)
                   for v in (value if isinstance(value, (tuple, list)) else (value,))):
                yield f"{section.name}.{f.name} must be a finite number, got {value!r}"
