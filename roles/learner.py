"""The learner role: one DeepSpeed rank (gloo on CPU, NCCL on GPU) of N; NTP + GRPO/PPO losses
and the optimizer steps. The Ray actor is this class itself.

Each rank owns whole documents (a document's trunk pass is never split across
ranks). Every document is one DeepSpeed micro-batch, so gradient accumulation
over a rank's documents is DeepSpeed's own and ZeRO 0-3 work unchanged. Per
document the loss is ``c_ntp * w * NTP + c_pg * PPO(token-mean over its n·G·k
tokens) + c_kl * KL`` (``w`` = 1, or the token-mean weight of ``refine.ntp_loss_agg_mode``).

Optimizer steps: one per ``refine.ppo_mini_batch_size`` documents (default: the whole
batch). A rank's documents split into consecutive mini-batches of ``ppo_mini_batch_size /
num_ranks``, as verl splits each GPU's share (upstream ReFINE: 4 steps per 128-document step).
Post-training's task SFT then takes one step over the whole batch, as upstream ReFINE's.
The learning-rate schedule counts training steps, whatever the number of optimizer steps.

Every optimizer step checks the gradient norm before it is applied: a non-finite norm
(a NaN/inf loss or gradient on any rank) raises FloatingPointError naming the document,
with the step not applied (DeepSpeed's ZeRO 1-3 and bf16 optimizers skip it themselves;
at ZeRO-0 fp32, which records no norm, the norm is taken here and the step not called).

ZeRO-3 gathers a partitioned module's weights with a collective at every call, so all
ranks must make the same module calls in the same order whatever their documents
(DeepSpeed's own requirement; a mismatch hangs or aborts gloo/NCCL). Where the calls
depend on the data, ranks agree on the most any of them needs (one all_reduce) and
pad: extra empty LM-head chunks for the NTP loss, dummy documents in validation. A
collective that still waits longer than ``learner.collective_timeout_s`` raises.
"""
from __future__ import annotations

import math
import os
import socket
import time
from collections import defaultdict
from datetime import timedelta
from typing import Optional

import numpy as np
import torch

from refine_ray.algo import head_calls
from refine_ray.transport.batches import DocBatch, LearnBatch
from refine_ray.config import ExperimentConfig
from refine_ray.models.dtypes import compute_dtype
from refine_ray.refine.policy import build_policy
from refine_ray.refine.loss import CHECKED_TERMS, cross_entropy_weights, document_loss, first_non_finite
from refine_ray.refine.sequence_logprobs import answer_nll, document_ntp_loss
from refine_ray.transport.checkpoint import weights_only_loading
from refine_ray.transport.weight_sync import backend
from refine_ray.transport.weight_sync.base import gather_tensor_set
from roles.common import Role, setup_process


