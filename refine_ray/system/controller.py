"""The single controller. One training step reads like the algorithm:

    score -> rollout -> reward (+ reference) -> advantages -> learn -> publish weights

Every role is its own Ray actor; batches move between them as object refs. A
step's documents are split into shards, one chain of calls per shard. In
``sync`` mode each step is exactly on-policy. In ``async`` mode the experience of
step t+1 is generated while the learner trains on step t, with the weights of
the last publication; the PPO ratio against the recorded behaviour log-probs
corrects for the lag, and batches older than ``system.max_staleness`` versions
are regenerated on the same documents, never used.

Faults: if an inference actor dies, it is replaced, receives the current
weights, and its shards are issued again with the same documents and seeds, so
no sample is lost or duplicated. A dead learner rank stops the job with a
message naming the checkpoint to resume from.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayError

from refine_ray.system import checkpoint as ckpt
from refine_ray.system.actor_group import RolePool
from refine_ray.algo import grpo_advantages, make_group_ids
from refine_ray.system.batches import DocBatch, LearnBatch, RewardBatch, RolloutBatch, ScoredBatch
from refine_ray.config import ExperimentConfig, to_dict
from refine_ray.data import DataCursor
from refine_ray.system.placement import Placement
from refine_ray.refine.rewarding import reward_metrics
from refine_ray.refine.scoring import min_document_tokens
from refine_ray.system.weight_sync import CollectiveWeightSync, ObjectStoreWeightSync
from roles.learner import LearnerRankRole
from roles.reference import ReferenceRole
from roles.reward import RewardRole
from roles.rollout import RolloutRole
from roles.scorer import ScorerRole

log = logging.getLogger("refine_ray")


class LearnerFailure(RuntimeError):
    """A learner rank died: the job stops and resumes from the last checkpoint."""


@dataclass
class Shard:
    index: int
    rows: list[int]
    refs: list                      # [scored, rollout, reward] (+ reference log-probs)


@dataclass
class Generation:
    step: int
    shards: list[Shard] = field(default_factory=list)
    ready: Optional[list] = None    # already-fetched shard values (restored from a checkpoint)


@dataclass
class Experience:
    scored: ScoredBatch
    rollout: RolloutBatch
    rewards: RewardBatch
    ref_logprobs: Optional[np.ndarray]
    shard_values: list


def init_ray(cfg: ExperimentConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.system.ray_address or os.environ.get("RAY_ADDRESS")   # `ray job submit` sets RAY_ADDRESS
    if address:
        ray.init(address=address)
    else:   # a new local cluster, never one that happens to run on this machine
        ray.init(address="local", num_cpus=cfg.system.num_cpus, num_gpus=cfg.system.num_gpus,
                 include_dashboard=False)


def merge(values: list) -> Experience:
    """Concatenate per-shard (scored, rollout, reward[, ref]) values in shard order."""
    scored = [v[0] for v in values]
    rolls = [v[1] for v in values]
    rews = [v[2] for v in values]
    docs = DocBatch.from_lists([int(i) for s in scored for i in s.docs.doc_ids],
                               [s.docs.doc(i) for s in scored for i in range(len(s.docs))])
    cat = np.concatenate
    return Experience(
        scored=ScoredBatch(docs=docs, cuts=cat([s.cuts for s in scored]), gt_ids=cat([s.gt_ids for s in scored]),
                           gt_hidden=cat([s.gt_hidden for s in scored]),
                           cut_entropy=cat([s.cut_entropy for s in scored]),
                           version=min(s.version for s in scored), step=scored[0].step,
                           compute_s=sum(s.compute_s for s in scored),
                           answers=None if scored[0].answers is None else DocBatch.from_lists(
                               [int(i) for s in scored for i in s.answers.doc_ids],
                               [s.answers.doc(i) for s in scored for i in range(len(s.answers))])),
        rollout=RolloutBatch(tokens=cat([r.tokens for r in rolls]), logprobs=cat([r.logprobs for r in rolls]),
                             versions=cat([r.versions for r in rolls]),
                             samples_per_prefix=rolls[0].samples_per_prefix, compute_s=sum(r.compute_s for r in rolls)),
        rewards=RewardBatch(rewards=cat([r.rewards for r in rews]),
                            components={k: cat([r.components[k] for r in rews]) for k in rews[0].components},
                            compute_s=sum(r.compute_s for r in rews)),
        ref_logprobs=cat([v[3] for v in values]) if len(values[0]) > 3 else None,
        shard_values=values)


class RefineTrainer:
    def __init__(self, cfg: ExperimentConfig, vocab_size: int, lengths: Optional[np.ndarray] = None,
                 resume_from: Optional[Path] = None):
        """``lengths``: token count per corpus row if already known (preflight); else a scorer counts.
        ``resume_from``: the checkpoint preflight chose; else ``train.resume_from``, else ``latest``
        when ``train.resume``. Raises ``checkpoint.CheckpointError`` for a corrupted checkpoint."""
        self.cfg = cfg
        init_ray(cfg)
        self.placement = Placement(cfg)
        self.learners = self._make_learners(vocab_size)
        opts = self.placement.options
        self.pools: dict[str, RolePool] = {
            "scorer": RolePool("scorer", ScorerRole, lambda i: (cfg, i), lambda i: opts("scorer", i),
                               cfg.scorer.num_actors),
            "rollout": RolePool("rollout", RolloutRole, lambda i: (cfg, i),
                                lambda i: opts("rollout", min(i, cfg.rollout.num_actors - 1)),
                                cfg.rollout.num_actors),
            "reward": RolePool("reward", RewardRole, lambda i: (cfg, i), lambda i: opts("reward", i),
                               cfg.reward.num_actors),
        }
        if cfg.reference.enabled:
            self.pools["reference"] = RolePool("reference", ReferenceRole, lambda i: (cfg, i),
                                               lambda i: opts("reference", i), cfg.reference.num_actors)
        for pool in self.pools.values():
            pool.ready()
        if lengths is None:
            lengths = ray.get(self.pools["scorer"][0].lengths.remote())
        self.cursor = DataCursor(lengths, max(min_document_tokens(cfg.refine), cfg.data.min_length),
                                 cfg.data.shuffle, cfg.data.seed, source=f"data.path '{cfg.data.path}'")
        self.sync = (CollectiveWeightSync(self.learners, cfg.system, cfg.model.dtype)
                     if cfg.system.weight_sync == "collective" else ObjectStoreWeightSync(self.learners))
        self.step_index = 0
        self.version = 0
        self.failures = 0
        self.pending: Optional[Generation] = None
        self.last_experience: Optional[Experience] = None
        self.val_docs: Optional[DocBatch] = None
        if resume_from is None:            # not chosen (and verified) by preflight
            if cfg.train.resume_from:
                resume_from = ckpt.find_checkpoint(cfg.train.resume_from)
            elif cfg.train.resume:
                resume_from = ckpt.latest_checkpoint(cfg.train.output_dir)
            if resume_from is not None:
                ckpt.verify_checkpoint(resume_from)
        if resume_from is not None:
            self.load(Path(resume_from))
        else:
            self.publish(wait=True)   # version 0: every role starts from the learner's initial weights

    # ------------------------------------------------------------ set-up
    def _make_learners(self, vocab_size: int) -> list:
        world = self.cfg.learner.num_ranks
        ranks = [ray.remote(LearnerRankRole).options(**self.placement.options("learner", r)).remote(self.cfg, r, world)
                 for r in range(world)]
        # Every rank's process is up before any joins the group: the rendezvous waits at most
        # learner.collective_timeout_s for the others.
        addr, port = ray.get([r.address.remote() for r in ranks])[0]
        ray.get([r.init.remote(addr, port, vocab_size) for r in ranks])
        return ranks

    def _learner_call(self, method: str, *args) -> list:
        """``method`` on every rank; a rank that dies or raises stops the job with one line
        naming the first rank to fail (the others usually fail waiting on it)."""
        from ray.exceptions import RayTaskError

        refs = [getattr(r, method).remote(*args) for r in self.learners]
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done[0])
            return ray.get(refs)
        except (RayActorError, RayTaskError) as e:
            latest = ckpt.latest_checkpoint(self.cfg.train.output_dir)
            where = f"checkpoint '{latest}'" if latest else "the start (no checkpoint yet)"
            again = "the same command" + (" without train.overwrite=true" if self.cfg.train.overwrite else "")
            hint = f"stopping. Run {again} again to resume from {where}."
            if isinstance(e, RayActorError):
                raise LearnerFailure(f"a learner rank died during '{method}' at step {self.step_index} "
                                     f"({type(e).__name__}); {hint}") from None
            log.debug("learner rank failed during '%s': %s", method, e)
            cause = e.cause if isinstance(e.cause, BaseException) else e
            first = (str(cause).strip().splitlines() or [""])[0][:300]
            if "timed out" in first.lower() or "timeout" in type(cause).__name__.lower():
                hint = (f"a collective waited longer than learner.collective_timeout_s="
                        f"{self.cfg.learner.collective_timeout_s:g} s (ranks made different collective "
                        f"calls, or one rank was that much slower); {hint}")
            raise LearnerFailure(f"learner rank {refs.index(done[0])} failed during '{method}' at step "
                                 f"{self.step_index}: {type(cause).__name__}: {first}; {hint}") from None

    def publish(self, wait: bool) -> float:
        receivers = self.pools["scorer"].actors + self.pools["rollout"].actors
        try:
            pub = self.sync.publish(self.version, receivers)
        except RayActorError:
            self._learner_call("ping")      # raises LearnerFailure if a learner died
            raise
        if wait:
            self._wait_acks(pub.acks)
        return pub.gather_s

    def _wait_acks(self, acks: list) -> None:
        try:
            ray.get(acks)
        except RayError:
            died = self.heal()              # a receiver died: its replacement gets the weights
            if not died:
                raise
            self.failures += died

    def heal(self) -> int:
        """Replace dead inference actors and give the replacements the current weights."""
        died = sum(pool.heal() for pool in self.pools.values())
        if died:
            self.publish(wait=True)
        return died

    # ------------------------------------------------------------ experience
    def _launch_shard(self, index: int, rows: list[int], step: int) -> Shard:
        p = self.pools
        s = p["scorer"][index].score_rows.remote(rows, step)
        r = p["rollout"][index].generate.remote(s)
        refs = [s, r, p["reward"][index].score.remote(s, r)]
        if "reference" in p:
            refs.append(p["reference"][index].logprobs.remote(s, r))
        return Shard(index, rows, refs)

    def launch_generation(self, step: int, rows: Optional[list[int]] = None) -> Generation:
        """Score -> rollout -> reward (+ reference) for one step's documents, as chains of refs."""
        if rows is None:
            rows = self.cursor.next_rows(self.cfg.data.batch_size)
        n_shards = min(len(rows), max(len(self.pools["scorer"]), len(self.pools["rollout"])))
        parts = np.array_split(np.asarray(rows), n_shards)
        return Generation(step, [self._launch_shard(i, [int(x) for x in part], step) for i, part in enumerate(parts)])

    def collect(self, gen: Generation) -> Experience:
        if gen.ready is not None:
            return merge(gen.ready)
        values = []
        for shard in gen.shards:
            for attempt in range(self.cfg.train.max_retries + 1):
                try:
                    values.append(ray.get(shard.refs))
                    break
                except RayError as e:
                    died = self.heal()
                    # An actor death seen again by a later shard: the actor was already replaced.
                    if attempt == self.cfg.train.max_retries or not (died or isinstance(e, RayActorError)):
                        raise
                    self.failures += died
                    shard = self._launch_shard(shard.index, shard.rows, gen.step)   # same rows, same seeds
        return merge(values)

    def validate(self) -> dict[str, float]:
        """NTP loss (and perplexity) of the current weights on the held-out documents."""
        if self.val_docs is None:
            from dataclasses import replace

            from refine_ray.data import Corpus, load_tokenizer

            val = replace(self.cfg.data, path=self.cfg.train.val_path, answer_column=None)   # text only
            corpus = Corpus(val, load_tokenizer(self.cfg.tokenizer.path))
            docs = [corpus.document(i) for i in range(min(self.cfg.train.val_docs, len(corpus)))]
            docs = [d for d in docs if len(d.ids) >= 2]
            self.val_docs = DocBatch.from_lists([d.doc_id for d in docs], [d.ids for d in docs])
        parts = self._learner_call("validation_nll", self.val_docs)
        total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
        loss = total / max(count, 1)
        return {"val/ntp_loss": loss, "val/perplexity": float(np.exp(min(loss, 50.0)))}

    def advantages(self, exp: Experience) -> np.ndarray:
        G = self.cfg.refine.samples_per_prefix
        groups = make_group_ids(len(exp.scored.docs), exp.scored.n_chunks, G)
        adv = grpo_advantages(torch.from_numpy(exp.rewards.rewards).double(), groups,
                              normalize_std=self.cfg.refine.normalize_adv_std)
        return adv.float().numpy()

    # ------------------------------------------------------------ the step
    def step(self) -> dict[str, float]:
        t_start = time.perf_counter()
        step = self.step_index
        if self.cfg.rollout.max_actors > len(self.pools["rollout"]):
            rc = self.cfg.rollout
            if self.pools["rollout"].grow(rc.max_actors, {"num_cpus": rc.cpus_per_actor,
                                                          "num_gpus": rc.gpus_per_actor}):
                self.publish(wait=True)     # the newcomers get the current weights
        gen = self.pending or self.launch_generation(step)
        self.pending = None
        exp = self.collect(gen)
        t_collected = time.perf_counter()
        staleness = self.version - int(exp.rollout.versions.min())
        regenerated = 0
        while staleness > self.cfg.system.max_staleness:
            regenerated += 1       # too old to importance-correct: the same documents again, on-policy
            exp = self.collect(self.launch_generation(gen.step, [int(i) for i in exp.scored.docs.doc_ids]))
            staleness = self.version - int(exp.rollout.versions.min())
        if self.cfg.system.mode == "async":
            self.pending = self.launch_generation(step + 1)   # overlaps with the learner below
        adv = self.advantages(exp)
        self.last_experience = exp
        batch = LearnBatch(docs=exp.scored.docs, cuts=exp.scored.cuts, responses=exp.rollout.tokens,
                           old_logprobs=exp.rollout.logprobs, advantages=adv, versions=exp.rollout.versions,
                           samples_per_prefix=exp.rollout.samples_per_prefix, ref_logprobs=exp.ref_logprobs,
                           answers=exp.scored.answers)
        t_learn = time.perf_counter()
        per_rank = self._learner_call("train_step", ray.put(batch))
        t_publish = time.perf_counter()
        self.version += 1
        self.step_index += 1
        gather_s = self.publish(wait=self.cfg.system.mode == "sync")
        t_end = time.perf_counter()
        metrics = {k: float(np.mean([m[k] for m in per_rank])) for k in per_rank[0]}
        if self.cfg.train.val_every and self.step_index % self.cfg.train.val_every == 0:
            metrics.update(self.validate())
        metrics["time/learner_compute_s"] = max(m["time/learner_compute_s"] for m in per_rank)  # slowest rank
        metrics.update(reward_metrics(exp.rewards))
        metrics.update({
            "advantage/mean": float(adv.mean()), "advantage/abs_mean": float(np.abs(adv).mean()),
            "cut_entropy": float(exp.scored.cut_entropy.mean()), "staleness": float(staleness),
            "stale_regenerated": float(regenerated), "docs_skipped_total": float(self.cursor.skipped),
            "actor_failures_total": float(self.failures), "rollout_actors": float(len(self.pools["rollout"])),
            "version": float(self.version), "samples": float(len(exp.rollout.tokens)),
            "time/wait_experience_s": t_collected - t_start, "time/learn_s": t_publish - t_learn,
            "time/publish_s": t_end - t_publish, "time/weight_gather_s": gather_s,
            "time/scorer_compute_s": exp.scored.compute_s, "time/rollout_compute_s": exp.rollout.compute_s,
            "time/reward_compute_s": exp.rewards.compute_s, "time/step_s": t_end - t_start,
            "tokens_per_s": float(len(exp.scored.docs.tokens) / max(t_end - t_start, 1e-9)),
        })
        return metrics

    # ------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Atomic checkpoint of learner state, data position, version and pending experience."""
        tmp, final = ckpt.begin_save(self.cfg.train.output_dir, self.step_index)
        pending = None
        if self.pending is not None:       # async: keep the in-flight experience, not regenerate it
            pending = self.collect(self.pending).shard_values
            self.pending = Generation(self.pending.step, ready=pending)
        self._learner_call("save", str(tmp / "learner"), {})
        arrays: dict = {}
        state = {"step": self.step_index, "version": self.version, "cursor": self.cursor.state_dict(),
                 "failures": self.failures, "pending": ckpt.encode_batches(pending, "pending", arrays),
                 "pending_step": None if self.pending is None else self.pending.step, "config": to_dict(self.cfg)}
        return str(ckpt.commit_save(tmp, final, state, arrays, self.cfg.train.keep_checkpoints))

    def load(self, path) -> None:
        """Resume from checkpoint folder ``path`` (verified by preflight; verified again here if not)."""
        state = ckpt.load_trainer_state(path)
        self._learner_call("load", str(path / "learner"))
        self.step_index, self.version, self.failures = state["step"], state["version"], state["failures"]
        self.cursor.load_state_dict(state["cursor"])
        if state["pending"] is not None:
            self.pending = Generation(state["pending_step"],
                                      ready=ckpt.decode_batches(state["pending"], state["pending_arrays"]))
        self.publish(wait=True)
        log.info("resumed from %s at step %d (weights v%d)", path, self.step_index, self.version)

    def shutdown(self) -> None:
        for actor in self.learners:
            ray.kill(actor)
        for pool in self.pools.values():
            pool.kill_all()
        self.placement.remove()
