"""The single controller. One training step reads like the algorithm:

    score -> rollout -> reward (+ reference) -> advantages -> learn -> publish weights

Every role is its own Ray actor; batches move between them as object refs. In
``sync`` mode each step is exactly on-policy. In ``async`` mode the scoring,
rollout and reward of step t+1 run while the learner trains on step t, with the
weights of the last publication; the PPO ratio against the recorded behaviour
log-probs corrects for the one-version lag, and batches older than
``system.max_staleness`` versions are regenerated, never used.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray
import torch

from refine_ray.algo import grpo_advantages, make_group_ids
from refine_ray.batches import DocBatch, LearnBatch, RewardBatch, RolloutBatch, ScoredBatch
from refine_ray.config import ExperimentConfig
from refine_ray.placement import Placement
from refine_ray.rewarding import reward_metrics
from refine_ray.weight_sync import ObjectStoreWeightSync
from roles.learner import LearnerRankRole
from roles.reference import ReferenceRole
from roles.reward import RewardRole
from roles.rollout import RolloutRole
from roles.scorer import ScorerRole


@dataclass
class Generation:
    """Refs of one step's experience, one entry per scorer shard."""
    scored: list
    rollouts: list
    rewards: list
    ref_logprobs: list
    launched_at: float


def init_ray(cfg: ExperimentConfig) -> None:
    if ray.is_initialized():
        return
    if cfg.system.ray_address:
        ray.init(address=cfg.system.ray_address)
    else:
        ray.init(num_cpus=cfg.system.num_cpus, num_gpus=cfg.system.num_gpus, include_dashboard=False)


def concat_scored(parts: list[ScoredBatch]) -> ScoredBatch:
    docs = DocBatch.from_lists([int(i) for p in parts for i in p.docs.doc_ids],
                               [p.docs.doc(i) for p in parts for i in range(len(p.docs))])
    return ScoredBatch(docs=docs, cuts=np.concatenate([p.cuts for p in parts]),
                       gt_ids=np.concatenate([p.gt_ids for p in parts]),
                       gt_hidden=np.concatenate([p.gt_hidden for p in parts]),
                       cut_entropy=np.concatenate([p.cut_entropy for p in parts]),
                       version=min(p.version for p in parts), skipped=sum(p.skipped for p in parts))


