"""The memory plan: what each GPU of a layout holds for a config, before anything starts (issue 23 point 4).

    refine-ray plan --config FILE [key=value ...] [--gpu-memory GiB]

Nothing is loaded: the model is built on the meta device from ``model.path``'s ``config.json`` (or
the random-model fields), as preflight's ``check_weights`` does, and every activation figure comes
from running the model's own code there, where tensors have shapes and no storage.

Per learner rank (one document at a time, as the learner rank, ``roles.learner``, runs them):

* **model states** by ZeRO stage and dtype (:func:`model_states`), DeepSpeed's accounting; its
  own estimators (``estimate_zero2/3_model_states_mem_needs``) assume 16-bit parameters and are
  shown beside ours, which also covers fp32 and the stages they do not;
* **activations** of the learner's step for ``data.max_length`` tokens (:func:`learner_activations`):
  what autograd saves for the trunk (prefix sharing: one pass; re-encode: every prefix) and
  the n*G continuation branches, the cut states, the NTP head's logits chunks, with or without
  ``model.gradient_checkpointing``.

What autograd saves is counted, not guessed (:func:`saved_per_block`): one and two blocks of the
model run forward on the meta device under ``torch.autograd.graph.saved_tensors_hooks``, and the
difference is one block's saved tensors (by storage, parameters excluded). On CUDA the model runs
fla's kernels, which save less than our PyTorch references (they recompute chunk states in
backward): the saves made inside the six kernels that dispatch to fla (``models.ops.dispatch``)
are replaced by what fla 0.6.0's autograd functions save (:data:`FLA_SAVES`), read from its
source. Formula and measurements: docs/performance.md, "Memory plan".
"""
from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from refine_ray.config import ModelConfig
from refine_ray.models import registry

GIB = 2**30
HEAD_CHUNK = 1024            # positions per LM-head call of the NTP loss (algo.ntp_loss_from_hidden)
FLA_CHUNK = 64               # fla's delta-rule chunk (its saved A is [B, T, H, 64])


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _fla_delta(q, k, v, beta, use_qk_l2norm=True, g=None, **_) -> tuple[int, tuple[str, ...]]:
    """fla's chunk_(gated_)delta_rule: v and beta as given; q and k l2-normed in the kernel (new tensors,
    with their fp32 rstd [B,T,H]) or as given; the WY matrix A [B,T,H,64] in q's dtype; the gated rule
    also its cumulated gate g [B,T,HV] in fp32. The initial state it saves is a cut state, counted
    once as such (:func:`learner_activations`)."""
    B, T, H, _K = q.shape
    new = B * T * H * FLA_CHUNK * q.element_size() + (0 if g is None else g.numel() * 4)
    if use_qk_l2norm:
        return new + _nbytes(q, k) + 2 * B * T * H * 4, ("v", "beta")
    return new, ("q", "k", "v", "beta")


def _rstd(x, g=None, **_) -> tuple[int, tuple[str, ...]]:
    """fla's RMSNorm kernels: their input (and gate) as given, plus the fp32 rstd per row."""
    return x[..., 0].numel() * 4, ("x",) if g is None else ("x", "g")


# What fla 0.6.0's autograd functions save (ctx.save_for_backward) per dispatched kernel, from the
# kernel's arguments: (bytes of the new tensors it saves, names of the arguments it saves as they are).
# Parameters are not activations. Sources: fla/ops/delta_rule/chunk.py, ops/gated_delta_rule/chunk.py,
# modules/norm/layernorm.py, modules/norm/fused_norm_gate.py, modules/causal_conv1d, modules/activations.
FLA_SAVES: dict[str, Callable[..., tuple[int, tuple[str, ...]]]] = {
    "delta_rule": _fla_delta,
    "gated_delta_rule": _fla_delta,
    "short_conv": lambda x, **_: (0, ("x",)),
    "rms_norm": _rstd,
    "rms_norm_gated": _rstd,
    "swiglu": lambda gate, up, **_: (0, ("gate", "up")),
}


