"""``refine-ray plan``: the memory plan of a config, per actor and per GPU, and whether it fits.

    refine-ray plan --config FILE [key=value ...] [--gpu-memory GiB]

The accounting (model states by ZeRO stage, activations counted on the meta device) is
:mod:`refine_ray.system.memory_plan`; here it is applied to every role of the layout
(``system.placement``: colocated bundles of one GPU each, or each role's own GPUs) and summed per
GPU. ``refine-ray train`` logs the compact form (:func:`compact_line`) once the inputs are checked.

Per actor (GiB), for the longest document (``data.max_length``):

* learner rank: weights, gradients, optimizer state (ZeRO stage, dtype) + one document's
  activations (documents run one at a time);
* scorer: weights + one pass over the document + the states it keeps every ``refine.state_stride``
  tokens + one document's cut states (each document's go to host memory once it is scored,
  ``refine.scoring.score_document``; its share of the batch waits there); with
  ``train.val_every`` also the frozen copy of the held-out evaluation;
* rollout: weights + the cut states of its share of the batch, repeated G times per document
  (prefix sharing), or a pass over each prefix (re-encode); vLLM: its ``REFINE_VLLM_MEM`` fraction
  of the GPU (default 0.2);
* reward: the frozen reference model when it runs on a GPU (``reward_source=frozen``): as the scorer
  for one document; the cosine on policy hidden states and exact match need no GPU;
* reference (``reference.enabled``): weights + the trunk pass and branches of one document.

Each process on a GPU also holds a CUDA context (:data:`CUDA_CONTEXT`, a typical figure, not
measured here). Colocated: one GPU per learner rank with its round-robin share of every role.
Disaggregated: each role on GPUs of its own; an actor asking for a fraction ``s`` of a GPU may
share it with up to ``1/s`` actors of its role, so a GPU holds that many.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from refine_ray.config import ExperimentConfig
from refine_ray.system import memory_plan as mp

GIB = mp.GIB
CUDA_CONTEXT = 0.5 * GIB        # per process on a GPU (CUDA context + kernels; ~0.3-0.6 GiB on H100s)
ROLES = ("learner", "scorer", "rollout", "reward", "reference")


class PlanError(ValueError):
    """A config the plan cannot be made for; the message is one line naming the field."""


@dataclass
class MemoryPlan:
    """Per-actor needs (bytes, by part) and per-GPU totals of one config.

    ``actors``: role -> {part: bytes} for one actor of that role (absent: not on a GPU);
    ``gpus``: one entry per distinct GPU content, ``(members, total bytes, count)`` with members
    like ``["learner[0]", "scorer[0]"]``; ``gpu_memory``: bytes per GPU or None (no fit check)."""
    summary: str
    actors: dict[str, dict[str, int]]
    notes: dict[str, str]
    gpus: list[tuple[list[str], int, int]] = field(default_factory=list)
    gpu_memory: Optional[int] = None

    @property
    def fullest(self) -> int:
        return max((total for _, total, _ in self.gpus), default=0)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.gpu_memory is None or not self.gpus else self.fullest <= self.gpu_memory

    def lines(self) -> list[str]:
        """The full plan, one role or GPU per line (GiB)."""
        out = [self.summary]
        for role, parts in self.actors.items():
            detail = " + ".join(f"{name} {gib(v)}" for name, v in parts.items() if v)
            out.append(f"  {role}: {gib(sum(parts.values()))} GiB = {detail}" +
                       (f" ({self.notes[role]})" if role in self.notes else ""))
            if role in ("learner", "eval"):
                out.append(f"    {self.notes['activations']}")
        for members, total, count in self.gpus:
            out.append(f"  {count} GPU{'s' if count > 1 else ''}, each: {' + '.join(members)} + "
                       f"{len(members)} CUDA context{'s' if len(members) > 1 else ''} ({gib(CUDA_CONTEXT)} each) "
                       f"= {gib(total)} GiB")
        out.append(verdict(self))
        return out


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def verdict(plan: MemoryPlan) -> str:
    """The last line: fits / does not fit, with the fullest GPU."""
    if not plan.gpus:
        return "no CUDA GPU (a CPU run): the figures are this machine's memory per process, nothing to fit"
    if plan.gpu_memory is None:
        return f"fullest GPU {gib(plan.fullest)} GiB (no GPU here and no --gpu-memory: fit not checked)"
    pct = 100 * plan.fullest / plan.gpu_memory
    word = "fits" if plan.fits else "DOES NOT FIT"
    return f"{word}: fullest GPU {gib(plan.fullest)} of {gib(plan.gpu_memory)} GiB ({pct:.0f}%)"


def compact_line(plan: MemoryPlan) -> str:
    """One line for the start-up log: per actor of each role, then the verdict."""
    parts = ", ".join(f"{role} {gib(sum(p.values()))}" for role, p in plan.actors.items())
    return f"memory plan (GiB per actor): {parts}; {verdict(plan)}"


def local_gpu_memory() -> Optional[int]:
    """Bytes of this machine's first CUDA GPU, or None without CUDA."""
    import torch

    from refine_ray.models.dtypes import compute_dtype

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def make_plan(cfg: ExperimentConfig, vocab_size: Optional[int], gpu_memory: Optional[int],
              on_gpu: bool, with_deepspeed: bool = True) -> MemoryPlan:
    """The plan of ``cfg`` (``vocab_size``: the tokenizer's, for a random model). ``on_gpu``: the GPU
    shares are real CUDA GPUs (fla's kernels, bf16 as configured); otherwise every role runs our
    PyTorch kernels in fp32 (a CPU run). ``with_deepspeed``: add DeepSpeed's own estimate of the
    learner's model states (imports DeepSpeed). Raises PlanError (one line) for a model it cannot build."""
    import torch

    from refine_ray.models.dtypes import compute_dtype

    try:
        config = mp.model_config(cfg.model, vocab_size)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise PlanError(str(e).splitlines()[0]) from None
    dtype = compute_dtype(cfg.model.dtype, "cuda") if on_gpu else torch.float32   # CPU runs are fp32 only
    b = dtype.itemsize
    shape = mp.model_shape(config, dtype)
    r, L, lc = cfg.refine, cfg.data.max_length, cfg.learner
    n, G, k = r.n_chunks, r.samples_per_prefix, r.response_length
    backend = "fla" if on_gpu else "torch"
    weights = shape.params * b
    actors, notes = {}, {}

    states = mp.model_states(shape.params, shape.largest_layer, b, lc.zero_stage, lc.num_ranks)
    act = mp.learner_activations(config, L, n, G, k, dtype, backend, cfg.model.gradient_checkpointing,
                                 r.prefix_sharing)
    other = mp.learner_activations(config, L, n, G, k, dtype, backend, not cfg.model.gradient_checkpointing,
                                   r.prefix_sharing)
    actors["learner"] = {**states, "activations": sum(act.values())}
    notes["learner"] = f"ZeRO-{lc.zero_stage} over {lc.num_ranks} rank{'s' if lc.num_ranks > 1 else ''}"
    if with_deepspeed and (est := mp.deepspeed_estimate(shape.params, shape.largest_layer, lc.zero_stage,
                                                        lc.num_ranks)) is not None:
        notes["learner"] += (f"; DeepSpeed's ZeRO-{'3' if lc.zero_stage == 3 else '1/2'} estimator, for 16-bit "
                             f"weights{' and partitioned gradients' if lc.zero_stage < 3 else ''}: {gib(est)}")
    notes["activations"] = (f"activations of one {L}-token document: " +
                            " + ".join(f"{name} {gib(v)}" for name, v in act.items()) +
                            f" (checkpointing {'off' if cfg.model.gradient_checkpointing else 'on'}: "
                            f"{gib(sum(other.values()))})")

    # refine.cut_states.resolve_state_stride's default: 64 for offset-free models on our kernels, else 512
    offset_free = mp.registry.family(shape.model_type).offset_free_state
    stride = r.state_stride or (64 if backend == "torch" and offset_free else 512)
    no_grad_pass_bytes = mp.no_grad_pass(config, L, dtype, backend)
    head = 2 * 4 * min(mp.HEAD_CHUNK, L) * shape.vocab                # entropy: fp32 [1024, V] logits + softmax
    share = {role: math.ceil(cfg.data.batch_size / getattr(cfg, role).num_actors)
             for role in ("scorer", "rollout", "reward", "reference")}
    cut = n * shape.state_bytes
    actors["scorer"] = {"weights": weights * (2 if cfg.train.val_every else 1), "pass": no_grad_pass_bytes + head,
                        "kept_states": (L // stride) * shape.state_bytes if r.prefix_sharing else 0,
                        "cut_states": cut if r.prefix_sharing else 0}
    notes["scorer"] = f"{share['scorer']} document(s) per actor; a state kept every {stride} tokens"
    if r.prefix_sharing:
        notes["scorer"] += (f"; one document's cut states on the GPU, the batch's in host memory "
                            f"({gib(share['scorer'] * cut)})")
        notes["rollout"] = (f"{share['rollout']} document(s) per actor; one document's cut states on the GPU "
                            f"at a time, the batch's in host memory")
    if cfg.rollout.backend == "vllm":
        frac = float(os.environ.get("REFINE_VLLM_MEM", "0.2"))
        actors["rollout"] = {"vllm": int(frac * gpu_memory) if gpu_memory else 0}
        notes["rollout"] = f"vLLM takes gpu_memory_utilization={frac:g} of its GPU (REFINE_VLLM_MEM)"
    else:
        actors["rollout"] = {"weights": weights,
                             "states": cut + (n * G * shape.state_bytes if G > 1 else 0) if r.prefix_sharing else 0,
                             "prefill": 0 if r.prefix_sharing else no_grad_pass_bytes,
                             "logits": n * G * shape.vocab * 4}
    if r.reward_source == "frozen" and r.reward != "exact":
        actors["reward"] = {"weights": weights,
                            "pass": no_grad_pass_bytes + (L // stride + 2 * n * G) * shape.state_bytes}
    if cfg.reference.enabled:
        actors["reference"] = {"weights": weights, "pass": no_grad_pass_bytes + (n + n * G) * shape.state_bytes}
    plan = MemoryPlan(
        f"memory plan: {cfg.name}: {shape.model_type}, {shape.params / 1e9:.2f}B parameters (hidden {shape.hidden}, "
        f"{shape.layers} layers, vocab {shape.vocab}), {str(dtype).split('.')[1]}, {L} tokens, n={n} G={G} k={k}, "
        f"{'prefix sharing' if r.prefix_sharing else 're-encode'}, checkpointing "
        f"{'on' if cfg.model.gradient_checkpointing else 'off'}, {backend} kernels",
        actors, notes, gpu_memory=gpu_memory)
    for role in actors:
        if (lc.gpus_per_rank if role == "learner" else getattr(cfg, role).gpus_per_actor) == 0:
            notes[role] = f"{notes[role]}; " if role in notes else ""
            notes[role] += "no GPU share: on CPU"
    if on_gpu:
        plan.gpus = per_gpu(cfg, {role: sum(parts.values()) for role, parts in actors.items()})
    return plan


def make_ttt_plan(cfg: ExperimentConfig, vocab_size: Optional[int], gpu_memory: Optional[int]) -> MemoryPlan:
    """The plan of ``refine-ray eval --ttt`` on one GPU (``refine_ray.eval.ttt``): fp32 weights, their
    gradients and AdamW's m and v; the snapshot restored after every batch (weights and optimizer
    state, on the GPU; none with ``eval.ttt.accumulate``); under bf16 autocast, the bf16 copies of the
    weights autocast keeps during a forward and one prompt's activations counted as for a bf16 model
    (documents run one at a time through ``LocalRefineStep``)."""
    import torch

    from refine_ray.models.dtypes import compute_dtype

    try:
        config = mp.model_config(cfg.model, vocab_size)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise PlanError(str(e).splitlines()[0]) from None
    bf16 = cfg.model.dtype == "bfloat16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    shape = mp.model_shape(config, dtype)
    r, L, P = cfg.refine, min(cfg.data.max_length, cfg.eval.max_prompt_tokens), shape.params
    act = mp.learner_activations(config, L, r.n_chunks, r.samples_per_prefix, r.response_length, dtype, "fla",
                                 cfg.model.gradient_checkpointing, r.prefix_sharing)
    parts = {"weights": 4 * P, "grads": 4 * P, "optimizer": 8 * P,
             "snapshot": 0 if cfg.eval.ttt.accumulate else 12 * P, "bf16_weight_casts": 2 * P if bf16 else 0,
             "activations": sum(act.values())}
    plan = MemoryPlan(
        f"memory plan: refine-ray eval --ttt (reward {r.reward}): {shape.model_type}, {P / 1e9:.2f}B parameters, "
        f"fp32 weights{' with bf16 autocast' if bf16 else ''}, prompts of {L} tokens, n={r.n_chunks} "
        f"G={r.samples_per_prefix} "
        f"k={r.response_length}, checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}, fla kernels",
        {"eval": parts}, {"eval": "one process on one GPU; AdamW, snapshot of weights + optimizer state"},
        gpu_memory=gpu_memory)
    plan.notes["activations"] = (f"activations of one {L}-token prompt: " +
                                 " + ".join(f"{name} {gib(v)}" for name, v in act.items()))
    plan.gpus = [(["eval"], sum(parts.values()) + int(CUDA_CONTEXT), 1)]
    return plan


def per_gpu(cfg: ExperimentConfig, need: dict[str, int]) -> list[tuple[list[str], int, int]]:
    """What each GPU holds: colocated bundles from ``placement.plan_slots``; disaggregated, per role,
    ``min(actors, floor(1 / share))`` actors of it. Distinct contents once, with their count."""
    from collections import Counter

    from refine_ray.system.placement import plan_slots

    groups: list[list[str]] = []
    slots = [s for s in plan_slots(cfg) if s.gpus > 0]
    if cfg.system.placement == "colocated":
        for bundle in sorted({s.bundle for s in slots}):
            groups.append([f"{s.role}" for s in slots if s.bundle == bundle])
    else:
        for role in ROLES:
            mine = [s for s in slots if s.role == role]
            if mine:
                per = max(1, min(len(mine), int(1 / mine[0].gpus + 1e-9)))
                groups += [[role] * per] * math.ceil(len(mine) / per)
    counted = Counter(tuple(g) for g in groups)
    return [(list(g), sum(need.get(role, 0) for role in g) + len(g) * int(CUDA_CONTEXT), count)
            for g, count in counted.items()]


def run_plan_command(config: str, overrides: list[str], gpu_memory_gib: Optional[float], ttt: bool = False) -> int:
    """``refine-ray plan``: print the plan (``ttt``: of ``refine-ray eval --ttt``, :func:`make_ttt_plan`; so
    too, with a note line under the first, for a test-time-training config, one whose ``eval.ttt.mode`` is
    not none: the ``configs/paper_ttt_*.yaml`` presets); exit status 0 fits, 1 does not fit, 2 bad input
    (one line on stderr: the config, the layout, a ``model.path`` without a usable ``config.json``, no
    ``--gpu-memory`` without CUDA)."""
    import sys

    from refine_ray.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
        if gpu_memory_gib is not None and not gpu_memory_gib > 0:
            raise PlanError(f"--gpu-memory: {gpu_memory_gib:g} must be > 0 (GiB per GPU)")
        gpu = int(gpu_memory_gib * GIB) if gpu_memory_gib else local_gpu_memory()
        if gpu is None:
            raise PlanError("--gpu-memory: required on a machine without CUDA (the memory of the GPUs to plan "
                            "for, in GiB, e.g. --gpu-memory 80)")
        vocab = None
        if cfg.model.path is None:                        # a random model: the tokenizer sets its vocabulary
            from refine_ray.data import load_tokenizer

            vocab = len(load_tokenizer(cfg.tokenizer.path))
        as_ttt = not ttt and cfg.eval.ttt.mode != "none"      # a TTT preset: what `eval` would run
        plan = make_ttt_plan(cfg, vocab, gpu) if ttt or as_ttt else make_plan(cfg, vocab, gpu, on_gpu=True)
    except ConfigError as e:
        print(f"refine-ray: config error: {e}", file=sys.stderr)
        return 2
    except (PlanError, OSError) as e:
        print(f"refine-ray: {e}", file=sys.stderr)
        return 2
    lines = plan.lines()
    if as_ttt:
        lines.insert(1, f"  (a test-time-training config, eval.ttt.mode={cfg.eval.ttt.mode}: planned as "
                        f"`refine-ray eval --ttt {cfg.eval.ttt.mode}`, as --ttt would)")
    print("\n".join(lines))
    return 0 if plan.fits else 1


def startup_line(cfg: ExperimentConfig, vocab_size: int) -> tuple[str, Optional[bool]]:
    """The compact plan ``refine-ray train`` logs once its inputs are checked, and whether it fits (None:
    not checked). GPU shares are taken as CUDA GPUs where this machine has one or the job joins an
    existing cluster (``system.ray_address``); a local cluster on a CPU machine is a CPU run."""
    import torch

    from refine_ray.models.dtypes import compute_dtype

    on_gpu = torch.cuda.is_available() or bool(cfg.system.ray_address or os.environ.get("RAY_ADDRESS"))
    plan = make_plan(cfg, vocab_size, local_gpu_memory(), on_gpu, with_deepspeed=False)
    return compact_line(plan), plan.fits
