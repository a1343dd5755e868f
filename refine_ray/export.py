"""``refine-ray export``: write a Hugging Face checkpoint directory, atomically.

    refine-ray export --from SOURCE --out DIR [--tokenizer TOK] [--run-config RUN/config.json]
                      [--dtype float32|bfloat16] [--overwrite]

Supported SOURCEs:
  * ``tiny:TYPE`` (a type of the model registry): a random tiny model (seeded) sized for
    the tokenizer; for smoke tests.
  * a local HF directory (``config.json`` with a supported ``model_type``): re-saved.
  * a refine-ray training checkpoint, given as the run dir (``outputs/<run>``: its latest
    checkpoint), ``checkpoints/`` or ``checkpoints/latest``, ``checkpoints/step_N``,
    ``step_N/learner`` (DeepSpeed's save_dir) or ``step_N/learner/ds`` (the tag). Its files are
    verified against the checkpoint's ``manifest.json`` first, and the run config comes from its
    ``trainer.json``. ZeRO 1-3 weights are consolidated from every rank's fp32 partition with
    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (ZeRO-3 keeps no weights in its
    model-state files); ZeRO 0 uses the module weights of ``mp_rank_00_model_states.pt``.
    DeepSpeed's files are read with the weights-only unpickler (``checkpoint.weights_only_loading``).
  * a bare DeepSpeed save_dir (``latest`` naming the tag, or a single tag folder) or tag folder.
  * a plain state-dict file (``.pt``/``.bin``/``.safetensors``; a ``module.`` prefix is stripped).
For the last two the architecture comes from the run's ``config.json`` (the
ExperimentConfig as JSON, ``outputs/<run>/config.json``): ``--run-config``, else the first
such ``config.json`` found in the checkpoint's directory or its five parents. The state dict must
match the architecture exactly (no missing or unexpected keys).

Output: ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer
files (``tokenizer.save_pretrained``, set up for batched ``generate``: it pads on the left and
returns only ``input_ids`` and ``attention_mask``, :func:`for_generate`), with the modes the user's umask gives new files and
directories (:func:`user_modes`). Every family loads with ``AutoModelForCausalLM.from_pretrained(DIR)``
after ``import refine_ray.models.auto`` (our classes, which ``generate`` on CPU and GPU; Llama
needs no import: transformers' own class), and with ``registry.load_model``; ``delta_net`` /
``gated_deltanet`` directories also with fla's own classes (``import fla`` then
``AutoModelForCausalLM``, identical parameter names). ``refine-ray generate --model DIR`` samples
from one with our cached-state engine. Saving is atomic: everything is written to
``DIR.tmp-XXXX`` beside ``DIR``, reloaded and compared tensor by tensor, and only then
renamed to ``DIR`` with ``os.replace``; any failure removes the temporary directory, so a
half-written ``DIR`` never exists. An existing ``DIR`` is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from refine_ray.transport import checkpoint as ckpt
from refine_ray.config import ConfigError, ExperimentConfig, ModelConfig, from_dict, upgrade_stored_config
from refine_ray.models import registry
from refine_ray.preflight import error_line

__all__ = ["ExportError", "load_source", "save_atomic", "export_model", "for_generate", "user_modes"]

STATE_FILES = (".pt", ".bin", ".pth", ".safetensors")


class ExportError(ValueError):
    """A bad export source or destination; the message is one line."""


def _tokenizer(path: Optional[str]):
    from refine_ray.data import load_tokenizer

    return load_tokenizer(path)


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _is_hf_dir(d: Path) -> bool:
    try:
        return "model_type" in json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError, TypeError):
        return False


def _find_run_config(src: Path, run_config: Optional[str]) -> ExperimentConfig:
    if run_config is not None:
        candidates = [Path(run_config)]
        if not candidates[0].is_file():
            raise ExportError(f"--run-config: '{run_config}' does not exist")
    else:
        base = src if src.is_dir() else src.parent
        candidates = [d / "config.json" for d in [base, *list(base.parents)[:5]]]
    for c in candidates:
        if not c.is_file():
            continue
        try:
            raw = json.loads(c.read_text())
        except json.JSONDecodeError as e:
            raise ExportError(f"{c}: not valid JSON ({e})") from None
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            try:
                return from_dict(ExperimentConfig, upgrade_stored_config(raw), "")
            except ConfigError as e:
                raise ExportError(f"{c}: not an ExperimentConfig ({e})") from None
    raise ExportError(f"{src}: no run config.json found (looked in {', '.join(str(c) for c in candidates)}); "
                      f"pass --run-config outputs/<run>/config.json")


def _run_config_from(raw: dict, src: Path) -> ExperimentConfig:
    try:
        return from_dict(ExperimentConfig, upgrade_stored_config(raw), "")
    except ConfigError as e:
        raise ExportError(f"{src}: the checkpoint's run config is not an ExperimentConfig ({e})") from None


def _architecture(cfg: ModelConfig, vocab_size: int):
    """A float32 CPU model with the run's architecture (weights are overwritten)."""
    if cfg.path is not None:
        if not Path(cfg.path).is_dir():
            raise ExportError(f"run config model.path '{cfg.path}' is not a directory here; the architecture "
                              f"comes from its config.json")
    from dataclasses import replace

    from refine_ray.refine.policy import build_policy   # the same model the learner built

    try:
        return build_policy(replace(cfg, dtype="float32"), vocab_size, device="cpu")
    except ValueError as e:                     # e.g. the run's tokenizer does not fit model.path
        raise ExportError(str(e).splitlines()[0]) from None


