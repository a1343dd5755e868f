"""Every random draw of REFINE is keyed by what is computed, never by who computes it.

A seed is a stable 63-bit hash (numpy ``SeedSequence``) of integers. Keying by
(run seed, stream, step, document id[, cut index, sample index]) rather than by actor,
shard or batch composition makes a retried, resumed or differently sharded step draw
exactly the same cuts and samples, whatever the number of actors.

Streams: ``CUT_STREAM`` for cut selection (one generator per document),
``ROLLOUT_STREAM`` for continuation sampling (one per sample).
"""
from __future__ import annotations

import numpy as np

CUT_STREAM = 1
ROLLOUT_STREAM = 2


def row_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (e.g. run seed, stream, step, document, cut, sample)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def cut_seed(run_seed: int, step: int, doc_id: int) -> int:
    """Seed of the cut draw of document ``doc_id`` at training step ``step``."""
    return row_seed(run_seed, CUT_STREAM, step, doc_id)


def sample_seed(run_seed: int, step: int, doc_id: int, cut_index: int, sample_index: int) -> int:
    """Seed of sample ``sample_index`` (of G) at the ``cut_index``-th cut (of n, in cut order)
    of document ``doc_id`` at step ``step``: the same for every rollout backend."""
    return row_seed(run_seed, ROLLOUT_STREAM, step, doc_id, cut_index, sample_index)
