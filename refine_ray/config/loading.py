"""Loading an experiment's configuration: YAML files with ``defaults`` includes, dotted overrides,
key and type checks (:func:`from_dict`), value checks (:func:`validate_config`) and ``to_dict``."""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from refine_ray.config.sections import ConfigError, ExperimentConfig, PathMarker


# Keys that older configs may still set: one line saying what became of them.
_MOVED_KEYS = {
    "refine.sampling": "renamed to refine.cut_strategy (how cut positions are drawn)",
    **{f"{role}.enabled": f"removed: the {role} role always runs (only reference.enabled switches a role off)"
       for role in ("scorer", "rollout", "reward")},
}



def upgrade_stored_config(raw: dict) -> dict:
    """A run config that an earlier refine-ray wrote (a run's ``config.json``, a checkpoint's
    ``trainer.json``), in today's keys: ``refine.sampling`` becomes ``refine.cut_strategy`` and the
    ``enabled`` flag of the scorer, rollout and reward roles (which always run) is dropped.

    Only for configs the program wrote itself, so that old runs still export and resume; a user's
    YAML with an old key still stops with the one line of ``_MOVED_KEYS``. Returns a new dict."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    refine = out.get("refine")
    if isinstance(refine, dict) and "sampling" in refine and "cut_strategy" not in refine:
        refine["cut_strategy"] = refine.pop("sampling")
    for role in ("scorer", "rollout", "reward"):
        if isinstance(out.get(role), dict):
            out[role].pop("enabled", None)
    return out


# ---------------------------------------------------------------- loading

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML file (or the defaults when None) with its ``defaults``, apply ``a.b=c`` overrides, validate.

    Values of overrides are parsed as YAML (``optim.lr=2e-5``, ``learner.resources.refine_learner=1``,
    ``data.path=[a.parquet, b.parquet]``). Raises :class:`ConfigError` (one line naming the file or
    the dotted key) for a missing or invalid file, an include cycle, an unknown key or a bad value.
    """
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key.path=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    cfg = from_dict(ExperimentConfig, raw, "")
    validate_config(cfg, "")
    return cfg


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of one YAML config with its ``defaults`` merged in (not yet typed or validated).

    ``defaults`` is a list of YAML files (or one), relative to the including file, read in order;
    later ones override earlier ones and the file's own keys override them all. A missing file, an
    include cycle or a non-mapping top level raises :class:`ConfigError` naming the file.
    """
    path = Path(path)
    including = f" (in defaults of '{_chain[-1]}')" if _chain else ""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist{including}")
    if path.resolve() in [p.resolve() for p in _chain]:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"config file '{path}': defaults include it again ({cycle})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}': not valid YAML ({first})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}': expected a mapping at the top level")
    includes = raw.pop("defaults", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError(f"config file '{path}': defaults: expected a list of YAML file paths, got {includes!r}")
    merged: dict[str, Any] = {}
    for include in includes:
        merged = _merge(merged, read_config_file(path.parent / include, (*_chain, path)))
    return _merge(merged, raw)


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, any other value replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[:i + 1])}' is not a section")
        node = nxt
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, key: str):
    """Build dataclass ``cls`` from a mapping, checking keys and types (not values: see validate_config).

    ``key`` is the dotted path of ``raw`` ("" for the top level), used in messages. Raises
    :class:`ConfigError` for an unknown key (with the closest field, or what became of a renamed or
    removed one) or a value of the wrong type.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        dotted = f"{key}.{name}" if key else str(name)
        if name not in names:
            if dotted in _MOVED_KEYS:
                raise ConfigError(f"config key '{dotted}': {_MOVED_KEYS[dotted]}")
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(sorted(names))})"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        kwargs[name] = _coerce(hints[name], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key)
        for option in inner:                  # e.g. a path or a list of paths: the first that fits
            try:
                return _coerce(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_describe(a) for a in inner)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is dict:                     # custom resources: name -> amount
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, f"{key} (a name)"): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if value < 0:                       # every integer field is a count, size or seed
            raise ConfigError(f"{key}: {value} must be >= 0")
        return value
    if tp is float:
        if isinstance(value, str):          # YAML 1.1 reads "2e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value} is not a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")  # pragma: no cover - programming error


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return "a list of strings" if typing.get_args(tp)[0] is str else f"a list of {typing.get_args(tp)[0]}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def validate_config(obj: Any, key: str) -> None:
    """Run ``validate`` of every nested section (innermost first), then of ``obj``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate_config(value, f"{key}.{f.name}" if key else f.name)
    if hasattr(obj, "validate"):
        obj.validate(key)


def path_fields(cfg: Any, output: bool | None = None, _key: str = "") -> dict[str, str | list[str]]:
    """Every set path-typed field of ``cfg`` (annotated ``InputPath``/``OutputPath`` in
    :mod:`refine_ray.config.sections`), found from the types: dotted key -> value (a string, or a list
    for fields such as ``data.path``); fields left ``None`` are omitted.

    ``output``: None lists all, True only the directories the run writes, False only what it reads.
    """
    out: dict[str, str | list[str]] = {}
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        dotted = f"{_key}.{f.name}" if _key else f.name
        if dataclasses.is_dataclass(value):
            out.update(path_fields(value, output, dotted))
            continue
        marker = _path_marker(hints[f.name])
        if value is not None and marker is not None and (output is None or marker.output == output):
            out[dotted] = value
    return out


def _path_marker(tp: Any) -> PathMarker | None:
    """The PathMarker anywhere in a field's annotation (``Optional[Union[InputPath, list[InputPath]]]``)."""
    if typing.get_origin(tp) is typing.Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, PathMarker)), None)
    return next((m for m in map(_path_marker, typing.get_args(tp)) if m is not None), None)


def to_dict(cfg: Any) -> dict:
    """The config as plain JSON-able dicts and lists (what a run's config.json holds)."""
    return dataclasses.asdict(cfg)