def _deepspeed_source(src: Path) -> tuple[Path, str, Optional[dict], Optional[int]]:
    """(DeepSpeed save_dir, tag, the run's config dict or None, the checkpoint's step or None) for a
    source directory.

    A refine-ray run dir, ``checkpoints/``, ``step_N``, ``step_N/learner`` or ``step_N/learner/ds``
    resolves to that checkpoint (verified against its manifest; its ``trainer.json`` holds the run
    config). Anything else is taken as a bare DeepSpeed save_dir (``latest`` naming the tag, or one
    tag folder) or a tag folder itself.
    """
    try:
        step = ckpt.find_checkpoint(src)
    except ckpt.CheckpointError as e:
        if (src / "checkpoints").is_dir() or src.name in ("checkpoints", ckpt.LATEST):   # a run, but no checkpoint
            raise ExportError(str(e)) from None
        step = None
    run_cfg = None
    if step is not None:
        try:
            ckpt.verify_checkpoint(step, way_out="export it with --from {}")
            run_cfg = ckpt.load_trainer_state(step).get("config")
        except ckpt.CheckpointError as e:
            raise ExportError(str(e)) from None
        save_dir = step / "learner"
    elif any(src.glob("*model_states.pt")):             # a tag folder
        return src.parent, src.name, None, None
    else:
        save_dir = src
    latest = save_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
    else:
        tags = sorted(d.name for d in save_dir.iterdir() if d.is_dir() and any(d.glob("*model_states.pt")))
        if len(tags) != 1:
            raise ExportError(f"{save_dir}: not a refine-ray checkpoint, and not a DeepSpeed save_dir with one "
                              f"tag directory (found {tags or 'none'})")
        tag = tags[0]
    if not any((save_dir / tag).glob("*model_states.pt")):
        raise ExportError(f"{save_dir}: DeepSpeed tag '{tag}' has no *model_states.pt")
    return (save_dir, tag, run_cfg if isinstance(run_cfg, dict) else None,
            ckpt.step_of(step) if step is not None else None)


