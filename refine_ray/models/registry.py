"""The one registry of model families: what every part of refine_ray knows about a model type.

Each :class:`ModelFamily` entry says, for one ``model_type`` (the ``config.json`` field):
its HF config class, causal-LM class and tiny preset (imported lazily, on first use, from
the family's folder), whether its state is offset-free (read from the class), and what config validation,
preflight, the vLLM rollout backend and the benchmarks ask of it. Those parts read
:data:`MODEL_TYPES`, :data:`VLLM_TYPES`, :data:`FAST_WEIGHT_TYPES` or :func:`family` and
keep no list of their own.

Adding a model family = one folder plus one registry entry:
  1. ``refine_ray/models/<family>/``: the config class (fla's or HF's own class where one
     exists, so checkpoints stay loadable by fla / transformers), the causal-LM class
     implementing :class:`~refine_ray.models.base.FastWeightLM` (``offset_free_state`` included), and a
     ``tiny_<type>_config(vocab_size, **overrides)`` preset; its mixer goes in
     ``models/layers/`` when it is new, built from ``layers.common``;
  2. a loader function and a :class:`ModelFamily` line in :data:`FAMILIES` below.
``tests/models/test_registry.py`` builds, runs and round-trips every entry's tiny preset.

Deliberate decisions:
  * Importing this module imports neither torch nor fla, so the config loader can read
    :data:`MODEL_TYPES` cheaply.
  * ``build_model`` starts from the tiny preset and overrides it with the given fields, so
    ``build_model(t, vocab_size=V)`` is a tiny model and full configs are built by passing
    every field. ``seed=None`` uses the global RNG (callers that seed themselves); an int
    seeds a forked RNG, leaving the global one untouched.
  * Presets accept ``num_heads`` for every family (the experiment config's
    ``model.num_heads``): LaCT maps it to ``num_attn_heads``, Llama to
    ``num_attention_heads``; GatedDeltaNet's ``head_dim`` follows hidden_size // num_heads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional


class FamilyClasses(NamedTuple):
    """A family's classes: ``config`` (HF config class), ``causal_lm`` (model class) and
    ``tiny_config(vocab_size: int, **overrides) -> config`` (the preset for tests and random models)."""

    config: type
    causal_lm: type
    tiny_config: Callable


@dataclass(frozen=True)
class ModelFamily:
    """One registry entry.

    model_type: the ``config.json`` ``model_type`` (and ``model.type`` in experiment configs).
    folder: the family's package under ``refine_ray.models`` (named in import errors).
    load: imports the family's folder and returns its :class:`FamilyClasses`.
    fast_weight: a fast-weight / linear-attention model, what REFINE targets and the
        one-pass benchmark (``scripts/bench_nsp.py``) measures.
    vllm: vLLM serves its checkpoints (``rollout.backend=vllm``).
    bench_sizes: ``bench_nsp``'s named sizes (hidden / layers / heads / MLP fields) describe a
        full model of this family (False: other fields, e.g. LaCT's window, stay tiny).
    """

    model_type: str
    folder: str
    load: Callable[[], FamilyClasses]
    fast_weight: bool
    vllm: bool
    bench_sizes: bool

    def classes(self) -> FamilyClasses:
        """The family's classes (imports its folder on first use).

        Raises:
            ImportError: one line naming the family's folder, when it does not import.
        """
        try:
            return self.load()
        except ImportError as e:
            raise ImportError(f"model_type {self.model_type!r} needs refine_ray.models.{self.folder} "
                              f"({str(e).splitlines()[0]})") from e

    @property
    def offset_free_state(self) -> bool:
        """States do not depend on their position (no RoPE, no chunk phase), so states at
        different positions share a batch and cut states come from one pass. Declared by the
        family's causal-LM class (``FastWeightLM.offset_free_state``; imports its folder, as
        :meth:`classes`), the attribute :func:`refine_ray.models.base.offset_free_state` reads."""
        return self.classes().causal_lm.offset_free_state


def _delta_net() -> FamilyClasses:
    from .deltanet import DeltaNetConfig, DeltaNetForCausalLM, tiny_delta_net_config
    return FamilyClasses(DeltaNetConfig, DeltaNetForCausalLM, tiny_delta_net_config)


def _gated_deltanet() -> FamilyClasses:
    from .deltanet import GatedDeltaNetConfig, GatedDeltaNetForCausalLM, tiny_gated_deltanet_config
    return FamilyClasses(GatedDeltaNetConfig, GatedDeltaNetForCausalLM, tiny_gated_deltanet_config)


def _lact() -> FamilyClasses:
    from .lact import LaCTConfig, LaCTForCausalLM, tiny_lact_config
    return FamilyClasses(LaCTConfig, LaCTForCausalLM, tiny_lact_config)


def _llama() -> FamilyClasses:
    from .llama import LlamaConfig, LlamaForCausalLM, tiny_llama_config
    return FamilyClasses(LlamaConfig, LlamaForCausalLM, tiny_llama_config)


FAMILIES: dict[str, ModelFamily] = {f.model_type: f for f in (
    ModelFamily("delta_net", "deltanet", _delta_net, fast_weight=True, vllm=True, bench_sizes=True),
    ModelFamily("gated_deltanet", "deltanet", _gated_deltanet, fast_weight=True, vllm=True, bench_sizes=True),
    ModelFamily("lact", "lact", _lact, fast_weight=True, vllm=False, bench_sizes=False),
    ModelFamily("llama", "llama", _llama, fast_weight=False, vllm=True, bench_sizes=False),
)}
MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)
VLLM_TYPES: tuple[str, ...] = tuple(t for t, f in FAMILIES.items() if f.vllm)
FAST_WEIGHT_TYPES: tuple[str, ...] = tuple(t for t, f in FAMILIES.items() if f.fast_weight)


def family(model_type: str) -> ModelFamily:
    """The registry entry of ``model_type``.

    Raises:
        ValueError: one line listing the registry's types, for an unknown type.
    """
    try:
        return FAMILIES[model_type]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}") from None


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """The family's tiny preset (seconds on a CPU) with the tokenizer's vocab size; ``overrides``
    are config fields (``num_heads`` accepted for every family). Raises ValueError for an
    unknown type, ImportError when the family's folder does not import."""
    return family(model_type).classes().tiny_config(vocab_size, **overrides)


