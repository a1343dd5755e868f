import pytest
import torch

from refine_ray.algo import grpo_advantages, make_group_ids


def test_make_group_ids():
    # G = 1: the n cuts of a document form one group
    assert make_group_ids(2, 3, 1).tolist() == [0, 0, 0, 1, 1, 1]
    # G > 1: the G samples of each prefix, rows interleaved per prefix
    assert make_group_ids(2, 2, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert make_group_ids(0, 8, 1).numel() == 0


# group 7: [1, 2, 3] -> mean 2, unbiased std 1 -> [-1, 0, 1]
# group 3: [0, 4]    -> mean 2, std sqrt(8)   -> [-1/sqrt2, 1/sqrt2]
# group 9: [5]       -> singleton -> A = R = 5
R = torch.tensor([1.0, 0.0, 2.0, 4.0, 3.0, 5.0])
GID = torch.tensor([7, 3, 7, 3, 7, 9])


def test_grpo_by_hand():
    a = grpo_advantages(R, GID)
    s = 2**-0.5
    exp = [-1 / (1 + 1e-6), -2 / (8**0.5 + 1e-6), 0.0, 2 / (8**0.5 + 1e-6), 1 / (1 + 1e-6), 5.0]
    assert a.tolist() == pytest.approx(exp, abs=1e-6)
    assert a[1].item() == pytest.approx(-s, abs=1e-5)
    assert a.dtype == torch.float32


def test_grpo_no_std_and_singleton_modes():
    a = grpo_advantages(R, GID, normalize_std=False)
    assert a.tolist() == pytest.approx([-1.0, -2.0, 0.0, 2.0, 1.0, 5.0])
    z = grpo_advantages(R, GID, singleton="zero")
    assert z[5].item() == 0.0
    with pytest.raises(ValueError):
        grpo_advantages(R, GID, singleton="mean")


def test_all_size_one_groups_give_reward():
    r = torch.tensor([0.3, -0.2, 0.9])
    assert grpo_advantages(r, torch.arange(3)).tolist() == pytest.approx(r.tolist())


@pytest.mark.parametrize("val", [0.7, 0.1, -0.3333, 1e4])
def test_equal_rewards_give_exact_zero(val):
    r = torch.full((5,), val, dtype=torch.float32)
    for norm in (True, False):
        a = grpo_advantages(r, torch.zeros(5, dtype=torch.long), normalize_std=norm)
        assert torch.isfinite(a).all() and a.abs().max().item() == 0.0


def _loop_grpo(r, gid, eps=1e-6, normalize_std=True):
    out = torch.empty_like(r, dtype=torch.float64)
    for g in gid.unique():
        idx = (gid == g).nonzero().squeeze(1)
        x = r[idx].double()
        if len(idx) == 1:
            out[idx] = x
        elif normalize_std:
            out[idx] = (x - x.mean()) / (x.std() + eps)
        else:
            out[idx] = x - x.mean()
    return out.float()


@pytest.mark.parametrize("normalize_std", [True, False])
def test_vectorised_matches_loop(normalize_std):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 60, (1,), generator=g))
        r = torch.randn(n, generator=g)
        gid = torch.randint(0, 12, (n,), generator=g) * 5 - 7
        a = grpo_advantages(r, gid, normalize_std=normalize_std)
        torch.testing.assert_close(a, _loop_grpo(r, gid, normalize_std=normalize_std), atol=1e-5, rtol=1e-5)


def test_empty_and_shape_errors():
    assert grpo_advantages(torch.empty(0), torch.empty(0, dtype=torch.long)).numel() == 0
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))

