"""Test-time training (TTT): adapt on each evaluation prompt, answer greedily, restore.

For every batch of ``ttt.batch_size`` prompts (default 1): run ``ttt.steps`` local
updates (:class:`refine_ray.refine.local_step.LocalRefineStep`) on the prompt tokens with
REFINE (``mode='refine'``: NTP + GRPO, the paper's "TTT ReFINE") or NTP only
(``mode='ntp'``: "TTT SFT"), then answer each prompt greedily with
:func:`refine_ray.models.generation.generate`.

Decisions vs upstream ReFINE:
  * **Reset by default.** After each batch the weights AND the optimizer state are
    restored to what they were before it, so every prompt is adapted from the same
    model and the score does not depend on test-set order. Upstream ReFINE never
    resets (TTT accumulates over the whole test set); ``accumulate: true`` keeps that
    behaviour explicitly.
  * The sampling RNG is re-seeded with ``ttt.seed`` at every batch, so a prompt's
    adaptation is reproducible and independent of its position.
  * A prompt too short for ``n_chunks`` cuts of ``response_length`` tokens falls back
    to NTP-only for that prompt (counted in ``ttt/ntp_fallback_prompts``), never an error.
  * Weights stay float32 (updates of lr ~1e-6 vanish in bf16 weights); on CUDA with
    ``model.dtype: bfloat16`` adaptation and generation run under bf16 autocast.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch

from refine_ray.config import ExperimentConfig, TTTConfig
from refine_ray.refine.local_step import LocalRefineStep
from refine_ray.models.dtypes import compute_dtype
from refine_ray.models.generation import generate

__all__ = ["TTTConfig", "TestTimeTrainer"]


Hook = Callable[[str, int, "TestTimeTrainer"], None]


class TestTimeTrainer:
    """Owns the optimizer and the snapshot; ``answer`` runs adapt → generate → restore per batch."""

    __test__ = False  # not a pytest class

    def __init__(self, model, cfg: ExperimentConfig, ttt: TTTConfig, tokenizer=None):
        self.model, self.cfg, self.ttt = model, cfg, ttt
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        self.updater = LocalRefineStep(model, self.optimizer, cfg.refine, cfg.optim.grad_clip, tokenizer,
                                       cfg.reward.encoder, seed=ttt.seed)
        device = next(model.parameters()).device
        self.autocast = compute_dtype(cfg.model.dtype, device) == torch.bfloat16
        self.metrics: dict[str, float] = defaultdict(float)

    # ------------------------------------------------------------ snapshot / restore
    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Copies of every weight/buffer and of the optimizer state (same device)."""
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return weights, copy.deepcopy(self.optimizer.state_dict())

    def restore(self, snap: tuple[dict[str, torch.Tensor], dict]) -> None:
        """Copy the snapshot back in place (parameters keep their identity for the optimizer)."""
        weights, optim_state = snap
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(weights[k])
        self.optimizer.load_state_dict(copy.deepcopy(optim_state))  # keep the snapshot pristine
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ adaptation
    def adapt(self, docs: Sequence[torch.Tensor]) -> dict[str, float]:
        """``ttt.steps`` local updates on ``docs``; returns the last step's metrics."""
        mode = self.ttt.mode
        if mode == "none":
            return {}
        self.updater.reseed(self.ttt.seed)
        last: dict[str, float] = {}
        was_training = self.model.training
        self.model.train()
        try:
            for _ in range(self.ttt.steps):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    last = self.updater.step(docs, mode)
        finally:
            self.model.train(was_training)
        m = self.metrics
        m["ttt/batches"] += 1
        m["ttt/steps"] += self.ttt.steps
        m["ttt/loss_sum"] += last.get("loss", 0.0)
        if mode == "refine":
            m["ttt/ntp_fallback_prompts"] += last.get("ntp_only_docs", 0.0)
            m["ttt/reward_sum"] += last.get("train_cuts/reward_mean", 0.0)
            m["ttt/refine_batches"] += 1.0 if last.get("refine_docs", 0.0) > 0 else 0.0
        return last

    def summary(self) -> dict[str, float]:
        """Mean loss / reward over batches and the fallback count."""
        m = self.metrics
        out = {"ttt/batches": m["ttt/batches"], "ttt/steps": m["ttt/steps"],
               "ttt/ntp_fallback_prompts": m["ttt/ntp_fallback_prompts"]}
        if m["ttt/batches"]:
            out["ttt/loss_mean"] = m["ttt/loss_sum"] / m["ttt/batches"]
        if m["ttt/refine_batches"]:
            out["ttt/reward_mean"] = m["ttt/reward_sum"] / m["ttt/refine_batches"]
        return out

    # ------------------------------------------------------------ the loop
    def answer(self, prompts: Sequence[torch.Tensor], max_new_tokens: Sequence[int],
               eos_token_id=None, hook: Optional[Hook] = None, progress=None,
               min_new_tokens: int = 0) -> list[torch.Tensor]:
        """Adapt on each batch, answer its prompts greedily, restore (unless accumulating).

        ``hook(event, batch_index, self)`` is called with ``'start'`` before a batch's
        adaptation and ``'adapted'`` after it (before generation). ``progress`` (e.g. a
        tqdm bar) gets ``update(n)`` per batch. ``eos_token_id`` / ``min_new_tokens`` go to
        :func:`generate` (stop ids, and how many tokens come before a stop may).
        """
        if len(prompts) != len(max_new_tokens):
            raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} generation lengths")
        device = next(self.model.parameters()).device
        restore_to = None if (self.ttt.accumulate or self.ttt.mode == "none") else self.snapshot()
        answers: list[torch.Tensor] = []
        bs = self.ttt.batch_size
        for b, start in enumerate(range(0, len(prompts), bs)):
            batch = [p.to(device) for p in prompts[start:start + bs]]
            if hook:
                hook("start", b, self)
            self.adapt(batch)
            if hook:
                hook("adapted", b, self)
            self.model.eval()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                for i, ids in enumerate(batch):
                    out = generate(self.model, ids, int(max_new_tokens[start + i]), eos_token_id=eos_token_id,
                                   min_new_tokens=min_new_tokens)
                    answers.append(out.cpu())
            if restore_to is not None:
                self.restore(restore_to)
            if progress is not None:
                progress.update(len(batch))
        return answers
