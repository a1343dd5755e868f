"""Loading an experiment's configuration: YAML files with ``defaults`` includes, dotted overrides,
key and type checks (:func:`from_dict`), value checks (:func:`validate_config`) and ``to_dict``."""
from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml

from refine_ray.config.sections import ConfigError, ExperimentConfig, ModelConfig, PathMarker


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

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: str | Path | None = None, hub: bool = False) -> ExperimentConfig:
    """Read a YAML file (or the defaults when None) with its ``defaults``, apply ``a.b=c`` overrides, validate.

    Values of overrides are parsed as YAML (``optim.lr=2e-5``, ``learner.resources.refine_learner=1``,
    ``data.path=[a.parquet, b.parquet]``). Relative paths in path-typed fields, from the file or an
    override, name paths from ``base`` (default: the working directory) and are made absolute
    (:func:`resolve_paths`); ``defaults`` includes are files of the config, relative to the file
    that names them. With ``model.path`` set, the model's type and sizes come from its
    ``config.json`` (:func:`model_from_checkpoint`). With ``hub`` (what ``refine-ray train``, the
    driver, asks), Hugging Face hub ids in ``model.path``, ``tokenizer.path``, ``data.path`` and
    ``train.val_path`` are replaced by their local snapshots, downloaded once when online
    (:mod:`refine_ray.config.hub`); without it they stay as written (``submit_job`` sends them to the
    cluster so). Raises :class:`ConfigError` (one line naming the file or the dotted key) for a
    missing or invalid file, an include cycle, an unknown key, a bad value, a model field that
    contradicts the checkpoint, or a hub id that cannot be had (``hub.HubError``).
    """
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key.path=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    cfg = from_dict(ExperimentConfig, raw, "")
    resolve_paths(cfg, base)
    if hub:
        from refine_ray.config.hub import resolve_hub_ids

        resolve_hub_ids(cfg)
    model_from_checkpoint(cfg.model, set(raw.get("model") or ()))
    validate_config(cfg, "")
    return cfg


# model.<field> <- the checkpoint config.json keys holding it; num_heads as the family presets alias
# it (refine_ray.models.registry): fla's num_heads, LaCT's num_attn_heads, Llama's num_attention_heads.
_CHECKPOINT_KEYS = {"type": ("model_type",), "hidden_size": ("hidden_size",),
                    "num_hidden_layers": ("num_hidden_layers",),
                    "num_heads": ("num_heads", "num_attn_heads", "num_attention_heads")}


def model_from_checkpoint(model: ModelConfig, given: set[str]) -> None:
    """With ``model.path`` set, its ``config.json`` is the truth for ``model.type`` and the size fields
    (hidden_size, num_hidden_layers, num_heads): they are set from it in place, so the run's
    ``config.json`` records the model that trains. A field in ``given`` (the keys the config's
    ``model`` section sets, in its files or overrides) that contradicts the checkpoint raises
    :class:`ConfigError` naming both values; defaults never do.

    Reads only that JSON file; a missing or unreadable one, or values of the wrong type or an
    unknown ``model_type``, are left to preflight's ``check_model``, which names the problem.
    """
    from refine_ray.models.registry import MODEL_TYPES   # torch-free

    if model.path is None:
        return
    file = Path(model.path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return
    if not isinstance(raw, dict):
        return
    for name, keys in _CHECKPOINT_KEYS.items():
        key = next((k for k in keys if k in raw), None)
        value = raw.get(key)
        if name == "type" and value not in MODEL_TYPES:
            continue
        if name != "type" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            continue
        if name in given and getattr(model, name) != value:
            raise ConfigError(f"model.{name}: {getattr(model, name)!r} contradicts model.path's checkpoint "
                              f"('{file}' has {key}={value!r}); leave model.{name} unset to use the checkpoint's")
        setattr(model, name, value)


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


def path_fields(cfg: Any, output: bool | None = None) -> dict[str, str | list[str]]:
    """Every set path-typed field of ``cfg`` (annotated ``InputPath``/``OutputPath`` in
    :mod:`refine_ray.config.sections`), found from the types: dotted key -> value (a string, or a list
    for fields such as ``data.path``); fields left ``None`` are omitted.

    ``output``: None lists all, True only the directories the run writes, False only what it reads.
    """
    return {dotted: getattr(owner, name) for owner, name, dotted, marker in _path_slots(cfg)
            if getattr(owner, name) is not None and (output is None or marker.output == output)}


def resolve_paths(cfg: Any, base: str | Path | None = None) -> None:
    """Make ``cfg``'s path-typed fields absolute against ``base`` (default: the working directory),
    in place: the rule that a relative path on the command line or in a config file names a path
    from the directory the user runs in, whichever process (a Ray actor, a cluster job) reads it.

    Output directories are always made absolute; inputs only when they name something under
    ``base`` (:func:`resolve_input_path`), so a Hugging Face hub id or a missing file stays as written.
    """
    base = Path.cwd() if base is None else Path(base)
    for owner, name, _, marker in _path_slots(cfg):
        value = getattr(owner, name)
        if value is None:
            continue
        fix = ((lambda v: os.path.abspath(base / Path(v).expanduser())) if marker.output else
               (lambda v: resolve_input_path(v, base)))
        setattr(owner, name, [fix(v) for v in value] if isinstance(value, list) else fix(value))


def resolve_input_path(value: str, base: str | Path) -> str:
    """``value`` as an absolute path when it names an existing file or directory under ``base`` (or is
    a glob matching one there), else ``value`` unchanged (absolute already, a hub id, or missing:
    the error about it then names it as the user wrote it). ``~`` is expanded."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = Path(base) / path
    if candidate.exists() or (any(c in value for c in "*?[") and glob.glob(str(candidate))):
        return os.path.abspath(candidate)
    return value


def _path_slots(cfg: Any, key: str = "") -> Iterator[tuple[Any, str, str, PathMarker]]:
    """(section object, field name, dotted key, marker) of every path-typed field, nested sections included."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        dotted = f"{key}.{f.name}" if key else f.name
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            yield from _path_slots(getattr(cfg, f.name), dotted)
        elif (marker := _path_marker(hints[f.name])) is not None:
            yield cfg, f.name, dotted, marker


def _path_marker(tp: Any) -> PathMarker | None:
    """The PathMarker anywhere in a field's annotation (``Optional[Union[InputPath, list[InputPath]]]``)."""
    if typing.get_origin(tp) is typing.Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, PathMarker)), None)
    return next((m for m in map(_path_marker, typing.get_args(tp)) if m is not None), None)


def to_dict(cfg: Any) -> dict:
    """The config as plain JSON-able dicts and lists (what a run's config.json holds)."""
    return dataclasses.asdict(cfg)
