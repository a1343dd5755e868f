"""Experience: launch, collect, retry and staleness of one step's chains of role calls
(score -> rollout -> reward, + reference model).

A step's documents are split into shards of whole documents, one chain of calls per
shard: scorer ``score_rows`` -> rollout ``generate`` -> reward ``score`` (and reference
``logprobs``), passed as object refs so the batches move between the actors, never through
the controller. Every draw is keyed by (step, document, cut, sample), so the shard count
(the number of actors) never changes a sample. If an inference actor dies, its group
replaces it, the controller re-publishes the weights and the shard is issued again with
the same documents on the weight version it was launched with: no sample is lost,
duplicated or changed. In async mode that version is older than the current one (the
learner published while the work was in flight): the generation keeps its object-store
ref, and the shard's scorer and rollout load it for the redo and the current version
after it (Ray runs one caller's calls on an actor in order). The collective backend keeps
no older version: there the redo uses the current weights, said in one warning line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import ray
from ray.exceptions import RayActorError, RayError

from refine_ray.system.actor_group import ActorGroup, document_shards
from refine_ray.transport.batches import DocBatch, RewardBatch, RolloutBatch, ScoredBatch

log = logging.getLogger("refine_ray")


@dataclass
class ShardResult:
    """The fetched outputs of one shard's chain (rows: ``(doc * n + cut) * G + sample``)."""

    scored: ScoredBatch
    rollout: RolloutBatch
    rewards: RewardBatch
    ref_logprobs: Optional[np.ndarray] = None   # [rows, k] float32, when the reference role runs


# The dataclasses a checkpoint may hold for pending async experience (checkpoint.encode_batches).
PENDING_TYPES = (DocBatch, ScoredBatch, RolloutBatch, RewardBatch, ShardResult)


@dataclass
class Shard:
    """The object refs of one shard's chain, in flight."""

    index: int
    rows: list[int]                 # corpus rows (documents) of this shard
    scored: ray.ObjectRef
    rollout: ray.ObjectRef
    rewards: ray.ObjectRef
    ref_logprobs: Optional[ray.ObjectRef] = None

    def fetch(self) -> ShardResult:
        """Wait for the chain; raises ray.exceptions.RayError when one of its actors failed."""
        refs = [self.scored, self.rollout, self.rewards] + ([self.ref_logprobs] if self.ref_logprobs else [])
        values = ray.get(refs)
        return ShardResult(*values[:3], ref_logprobs=values[3] if len(values) > 3 else None)


@dataclass
class Generation:
    """One step's experience: shards in flight, or (restored from a checkpoint) already fetched.

    ``version``: the weight version the scorers and rollouts held at launch; ``weights``: its
    object-store ref (None with the collective backend), held until the generation is
    collected so that a lost shard is redone on the same weights.
    """

    step: int
    shards: list[Shard] = field(default_factory=list)
    ready: Optional[list[ShardResult]] = None
    version: int = 0
    weights: Optional[ray.ObjectRef] = None


@dataclass
class Experience:
    """One step's experience, shards concatenated in shard order (documents in request order)."""

    scored: ScoredBatch
    rollout: RolloutBatch
    rewards: RewardBatch
    ref_logprobs: Optional[np.ndarray]
    shards: list[ShardResult]

    @property
    def oldest_version(self) -> int:
        """The oldest weight version any sample was drawn with."""
        return int(self.rollout.versions.min())

    @staticmethod
    def merge(shards: list[ShardResult]) -> "Experience":
        """Concatenate the shards' batches along documents / sample rows, in shard order."""
        scored, rolls, rews = [s.scored for s in shards], [s.rollout for s in shards], [s.rewards for s in shards]
        cat = np.concatenate
        answers = None
        if scored[0].answers is not None:
            answers = _concat_docs([s.answers for s in scored])
        # replace(): fields not concatenated here (e.g. the step) come from the first shard
        return Experience(
            scored=replace(scored[0], docs=_concat_docs([s.docs for s in scored]), cuts=cat([s.cuts for s in scored]),
                           gt_ids=cat([s.gt_ids for s in scored]), gt_hidden=cat([s.gt_hidden for s in scored]),
                           cut_entropy=cat([s.cut_entropy for s in scored]), compute_s=sum(s.compute_s for s in scored),
                           answers=answers, cut_hidden=None, cut_states=None),
            rollout=RolloutBatch(tokens=cat([r.tokens for r in rolls]), logprobs=cat([r.logprobs for r in rolls]),
                                 versions=cat([r.versions for r in rolls]), samples_per_prefix=rolls[0].samples_per_prefix,
                                 compute_s=sum(r.compute_s for r in rolls)),
            rewards=RewardBatch(rewards=cat([r.rewards for r in rews]),
                                components={k: cat([r.components[k] for r in rews]) for k in rews[0].components},
                                compute_s=sum(r.compute_s for r in rews)),
            ref_logprobs=cat([s.ref_logprobs for s in shards]) if shards[0].ref_logprobs is not None else None,
            shards=shards)


