"""One DeepSpeed rank of the learner: NTP + GRPO/PPO losses and the optimizer step.

Each rank owns whole documents (a document's trunk pass is never split across
ranks). Every document is one DeepSpeed micro-batch, so gradient accumulation
over a rank's documents is DeepSpeed's own and ZeRO 0-3 work unchanged. Per
document the loss is ``c_ntp * NTP + c_pg * PPO(token-mean over its n·G·k
tokens) + c_kl * KL``.

ZeRO-3 gathers a partitioned module's weights with a collective at every call, so all
ranks must make the same module calls in the same order whatever their documents
(DeepSpeed's own requirement; a mismatch hangs or aborts gloo/NCCL). Where the calls
depend on the data, ranks agree on the most any of them needs (one all_reduce) and
pad: extra empty LM-head chunks for the NTP loss, dummy documents in validation. A
collective that still waits longer than ``learner.collective_timeout_s`` raises.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from datetime import timedelta
from typing import Optional

import numpy as np
import torch

from refine_ray.algo import head_calls
from refine_ray.system.batches import DocBatch, LearnBatch
from refine_ray.config import ExperimentConfig
from refine_ray.models.dtypes import compute_dtype
from refine_ray.refine.policy import build_policy
from refine_ray.refine.loss import document_loss
from refine_ray.refine.sequence_logprobs import answer_nll, document_ntp_loss


def deepspeed_config(cfg: ExperimentConfig, docs_per_rank: int, on_gpu: bool) -> dict:
    """The DeepSpeed config: one document per micro-batch, ``docs_per_rank`` accumulation steps,
    ``learner.zero_stage``, ``optim.grad_clip``, bf16 only on a GPU with ``model.dtype=bfloat16``."""
    zero: dict = {"stage": cfg.learner.zero_stage}
    if cfg.learner.zero_stage == 3:
        # Gather the full weights on save/publish rather than keeping fp16 shards only.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": docs_per_rank,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": compute_dtype(cfg.model.dtype, "cuda" if on_gpu else "cpu") == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class RefineLearner:
    """A DeepSpeed engine around the policy; call on every rank in lockstep."""

    def __init__(self, cfg: ExperimentConfig, vocab_size: int):
        """Join the process group (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from the environment;
        NCCL on GPU, gloo on CPU; ``learner.collective_timeout_s``), build the policy, AdamW and
        the linear warm-up schedule, and wrap them in a DeepSpeed engine."""
        import deepspeed

        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                                   timeout=timedelta(seconds=cfg.learner.collective_timeout_s))
        model = build_policy(cfg.model, vocab_size)
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
        warmup = cfg.optim.warmup_steps
        # DeepSpeed steps the scheduler at every optimizer step; post-training makes two
        # updates per training step (REFINE, then task SFT). Counting training steps keeps
        # the schedule per step (the reference stepped it twice per post-training step).
        updates = 2 if cfg.train.task_update == "sft" else 1
        sched = torch.optim.lr_scheduler.LambdaLR(
            optim, lambda n: min(1.0, (n // updates + 1) / warmup) if warmup > 0 else 1.0)
        self.docs_per_rank = cfg.data.batch_size // self.world
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optim, lr_scheduler=sched,
            config=deepspeed_config(cfg, self.docs_per_rank, on_gpu))

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

    def train_step(self, batch: LearnBatch) -> dict[str, float]:
        """One optimizer step over this rank's documents (every rank, in lockstep).

        ``batch``: this rank's ``data.batch_size / learner.num_ranks`` whole documents, rows
        ``(doc * n + cut) * G + sample``. Each document is one DeepSpeed micro-batch whose loss is
        :func:`refine_ray.refine.loss.document_loss` (the same function as the local step's);
        DeepSpeed divides it by the accumulation steps (= documents) and steps once at the end.
        Returns rank-local means over the documents (``loss``, ``ntp_loss``, ``pg_loss``,
        ``clipfrac``, ``clipfrac_lower``, ``approx_kl``, ``kl`` with KL) plus ``grad_norm``,
        ``lr`` (the rate this step used), ``time/learner_compute_s`` (seconds) and, with
        ``train.task_update=sft``, the task update's metrics.
        Raises ValueError for a wrong number of documents.
        """
        if len(batch.docs) != self.docs_per_rank:
            raise ValueError(f"learner rank {self.rank}: got {len(batch.docs)} documents, "
                             f"expected {self.docs_per_rank} (data.batch_size / learner.num_ranks)")
        t0 = time.perf_counter()
        r, per_doc = self.cfg.refine, batch.cuts.shape[1] * batch.samples_per_prefix
        # The rate this step's updates use (the scheduler moves on at each update).
        lr = float(self.scheduler.get_last_lr()[0])
        ntp_calls = self._ntp_head_calls(batch.docs) if r.ntp_coef > 0 else [0] * len(batch.docs)
        self.engine.train()
        sums: dict[str, float] = defaultdict(float)
        for d in range(len(batch.docs)):
            rows = slice(d * per_doc, (d + 1) * per_doc)
            resp, old, adv, ref = (None if a is None else torch.from_numpy(a[rows]).to(self.device) for a in
                                   (batch.responses, batch.old_logprobs, batch.advantages, batch.ref_logprobs))
            loss, doc_metrics = document_loss(self.engine.module, torch.from_numpy(batch.docs.doc(d)).to(self.device),
                                              torch.from_numpy(batch.cuts[d]), resp, old, adv, r, ref,
                                              ntp_head_calls=ntp_calls[d])
            self.engine.backward(loss)
            self.engine.step()
            for name, value in doc_metrics.items():
                sums[name] += value
        metrics = {name: value / len(batch.docs) for name, value in sums.items()}
        metrics["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        if self.cfg.train.task_update == "sft":
            metrics.update(self._task_sft(batch))
        metrics["lr"] = lr
        metrics["time/learner_compute_s"] = time.perf_counter() - t0
        return metrics

    def _task_sft(self, batch: LearnBatch) -> dict[str, float]:
        """Post-training's outer update: CE on the answer after the prompt, one optimizer step."""
        if batch.answers is None:
            raise ValueError("train.task_update=sft but the batch carries no answers (data.answer_column)")
        total = 0.0
        for d in range(len(batch.docs)):
            prompt = torch.from_numpy(batch.docs.doc(d)).to(self.device)
            answer = torch.from_numpy(batch.answers.doc(d)).to(self.device)
            loss = self.cfg.train.task_coef * answer_nll(self.engine.module, prompt, answer)
            self.engine.backward(loss)
            self.engine.step()
            total += float(loss.detach())
        return {"task_sft_loss": total / len(batch.docs),
                "task_grad_norm": float(self.engine.get_global_grad_norm() or 0.0)}

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

    def gather_weights(self) -> Optional[dict[str, np.ndarray]]:
        """The weight-sync tensor set as ``{name: float32 ndarray}`` on rank 0 (None elsewhere);
        every rank must call it under ZeRO-3 (the gathers are collective). See weight_sync.object_store."""
        from refine_ray.system.weight_sync.object_store import gather_weights

        return gather_weights(self.engine.module, self.cfg.learner.zero_stage == 3, self.rank)

    def join_weight_group(self, host: str, port: int, world: int, rank: int, group_id: int,
                          timeout_s: float) -> None:
        """Rank 0 joins the weight-broadcast group as its sender (``rank`` 0 of that group)."""
        from refine_ray.system.weight_sync.collective import WeightGroup

        self.weight_group = WeightGroup(host, port, world, rank, group_id, timeout_s)

    def send_weights(self, model_dtype: str, bucket_mb: float) -> int:
        """Broadcast the tensor set to the weight group in buckets; returns bytes sent (0 off rank 0).
        Every learner rank calls this (ZeRO-3 gathers are collective). See weight_sync.collective."""
        from refine_ray.system.weight_sync.collective import send_weights

        group = self.weight_group if self.rank == 0 else None
        return send_weights(self.engine.module, group, self.cfg.learner.zero_stage == 3, model_dtype, bucket_mb)

    def save(self, path: str, client_state: dict) -> None:
        """DeepSpeed checkpoint of this rank (weights, optimizer, scheduler) under ``path``, tag ``ds``."""
        self.engine.save_checkpoint(path, tag="ds", client_state=client_state)

    def load(self, path: str) -> dict:
        """Load this rank's checkpoint from ``path`` (weights-only unpickling: a pickled object
        outside tensors and DeepSpeed's allow-list raises pickle.UnpicklingError); returns the client state."""
        from refine_ray.system.checkpoint import weights_only_loading

        with weights_only_loading():        # a checkpoint from elsewhere must not run code here
            _, client_state = self.engine.load_checkpoint(path, tag="ds")
        return client_state or {}
