import math

import pytest
import torch

from refine_ray.algo import (
    DocumentTooShort,
    cut_range,
    gather_targets,
    sample_cuts,
    smooth_entropy,
)


def test_smooth_forward_window_by_hand():
    e = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # s[t] = mean(e[t:t+k]); the tail averages only existing positions (no zero pads)
    assert smooth_entropy(e, 1).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert smooth_entropy(e, 2).tolist() == [1.5, 2.5, 3.5, 4.5, 5.0]
    assert smooth_entropy(e, 3).tolist() == [2.0, 3.0, 4.0, 4.5, 5.0]
    assert smooth_entropy(e, 10).tolist() == [3.0, 3.5, 4.0, 4.5, 5.0]


def _spiky(L, spikes):
    e = torch.zeros(L)
    for pos, vals in spikes.items():
        e[pos : pos + len(vals)] = torch.tensor(vals)
    return e


def test_argmax_alignment_continuation_predicts_high_entropy_tokens():
    # entropy[10..12] = 3,2,1. With k=3 the cut c is scored by mean(e[c-1 : c+2]):
    # c=11 -> (3+2+1)/3 = 2 (max); c=10 -> 5/3; c=12 -> 1. A centred window (reference)
    # would peak at t=11, i.e. cut 12.
    e = _spiky(40, {10: [3.0, 2.0, 1.0]})
    cuts = sample_cuts(e, 1, 3, "argmax", min_prefix=1)
    assert cuts.tolist() == [11]
    ids = torch.arange(40)
    gt_ids, _ = gather_targets(ids, None, cuts, 3)
    assert gt_ids.tolist() == [[11, 12, 13]]  # predicted at positions 10, 11, 12


def test_argmin_picks_known_position():
    e = torch.ones(40)
    e[20:23] = 0.0  # only cut 21 has a window e[20:23] of all zeros
    assert sample_cuts(e, 1, 3, "argmin", min_prefix=1).tolist() == [21]


def test_two_chunks_argmax_and_ties():
    # L=40,k=3,min_prefix=1: candidates 1..37 (37), chunks [1,18] and [19,37]
    e = _spiky(40, {10: [3.0, 2.0, 1.0], 30: [1.0, 1.0, 4.0]})
    # chunk 1: c=31 -> e[30:33] = 6/3 = 2; c=32 -> 5/3; c=33 -> 4/3; c=30 -> 2/3
    assert sample_cuts(e, 2, 3, "argmax", min_prefix=1).tolist() == [11, 31]
    flat = torch.zeros(40)  # ties -> first candidate of each chunk
    assert sample_cuts(flat, 2, 3, "argmax", min_prefix=1).tolist() == [1, 19]
    assert sample_cuts(flat, 2, 3, "argmin", min_prefix=1).tolist() == [1, 19]


def test_min_prefix_respected_in_argmax():
    e = _spiky(40, {10: [3.0, 2.0, 1.0]})  # peak before min_prefix
    assert sample_cuts(e, 1, 3, "argmax", min_prefix=20).tolist() == [20]


def test_entropy_sampling_follows_softmax():
    # k=1, L=4, min_prefix=1: candidates c in {1,2,3}, scores e[c-1] = 0, ln2, ln3
    # -> probabilities 1/6, 2/6, 3/6
    e = torch.tensor([0.0, math.log(2), math.log(3), 9.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 3000
    for _ in range(n):
        counts[sample_cuts(e, 1, 1, "entropy", min_prefix=1, generator=g)] += 1
    freq = (counts / n).tolist()
    assert freq[0] == 0.0 and freq[1:] == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.03)
    # temperature -> large: close to uniform
    counts.zero_()
    for _ in range(n):
        counts[sample_cuts(e, 1, 1, "entropy", 1, g, temperature=1e6)] += 1
    assert (counts[1:] / n).tolist() == pytest.approx([1 / 3] * 3, abs=0.03)


@pytest.mark.parametrize("strategy", ["entropy", "uniform", "argmax", "argmin"])
def test_cuts_always_in_range(strategy):
    for seed in range(150):
        g = torch.Generator().manual_seed(seed)
        n, k = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        mp = int(torch.randint(0, 30, (1,), generator=g))
        lo = max(mp, 1)
        L = lo + (n + 1) * k - 1 + int(torch.randint(0, 60, (1,), generator=g))
        e = torch.rand(L, generator=g) * 5
        cuts = sample_cuts(e, n, k, strategy, min_prefix=mp, generator=g)
        assert cuts.dtype == torch.long and cuts.shape == (n,)
        assert int(cuts.min()) >= lo and int(cuts.max()) + k <= L
        assert bool((cuts[1:] > cuts[:-1]).all())
        # cut j lies in chunk j of the candidate range
        m = L - k - lo + 1
        for j, c in enumerate(cuts.tolist()):
            assert lo + (j * m) // n <= c < lo + ((j + 1) * m) // n


def test_generator_reproducible():
    e = torch.rand(500)
    a = sample_cuts(e, 8, 5, generator=torch.Generator().manual_seed(3))
    b = sample_cuts(e, 8, 5, generator=torch.Generator().manual_seed(3))
    assert a.tolist() == b.tolist()


def test_document_too_short():
    # lo = 20, n=2, k=5: need 20 + 3*5 - 1 = 34 tokens
    assert cut_range(34, 2, 5, 20) == (20, 29)
    with pytest.raises(DocumentTooShort, match="33 tokens.*needs >= 34"):
        sample_cuts(torch.zeros(33), 2, 5, min_prefix=20)
    assert issubclass(DocumentTooShort, ValueError)
    assert sample_cuts(torch.zeros(34), 2, 5, "argmax", min_prefix=20).tolist() == [20, 25]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown cut strategy"):
        sample_cuts(torch.zeros(100), 2, 5, "max")
    with pytest.raises(ValueError):
        sample_cuts(torch.zeros(2, 100), 2, 5)


def test_gather_targets_by_hand():
    ids = torch.arange(10) * 10
    hidden = torch.stack([torch.arange(10.0), -torch.arange(10.0)], dim=1)  # hidden[t] = [t, -t]
    gt_ids, gt_h = gather_targets(ids, hidden, torch.tensor([2, 5]), 3)
    assert gt_ids.tolist() == [[20, 30, 40], [50, 60, 70]]
    assert gt_h.tolist() == [
        [[2.0, -2.0], [3.0, -3.0], [4.0, -4.0]],
        [[5.0, -5.0], [6.0, -6.0], [7.0, -7.0]],
    ]
    assert gather_targets(ids, hidden, torch.tensor([7]), 3)[0].tolist() == [[70, 80, 90]]
    with pytest.raises(ValueError, match="out of range"):
        gather_targets(ids, hidden, torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="out of range"):
        gather_targets(ids, hidden, torch.tensor([0]), 3)
