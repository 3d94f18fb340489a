"""Typed configs from YAML recipes plus dotted command-line overrides.

We use OmegaConf structured configs: the schema *is* our dataclasses (no second schema
language), it merges a YAML file with ``key.sub=value`` overrides, and it rejects unknown
keys and wrong types while naming the full dotted key. OmegaConf does not know our value
ranges, so after merging we build the dataclasses ourselves, bottom-up, which runs each
``__post_init__`` and lets us prefix its error with the dotted path of the section.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill_common.errors import DistillUserError

T = TypeVar("T")


class ConfigError(DistillUserError, ValueError):
    """A recipe or override that cannot be used; the message names file, key and fix."""


class FieldError(ValueError):
    """Raised from ``__post_init__``: ``field`` is relative to the dataclass raising it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check(condition: bool, field: str, message: str) -> None:
    """``check(x > 0, "steps", "must be > 0, got 0")`` -> FieldError when false."""
    if not condition:
        raise FieldError(field, message)


def check_choice(value: Any, field: str, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise FieldError(field, f"must be one of {list(choices)}, got {value!r}")


def _describe_omegaconf_error(err: OmegaConfBaseException) -> str:
    full_key = getattr(err, "full_key", None)
    msg = str(err).split("\n")[0]
    if "not in" in msg and "Key" in msg:
        msg = f"unknown key ({msg}); check the spelling against `distill config show`"
    return f"{full_key}: {msg}" if full_key else msg


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _build(cls: type[T], data: Any, prefix: str) -> T:
    """Instantiate dataclass ``cls`` from plain containers, nested first."""
    kwargs = {}
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in data:
            continue
        value = data[f.name]
        tp = _unwrap_optional(hints[f.name])
        key = f"{prefix}.{f.name}" if prefix else f.name
        if value is not None and dataclasses.is_dataclass(tp):
            value = _build(tp, value, key)
        elif value is not None and typing.get_origin(tp) in (list, tuple):
            (item_tp,) = typing.get_args(tp)[:1]
            if dataclasses.is_dataclass(item_tp):
                value = [_build(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        elif value is not None and typing.get_origin(tp) is dict:
            args = typing.get_args(tp)
            if len(args) == 2 and dataclasses.is_dataclass(args[1]):
                value = {k: _build(args[1], v, f"{key}.{k}") for k, v in value.items()}
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except FieldError as err:
        where = f"{prefix}.{err.field}" if prefix else err.field
        raise ConfigError(f"{where}: {err.message}") from None
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{prefix or '<root>'}: {err}") from None


def load_config(schema: type[T], path: str | Path | None = None,
                overrides: Sequence[str] = (), section: str = "") -> T:
    """YAML file (optional) + dotted overrides -> validated dataclass tree.

    Raises ConfigError naming the file (or the command line), the dotted key and what is
    allowed. ``section``: the recipe section the schema is (``finetune``), named in the
    keys of errors as the user wrote them (``finetune.epochs``).
    """
    source = str(path) if path else "command line" if overrides else "<defaults>"
    try:
        merged = OmegaConf.structured(schema)
    except OmegaConfBaseException as err:  # a bug in our schema, not the user's input
        raise TypeError(f"bad config schema {schema.__name__}: {err}") from err
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: recipe file not found; pass a path to a YAML recipe "
                              f"(see the configs/ folder)")
        try:
            loaded = OmegaConf.load(p)
        except Exception as err:  # yaml.YAMLError and friends
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{p}: a recipe must be a YAML mapping at the top level")
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{p}: {_describe_omegaconf_error(err)}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key.sub=value")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line override: {_describe_omegaconf_error(err)}") from None
    try:
        data = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_describe_omegaconf_error(err)}") from None
    try:
        return _build(schema, data, section)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config tree (for manifests, checkpoints and fingerprints)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


__all__ = ["ConfigError", "FieldError", "check", "check_choice", "load_config", "to_dict",
           "to_yaml", "ListConfig"]
