"""Hugging Face hub ids in ``model.path``, ``tokenizer.path``, ``data.path`` and ``train.val_path``.

A value that names no local path and reads as a hub id (``org/name``) is fetched once, in the
driver, into the Hugging Face cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``) with
``huggingface_hub.snapshot_download``, and replaced by the local snapshot's path, so every Ray
actor reads local files and none downloads:

  * ``model.path``: the model repository (weights in other frameworks' formats left out);
  * ``tokenizer.path``: the model repository without weight files;
  * ``data.path`` / ``train.val_path``: the dataset repository's parquet/jsonl/json/txt files;
    the value becomes the files of its ``train`` split (or its only split), found by
    ``datasets``' own split rules (``datasets.data_files.get_data_patterns``).

The run's ``config.json`` records the snapshot paths, which hold the commit hash of what was read.
Offline (``HF_HUB_OFFLINE=1``, as ``scripts/env.sh`` and the tests set it) a snapshot already in
the cache is used (what a user who downloaded earlier gets); otherwise one line says which id
to download and how. The rule for telling ids from paths is :func:`is_hub_id`; a missing local
path that is not an id keeps its "does not exist" error from the path checks.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from refine_ray.config.sections import ConfigError

log = logging.getLogger("refine_ray")

# The fields that accept hub ids, and the repository each names.
HUB_FIELDS = {"model.path": "model", "tokenizer.path": "tokenizer", "data.path": "dataset",
              "train.val_path": "dataset"}
# Files that are weights for other frameworks (never read here) or, for a tokenizer, any weights.
_OTHER_WEIGHTS = ["*.msgpack", "*.h5", "*.ckpt", "*.onnx", "*.gguf", "*.tflite", "*.ot"]
_WEIGHTS = ["*.safetensors", "*.bin", "*.pt", "*.pth", *_OTHER_WEIGHTS]
# huggingface_hub's repo-id characters, as org/name: each part 1-96 characters, no '--' or '..'.
_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
# A value ending like a file is a path even when it has the id's shape ("data/train.parquet").
_FILE_SUFFIXES = {".parquet", ".jsonl", ".json", ".txt", ".csv", ".arrow", ".safetensors", ".bin", ".pt", ".pth",
                  ".yaml", ".yml", ".gz", ".zst"}


class HubError(ConfigError):
    """A hub id that cannot be resolved here; the message is one line naming the field and the id."""


def is_hub_id(value: Any) -> bool:
    """Whether ``value`` reads as a Hugging Face hub id rather than a local path.

    True for ``org/name`` (exactly one '/', huggingface_hub's id characters, no '--' or '..')
    that names no local file or directory and does not end in a data or weights file suffix;
    False for anything else: absolute, ``./``, ``~`` or deeper paths, globs, existing paths.
    """
    if not isinstance(value, str) or not _ID.fullmatch(value) or "--" in value or ".." in value:
        return False
    if value.endswith((".", "-")) or Path(value).suffix.lower() in _FILE_SUFFIXES:
        return False
    return not Path(value).exists()


def resolve_hub_ids(cfg) -> None:
    """Replace every hub id in :data:`HUB_FIELDS` of ``cfg`` (an ExperimentConfig) by its local
    snapshot, in place (``data.path`` lists entry by entry), with one log line each.

    Raises:
        HubError: one line naming the field and the id: offline with nothing cached (which
            command downloads it), a repository that does not exist or is gated, a download
            that failed, a dataset without parquet/jsonl/json/txt files.
    """
    for key, kind in HUB_FIELDS.items():
        section, name = key.split(".")
        owner = getattr(cfg, section)
        value = getattr(owner, name)
        values = value if isinstance(value, list) else [value]
        if not any(is_hub_id(v) for v in values):
            continue
        resolved: list[str] = []
        for v in values:
            if not is_hub_id(v):
                resolved.append(v)
                continue
            local = snapshot(key, v, kind)
            log.info("%s: hub id '%s' is '%s'", key, v, local)
            resolved += dataset_files(key, v, local) if kind == "dataset" else [local]
        setattr(owner, name, resolved if isinstance(value, list) or len(resolved) > 1 else resolved[0])


def snapshot(key: str, repo_id: str, kind: str) -> str:
    """The local snapshot directory of ``repo_id`` (a ``kind`` repository, see the module docstring):
    downloaded into the HF cache when online, taken from it when offline. Raises HubError."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_type = "dataset" if kind == "dataset" else "model"
    if kind == "dataset":
        patterns = {"allow_patterns": ["*.parquet", "*.jsonl", "*.json", "*.txt"]}
    else:
        patterns = {"ignore_patterns": _WEIGHTS if kind == "tokenizer" else _OTHER_WEIGHTS}
    offline = constants.HF_HUB_OFFLINE
    cache = constants.HF_HUB_CACHE
    try:
        return snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache, local_files_only=offline,
                                 **patterns)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        gated = isinstance(e, GatedRepoError) or getattr(getattr(e, "response", None), "status_code", 0) == 401
        raise HubError(f"{key}: '{repo_id}' is not a local path, and the Hugging Face hub has no {repo_type} "
                       f"repository '{repo_id}' you can read" + (" (gated or private: log in with `hf auth login`)"
                                                                 if gated else "")) from None
    except LocalEntryNotFoundError:
        get = f"hf download {repo_id}{' --repo-type dataset' if repo_type == 'dataset' else ''}"
        why = ("this machine is offline (HF_HUB_OFFLINE=1)" if offline else
               "the hub could not be reached (no connection?)")
        raise HubError(f"{key}: '{repo_id}' is not a local path, and as a Hugging Face hub id it is not in the "
                       f"cache '{cache}' and {why}: download it with `{get} --cache-dir {cache}` where the hub is "
                       f"reachable, or run online with HF_HUB_OFFLINE=0; or `{get} --local-dir DIR` and set "
                       f"{key}=DIR") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise HubError(f"{key}: '{repo_id}' is not a local path, and downloading it from the Hugging Face "
                       f"hub failed ({reason})") from None


def dataset_files(key: str, repo_id: str, local: str) -> list[str]:
    """The data files of a dataset snapshot's ``train`` split (or its only split), sorted, as datasets
    splits a repository (``get_data_patterns``); only parquet/jsonl/json/txt. Raises HubError."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    suffixes = [".parquet", ".jsonl", ".json", ".txt"]
    try:
        splits = DataFilesDict.from_patterns(get_data_patterns(local), base_path=local, allowed_extensions=suffixes)
    except (EmptyDatasetError, FileNotFoundError):
        splits = {}
    files = splits.get("train") or (next(iter(splits.values())) if len(splits) == 1 else None)
    if not files:
        found = ", ".join(sorted(str(s) for s in splits)) or "no parquet/jsonl/json/txt files"
        raise HubError(f"{key}: hub dataset '{repo_id}' ({local}) has no 'train' split of parquet/jsonl/json/txt "
                       f"files (found: {found})")
    return sorted(str(f) for f in files)
