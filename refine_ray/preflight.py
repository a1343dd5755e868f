"""Check a training job's inputs in the driver process, before Ray or any actor starts.

    report = preflight(cfg)      # raises ConfigError / DataError / PreflightError, one line each

Every input an actor would read is opened here first, so a bad input stops the
job with one line naming the key or file and what was expected, instead of a
``RayTaskError`` traceback from inside an actor (and before the output
directory, its ``config.json`` or a checkpoint is touched). Checked, cheapest first:

  * the output directory can be written (:func:`check_writable`: probed with a
    temporary file, so read-only filesystems, ``/proc``, ``/sys`` and a file where a
    parent directory should be are caught also as root);
  * the files it reads exist (:func:`check_paths`);
  * the output directory: not an existing file; a resume pointer
    (``checkpoints/latest``) that names a complete, loadable checkpoint written with this
    ``learner.zero_stage`` (and, from ZeRO 1-3, ``learner.num_ranks``);
  * (only now are torch, fla and Ray imported: the checks above take about a second)
  * the layout's CPUs/GPUs fit the declared local cluster
    (:func:`refine_ray.system.placement.check_resources`);
  * ``model.dtype=bfloat16`` only where every role running the model gets a CUDA GPU
    (:func:`check_dtype`; never a silent float32 run on CPU);
  * ``data.max_length`` leaves room for ``refine.n_chunks`` cuts of
    ``refine.response_length`` tokens after ``refine.min_prefix``;
  * the tokenizer loads;
  * the model: ``model.path`` holds a ``config.json`` with a supported
    ``model_type``, weights, and a vocabulary that covers the tokenizer; its
    safetensors files are complete and hold the shapes its config builds
    (:func:`check_weights`), every weight finite (:func:`check_finite_weights`); a random
    ``model.type`` has its classes importable and its config builds;
  * the corpus: readable, the text column present, every value text, not all
    empty, post-training answers (``data.answer_column``) usable and non-empty
    after tokenisation, and at least one document long enough (the rule of the
    driver's :class:`~refine_ray.data.DataCursor`);
  * the held-out documents (``train.val_path``): readable, and at least one of the first
    ``train.val_docs`` long enough for ``train.val_cuts`` fixed cuts (:func:`check_validation`).

An answer that tokenises to nothing is an error, not a skipped row: like an empty
answer list it is a broken label (the task SFT would train on no target), while a
short document is ordinary data that the cursor skips and counts.

Weights are not loaded into a model: safetensors headers give the shapes, the model is
built on the meta device, and the tensors are streamed once, one at a time, for NaN/inf;
the corpus is memory-mapped and its token counts come from the
index cached per (file contents, tokenizer) (refine_ray.data), so after the first start
the check reads no text (docs/performance.md, "Data at corpus scale").
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from refine_ray.transport import checkpoint as ckpt
from refine_ray.system import run_dir
from refine_ray.config import ConfigError, ExperimentConfig, resolve_input_path, to_dict
from refine_ray.data import Corpus, DataCursor, DataError, data_files, load_tokenizer
from refine_ray.models import registry

__all__ = ["PreflightError", "PreflightReport", "check_writable", "preflight"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class PreflightError(ValueError):
    """A bad output directory or checkpoint; the message is one line naming the path."""


@dataclass
class PreflightReport:
    """What preflight learned and the run reuses: the tokenizer, its size, corpus lengths, the checkpoint to resume."""
    tokenizer: object
    vocab_size: int             # len(tokenizer)
    rows: int                   # documents in the corpus
    usable: int                 # documents with at least ``min_tokens`` tokens
    min_tokens: int
    resume_from: object = None  # Path of the checkpoint a resume would load, or None
    lengths: object = None      # token count per corpus row (the driver's data cursor reuses it)


def error_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type name."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


ARCHITECTURE_KEYS = ("type", "path", "hidden_size", "num_hidden_layers", "num_heads")


def check_output(cfg: ExperimentConfig):
    """The output dir may be used as asked (one run per directory, ``refine_ray.system.run_dir``); a
    checkpoint to resume from is complete, matches its manifest and was written for this
    architecture. Returns that checkpoint, or None for a fresh start."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise PreflightError(f"train.output_dir: '{out}' exists and is not a directory")
    key = "train.resume_from" if cfg.train.resume_from else "train.resume"
    try:
        path = run_dir.plan_start(cfg).resume_from
        if path is None:
            return None
        ckpt.verify_checkpoint(path)
        state = ckpt.load_trainer_state(path)
    except run_dir.RunDirError as e:
        raise PreflightError(str(e)) from None
    except ckpt.CheckpointError as e:          # already one line, with the way out: keep it whole
        raise PreflightError(f"{key}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PreflightError(f"{key}: {error_line(e)}") from None
    if not (path / "learner").is_dir():
        raise PreflightError(f"{key}: checkpoint '{path}' has no learner/ directory (incomplete checkpoint)")
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    then, now = dict(saved.get("model", {})), to_dict(cfg)["model"]
    was_tok = saved.get("tokenizer", {}).get("path")
    # runs written before paths were made absolute at load time stored them relative to the working directory
    if isinstance(then.get("path"), str):
        then["path"] = resolve_input_path(then["path"], Path.cwd())
    if isinstance(was_tok, str):
        was_tok = resolve_input_path(was_tok, Path.cwd())
    differ = [k for k in ARCHITECTURE_KEYS if k in then and then[k] != now[k]]
    if was_tok != cfg.tokenizer.path and "tokenizer" in saved:
        differ.append("tokenizer.path")
    if differ:
        k = differ[0]
        was = was_tok if k == "tokenizer.path" else then[k]
        is_ = cfg.tokenizer.path if k == "tokenizer.path" else now[k]
        name = k if k == "tokenizer.path" else f"model.{k}"
        raise PreflightError(f"{key}: checkpoint '{path}' was written with {name}={was!r}, this config has "
                             f"{is_!r}; resume with the run's settings or pick another train.output_dir")
    check_learner_layout(saved.get("learner"), cfg, key, path)
    return path


def check_learner_layout(then, cfg: ExperimentConfig, key: str, path: Path) -> None:
    """A DeepSpeed checkpoint loads only into the ZeRO stage, and (ZeRO 1-3: its optimizer state is
    sharded per rank) the number of ranks, that wrote it. ``then``: the checkpoint's stored
    ``learner`` section (None for a checkpoint that stored none). Converting across the change
    (DeepSpeed's universal checkpoint) is not supported. Raises PreflightError naming the field."""
    if not isinstance(then, dict):
        return
    now = cfg.learner
    for field in ("zero_stage", "num_ranks"):
        was, is_ = then.get(field), getattr(now, field)
        if was is None or was == is_ or (field == "num_ranks" and then.get("zero_stage") == now.zero_stage == 0):
            continue
        raise PreflightError(
            f"{key}: checkpoint '{path}' was written with learner.{field}={was!r}, this config has {is_!r}; its "
            f"DeepSpeed state cannot be loaded across that change (converting it is not supported). Resume with "
            f"learner.{field}={was!r}, or export its weights (`refine-ray export --from {path} --out DIR`) and start "
            f"a new run with model.path=DIR (a fresh optimizer)")


def check_writable(path: str | Path, what: str, is_dir: bool = True) -> None:
    """``path`` (a directory, or a file when ``is_dir`` is false) can be written here, without creating it.

    Probes by creating and removing a temporary file in the directory the writes
    land in: ``path`` itself when it is an existing directory, else its nearest
    existing ancestor. A probe rather than ``os.access`` because permission bits do
    not stop root, while read-only or pseudo filesystems (``/proc``, ``/sys``) do.

    Raises:
        PreflightError: one line naming ``what`` (the key or flag) and the path.
    """
    p = Path(path)
    name = f"{what} '{p}'" if what.startswith("-") else f"{what}: '{p}'"    # a flag, or a config key
    if p.exists() and is_dir and not p.is_dir():
        raise PreflightError(f"{name} exists and is not a directory")
    if p.is_dir() and not is_dir:
        raise PreflightError(f"{name} is a directory (expected a file path)")
    where = p if p.is_dir() else p.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise PreflightError(f"{name} cannot be created: '{where}' is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=where, prefix=".refine-ray-probe-"):
            pass
    except OSError as e:
        raise PreflightError(f"{name} is not writable (creating a file in '{where}' failed: "
                             f"{e.strerror or type(e).__name__})") from None
    if p.is_file() and not os.access(p, os.W_OK):
        raise PreflightError(f"{name} is not writable (the file is read-only)")


def _check_pickled_weights(d: Path) -> None:
    """``pytorch_model*.bin`` files hold nothing but tensors (globals listed by torch's scanner,
    which executes nothing); a file that pickles code is refused before any actor loads it."""
    for f in sorted(d.glob("pytorch_model*.bin")):
        try:
            unsafe = ckpt.unsafe_globals(f)
        except Exception as e:
            raise ConfigError(f"model.path: '{f}' is not a torch weights file ({error_line(e)})") from None
        if unsafe:
            raise ConfigError(f"model.path: '{f}' pickles {unsafe[0]!r}, not just tensors; refusing weights "
                              f"that could run code (convert them to safetensors)")


def check_weights(d: Path, model_type: str) -> None:
    """``model.path``'s safetensors files are complete and hold the shapes its ``config.json`` builds.

    Reads only headers (``safetensors.safe_open``, which also refuses a file shorter
    or longer than its header's data offsets say: truncated downloads) and builds the
    model on the meta device for the expected shapes. Tensors the model lacks and
    tied weights absent from the file are left to transformers (it warns); a
    ``pytorch_model.bin`` is only scanned for pickled globals (nothing unpickled).

    Raises:
        ConfigError: ``model.path: '<file>' ...`` naming the file and the first wrong tensor.
    """
    from safetensors import safe_open

    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"model.path: '{index}' is not a safetensors index ({error_line(e)})") from None
        for name in names:
            if not (d / name).is_file():
                raise ConfigError(f"model.path: '{index}' names '{name}', which does not exist")
    elif (d / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        _check_pickled_weights(d)
        check_finite_weights(d, sorted(f.name for f in d.glob("pytorch_model*.bin")))
        return
    classes = registry.family(model_type).classes()
    try:
        import torch

        with torch.device("meta"):      # shapes only: no memory, no initialisation cost
            model = classes.causal_lm(classes.config.from_pretrained(str(d)))
    except Exception as e:              # a config.json whose fields do not build the model
        raise ConfigError(f"model.path: cannot build a {model_type} model from '{d / 'config.json'}' "
                          f"({error_line(e)})") from None
    prefix = f"{model.base_model_prefix}."
    expected = {k.removeprefix(prefix): list(v.shape) for k, v in model.state_dict().items()}
    seen = 0
    for name in names:
        try:
            with safe_open(str(d / name), "pt") as f:   # header only; weights stay on disk
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:   # SafetensorError: header too small, file not fully covered; OSError
            raise ConfigError(f"model.path: '{d / name}' is not a complete safetensors file "
                              f"({error_line(e)})") from None
        for key, shape in shapes.items():
            want = expected.get(key.removeprefix(prefix))
            seen += want is not None
            if want is not None and want != shape:
                raise ConfigError(f"model.path: '{d / name}': tensor '{key}' has shape {shape} but config.json "
                                  f"builds {want} (weights and config.json are from different models)")
    if not seen:
        raise ConfigError(f"model.path: '{d}': none of its tensors is a parameter of the {model_type} model "
                          f"that config.json builds")
    check_finite_weights(d, names)


def check_finite_weights(d: Path, files: list[str]) -> None:
    """Every floating tensor in ``model.path``'s weight ``files`` is finite.

    A NaN or inf weight passes the header and shape checks, then surfaces deep inside an actor
    (cut sampling from NaN entropies). Tensors are read one at a time: safetensors memory-mapped,
    ``pytorch_model*.bin`` (already scanned for pickled code) with torch's weights-only
    unpickler; the cost is one memory-bound pass over the weights (the roles' own load then finds
    them in the page cache on this node). Raises ConfigError naming the file,
    the tensor and the count.
    """
    import torch
    from safetensors import safe_open

    from refine_ray.models.dtypes import non_finite_tensor

    for name in files:
        path = d / name
        if name.endswith(".safetensors"):
            with safe_open(str(path), "pt") as f:
                bad = non_finite_tensor((k, f.get_tensor(k)) for k in f.keys())
        else:
            bad = non_finite_tensor(torch.load(path, map_location="cpu", weights_only=True, mmap=True).items())
        if bad:
            key, count, total = bad
            raise ConfigError(f"model.path: '{path}': tensor '{key}' holds {count} non-finite value"
                              f"{'s' if count > 1 else ''} (NaN or inf) of {total}; the weights are broken, "
                              f"use another checkpoint")


def check_model(cfg: ExperimentConfig, vocab_size: int, tokenizer_name: str) -> None:
    """The model section builds (random model) or ``model.path`` is a loadable checkpoint of a registry type
    whose vocabulary covers the tokenizer's. Raises ConfigError with one line naming the field or file."""
    m = cfg.model
    if m.path is None:
        try:
            registry.tiny_config(m.type, vocab_size, hidden_size=m.hidden_size,
                                 num_hidden_layers=m.num_hidden_layers, num_heads=m.num_heads)
        except ImportError as e:
            raise ConfigError(f"model.type: {error_line(e)}") from None
        except (ValueError, TypeError, AssertionError) as e:
            raise ConfigError(f"model: cannot build a {m.type} model from hidden_size={m.hidden_size}, "
                              f"num_hidden_layers={m.num_hidden_layers}, num_heads={m.num_heads} "
                              f"({error_line(e)})") from None
        return
    d = Path(m.path)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"model.path: '{d}' has no config.json (expected a local HF model directory: "
                          f"config.json + weights)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.path: '{cfg_file}' is not valid JSON ({error_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model.path: '{cfg_file}' is not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in registry.MODEL_TYPES:
        raise ConfigError(f"model.path: '{cfg_file}' has model_type {model_type!r}; "
                          f"supported: {', '.join(registry.MODEL_TYPES)}")
    try:
        registry.family(model_type).classes()
    except ImportError as e:
        raise ConfigError(f"model.path: {error_line(e)}") from None
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"model.path: '{d}' has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    model_vocab = raw.get("vocab_size")
    if isinstance(model_vocab, bool) or not isinstance(model_vocab, int) or model_vocab <= 0:
        raise ConfigError(f"model.path: '{cfg_file}' has vocab_size={model_vocab!r} (expected a positive integer)")
    if model_vocab < vocab_size:
        raise ConfigError(f"model.path: '{d}' has vocab_size={model_vocab} but the tokenizer ({tokenizer_name}) "
                          f"has {vocab_size} tokens (tokenizer.path must match the model)")
    check_weights(d, model_type)


def check_data(cfg: ExperimentConfig, tokenizer, min_tokens: int) -> tuple[int, int, np.ndarray]:
    """(rows, usable rows, token count per row ``[rows]`` int64 after truncation); raises DataError
    naming the file and what was expected. Reads no texts into memory: the corpus is memory-mapped
    and its token counts come from the cached index (refine_ray.data; built here on the first
    start, with a progress bar for large corpora)."""
    from refine_ray.refine.scoring import min_document_tokens

    d = cfg.data
    corpus = Corpus(d, tokenizer, progress=True)    # opens the file(s), checks the columns
    n = len(corpus)
    lengths = corpus.lengths()          # every value text, not all empty
    corpus.check_answers()              # post-training answers, checked as the scorer reads them
    usable = int((lengths >= min_tokens).sum())
    if usable == 0:
        rule = (f"data.min_length={d.min_length}" if d.min_length >= min_document_tokens(cfg.refine) else
                f"refine.min_prefix={cfg.refine.min_prefix} + (refine.n_chunks={cfg.refine.n_chunks} + 1) x "
                f"refine.response_length={cfg.refine.response_length} - 1")
        raise DataError(f"data.path '{d.path}': no document has the {min_tokens} tokens needed ({rule}); "
                        f"the longest of {n} has {int(lengths.max())} tokens")
    DataCursor(lengths, min_tokens, d.shuffle, d.seed, source=f"data.path '{d.path}'")   # the driver's rule
    return n, usable, lengths


def check_validation(cfg: ExperimentConfig, tokenizer) -> None:
    """``train.val_path``: readable with the corpus's text column, and at least one of its first
    ``train.val_docs`` documents (as the controller reads them: truncated to ``data.max_length``)
    long enough for the fixed-cut evaluation (``train.val_cuts`` cuts,
    refine_ray.refine.heldout), whose ``val/nsp_*`` metrics would otherwise be missing from
    every evaluation. Reads only those documents. Raises DataError naming ``train.val_path``."""
    from dataclasses import replace

    from refine_ray.refine.heldout import eval_config
    from refine_ray.refine.scoring import min_document_tokens

    path, t = cfg.train.val_path, cfg.train
    try:   # read as the controller reads them: text only (validation is NTP + fixed cuts on the documents)
        corpus = Corpus(replace(cfg.data, path=path, answer_column=None), tokenizer)
        docs = [corpus.document(i) for i in range(min(t.val_docs, len(corpus)))]
    except DataError as e:
        raise _as_val_path(e) from None
    need = min_document_tokens(eval_config(cfg.refine, t.val_cuts))
    longest = max(len(doc.ids) for doc in docs)
    if longest < need:
        r = cfg.refine
        cap = f" (data.max_length={cfg.data.max_length})" if longest == cfg.data.max_length else ""
        raise DataError(f"train.val_path '{path}': 0 of the first {len(docs)} documents (train.val_docs={t.val_docs}) "
                        f"have the {need} tokens the fixed-cut evaluation needs (refine.min_prefix={r.min_prefix} + "
                        f"(train.val_cuts={t.val_cuts} + 1) x refine.response_length={r.response_length} - 1); "
                        f"the longest has {longest}{cap}: val/nsp_* would never be computed")


def check_dtype(cfg: ExperimentConfig) -> None:
    """``model.dtype=bfloat16`` only where every role that runs the model gets a CUDA GPU
    (:func:`refine_ray.models.dtypes.check_roles_dtype`); raises ConfigError with one line."""
    from refine_ray.models.dtypes import check_roles_dtype

    r = cfg.refine
    shares = {"learner.gpus_per_rank": cfg.learner.gpus_per_rank, "scorer.gpus_per_actor": cfg.scorer.gpus_per_actor,
              "rollout.gpus_per_actor": cfg.rollout.gpus_per_actor}
    if cfg.reference.enabled:
        shares["reference.gpus_per_actor"] = cfg.reference.gpus_per_actor
    if r.reward_source == "frozen" and r.reward != "exact":       # the reward role runs the frozen policy
        shares["reward.gpus_per_actor"] = cfg.reward.gpus_per_actor
    try:
        check_roles_dtype(cfg.model.dtype, shares, not (cfg.system.ray_address or os.environ.get("RAY_ADDRESS")))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_weight_sync(cfg: ExperimentConfig) -> None:
    """``system.weight_sync`` names a backend of :data:`refine_ray.transport.weight_sync.BACKENDS`
    (the one place backends are listed); raises ConfigError with one line."""
    from refine_ray.transport.weight_sync import backend

    try:
        backend(cfg.system.weight_sync)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_vllm(cfg: ExperimentConfig) -> None:
    """``rollout.backend=vllm`` needs a vLLM in the supported range in this environment (read from
    the package metadata, nothing imported): ConfigError with one line, before Ray starts an actor."""
    if cfg.rollout.backend != "vllm":
        return
    from refine_ray.serving.vllm_plugin import check_vllm_version, installed_vllm
    from refine_ray.serving.vllm_rollout import INSTALL_HINT

    installed = installed_vllm()
    if installed is None:
        raise ConfigError(f"rollout.backend=vllm needs vLLM, which is not installed in this environment "
                          f"({sys.executable}): {INSTALL_HINT}, or use rollout.backend=fast_weight")
    try:
        check_vllm_version(installed)
    except RuntimeError as e:
        raise ConfigError(f"rollout.backend=vllm: {e}") from None


def _as_val_path(e: DataError) -> DataError:
    """A corpus error about ``train.val_path``: the message names the value itself, under the key that holds it."""
    msg = str(e)
    return DataError(f"train.val_path{msg[len('data.path'):]}" if msg.startswith("data.path") else
                     f"train.val_path: {msg}")


def check_paths(cfg: ExperimentConfig) -> None:
    """The files a run reads exist: ``data.path`` and ``train.val_path`` by the corpus's rules
    (:func:`refine_ray.data.data_files`), ``tokenizer.path``. Imports nothing heavy, so a missing
    file is reported in about a second. Relative paths were made absolute against the working
    directory when the config loaded, where they named something; one that names nothing there is
    reported as written. Raises DataError naming the key."""
    data_files(cfg.data.path)
    if cfg.train.val_path:
        try:
            data_files(cfg.train.val_path)
        except DataError as e:
            raise _as_val_path(e) from None
    if cfg.tokenizer.path is not None and not Path(cfg.tokenizer.path).exists():
        raise DataError(f"tokenizer.path: '{cfg.tokenizer.path}' does not exist (expected a local tokenizer directory)")


def preflight(cfg: ExperimentConfig) -> PreflightReport:
    """Open every input of a training job in this process; raise one-line errors, start nothing.
    The checks of paths and of the output directory come first, before torch, fla or Ray is imported."""
    check_writable(cfg.train.output_dir, "train.output_dir")
    check_paths(cfg)
    resume_from = check_output(cfg)
    from refine_ray.refine.scoring import min_document_tokens    # torch and fla from here on
    from refine_ray.system.placement import check_resources     # Ray

    check_resources(cfg)
    check_dtype(cfg)
    check_weight_sync(cfg)
    check_vllm(cfg)
    need = min_document_tokens(cfg.refine)
    if cfg.data.max_length < need:
        raise ConfigError(f"data.max_length: {cfg.data.max_length} is below the {need} tokens a document needs "
                          f"(refine.min_prefix + (refine.n_chunks + 1) x refine.response_length - 1)")
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    vocab = len(tokenizer)
    check_model(cfg, vocab, f"'{cfg.tokenizer.path}'" if cfg.tokenizer.path else "the default MiniLM one")
    min_tokens = max(need, cfg.data.min_length)
    rows, usable, lengths = check_data(cfg, tokenizer, min_tokens)
    if cfg.train.val_path:                # held-out documents: same column rules, errors name train.val_path
        check_validation(cfg, tokenizer)
    return PreflightReport(tokenizer, vocab, rows, usable, min_tokens, resume_from, lengths)
