"""The single controller of a REFINE run. One training step reads like the algorithm:

    score -> rollout -> reward (+ reference model) -> advantages -> learn -> publish weights

Every role is a group of Ray actors (:class:`~refine_ray.system.actor_group.ActorGroup`);
batches move between them as object refs (:mod:`refine_ray.system.experience`). In ``sync``
mode each step is exactly on-policy. In ``async`` mode the experience of step t+1 is
generated while the learner trains on step t, with the weights of the last publication;
the PPO ratio against the recorded behaviour log-probs corrects for the lag, and batches
older than ``system.max_staleness`` versions are regenerated on the same documents, never
used (the one-step off-policy overlap of verl/OpenRLHF's async modes).

Faults: a dead inference actor is replaced, receives the current weights, and its shards
are issued again with the same documents, seeds and weight version (async: the version the
work was launched with, kept until it is collected), so no sample is lost, duplicated or
changed. A dead learner rank stops the job with a :class:`LearnerFailure` naming the
checkpoint to resume from.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayError

from refine_ray.algo import grpo_advantages, make_group_ids
from refine_ray.config import ExperimentConfig, to_dict
from refine_ray.data import DataCursor
from refine_ray.refine.collapse import step_collapse_metrics
from refine_ray.refine.rewarding import advantage_metrics, reward_metrics
from refine_ray.refine.scoring import min_document_tokens
from refine_ray.transport import checkpoint as ckpt
from refine_ray.system.actor_group import (ActorGroup, ClusterWaitTimeout, LearnerFailure, document_shards,
                                           elastic_options, elastic_shortfall, wait_started)
from refine_ray.transport.batches import DocBatch, LearnBatch
from refine_ray.system.experience import PENDING_TYPES, Experience, ExperienceMaker, Generation
from refine_ray.system.placement import Placement
from refine_ray.system.run_log import worker_runtime_env
from refine_ray.transport.weight_sync import backend
from roles.learner import LearnerRankRole
from roles.reference import ReferenceRole
from roles.reward import RewardRole
from roles.rollout import RolloutRole
from roles.scorer import ScorerRole

__all__ = ["RefineController", "LearnerFailure", "ClusterWaitTimeout", "NonFiniteReward", "init_ray"]

log = logging.getLogger("refine_ray")


def init_ray(cfg: ExperimentConfig) -> bool:
    """Connect to ``system.ray_address`` (or ``RAY_ADDRESS``, set by ``ray job submit``), else start
    a new local cluster with ``system.num_cpus``/``num_gpus`` (and, with ``system.dashboard``, the Ray
    dashboard on 127.0.0.1, announced in one line); nothing if Ray is already up here. Every worker
    of the job writes its output to the run's log file, known third-party noise only there
    (:mod:`refine_ray.system.run_log`). Returns whether this call connected (the caller shuts Ray down)."""
    if ray.is_initialized():
        return False
    address = cfg.system.ray_address or os.environ.get("RAY_ADDRESS")
    env = worker_runtime_env(cfg.train.output_dir)
    if address:
        ray.init(address=address, runtime_env=env)
        log.info("Ray up: connected to %s", address)
    else:   # a new local cluster, never one that happens to run on this machine
        ctx = ray.init(address="local", num_cpus=cfg.system.num_cpus, num_gpus=cfg.system.num_gpus,
                       include_dashboard=cfg.system.dashboard, dashboard_host="127.0.0.1", runtime_env=env)
        res = ray.cluster_resources()
        log.info("Ray up: a local cluster of %g CPUs, %g GPUs", res.get("CPU", 0), res.get("GPU", 0))
        if cfg.system.dashboard:    # the token itself is never printed
            auth = ("no auth: RAY_AUTH_MODE=disabled" if os.environ.get("RAY_AUTH_MODE") == "disabled" else
                    "token auth: log in with the token `ray get-auth-token` prints; API clients send "
                    "'Authorization: Bearer <token>'")
            log.warning("Ray dashboard: http://%s (%s)", ctx.dashboard_url, auth)
    return True


class NonFiniteReward(LearnerFailure):
    """A NaN or inf reward: the step stops before its advantages (one line; exit status as a
    learner failure, resumable from the last checkpoint)."""


class RefineController:
    """Owns the actor groups, the data position, the weight version and the checkpoints of one run."""

    def __init__(self, cfg: ExperimentConfig, vocab_size: int, lengths: Optional[np.ndarray] = None,
                 resume_from: Optional[Path] = None):
        """``vocab_size``: the tokenizer's size; ``lengths``: token count per corpus row if already
        known (preflight), else a scorer counts; ``resume_from``: the checkpoint preflight chose,
        else ``train.resume_from``, else ``latest`` when ``train.resume``.

        Raises ``checkpoint.CheckpointError`` for a corrupted checkpoint, ``LearnerFailure`` when
        a learner rank fails to start.
        """
        self.cfg = cfg
        self.step_index, self.version, self.failures = 0, 0, 0
        self.placement, self.learners, self.groups = None, None, {}
        self.owns_ray = init_ray(cfg)
        try:    # a failure or Ctrl-C while starting stops what started (and Ray, if this run started it)
            self._start_roles(vocab_size)
            self._prepare(lengths, resume_from)
        except BaseException:
            self.shutdown()
            raise

    def _prepare(self, lengths: Optional[np.ndarray], resume_from: Optional[Path]) -> None:
        """The data cursor, experience maker and weight sync; then the checkpoint's or the initial weights."""
        cfg = self.cfg
        if lengths is None:
            lengths = ray.get(self.groups["scorer"][0].lengths.remote())
        self.cursor = DataCursor(lengths, max(min_document_tokens(cfg.refine), cfg.data.min_length),
                                 cfg.data.shuffle, cfg.data.seed, source=f"data.path '{cfg.data.path}'")
        self.published = None   # async: the object-store ref of the current version (Generation.weights)
        self.experience = ExperienceMaker(self.groups, self.heal, cfg.train.max_retries,
                                          weights=lambda: (self.version, self.published))
        self.sync = backend(cfg.system.weight_sync).publisher(self.learners.actors, cfg.system, cfg.model.dtype)
        self.pending: Optional[Generation] = None
        self.last_experience: Optional[Experience] = None
        self.heldout_docs: Optional[DocBatch] = None
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

    # ------------------------------------------------------------ the step
    def step(self) -> dict[str, float]:
        """One REFINE training step; returns its metrics (losses, rewards, staleness, timings in s)."""
        t = {"start": time.perf_counter()}
        self._grow_rollouts()
        gen, self.pending = self.pending or self._launch(self.step_index), None
        exp, staleness, regenerated = self.experience.on_policy(gen, self.version, self.cfg.system.max_staleness)
        t["collected"] = time.perf_counter()
        if self.cfg.system.mode == "async":
            self.pending = self._launch(self.step_index + 1)      # overlaps with the learner below
        adv = self.advantages(exp)
        t["learn"] = time.perf_counter()
        per_rank = self.learn(exp, adv)
        t["publish"] = time.perf_counter()
        self.version, self.step_index = self.version + 1, self.step_index + 1
        gather_s = self.publish(wait=self.cfg.system.mode == "sync")
        t["end"] = time.perf_counter()
        self.last_experience = exp
        return self._metrics(exp, adv, per_rank, t, gather_s, staleness, regenerated)

    def advantages(self, exp: Experience) -> np.ndarray:
        """GRPO advantages ``[B*n*G]`` float32: each sample's reward against the other G - 1 of its
        prefix group (mean-centred; divided by the group std when ``refine.normalize_adv_std``).
        Raises NonFiniteReward (one line: document, cut, sample, the way to resume) for a NaN or
        inf reward, which would make its whole group's advantages and the gradients non-finite."""
        rewards = exp.rewards.rewards
        bad = np.flatnonzero(~np.isfinite(rewards))
        if bad.size:
            i, G = int(bad[0]), exp.rollout.samples_per_prefix
            doc, cut = divmod(i // G, exp.scored.n_chunks)
            raise NonFiniteReward(f"the reward of document {int(exp.scored.docs.doc_ids[doc])} of the corpus, "
                                  f"cut {cut}, sample {i % G} is {rewards[i]} ({bad.size} of {rewards.size} rewards "
                                  f"not finite); the step was not applied and nothing was saved; {self._resume_hint()}")
        groups = make_group_ids(len(exp.scored.docs), exp.scored.n_chunks, self.cfg.refine.samples_per_prefix)
        adv = grpo_advantages(torch.from_numpy(exp.rewards.rewards).double(), groups,
                              normalize_std=self.cfg.refine.normalize_adv_std)
        return adv.float().numpy()

    def learn(self, exp: Experience, advantages: np.ndarray) -> list[dict[str, float]]:
        """The learner's optimizer steps of one training step (one per ``refine.ppo_mini_batch_size``
        documents); each rank gets its own whole documents. Returns the per-rank metrics. Raises
        LearnerFailure (also for a non-finite gradient norm: that step is not applied)."""
        batch = LearnBatch(docs=exp.scored.docs, cuts=exp.scored.cuts, responses=exp.rollout.tokens,
                           old_logprobs=exp.rollout.logprobs, advantages=advantages,
                           samples_per_prefix=exp.rollout.samples_per_prefix, ref_logprobs=exp.ref_logprobs,
                           answers=exp.scored.answers)
        shards = document_shards(len(batch.docs), len(self.learners))
        return self.learners.call_all("train_step", per_actor=[(batch.select(s),) for s in shards])

    def publish(self, wait: bool) -> float:
        """Publish the learner's weights as ``self.version`` to the scorers and rollouts; with ``wait``,
        until every receiver holds them. Returns :attr:`Publication.gather_s` (seconds; what it
        covers depends on the backend)."""
        receivers = self.groups["scorer"].actors + self.groups["rollout"].actors
        try:
            pub = self.sync.publish(self.version, receivers)
        except RayActorError:
            self.learners.call_all("ping")      # raises LearnerFailure if a learner rank died
            raise
        if self.cfg.system.mode == "async":     # kept while work launched with it may be redone
            self.published = pub.weights
        if wait:
            try:
                ray.get(pub.acks)
            except RayError:
                if not self.heal():             # a receiver died: its replacement gets the weights
                    raise
        return pub.gather_s

    def heal(self) -> int:
        """Replace dead inference actors, wait until the replacements started and give them the
        current weights; returns how many had died. Raises ClusterWaitTimeout after
        ``system.wait_timeout_s`` without them (their bundles found no node)."""
        died = sum(group.replace_dead() for group in self.groups.values())
        if died:
            self.failures += died
            wait_started(self.groups.values(), self.cfg.system.wait_timeout_s, self.cfg.system.wait_report_s,
                         self._resume_hint)   # a replacement may wait for its bundle: reported, bounded
            self.publish(wait=True)
        return died

    def heldout_loss(self) -> dict[str, float]:
        """Held-out NTP loss (nats per token) and perplexity of the current learner weights on the
        first ``train.val_docs`` documents of ``train.val_path`` (text only), and the fixed-cut
        next-sequence metrics of the published weights on them (``val/nsp_*``, collapse indicators;
        one scorer actor, refine_ray.refine.heldout): the step-comparable learning signal."""
        if self.heldout_docs is None:
            from refine_ray.data import Corpus, load_tokenizer

            val = replace(self.cfg.data, path=self.cfg.train.val_path, answer_column=None)
            corpus = Corpus(val, load_tokenizer(self.cfg.tokenizer.path))
            docs = [corpus.document(i) for i in range(min(self.cfg.train.val_docs, len(corpus)))]
            docs = [d for d in docs if len(d.ids) >= 2]
            self.heldout_docs = DocBatch.from_lists([d.doc_id for d in docs], [d.ids for d in docs])
        shards = document_shards(len(self.heldout_docs), len(self.learners))
        parts = self.learners.call_all("validation_nll", per_actor=[(self.heldout_docs.select(s),) for s in shards])
        nsp = self.groups["scorer"][0].heldout_nsp.remote(self.heldout_docs, self.cfg.train.val_cuts)
        loss = sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)
        out = ray.get(nsp)
        out.update({"val/ntp_loss": loss, "val/perplexity": float(np.exp(min(loss, 50.0)))})
        return out

    # ------------------------------------------------------------ helpers of the step
    def _launch(self, step: int) -> Generation:
        return self.experience.launch(step, self.cursor.next_rows(self.cfg.data.batch_size))

    def _grow_rollouts(self) -> None:
        """Elastic rollouts: add actors while the cluster has room; newcomers get the current weights."""
        rc = self.cfg.rollout
        if rc.max_actors > len(self.groups["rollout"]) and self.groups["rollout"].grow(rc.max_actors,
                                                                                     elastic_options(rc)):
            self.publish(wait=True)

    def _metrics(self, exp: Experience, adv: np.ndarray, per_rank: list[dict], t: dict, gather_s: float,
                 staleness: int, regenerated: int) -> dict[str, float]:
        metrics = {k: float(np.mean([m[k] for m in per_rank])) for k in per_rank[0]}
        if self.cfg.train.val_every and self.step_index % self.cfg.train.val_every == 0:
            metrics.update(self.heldout_loss())
        metrics["time/learner_compute_s"] = max(m["time/learner_compute_s"] for m in per_rank)  # slowest rank
        metrics.update(reward_metrics(exp.rewards))
        metrics.update(advantage_metrics(adv))
        metrics.update(step_collapse_metrics(torch.from_numpy(exp.scored.gt_hidden),
                                             torch.from_numpy(exp.scored.cut_entropy),
                                             torch.from_numpy(exp.rollout.tokens)))   # cut_entropy + collapse/*
        step_s = t["end"] - t["start"]
        metrics.update({
            "staleness": float(staleness),
            "stale_regenerated": float(regenerated), "docs_skipped_total": float(self.cursor.skipped),
            "actor_failures_total": float(self.failures), "rollout_actors": float(len(self.groups["rollout"])),
            "version": float(self.version), "samples": float(len(exp.rollout.tokens)),
            "time/wait_experience_s": t["collected"] - t["start"], "time/learn_s": t["publish"] - t["learn"],
            "time/publish_s": t["end"] - t["publish"], "time/weight_gather_s": gather_s,
            "time/scorer_compute_s": exp.scored.compute_s, "time/rollout_compute_s": exp.rollout.compute_s,
            "time/reward_compute_s": exp.rewards.compute_s, "time/step_s": step_s,
            "tokens_per_s": float(len(exp.scored.docs.tokens) / max(step_s, 1e-9)),
        })
        return metrics

    # ------------------------------------------------------------ set-up
    def _start_roles(self, vocab_size: int) -> None:
        """Create every role's actors at once, so that their processes start (import, build the
        model) concurrently, then wait: the learner ranks join their process group, the inference
        actors answer. One phase line each."""
        self.placement = Placement(self.cfg)
        self.learners = self._learner_group()
        self.groups = self._inference_groups(vocab_size)
        # Every rank's process is up before any joins the group: the rendezvous waits at most
        # learner.collective_timeout_s for the others.
        self.learners.ready()
        addr, port = ray.get(self.learners[0].address.remote())
        self.learners.call_all("init", addr, port, vocab_size)
        log.info("%d learner rank%s ready (DeepSpeed ZeRO-%d)", len(self.learners), "s" * (len(self.learners) > 1),
                 self.cfg.learner.zero_stage)
        for group in self.groups.values():
            group.ready()
        log.info("%d inference actors ready (%s)", sum(len(g) for g in self.groups.values()),
                 ", ".join(f"{role} {len(g)}" for role, g in self.groups.items()))
        local = self.owns_ray and not (self.cfg.system.ray_address or os.environ.get("RAY_ADDRESS"))
        short = elastic_shortfall(self.cfg.rollout, self.cfg.system.placement == "colocated", local)
        if short:
            log.warning("%s", short)

    def _learner_group(self) -> ActorGroup:
        world, opts = self.cfg.learner.num_ranks, self.placement.options
        return ActorGroup("learner", LearnerRankRole, lambda r: dict(cfg=self.cfg, rank=r, world_size=world),
                          lambda r: opts("learner", r), world, failure_hint=self._resume_hint,
                          timeout_setting=("learner.collective_timeout_s", self.cfg.learner.collective_timeout_s))

    def _inference_groups(self, vocab_size: int) -> dict[str, ActorGroup]:
        c, opts = self.cfg, self.placement.options
        common = dict(model=c.model, refine=c.refine, run_seed=c.train.seed)    # every role's
        groups = {
            "scorer": ActorGroup("scorer", ScorerRole,
                                 lambda i: dict(common, tokenizer=c.tokenizer, data=c.data, system=c.system,
                                                actor_index=i),
                                 lambda i: opts("scorer", i), c.scorer.num_actors),
            "rollout": ActorGroup("rollout", RolloutRole,
                                  lambda i: dict(common, data=c.data, rollout=c.rollout, system=c.system,
                                                 vocab_size=vocab_size, actor_index=i),
                                  lambda i: opts("rollout", min(i, c.rollout.num_actors - 1)), c.rollout.num_actors),
            "reward": ActorGroup("reward", RewardRole,
                                 lambda i: dict(common, tokenizer=c.tokenizer, reward=c.reward, vocab_size=vocab_size,
                                                actor_index=i),
                                 lambda i: opts("reward", i), c.reward.num_actors),
        }
        if c.reference.enabled:
            groups["reference"] = ActorGroup("reference", ReferenceRole,
                                             lambda i: dict(common, vocab_size=vocab_size, actor_index=i),
                                             lambda i: opts("reference", i), c.reference.num_actors)
        return groups

    def _resume_hint(self) -> str:
        """The end of a LearnerFailure line: where the job stopped and how to resume."""
        latest = ckpt.latest_checkpoint(self.cfg.train.output_dir)
        where = f"checkpoint '{latest}'" if latest else "the start (no checkpoint yet)"
        again = "the same command" + (" without train.overwrite=true" if self.cfg.train.overwrite else "")
        return f"stopping at step {self.step_index}. Run {again} again to resume from {where}."

    # ------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Atomic checkpoint of learner state, data position, version and pending async experience
        (collected, not regenerated); returns the committed step folder."""
        tmp, final = ckpt.begin_save(self.cfg.train.output_dir, self.step_index)
        pending = None
        if self.pending is not None:
            pending = self.experience.collect(self.pending).shards
            self.pending = Generation(self.pending.step, ready=pending)
        self.learners.call_all("save", str(tmp / "learner"), {})
        arrays: dict = {}
        state = {"step": self.step_index, "version": self.version, "cursor": self.cursor.state_dict(),
                 "failures": self.failures, "pending": ckpt.encode_batches(pending, "pending", arrays, PENDING_TYPES),
                 "pending_step": None if self.pending is None else self.pending.step, "config": to_dict(self.cfg)}
        return str(ckpt.commit_save(tmp, final, state, arrays, self.cfg.train.keep_checkpoints))

    def load(self, path: Path) -> None:
        """Resume from checkpoint folder ``path`` and publish its weights. Raises CheckpointError."""
        state = ckpt.load_trainer_state(path)
        self.learners.call_all("load", str(path / "learner"))
        self.step_index, self.version, self.failures = state["step"], state["version"], state["failures"]
        self.cursor.load_state_dict(state["cursor"])
        if state["pending"] is not None:
            self.pending = Generation(state["pending_step"],
                                      ready=ckpt.decode_batches(state["pending"], state["pending_arrays"], PENDING_TYPES))
        self.publish(wait=True)
        log.info("resumed from %s at step %d (weights v%d)", path, self.step_index, self.version)

    def shutdown(self) -> None:
        """Kill every actor, remove the placement groups and, when this run started or connected
        to Ray, disconnect (a local cluster stops; the log lines of its actors end here)."""
        for group in ([self.learners] if self.learners is not None else []) + list(self.groups.values()):
            group.kill_all()
        self.learners, self.groups = None, {}
        if self.placement is not None:
            self.placement.remove()
            self.placement = None
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False
