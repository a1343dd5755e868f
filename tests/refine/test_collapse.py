"""Collapse indicators (issue 15 point 3) on constructed inputs whose answer is known."""
import pytest
import torch

from refine_ray.refine.collapse import (collapse_metrics, distinct_token_fraction, hidden_pair_cosine,
                                        step_collapse_metrics, unrelated_position_pairs)


def test_pairs_join_different_documents_and_are_fixed():
    lengths = [50, 80, 30]
    pairs = unrelated_position_pairs(lengths, 64, seed=3, min_prefix=10)
    assert pairs.shape == (64, 4)
    assert bool((pairs[:, 0] != pairs[:, 2]).all())
    for d, p in ((pairs[:, 0], pairs[:, 1]), (pairs[:, 2], pairs[:, 3])):
        limits = torch.tensor(lengths)[d]
        assert bool((p >= 10).all()) and bool((p < limits).all())
    assert torch.equal(pairs, unrelated_position_pairs(lengths, 64, seed=3, min_prefix=10))
    assert not torch.equal(pairs, unrelated_position_pairs(lengths, 64, seed=4, min_prefix=10))


def test_one_document_pairs_are_half_its_usable_length_apart():
    pairs = unrelated_position_pairs([100], 32, seed=0, min_prefix=20)
    assert bool((pairs[:, 3] - pairs[:, 1] == 40).all()) and int(pairs[:, 3].max()) < 100


def test_too_short_documents_are_one_clear_error():
    with pytest.raises(ValueError, match="min_prefix"):
        unrelated_position_pairs([5, 6], 8, min_prefix=10)
    with pytest.raises(ValueError, match="min_prefix"):
        unrelated_position_pairs([11], 8, min_prefix=10)
    pairs = unrelated_position_pairs([1, 1], 4)              # k=1 cut rows: one position each
    assert bool((pairs[:, [1, 3]] == 0).all()) and bool((pairs[:, 0] != pairs[:, 2]).all())


def test_identical_hidden_states_give_cosine_one():
    v = torch.randn(16)
    hidden = [v.expand(40, 16).clone(), 3.0 * v.expand(60, 16).clone()]
    pairs = unrelated_position_pairs([40, 60], 64)
    assert hidden_pair_cosine(hidden, pairs) == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_and_opposite_hidden_states():
    e = torch.eye(4)
    pairs = unrelated_position_pairs([10, 10], 16)
    assert hidden_pair_cosine([e[0].expand(10, 4), e[1].expand(10, 4)], pairs) == pytest.approx(0.0, abs=1e-7)
    assert hidden_pair_cosine([e[0].expand(10, 4), -e[0].expand(10, 4)], pairs) == pytest.approx(-1.0, abs=1e-6)


def test_random_hidden_states_are_far_from_collapsed():
    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(200, 64, generator=gen) for _ in range(3)]
    assert abs(hidden_pair_cosine(hidden, unrelated_position_pairs([200] * 3, 256))) < 0.05


def test_distinct_token_fraction():
    assert distinct_token_fraction(torch.full((8, 5), 7)) == pytest.approx(1 / 40)
    assert distinct_token_fraction(torch.arange(40).reshape(8, 5)) == 1.0
    assert distinct_token_fraction(torch.tensor([[1, 2], [1, 2]])) == 0.5
    with pytest.raises(ValueError):
        distinct_token_fraction(torch.zeros(0, 5, dtype=torch.long))


def test_collapse_metrics_names_and_values():
    v = torch.ones(8)
    out = collapse_metrics([v.expand(30, 8), v.expand(30, 8)], unrelated_position_pairs([30, 30], 8),
                           torch.tensor([1.0, 3.0]), torch.full((4, 5), 2))
    assert out == pytest.approx({"hidden_pair_cosine": 1.0, "cut_entropy": 2.0, "distinct_token_frac": 1 / 20})


def test_step_metrics_pair_different_cuts():
    gen = torch.Generator().manual_seed(1)
    same = torch.randn(8, generator=gen).expand(6, 5, 8)          # 6 cuts, k=5, all one vector
    out = step_collapse_metrics(same, torch.full((6,), 0.5), torch.arange(30).reshape(6, 5))
    assert out == pytest.approx({"collapse/hidden_pair_cosine": 1.0, "cut_entropy": 0.5,
                                 "collapse/distinct_token_frac": 1.0})
    assert "collapse/hidden_pair_cosine" not in step_collapse_metrics(same[:1], torch.ones(1), torch.ones(1, 5))