def deepspeed_config(cfg: ExperimentConfig, docs_per_rank: int, on_gpu: bool) -> dict:
    """The DeepSpeed config: one document per micro-batch, ``docs_per_rank`` accumulation steps
    (a rank's share of one mini-batch), ``learner.zero_stage``, ``optim.grad_clip``, bf16 only on
    a GPU with ``model.dtype=bfloat16`` (with DeepSpeed's overflow check: a non-finite step is skipped)."""
    zero: dict = {"stage": cfg.learner.zero_stage}
    if cfg.learner.zero_stage == 3:
        # Gather the full weights on save/publish rather than keeping fp16 shards only.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": docs_per_rank,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": compute_dtype(cfg.model.dtype, "cuda" if on_gpu else "cpu") == torch.bfloat16,
                 "check_grad_overflow": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class LearnerRankRole(Role):
    """Rank ``rank`` of the DeepSpeed learner. It reads most config sections (model, data, refine,
    optim, learner, train, system), so it takes the whole config. Every method except
    ``address``/``ping`` must be called on every rank in lockstep (the controller's actor group
    does), each rank with its own documents."""

    def __init__(self, cfg: ExperimentConfig, rank: int, world_size: int):
        """Nothing heavy here: the engine is built by :meth:`init` once every rank's process is up."""
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.engine = None

    def address(self) -> tuple[str, int]:
        """This node's reachable IP and a free port (rank 0's serve the rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init(self, master_addr: str, master_port: int, vocab_size: int) -> bool:
        """Join the process group at ``master_addr:master_port`` (NCCL on GPU, gloo on CPU; waits at
        most ``learner.collective_timeout_s`` for the other ranks), build the policy, AdamW and the
        linear warm-up schedule, wrap them in a DeepSpeed engine, and the weight-sync sender."""
        import deepspeed
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        os.environ.update({"RANK": str(self.rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(self.world),
                           "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        cfg = self.cfg
        self.device = setup_process(cfg.train.seed)
        on_gpu = self.device.type == "cuda"
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                                   timeout=timedelta(seconds=cfg.learner.collective_timeout_s))
        model = build_policy(cfg.model, vocab_size)
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
        warmup = cfg.optim.warmup_steps
        self.docs_per_rank = cfg.data.batch_size // self.world
        self.mini_per_rank = (cfg.refine.ppo_mini_batch_size or cfg.data.batch_size) // self.world
        # DeepSpeed steps the scheduler at every optimizer step: one per mini-batch, plus
        # post-training's task SFT step. Counting training steps keeps the schedule per step
        # (upstream ReFINE stepped it once per update call: twice per post-training step).
        updates = self.docs_per_rank // self.mini_per_rank + (cfg.train.task_update == "sft")
        sched = torch.optim.lr_scheduler.LambdaLR(
            optim, lambda n: min(1.0, (n // updates + 1) / warmup) if warmup > 0 else 1.0)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optim, lr_scheduler=sched,
            config=deepspeed_config(cfg, self.mini_per_rank, on_gpu))
        # DeepSpeed records the norm (and skips a non-finite step) in its ZeRO and bf16 optimizers;
        # at ZeRO-0 fp32 it clips with the bare torch optimizer and records neither.
        self.records_norm = hasattr(self.engine.optimizer, "_global_grad_norm")
        self.zero_optimizer = isinstance(self.engine.optimizer, ZeROOptimizer)
        self.weight_sender = backend(cfg.system.weight_sync).sender(
            self.engine.module, self.rank, cfg.learner.zero_stage == 3, cfg.system, cfg.model.dtype)
        return True

    @property
    def module(self):
        """The policy inside the DeepSpeed engine (partitioned placeholders under ZeRO-3)."""
        return self.engine.module

    def _max_over_ranks(self, counts: list[int]) -> list[int]:
        """Element-wise max of ``counts`` over the ranks under ZeRO-3 (one all_reduce; every
        rank must pass a list of the same length); ``counts`` itself otherwise."""
        if self.cfg.learner.zero_stage != 3 or self.world == 1:
            return counts
        import torch.distributed as dist

        t = torch.tensor(counts, dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def _ntp_head_calls(self, docs: DocBatch) -> list[int]:
        """Per document slot, the most LM-head calls any rank's NTP loss makes there."""
        return self._max_over_ranks([head_calls(len(docs.doc(d)) - 1) for d in range(len(docs))])

    def _begin_micro_batch(self) -> None:
        """What ``engine.forward()`` does first, for losses that call the module's own methods
        (``forward_segment``, ``lm_head``) instead: a ZeRO optimizer starts a new micro-batch
        (``clear_backward_seen_flag``). ZeRO-3 advances its micro-step counter there; without it
        every backward overwrote the gradient partitions instead of accumulating, and a step
        trained on each rank's last document only (DeepSpeed 0.19)."""
        if self.zero_optimizer:
            self.engine.optimizer.clear_backward_seen_flag()

    def train_step(self, batch: LearnBatch) -> dict[str, float]:
        """The optimizer steps of one training step over this rank's documents (every rank, in lockstep).

        ``batch``: this rank's ``data.batch_size / learner.num_ranks`` whole documents, rows
        ``(doc * n + cut) * G + sample``. Each document is one DeepSpeed micro-batch whose loss is
        :func:`refine_ray.refine.loss.document_loss` (the same function as the local step's);
        DeepSpeed divides it by the accumulation steps (= documents per mini-batch on this rank)
        and steps at the end of each mini-batch.
        Returns rank-local means over the documents (``loss``, ``ntp_loss``, ``pg_loss``,
        ``clipfrac``, ``clipfrac_lower``, ``approx_kl``, ``kl`` with KL) plus ``grad_norm`` (the
        global norm before clipping, mean over this step's optimizer steps), ``optimizer_steps``
        (DeepSpeed's count so far), ``lr`` (the rate this step used), ``time/learner_compute_s``
        (seconds) and, with ``train.task_update=sft``, the task update's metrics.
        Raises ValueError for a wrong number of documents, FloatingPointError (step not applied)
        for a non-finite gradient norm.
        """
        if len(batch.docs) != self.docs_per_rank:
            raise ValueError(f"learner rank {self.rank}: got {len(batch.docs)} documents, "
                             f"expected {self.docs_per_rank} (data.batch_size / learner.num_ranks)")
        t0 = time.perf_counter()
        r, per_doc = self.cfg.refine, batch.cuts.shape[1] * batch.samples_per_prefix
        # The rate this step's updates use (the scheduler moves on at each update).
        lr = float(self.scheduler.get_last_lr()[0])
        ntp_calls = self._ntp_head_calls(batch.docs) if r.ntp_coef > 0 else [0] * len(batch.docs)
        weights = cross_entropy_weights([len(batch.docs.doc(d)) - 1 for d in range(len(batch.docs))], r,
                                        self.mini_per_rank)
        self.engine.train()
        sums: dict[str, float] = defaultdict(float)
        norms, bad = [], None
        for d in range(len(batch.docs)):
            rows = slice(d * per_doc, (d + 1) * per_doc)
            resp, old, adv, ref = (None if a is None else torch.from_numpy(a[rows]).to(self.device) for a in
                                   (batch.responses, batch.old_logprobs, batch.advantages, batch.ref_logprobs))
            self._begin_micro_batch()
            loss, doc_metrics = document_loss(self.engine.module, torch.from_numpy(batch.docs.doc(d)).to(self.device),
                                              torch.from_numpy(batch.cuts[d]), resp, old, adv, r, ref,
                                              ntp_head_calls=ntp_calls[d], ntp_weight=weights[d])
            bad = bad or first_non_finite(doc_metrics, int(batch.docs.doc_ids[d]))
            self.engine.backward(loss)
            norms += self._step(bad)
            for name, value in doc_metrics.items():
                sums[name] += value
        metrics = {name: value / len(batch.docs) for name, value in sums.items()}
        metrics["grad_norm"] = float(np.mean(norms))
        if self.cfg.train.task_update == "sft":
            metrics.update(self._task_sft(batch))
        metrics["optimizer_steps"] = float(self.engine.global_steps)
        metrics["lr"] = lr
        metrics["time/learner_compute_s"] = time.perf_counter() - t0
        return metrics

    def _step(self, bad: Optional[tuple]) -> list[float]:
        """``engine.step()`` after a document's backward: at the end of a mini-batch (DeepSpeed's
        gradient-accumulation boundary) it applies the update and returns ``[grad norm]``, else
        ``[]``. ``bad``: this rank's first non-finite loss so far, for the error.

        Raises FloatingPointError, the update not applied, when the norm is not finite."""
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return []
        if self.records_norm:
            self.engine.step()
            norm, applied = self.engine.get_global_grad_norm(), self.engine.was_step_applied()
        else:   # ZeRO-0 fp32: the gradients are all-reduced in the boundary's backward; DeepSpeed's
            # clip takes this same norm (deepspeed.runtime.utils.clip_grad_norm_) but keeps it to itself
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            applied = math.isfinite(norm)
            if applied:
                self.engine.step()
        if not applied or not math.isfinite(norm):
            raise self._non_finite(float(norm), bad)
        return [float(norm)]

    def _non_finite(self, norm: float, bad: Optional[tuple]) -> FloatingPointError:
        """The one-line error for a step whose gradient norm is not finite, naming the first rank's
        first non-finite loss. Every rank is here (the norm is global), so it may gather."""
        mine = torch.tensor(bad[:2] + (CHECKED_TERMS.index(bad[2]),) if bad else (-1.0, 0.0, -1.0),
                            dtype=torch.float64, device=self.device)
        parts = [mine]
        if self.world > 1:
            import torch.distributed as dist

            parts = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(parts, mine)
        found = next(((rank, p.tolist()) for rank, p in enumerate(parts) if p[2] >= 0), None)
        what = (f"{CHECKED_TERMS[int(found[1][2])]} is {found[1][1]} on document {int(found[1][0])} of the corpus "
                f"(learner rank {found[0]}), so the gradient norm is {norm}" if found else
                f"the gradient norm is {norm} with finite losses on every rank (a non-finite gradient)")
        return FloatingPointError(f"non-finite training step: {what}; the optimizer step was not applied and "
                                  f"nothing was saved")

    def _task_sft(self, batch: LearnBatch) -> dict[str, float]:
        """Post-training's outer update: CE on the answer after the prompt, one optimizer step over
        the whole batch (upstream ReFINE's task SFT), pooled as ``refine.ntp_loss_agg_mode`` says."""
        if batch.answers is None:
            raise ValueError("train.task_update=sft but the batch carries no answers (data.answer_column)")
        weights = cross_entropy_weights([len(batch.answers.doc(d)) for d in range(len(batch.docs))],
                                        self.cfg.refine, self.docs_per_rank)
        self.engine.set_train_batch_size(self.docs_per_rank * self.world)   # every document, one step
        try:
            total, norms, bad = 0.0, [], None
            for d in range(len(batch.docs)):
                prompt = torch.from_numpy(batch.docs.doc(d)).to(self.device)
                answer = torch.from_numpy(batch.answers.doc(d)).to(self.device)
                self._begin_micro_batch()
                loss = self.cfg.train.task_coef * weights[d] * answer_nll(self.engine.module, prompt, answer)
                bad = bad or first_non_finite({"task_sft_loss": float(loss.detach())}, int(batch.docs.doc_ids[d]))
                self.engine.backward(loss)
                norms += self._step(bad)
                total += float(loss.detach())
        finally:
            self.engine.set_train_batch_size(self.mini_per_rank * self.world)
        return {"task_sft_loss": total / len(batch.docs), "task_grad_norm": norms[0]}

    @torch.no_grad()
    def validation_nll(self, docs: DocBatch) -> tuple[float, int]:
        """(summed NTP loss, predicted tokens) over this rank's share of held-out documents.

        Under ZeRO-3 a rank with fewer documents than another scores dummy 2-token
        documents (not counted) so that all make the same module calls."""
        self.engine.eval()
        n_docs = self._max_over_ranks([len(docs)])[0]
        pad = np.zeros(2, dtype=np.int64)
        padded = DocBatch.from_lists(list(docs.doc_ids) + [-1] * (n_docs - len(docs)),
                                     [docs.doc(d) for d in range(len(docs))] + [pad] * (n_docs - len(docs)))
        calls = self._ntp_head_calls(padded)
        total, count = 0.0, 0
        for d in range(n_docs):
            ids = torch.from_numpy(padded.doc(d)).to(self.device)
            loss = float(document_ntp_loss(self.engine.module, ids, head_calls=calls[d]))
            if d < len(docs):
                total += loss * (ids.shape[0] - 1)
                count += ids.shape[0] - 1
        self.engine.train()
        return total, count

    def connect_weights(self, group) -> bool:
        """Weight sync: join the publisher's ``group`` (collective backends; rank 0 is its sender)."""
        self.weight_sender.connect(group)
        return True

    def send_weights(self):
        """Weight sync: send the tensor set (every rank, in lockstep: ZeRO-3 gathers are collective);
        returns the backend's payload (the object store's ``{name: ndarray}`` on rank 0)."""
        return self.weight_sender.send()

    def full_weights(self) -> Optional[dict[str, np.ndarray]]:
        """The tensor set as ``{name: float32 ndarray}`` on rank 0, None elsewhere, whatever the
        backend (checks and exports; every rank calls it under ZeRO-3)."""
        return gather_tensor_set(self.engine.module, self.cfg.learner.zero_stage == 3, self.rank)

    def save(self, path: str, client_state: dict) -> None:
        """DeepSpeed checkpoint of this rank (weights, optimizer, scheduler) under ``path``, tag ``ds``."""
        self.engine.save_checkpoint(path, tag="ds", client_state=client_state)

    def load(self, path: str) -> dict:
        """Load this rank's checkpoint from ``path`` (weights-only unpickling: a pickled object
        outside tensors and DeepSpeed's allow-list raises pickle.UnpicklingError); returns the client state."""
        with weights_only_loading():        # a checkpoint from elsewhere must not run code here
            _, client_state = self.engine.load_checkpoint(path, tag="ds")
        return client_state or {}