def _deepspeed_state_dict(save_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a DeepSpeed checkpoint, ZeRO 0-3, read without unpickling code.

    ZeRO 1-3 (optimizer shards present): DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``
    merges every rank's fp32 partition (ZeRO-3 keeps no weights in the model-state files).
    ZeRO 0: the module weights of ``mp_rank_00_model_states.pt``.
    """
    import pickle

    tag_dir = save_dir / tag
    try:
        with ckpt.weights_only_loading():
            if any(tag_dir.glob("*optim_states.pt")):
                # imported outside the redirect: DeepSpeed's logger keeps the stdout it finds at import
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                # its progress prints ("Detected checkpoint ...", "Reconstructed fp32 ...") and tqdm
                # bars are not the command's output; a failure still raises with its own message
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    return dict(get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag))
            states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ExportError(f"{tag_dir}: refusing to load a checkpoint file that pickles code or unknown "
                          f"objects ({error_line(e, 300)})") from None
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ExportError(f"{tag_dir}: unreadable DeepSpeed checkpoint ({type(e).__name__}: {error_line(e, 300)})") from None
    return dict(states["module"])


def _plain_state_dict(src: Path) -> dict[str, torch.Tensor]:
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(src))
    else:
        sd = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("module"), dict):
        sd = sd["module"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ExportError(f"{src}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_source(source: str, tokenizer_path: Optional[str] = None, run_config: Optional[str] = None,
                seed: int = 0):
    """(model on CPU in float32, tokenizer, the step of the refine-ray checkpoint it came from or None)
    for any supported source."""
    if source.startswith("tiny:"):
        mtype = source.split(":", 1)[1]
        if mtype not in registry.MODEL_TYPES:
            raise ExportError(f"--from {source!r}: unknown type (supported: {', '.join(registry.MODEL_TYPES)})")
        tok = _tokenizer(tokenizer_path)
        return registry.build_model(mtype, seed=seed, vocab_size=len(tok)).float(), tok, None
    src = Path(source)
    if not src.exists():
        raise ExportError(f"--from '{source}': no such file or directory")
    if src.is_dir() and _is_hf_dir(src):
        try:
            model = registry.load_model(str(src)).float()
        except (ValueError, FileNotFoundError, OSError) as e:
            raise ExportError(f"--from '{source}': {str(e).splitlines()[0]}") from None
        tok = _tokenizer(tokenizer_path or (str(src) if _has_tokenizer(src) else None))
        return model, tok, None
    saved_cfg, step = None, None
    if src.is_dir() or (src.name == ckpt.LATEST and src.parent.name == "checkpoints"):
        save_dir, tag, saved_cfg, step = _deepspeed_source(src)
        sd = _deepspeed_state_dict(save_dir, tag)
        src = save_dir
    elif src.suffix in STATE_FILES:
        sd = _plain_state_dict(src)
    else:
        raise ExportError(f"--from '{source}': expected tiny:TYPE, an HF dir, a DeepSpeed checkpoint dir "
                          f"or a state-dict file ({'/'.join(STATE_FILES)})")
    cfg = _run_config_from(saved_cfg, src) if saved_cfg is not None and run_config is None \
        else _find_run_config(src, run_config)
    tok = _tokenizer(tokenizer_path or cfg.tokenizer.path)
    model = _architecture(cfg.model, len(tok))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ExportError(f"{source}: state dict does not match the run's {cfg.model.type} architecture "
                          f"({len(missing)} missing e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. {unexpected[:2]})")
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ExportError(f"{source}: state dict does not match the run's {cfg.model.type} architecture "
                          f"({detail})") from None
    return model, tok, step


def for_generate(tokenizer):
    """``tokenizer`` set up, in place and in what ``save_pretrained`` writes, for transformers' batched
    ``generate``: padding on the left (prompts end where generation starts; our models run left-padded
    rows unpadded, ``models/hf_generate.py``) and only ``input_ids`` and ``attention_mask`` as model
    inputs (a BERT-style tokenizer such as the offline MiniLM one also returns ``token_type_ids``,
    which ``generate`` refuses as an unused model kwarg). Returns ``tokenizer``."""
    tokenizer.padding_side = "left"
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names   # what save_pretrained writes
    return tokenizer


def _verify(tmp: Path, model) -> None:
    back = registry.load_model(str(tmp))
    ours = model.state_dict()
    theirs = back.state_dict()
    if set(ours) != set(theirs):
        raise ExportError(f"export check: reloaded keys differ ({sorted(set(ours) ^ set(theirs))[:3]})")
    for k, v in ours.items():
        if not torch.equal(theirs[k].to(v.dtype), v):
            raise ExportError(f"export check: tensor {k} differs after reload")


def user_modes(d: Path) -> None:
    """Give ``d`` and everything in it the modes the user's umask gives a new directory (0o777 minus
    the umask) and file (0o666 minus the umask), e.g. 0755 / 0644: ``tempfile.mkdtemp`` creates the
    directory 0700 and safetensors writes its file 0600, so an export would be private to its writer."""
    mask = os.umask(0o077)
    os.umask(mask)
    for root, dirs, files in os.walk(d):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def save_atomic(model, tokenizer, out: str | Path, overwrite: bool = False,
                check: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``out`` via a temporary sibling directory; ``check(tmp)`` may veto by raising."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"--out '{out}' already exists (use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out '{out}' exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"--out '{out}': cannot write beside it ({e.strerror or e})") from None
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        user_modes(tmp)
        _verify(tmp, model)
        if check is not None:
            check(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out_apart(source: str, out: Path) -> None:
    """``--out`` must not be the source, hold it, lie in its checkpoints, or be a training run:
    ``--overwrite`` would delete them. An export inside a run (``<run>/hf``) is fine."""
    if source.startswith("tiny:"):
        return
    src, dst = Path(source).resolve(), out.resolve()
    run_part = src in dst.parents and dst.relative_to(src).parts[0] in ("checkpoints", "tensorboard")
    if dst == src or dst in src.parents or run_part:
        raise ExportError(f"--out '{out}' is or holds the source '{source}'; export next to it or inside a run "
                          f"(e.g. --out {Path(source) / 'hf'})")
    if (dst / "checkpoints").is_dir() or (dst / "metrics.jsonl").is_file():
        raise ExportError(f"--out '{out}' is a training run directory; refusing to replace it with an export")


def export_model(source: str, out: str | Path, tokenizer_path: Optional[str] = None,
                 run_config: Optional[str] = None, dtype: str = "float32", overwrite: bool = False,
                 check: Optional[Callable[[Path], None]] = None):
    """Load ``source`` and save it to ``out`` atomically, its tokenizer set up by :func:`for_generate`.
    Returns the exported model; its ``export_step`` attribute is the step of the refine-ray checkpoint
    it came from (None for other sources)."""
    if dtype not in ("float32", "bfloat16"):
        raise ExportError(f"--dtype {dtype!r}: expected float32 or bfloat16")
    _check_out_apart(source, Path(out))
    if Path(out).exists() and not overwrite:       # before the (possibly long) load; save_atomic checks again
        raise ExportError(f"--out '{out}' already exists (use --overwrite to replace it)")
    model, tok, step = load_source(source, tokenizer_path, run_config)
    if model.config.vocab_size < len(tok):
        raise ExportError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}")
    model = model.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    save_atomic(model, for_generate(tok), out, overwrite, check)
    model.export_step = step
    return model