def build_model(model_type: str, seed: Optional[int] = None, **config_fields):
    """A randomly initialised model of ``model_type`` (fp32, CPU); ``config_fields`` override the
    tiny preset (``vocab_size`` defaults to 256). ``seed``: see the module docstring."""
    import torch

    vocab_size = config_fields.pop("vocab_size", 256)
    classes = family(model_type).classes()
    config = classes.tiny_config(vocab_size, **config_fields)
    if seed is None:
        return classes.causal_lm(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return classes.causal_lm(config)


def model_type_of(path: str) -> str:
    """The registry type of a local HF model directory (its ``config.json`` ``model_type``).

    Raises:
        FileNotFoundError: no ``config.json`` in ``path``.
        ValueError: a training run (export it first) or a ``model_type`` not in the registry.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {path!r} (expected a local HF model directory)")
    with open(cfg_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type is None and os.path.isdir(os.path.join(path, "checkpoints")):
        raise ValueError(f"{path!r} is a training run, not a model: export it first "
                         f"(refine-ray export --from {path} --out {os.path.join(path, 'hf')})")
    if model_type not in FAMILIES:
        raise ValueError(f"{cfg_path}: unknown model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    return model_type


def load_model(path: str, dtype=None, device=None):
    """Load a local HF directory (config.json + weights) into our class for its model_type.

    ``dtype``: a torch dtype to load the weights in (None: as saved); ``device``: where to
    move the model (None: CPU). ``.bin`` weights go through transformers' weights-only
    ``torch.load``: a file that pickles anything but tensors is refused, never executed.

    Raises:
        ValueError: one line, for a weights file that pickles code or unknown objects, or as
            :func:`model_type_of`.
    """
    import pickle
    import re

    model_cls = family(model_type_of(path)).classes().causal_lm
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        model = model_cls.from_pretrained(path, local_files_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"'{path}': refusing to load weights that pickle code or unknown objects "
                         f"({unsafe.group(1) if unsafe else type(e).__name__})") from None
    if device is not None:
        model = model.to(device)
    return model
