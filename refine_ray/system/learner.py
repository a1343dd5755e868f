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

from refine_ray.algo import agg_loss, head_calls, kl_penalty, ppo_clip_loss, refine_loss
from refine_ray.system.batches import DocBatch, LearnBatch
from refine_ray.config import ExperimentConfig
from refine_ray.refine.policy import build_policy
from refine_ray.refine.sequence_logprobs import answer_nll, document_logprobs, document_ntp_loss


def deepspeed_config(cfg: ExperimentConfig, docs_per_rank: int, on_gpu: bool) -> dict:
    zero: dict = {"stage": cfg.learner.zero_stage}
    if cfg.learner.zero_stage == 3:
        # Gather the full weights on save/publish rather than keeping fp16 shards only.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": docs_per_rank,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu and cfg.model.dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class RefineLearner:
    """A DeepSpeed engine around the policy; call on every rank in lockstep."""

    def __init__(self, cfg: ExperimentConfig, vocab_size: int):
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
        self.version = 0

    @property
    def module(self):
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
        """One optimizer step over this rank's documents; returns rank-local mean metrics."""
        if len(batch.docs) != self.docs_per_rank:
            raise ValueError(f"learner rank {self.rank}: got {len(batch.docs)} documents, "
                             f"expected {self.docs_per_rank} (data.batch_size / learner.num_ranks)")
        t0 = time.perf_counter()
        r, G = self.cfg.refine, batch.samples_per_prefix
        per_doc = batch.cuts.shape[1] * G
        # The rate this step's updates use (the scheduler moves on at each update).
        lr = float(self.scheduler.get_last_lr()[0])
        ntp_calls = self._ntp_head_calls(batch.docs) if r.ntp_coef > 0 else [0] * len(batch.docs)
        self.engine.train()
        sums: dict[str, float] = defaultdict(float)
        for d in range(len(batch.docs)):
            rows = slice(d * per_doc, (d + 1) * per_doc)
            ids = torch.from_numpy(batch.docs.doc(d)).to(self.device)
            resp = torch.from_numpy(batch.responses[rows]).to(self.device)
            out = document_logprobs(self.engine.module, ids, torch.from_numpy(batch.cuts[d]), resp, G,
                                    r.temperature, shared=r.prefix_sharing, with_ntp=r.ntp_coef > 0,
                                    ntp_head_calls=ntp_calls[d])
            old = torch.from_numpy(batch.old_logprobs[rows]).to(self.device)
            adv = torch.from_numpy(batch.advantages[rows]).to(self.device)
            mask = torch.ones_like(old)
            pg, pg_metrics = ppo_clip_loss(out.logprobs, old, adv, mask, r.clip_low, r.clip_high, r.dual_clip)
            kl = None
            if r.kl_coef > 0:
                ref = torch.from_numpy(batch.ref_logprobs[rows]).to(self.device)
                kl = agg_loss(kl_penalty(out.logprobs, ref, r.kl_type), mask)
                sums["kl"] += float(kl.detach())
            ntp = out.ntp_loss if out.ntp_loss is not None else torch.zeros((), device=self.device)
            loss = refine_loss(ntp, pg, kl, r.ntp_coef, r.pg_coef, r.kl_coef)
            self.engine.backward(loss)
            self.engine.step()
            sums["loss"] += float(loss.detach())
            sums["ntp_loss"] += float(ntp.detach())
            sums["pg_loss"] += float(pg.detach())
            for name, value in pg_metrics.items():
                sums[name] += float(value)
        metrics = {name: value / len(batch.docs) for name, value in sums.items()}
        metrics["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        if self.cfg.train.task_update == "sft":
            metrics.update(self._task_sft(batch))
        metrics["lr"] = lr
        metrics["time/learner_compute_s"] = time.perf_counter() - t0
        self.version += 1
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

    def full_state_dict(self) -> Optional[dict[str, np.ndarray]]:
        """Full float32 weights as numpy on rank 0 (None elsewhere). Collective under ZeRO-3."""
        module = self.engine.module
        if self.cfg.learner.zero_stage == 3:
            import deepspeed

            out = {}
            for name, p in module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if self.rank == 0:
                        out[name] = p.detach().float().cpu().numpy().copy()
            for name, b in module.named_buffers():
                if self.rank == 0:
                    out[name] = b.detach().float().cpu().numpy().copy()
            return out if self.rank == 0 else None
        if self.rank != 0:
            return None
        return {name: t.detach().float().cpu().numpy().copy() for name, t in module.state_dict().items()}

    def join_weight_group(self, host: str, port: int, world: int, group_id: int) -> None:
        """Rank 0 joins the weight-broadcast group as its sender (rank 0 of that group)."""
        from refine_ray.system.collective_sync import WeightGroup

        self.weight_group = WeightGroup(host, port, world, 0, group_id, self.cfg.system.weight_sync_timeout_s)

    def broadcast_weights(self) -> int:
        """Send the full weights to the group in buckets; every learner rank calls this (ZeRO-3 gathers)."""
        from refine_ray.system.collective_sync import sync_dtype, take_part_in_gathers

        params = [p for _, p in self.engine.module.named_parameters()]
        dtype, mb = sync_dtype(self.cfg.model.dtype), self.cfg.system.weight_bucket_mb
        gather = None
        if self.cfg.learner.zero_stage == 3:
            import deepspeed

            gather = lambda bucket: deepspeed.zero.GatheredParameters(bucket, modifier_rank=None)  # noqa: E731
        if self.rank != 0:
            if gather is not None:
                take_part_in_gathers(params, dtype, mb, gather)
            return 0
        return self.weight_group.send(params, dtype, mb, gather)

    def save(self, path: str, client_state: dict) -> None:
        self.engine.save_checkpoint(path, tag="ds", client_state=client_state)

    def load(self, path: str) -> dict:
        from refine_ray.system.checkpoint import weights_only_loading

        with weights_only_loading():        # a checkpoint from elsewhere must not run code here
            _, client_state = self.engine.load_checkpoint(path, tag="ds")
        return client_state or {}