class _Saved:
    """Bytes of the tensors autograd saves while active, each storage once, parameters excluded.

    ``backend='fla'``: saves made inside a kernel of :data:`FLA_SAVES` (seen through a profile
    hook on the kernel's frame) are dropped and replaced by what fla's kernel saves: the kernel's
    saved inputs (counted once with the others, by storage) plus its new tensors."""

    def __init__(self, params, backend: str):
        self.skip = {p.untyped_storage()._cdata for p in params}
        self.backend, self.storages, self.extra, self.inside = backend, {}, 0, []

    def _pack(self, t: torch.Tensor):
        if not self.inside:
            self._count(t)
        return t

    def _count(self, t: torch.Tensor, hold: bool = False) -> None:
        """Count ``t``'s storage while ``t`` lives (autograd holds what it saves as long as its graph
        lives); ``hold``: for as long as this counter (an input fla's kernel would hold)."""
        st = t.untyped_storage()
        if st._cdata not in self.skip:
            self.storages.setdefault(st._cdata, (st.nbytes(), []))[1].append((lambda: t) if hold else weakref.ref(t))

    def _profile(self, frame, event, arg):
        name = frame.f_code.co_name
        if frame.f_globals.get("__name__") == "refine_ray.models.ops.dispatch" and name in FLA_SAVES:
            if event == "call":
                new, inputs = FLA_SAVES[name](**frame.f_locals)
                self.inside.append(name)
                for key in inputs:
                    self._count(frame.f_locals[key], hold=True)
                self.extra += new
            elif event == "return" and self.inside:
                self.inside.pop()

    @property
    def total(self) -> int:
        """Bytes of the saved storages still alive (a graph no output needs is freed with its saves)."""
        return sum(n for n, refs in self.storages.values() if any(r() is not None for r in refs)) + self.extra

    @contextmanager
    def counting(self):
        previous = sys.getprofile()
        if self.backend == "fla":
            sys.setprofile(self._profile)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            sys.setprofile(previous)


@dataclass
class ModelShape:
    """What the plan needs of a model, from its meta-device build.

    params: parameters (tied ones once); largest_layer: the largest module's own parameters
    (ZeRO-3 gathers one at a time); hidden, layers, vocab: sizes; state_bytes: one row's
    recurrent state over all layers, as the roles keep it (fp32 fast weights; float tensors in
    the compute dtype otherwise), bytes."""
    model_type: str
    params: int
    largest_layer: int
    hidden: int
    layers: int
    vocab: int
    state_bytes: int


def meta_model(config, layers: Optional[int] = None, dtype: torch.dtype = torch.float32):
    """The causal LM of ``config`` on the meta device (no storage), optionally with ``layers`` blocks."""
    if layers is not None:
        config = type(config).from_dict({**config.to_dict(), "num_hidden_layers": layers})
    cls = registry.family(config.model_type).classes().causal_lm
    with torch.device("meta"):
        return cls(config).to(dtype)