class RefineTrainer:
    def __init__(self, cfg: ExperimentConfig, vocab_size: int):
        self.cfg = cfg
        init_ray(cfg)
        self.placement = Placement(cfg)
        self.version = 0
        self.learners = self._make_learners(vocab_size)
        n_scorers = cfg.scorer.num_actors
        self.scorers = [self._actor(ScorerRole, "scorer", i, cfg, i, i, n_scorers) for i in range(n_scorers)]
        self.rollouts = [self._actor(RolloutRole, "rollout", i, cfg, i) for i in range(cfg.rollout.num_actors)]
        self.rewarders = [self._actor(RewardRole, "reward", i, cfg, i) for i in range(cfg.reward.num_actors)]
        self.references = ([self._actor(ReferenceRole, "reference", i, cfg, i)
                            for i in range(cfg.reference.num_actors)] if cfg.reference.enabled else [])
        ray.get([a.ping.remote() for a in self.scorers + self.rollouts + self.rewarders + self.references])
        self.sync = ObjectStoreWeightSync(self.learners, self.scorers + self.rollouts)
        # Version 0: every inference role starts from exactly the learner's initial weights.
        ray.get(self.sync.publish(0).acks)
        self.pending: Optional[Generation] = None
        self.last_experience: Optional[tuple[ScoredBatch, RolloutBatch, RewardBatch]] = None
        self.docs_per_scorer = cfg.data.batch_size // n_scorers
        if cfg.data.batch_size % n_scorers:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by scorer.num_actors={n_scorers}")

    def _actor(self, cls, role: str, index: int, *args):
        return ray.remote(cls).options(**self.placement.options(role, index)).remote(*args)

    def _make_learners(self, vocab_size: int) -> list:
        world = self.cfg.learner.num_ranks
        ranks = [self._actor(LearnerRankRole, "learner", r, self.cfg, r, world) for r in range(world)]
        addr, port = ray.get(ranks[0].address.remote())
        ray.get([r.init.remote(addr, port, vocab_size) for r in ranks])
        return ranks

    # ------------------------------------------------------------ the step
    def launch_generation(self, redo: Optional[list] = None) -> Generation:
        """Score -> rollout -> reward (+ reference) for one step, as a chain of refs.

        ``redo``: the scored shards of a stale batch; their documents are scored and
        sampled again with the current weights, so no document is skipped.
        """
        scored, rollouts, rewards, refs = [], [], [], []
        for i, scorer in enumerate(self.scorers):
            if redo is None:
                s = scorer.next_batch.remote(self.docs_per_scorer)
            else:
                s = scorer.score.remote(redo[i].docs)
            r = self.rollouts[i % len(self.rollouts)].generate.remote(s)
            scored.append(s)
            rollouts.append(r)
            rewards.append(self.rewarders[i % len(self.rewarders)].score.remote(s, r))
            if self.references:
                refs.append(self.references[i % len(self.references)].logprobs.remote(s, r))
        return Generation(scored, rollouts, rewards, refs, time.perf_counter())

    def collect(self, gen: Generation):
        """Fetch one step's experience; returns (scored, rollout, rewards, ref_logprobs, timings, scored shards)."""
        t0 = time.perf_counter()
        scored_parts = ray.get(gen.scored)
        t_score = time.perf_counter()
        roll_parts = ray.get(gen.rollouts)
        t_roll = time.perf_counter()
        reward_parts = ray.get(gen.rewards)
        ref = np.concatenate(ray.get(gen.ref_logprobs)) if gen.ref_logprobs else None
        t_reward = time.perf_counter()
        scored = concat_scored(scored_parts)
        rollout = RolloutBatch(tokens=np.concatenate([r.tokens for r in roll_parts]),
                               logprobs=np.concatenate([r.logprobs for r in roll_parts]),
                               versions=np.concatenate([r.versions for r in roll_parts]),
                               samples_per_prefix=roll_parts[0].samples_per_prefix)
        rewards = RewardBatch(rewards=np.concatenate([r.rewards for r in reward_parts]),
                              components={k: np.concatenate([r.components[k] for r in reward_parts])
                                          for k in reward_parts[0].components})
        timings = {"time/wait_score_s": t_score - t0, "time/wait_rollout_s": t_roll - t_score,
                   "time/wait_reward_s": t_reward - t_roll}
        return scored, rollout, rewards, ref, timings, scored_parts

    def advantages(self, scored: ScoredBatch, rewards: RewardBatch) -> np.ndarray:
        G = self.cfg.refine.samples_per_prefix
        groups = make_group_ids(len(scored.docs), scored.n_chunks, G)
        adv = grpo_advantages(torch.from_numpy(rewards.rewards).double(), groups,
                              normalize_std=self.cfg.refine.normalize_adv_std)
        return adv.float().numpy()

    def step(self) -> dict[str, float]:
        t_start = time.perf_counter()
        gen = self.pending or self.launch_generation()
        self.pending = None
        scored, rollout, rewards, ref, timings, shards = self.collect(gen)
        staleness = self.version - int(rollout.versions.min())
        regenerated = 0
        while staleness > self.cfg.system.max_staleness:
            regenerated += 1       # too old to importance-correct: the same documents again, on-policy
            scored, rollout, rewards, ref, timings, shards = self.collect(self.launch_generation(redo=shards))
            staleness = self.version - int(rollout.versions.min())
        if self.cfg.system.mode == "async":
            self.pending = self.launch_generation()   # overlaps with the learner below
        adv = self.advantages(scored, rewards)
        self.last_experience = (scored, rollout, rewards)   # for inspection (tests, debugging)
        batch = LearnBatch(docs=scored.docs, cuts=scored.cuts, responses=rollout.tokens,
                           old_logprobs=rollout.logprobs, advantages=adv, versions=rollout.versions,
                           samples_per_prefix=rollout.samples_per_prefix, ref_logprobs=ref)
        t_learn = time.perf_counter()
        batch_ref = ray.put(batch)
        per_rank = ray.get([r.train_step.remote(batch_ref) for r in self.learners])
        t_publish = time.perf_counter()
        self.version += 1
        pub = self.sync.publish(self.version)
        if self.cfg.system.mode == "sync":
            ray.get(pub.acks)
        t_end = time.perf_counter()
        metrics = {k: float(np.mean([m[k] for m in per_rank])) for k in per_rank[0]}
        metrics.update(reward_metrics(rewards))
        metrics.update(timings)
        metrics.update({
            "advantage/mean": float(adv.mean()), "advantage/abs_mean": float(np.abs(adv).mean()),
            "cut_entropy": float(scored.cut_entropy.mean()), "staleness": float(staleness),
            "stale_regenerated": float(regenerated), "docs_skipped_total": float(scored.skipped),
            "version": float(self.version), "samples": float(len(rollout.tokens)),
            "time/learn_s": t_publish - t_learn, "time/publish_s": t_end - t_publish,
            "time/weight_gather_s": pub.gather_s, "time/step_s": t_end - t_start,
            "tokens_per_s": float(len(scored.docs.tokens) / max(t_end - t_start, 1e-9)),
        })
        return metrics

    def shutdown(self) -> None:
        if self.pending is not None:
            ray.get(self.pending.rewards)
        for actor in self.learners + self.scorers + self.rollouts + self.rewarders + self.references:
            ray.kill(actor)
        self.placement.remove()
