"""One seeding rule for the rollout: samples keyed by (step, document id, cut index, sample index).

The rollout role is run in-process on transport batches built as the scorer builds them. The same
documents generated in one request and split over several requests (other grouping, other order)
give bit-identical tokens, log-probs and hidden states: each row draws from its own keyed generator
and a decode batch holds one document's rows only. Before, seeds were keyed by the request's
documents (one seed for a whole offset-free batch) and rows shared one generator, so the samples
changed with the number of rollout actors.
"""
import numpy as np
import pytest
import torch

from refine_ray.config import DataConfig, ModelConfig, RefineConfig, RolloutConfig, SystemConfig
from refine_ray.refine.sampling import continuation_seeds, sample_at_cuts
from refine_ray.refine.scoring import score_document
from refine_ray.refine.seeding import cut_seed
from refine_ray.transport.batches import DocBatch, ScoredBatch
from roles.rollout import RolloutRole

V, RUN_SEED, STEP = 97, 7, 3
DOC_IDS = [11, 4, 30, 2]


def _docs():
    g = torch.Generator().manual_seed(0)
    return {d: torch.randint(0, V, (int(n),), generator=g) for d, n in zip(DOC_IDS, (90, 120, 75, 101))}


def _scored(role, docs, doc_ids, cfg, step=STEP) -> ScoredBatch:
    """What the scorer role sends for ``doc_ids`` (cuts keyed by run seed, step and document)."""
    scores = [score_document(role.weight_target(), docs[d], cfg, torch.Generator().manual_seed(cut_seed(RUN_SEED, step, d)),
                             with_states=cfg.prefix_sharing) for d in doc_ids]
    return ScoredBatch.from_scores(DocBatch.from_lists(doc_ids, [docs[d].numpy() for d in doc_ids]), scores, step)


def _by_doc(scored, rollout):
    rows = rollout.tokens.shape[0] // len(scored.docs)
    return {int(d): (rollout.tokens[i * rows:(i + 1) * rows], rollout.logprobs[i * rows:(i + 1) * rows],
                     rollout.hidden[i * rows:(i + 1) * rows]) for i, d in enumerate(scored.docs.doc_ids)}


@pytest.mark.parametrize("model_type", ["delta_net", "lact"])
@pytest.mark.parametrize("shared", [True, False], ids=["prefix_sharing", "reencode"])
def test_samples_do_not_depend_on_request_grouping(model_type, shared):
    cfg = RefineConfig(n_chunks=3, response_length=4, samples_per_prefix=3, min_prefix=8, prefix_sharing=shared)
    role = RolloutRole(model=ModelConfig(type=model_type), data=DataConfig(), refine=cfg, rollout=RolloutConfig(),
                       system=SystemConfig(), vocab_size=V, run_seed=RUN_SEED)
    docs = _docs()
    whole = _scored(role, docs, DOC_IDS, cfg)
    one = _by_doc(whole, role.generate(whole))
    split = {}
    for group in ([30], [2, 11], [4]):               # other grouping and order, as 3 actors would get them
        part = _scored(role, docs, group, cfg)
        split.update(_by_doc(part, role.generate(part)))
    assert split.keys() == one.keys()
    for d in DOC_IDS:
        for a, b in zip(one[d], split[d]):
            assert np.array_equal(a, b), d
    # the key is (step, document, cut, sample): samples of a document differ, another step differs,
    d0 = whole.docs.doc_ids[0]
    tokens = one[d0][0]
    assert len({tuple(r) for r in tokens.tolist()}) > 1, "samples of one document must differ"
    later = _scored(role, docs, [int(d0)], cfg, step=STEP + 1)
    assert not np.array_equal(role.generate(later).tokens, tokens)
    # and, from the same cut states, they are sample_at_cuts' rows under that key (the local step's)
    if not shared:
        return
    score = score_document(role.weight_target(), docs[d0], cfg,
                           torch.Generator().manual_seed(cut_seed(RUN_SEED, STEP, int(d0))), with_states=True)
    local = sample_at_cuts(role.weight_target(), score.cut_states, score.cut_hidden, cfg.response_length,
                           cfg.samples_per_prefix, cfg.temperature, cfg.top_p,
                           continuation_seeds(RUN_SEED, STEP, int(d0), cfg.n_chunks, cfg.samples_per_prefix))
    assert torch.equal(local.tokens, torch.from_numpy(tokens))