def model_config(cfg: ModelConfig, vocab_size: Optional[int]):
    """The HF config of ``model``: ``model.path``'s ``config.json``, else the random model's fields with
    ``vocab_size`` (the tokenizer's). Raises ValueError (one line) for a path without a usable config."""
    if cfg.path is not None:
        try:
            model_type = registry.model_type_of(cfg.path)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"model.path: {e}") from None
        try:
            return registry.family(model_type).classes().config.from_pretrained(cfg.path)
        except Exception as e:
            raise ValueError(f"model.path: cannot read a {model_type} config from '{cfg.path}' "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return registry.tiny_config(cfg.type, vocab_size, hidden_size=cfg.hidden_size,
                                num_hidden_layers=cfg.num_hidden_layers, num_heads=cfg.num_heads)


def model_shape(config, dtype: torch.dtype = torch.float32) -> ModelShape:
    """Sizes of ``config``'s model, counted on the meta device (``dtype``: the compute dtype); cached."""
    key = (config.to_json_string(), dtype)
    if key not in _SHAPE_CACHE:
        _SHAPE_CACHE[key] = _model_shape(config, dtype)
    return _SHAPE_CACHE[key]


_SHAPE_CACHE: dict[tuple, ModelShape] = {}


def _model_shape(config, dtype: torch.dtype) -> ModelShape:
    # one- and two-block models give every count (the blocks are alike) without building them all
    counts = []
    for layers in (1, 2):
        model = meta_model(config, layers, dtype)
        params = sum({p.untyped_storage()._cdata: p.numel() for p in model.parameters()}.values())
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        with torch.no_grad():
            state = model.forward_segment(torch.zeros(1, 1, dtype=torch.long, device="meta"), None,
                                          return_logits=False).state
        counts.append((params, largest, sum(_nbytes(*layer.values()) for layer in state.layers)))
    (p1, largest, s1), (p2, _, s2) = counts
    n = config.num_hidden_layers
    return ModelShape(config.model_type, p1 + (n - 1) * (p2 - p1), largest, config.hidden_size, n,
                      config.vocab_size, s1 + (n - 1) * (s2 - s1))


def saved_per_block(config, rows: int, tokens: int, dtype: torch.dtype, backend: str,
                    with_state: bool = False) -> tuple[int, int]:
    """``(one block, the rest)``: bytes autograd saves in a training forward of ``rows x tokens``
    (from an empty state, or with ``with_state`` from a state of the same rows, as the continuation
    branches run), measured on the meta device as two-block minus one-block saves; the rest is the
    embedding and final norm. ``backend``: 'torch' (our kernels) or 'fla' (see :class:`_Saved`).
    Results are cached per argument set (a plan asks for the same pass several times)."""
    key = (config.to_json_string(), rows, tokens, dtype, backend, with_state)
    if key not in _SAVED_CACHE:
        _SAVED_CACHE[key] = _saved_per_block(config, rows, tokens, dtype, backend, with_state)
    return _SAVED_CACHE[key]


_SAVED_CACHE: dict[tuple, tuple[int, int]] = {}


def _saved_per_block(config, rows: int, tokens: int, dtype: torch.dtype, backend: str,
                     with_state: bool) -> tuple[int, int]:
    totals = []
    for layers in (1, 2):
        model = meta_model(config, layers, dtype).train()
        ids = torch.zeros(rows, tokens, dtype=torch.long, device="meta")
        state = None
        if with_state:
            with torch.no_grad():
                state = model.forward_segment(ids[:, :1], None, return_logits=False).state
            state = state._map(lambda t: t.requires_grad_() if t.is_floating_point() else t)
        saved = _Saved(model.parameters(), backend)
        with saved.counting():
            hidden = model.forward_segment(ids, state, return_logits=False).hidden   # kept, as the learner does
        totals.append(saved.total)
        del hidden
    block = totals[1] - totals[0]
    return block, totals[0] - block


def model_states(params: int, largest_layer: int, dtype_bytes: int, zero_stage: int, ranks: int) -> dict[str, int]:
    """Bytes per learner rank of ``params`` parameters: ``params``, ``grads`` and ``optimizer`` (AdamW).

    DeepSpeed's accounting for our engine (``roles.learner.deepspeed_config``): weights and
    gradients in the compute dtype (``dtype_bytes``: 2 bf16, 4 fp32); every ZeRO optimizer keeps
    fp32 master weights, their fp32 gradients and Adam's m and v (16 bytes per parameter),
    partitioned over the ranks. ZeRO-0: bf16 through DeepSpeed's bf16 wrapper (the same 16 bytes,
    whole), fp32 through the bare torch AdamW (m and v only). ZeRO-1 partitions the optimizer,
    ZeRO-2 also the gradients, ZeRO-3 also the weights, plus one gathered layer's weights and
    gradients (``largest_layer``). Communication buckets are not counted."""
    p, n = dtype_bytes, ranks
    if zero_stage == 0:
        return {"params": p * params, "grads": p * params, "optimizer": (16 if p == 2 else 8) * params}
    shard = 16 * params // n
    if zero_stage == 1:
        return {"params": p * params, "grads": p * params, "optimizer": shard}
    if zero_stage == 2:
        return {"params": p * params, "grads": p * params // n, "optimizer": shard}
    gathered = p * largest_layer
    return {"params": p * params // n + gathered, "grads": p * params // n + gathered, "optimizer": shard}


def deepspeed_estimate(params: int, largest_layer: int, zero_stage: int, ranks: int) -> Optional[int]:
    """DeepSpeed's own estimate of a rank's model states (bytes; it assumes 16-bit weights), for ZeRO 1-3;
    None for ZeRO-0 or without DeepSpeed (the GPU acceptance machine has none)."""
    try:
        if zero_stage in (1, 2):
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as est
            return est(params, num_gpus_per_node=ranks, num_nodes=1, cpu_offload=False)[1]
        if zero_stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as est3
            return est3(params, largest_layer, num_gpus_per_node=ranks, num_nodes=1, cpu_offload=False)[1]
    except ImportError:
        pass
    return None


def learner_activations(config, length: int, n: int, G: int, k: int, dtype: torch.dtype, backend: str,
                        checkpointing: bool, prefix_sharing: bool = True) -> dict[str, int]:
    """Peak activation bytes of one learner document step (``refine.loss.document_loss``, then backward)
    for a document of ``length`` tokens, ``n`` cuts, ``G`` samples of ``k`` tokens, by part.

    With ``A`` one block's saves for the document (:func:`saved_per_block`), ``D`` the hidden size,
    ``b`` the compute dtype's bytes and ``H = 4 * 4 * 1024 * V`` the NTP head's chunk in backward
    (four fp32 ``[1024, V]``: logits, log-softmax, two gradients):

    * ``trunk``: without checkpointing every block's ``A`` plus the embedding's and final norm's
      saves; with it each block's input ``[L, D]`` instead. Prefix sharing runs one trunk over the
      document; re-encoding (upstream ReFINE) the NTP pass plus G rows of every prefix with its
      continuation, at the mean cut (length / 2), all kept until the one backward;
    * ``cut_states``: the n states the trunk returns (n*G rows once repeated for G > 1);
    * ``branches``: the n*G continuations of k - 1 tokens from those states, saved as the trunk is;
    * ``logits``: the continuations' fp32 logits ``[n*G, k, V]`` and the NTP head's input ``[L, D]``;
    * ``backward``: on top of what is saved, the larger of ``H`` and a block's backward: ``A / 4``
      (its gradients in flight) or, checkpointed, ``1.25 A`` (the block re-runs, then the same).
      The 1/4 is measured, not derived: 0.18-0.31 on CPU (docs/performance.md, "Memory plan").
    """
    b = dtype.itemsize
    shape = model_shape(config, dtype)
    D, layers, V = shape.hidden, shape.layers, shape.vocab
    blk, rest = saved_per_block(config, 1, length, dtype, backend)
    tokens, largest = length, blk
    if not prefix_sharing:      # per-token saves of one pass, scaled to every sequence; the longest: G x L
        tokens = length + n * G * (length // 2 + k)
        blk, rest, largest = blk * tokens // length, rest * tokens // length, blk * G
    out = {"trunk": (layers * tokens * D * b if checkpointing else layers * blk) + rest,
           "cut_states": 0, "branches": 0}
    if prefix_sharing:
        out["cut_states"] = n * (G if G > 1 else 1) * shape.state_bytes
        if k > 1:
            br_blk, br_rest = saved_per_block(config, n * G, k - 1, dtype, backend, with_state=True)
            out["branches"] = br_rest + (layers * n * G * (k - 1) * D * b + br_blk if checkpointing
                                         else layers * br_blk)
    out["logits"] = n * G * k * V * 4 + length * D * b
    head = 4 * 4 * min(HEAD_CHUNK, length) * V
    out["backward"] = max(head, (5 * largest) // 4 if checkpointing else largest // 4)
    return out


def no_grad_pass(config, length: int, dtype: torch.dtype, backend: str) -> int:
    """Bytes an inference pass over ``length`` tokens holds at once: one block's working set, at most
    what it would save for backward (:func:`saved_per_block`), and the hidden states ``[L, D]``."""
    return saved_per_block(config, 1, length, dtype, backend)[0] + length * config.hidden_size * dtype.itemsize


def local_step_peak(config, length: int, n: int, G: int, k: int, dtype: torch.dtype, backend: str,
                    checkpointing: bool) -> int:
    """Planned peak bytes of a single-process REFINE step (``refine.local_step.LocalRefineStep``, one
    document) with torch's AdamW on the model's own weights: weights, gradients and Adam's m and v all
    in ``dtype`` (4 copies of the parameters), plus the learner step's activations (the scoring pass
    before it holds less). What ``scripts/gpu_check.py`` compares with ``torch.cuda.max_memory_allocated``."""
    shape = model_shape(config, dtype)
    return 4 * shape.params * dtype.itemsize + sum(
        learner_activations(config, length, n, G, k, dtype, backend, checkpointing).values())