def _concat_docs(parts: list[DocBatch]) -> DocBatch:
    return DocBatch.from_lists([int(i) for p in parts for i in p.doc_ids],
                               [p.doc(i) for p in parts for i in range(len(p))])


class ExperienceMaker:
    """Launches and collects the chains on the inference groups (``scorer``, ``rollout``, ``reward``,
    optionally ``reference``).

    ``heal()`` replaces dead actors, re-publishes the weights and returns how many died;
    ``max_retries``: re-issues of a shard after an actor death (``train.max_retries``);
    ``weights()``: the version the scorers and rollouts hold (or have queued) now and its
    object-store ref (None where not kept: collective backend, or sync mode, where work is
    collected before any newer version exists).
    """

    def __init__(self, groups: dict[str, ActorGroup], heal: Callable[[], int], max_retries: int,
                 weights: Callable[[], tuple[int, Optional[ray.ObjectRef]]] = lambda: (0, None)):
        """``groups``: the inference groups by role name (the controller's)."""
        self.groups, self.heal, self.max_retries, self.weights = groups, heal, max_retries, weights

    def launch(self, step: int, rows: list[int]) -> Generation:
        """Start the chains for corpus ``rows`` at training step ``step``: one shard of whole
        documents per scorer or rollout actor (the larger group), at most one per document."""
        n_shards = min(len(rows), max(len(self.groups["scorer"]), len(self.groups["rollout"])))
        shards = [[rows[i] for i in part] for part in document_shards(len(rows), n_shards)]
        version, weights = self.weights()
        return Generation(step, [self._launch_shard(i, part, step) for i, part in enumerate(shards)],
                          version=version, weights=weights)

    def _launch_shard(self, index: int, rows: list[int], step: int) -> Shard:
        g = self.groups
        scored = g["scorer"][index].score_rows.remote(rows, step)
        rollout = g["rollout"][index].generate.remote(scored)
        ref = g["reference"][index].logprobs.remote(scored, rollout) if "reference" in g else None
        return Shard(index, rows, scored, rollout, g["reward"][index].score.remote(scored, rollout), ref)

    def _redo_shard(self, gen: Generation, shard: Shard) -> Shard:
        """Issue a lost shard again: same rows and seeds, on the weight version ``gen`` was launched
        with. When that is older than the current one, the shard's scorer and rollout load it
        first (``receive_weights``) and the current version after the shard."""
        version, current = self.weights()
        receivers = [self.groups["scorer"][shard.index], self.groups["rollout"][shard.index]]
        older = gen.version != version
        if older and (gen.weights is None or current is None):
            log.warning("step %d: shard %d is generated again with weights v%d, not v%d it was launched with "
                        "(system.weight_sync=collective keeps no older version): same documents and seeds, "
                        "other samples", gen.step, shard.index, version, gen.version)
            older = False
        if older:
            for actor in receivers:
                actor.receive_weights.remote(gen.version, gen.weights)
        redone = self._launch_shard(shard.index, shard.rows, gen.step)
        if older:
            for actor in receivers:
                actor.receive_weights.remote(version, current)
        return redone

    def collect(self, gen: Generation) -> Experience:
        """Wait for every shard; a shard whose actor died is issued again (same rows, seeds and
        weight version: :meth:`_redo_shard`) up to ``max_retries`` times. Raises the Ray error when
        retries run out or nothing died."""
        if gen.ready is not None:
            return Experience.merge(gen.ready)
        results = []
        for shard in gen.shards:
            for attempt in range(self.max_retries + 1):
                try:
                    results.append(shard.fetch())
                    break
                except RayError as e:
                    died = self.heal()
                    # An actor death seen again by a later shard: the actor was already replaced.
                    if attempt == self.max_retries or not (died or isinstance(e, RayActorError)):
                        raise
                    shard = self._redo_shard(gen, shard)
        return Experience.merge(results)

    def on_policy(self, gen: Generation, version: int, max_staleness: int) -> tuple[Experience, int, int]:
        """Collect ``gen``; while its oldest sample is more than ``max_staleness`` versions behind
        ``version`` (too old to importance-correct), regenerate the same documents with the current
        weights. Returns (experience, staleness in versions, regenerations)."""
        exp = self.collect(gen)
        regenerated = 0
        while version - exp.oldest_version > max_staleness:
            regenerated += 1
            exp = self.collect(self.launch(gen.step, [int(i) for i in exp.scored.docs.doc_ids]))
        return exp, version - exp.oldest_version, regenerated
