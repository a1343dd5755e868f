"""Actor groups and sharding by document: whole documents per shard, and samples that do not
depend on how many rollout actors share a step (real scorer, rollout and reward actors on a
local Ray cluster, LongBench text, a tiny random DeltaNet)."""
import numpy as np
import pytest

from refine_ray.config import load_config
from refine_ray.data import load_tokenizer
from refine_ray.system.actor_group import ActorGroup, document_shards
from refine_ray.transport.batches import DocBatch, LearnBatch
from refine_ray.system.experience import ExperienceMaker
from roles.reward import RewardRole
from roles.rollout import RolloutRole
from roles.scorer import ScorerRole


def test_document_shards_are_whole_contiguous_and_balanced():
    assert document_shards(5, 2) == [[0, 1, 2], [3, 4]]
    assert document_shards(4, 4) == [[0], [1], [2], [3]]
    assert document_shards(1, 3) == [[0], [], []]
    assert sum(document_shards(7, 3), []) == list(range(7))


def test_learn_batch_select_keeps_documents_whole():
    docs = DocBatch.from_lists([10, 11, 12, 13], [np.arange(n) for n in (5, 6, 7, 8)])
    n, G, k = 2, 3, 4
    rows = len(docs) * n * G
    batch = LearnBatch(docs=docs, cuts=np.tile([[1, 2]], (4, 1)), responses=np.arange(rows * k).reshape(rows, k),
                       old_logprobs=np.zeros((rows, k)), advantages=np.arange(rows, dtype=np.float32),
                       samples_per_prefix=G, ref_logprobs=np.arange(rows * k, dtype=np.float32).reshape(rows, k))
    parts = [batch.select(s) for s in document_shards(len(docs), 2)]
    assert [list(p.docs.doc_ids) for p in parts] == [[10, 11], [12, 13]]
    assert list(parts[1].docs.doc(1)) == list(range(8))
    assert list(parts[1].advantages) == list(range(12, 24))
    np.testing.assert_array_equal(np.concatenate([p.responses for p in parts]), batch.responses)
    np.testing.assert_array_equal(np.concatenate([p.ref_logprobs for p in parts]), batch.ref_logprobs)


def _experience(cfg, vocab: int, rollout_actors: int, rows: list[int]):
    """One step's experience on fresh real actors, with ``rollout_actors`` rollout actors."""
    c, seed, cpu = cfg, cfg.train.seed, (lambda i: {"num_cpus": 0.25})
    groups = {
        "scorer": ActorGroup("scorer", ScorerRole, lambda i: dict(model=c.model, tokenizer=c.tokenizer, data=c.data,
                                                                  refine=c.refine, system=c.system, run_seed=seed,
                                                                  actor_index=i), cpu, 1),
        "rollout": ActorGroup("rollout", RolloutRole, lambda i: dict(model=c.model, data=c.data, refine=c.refine,
                                                                    rollout=c.rollout, system=c.system,
                                                                    vocab_size=vocab, run_seed=seed, actor_index=i),
                              cpu, rollout_actors),
        "reward": ActorGroup("reward", RewardRole, lambda i: dict(refine=c.refine, tokenizer=c.tokenizer, reward=c.reward,
                                                                 run_seed=seed, actor_index=i, model=c.model,
                                                                 vocab_size=vocab), cpu, 1),
    }
    try:
        for g in groups.values():
            g.ready()
        maker = ExperienceMaker(groups, heal=lambda: 0, max_retries=0)
        gen = maker.launch(3, rows)
        assert len(gen.shards) == min(len(rows), rollout_actors)
        return maker.collect(gen)
    finally:
        for g in groups.values():
            g.kill_all()


@pytest.mark.parametrize("prefix_sharing", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_samples_do_not_depend_on_the_number_of_rollout_actors(cluster, prefix_sharing):
    """The same step's documents with 1 and with 3 rollout actors (1 shard vs 3 shards): identical
    cuts, tokens, behaviour log-probs and rewards, bit for bit."""
    cfg = load_config("configs/tiny_deltanet_mid.yaml", [
        "data.max_length=200", "refine.n_chunks=3", "refine.samples_per_prefix=2", "refine.response_length=4",
        f"refine.prefix_sharing={str(prefix_sharing).lower()}"])
    vocab, rows = len(load_tokenizer()), [4, 0, 7]
    one, three = (_experience(cfg, vocab, n, rows) for n in (1, 3))
    assert one.scored.docs.doc_ids.tolist() == three.scored.docs.doc_ids.tolist() == rows
    assert one.rollout.tokens.shape == (3 * 3 * 2, 4)
    np.testing.assert_array_equal(one.scored.cuts, three.scored.cuts)
    np.testing.assert_array_equal(one.rollout.tokens, three.rollout.tokens)
    np.testing.assert_array_equal(one.rollout.logprobs, three.rollout.logprobs)
    np.testing.assert_array_equal(one.rewards.rewards, three.rewards.rewards)
