"""Group advantages (docs/objective.md, 'What one RL step trains on')."""

from __future__ import annotations

import pytest
import torch

from slim_rl.advantages import compute_advantages


def _loop(rewards, groups, kind, filt, low, high):
    out, keep = [], []
    for r, g in zip(rewards, groups):
        rs = [x for x, h in zip(rewards, groups) if h == g]
        mean = sum(rs) / len(rs)
        std = (sum((x - mean) ** 2 for x in rs) / len(rs)) ** 0.5
        k = (not filt) or (low <= mean <= high)
        a = r - mean if kind == "dr_grpo" else ((r - mean) / std if std > 1e-6 else 0.0)
        out.append(a if k else 0.0)
        keep.append(k)
    return out, keep


@pytest.mark.parametrize("kind", ["dr_grpo", "zscore"])
@pytest.mark.parametrize("filt", [True, False])
def test_advantages_match_per_group_loop(kind, filt):
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 7, (60,), generator=g) * 3 + 11   # non-contiguous, unequal groups
    rewards = (torch.rand(60, generator=g) < 0.5).float()
    res = compute_advantages(rewards, groups, kind=kind, filter_groups=filt, low=0.2, high=0.8)
    exp, keep = _loop(rewards.tolist(), groups.tolist(), kind, filt, 0.2, 0.8)
    assert torch.allclose(res.advantages, torch.tensor(exp), atol=1e-6)
    assert res.keep.tolist() == keep


def test_filter_drops_easy_and_hard_groups_and_keeps_alignment():
    rewards = torch.tensor([1., 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 0])
    groups = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4)
    res = compute_advantages(rewards, groups)
    assert res.keep.tolist() == [False] * 8 + [True] * 4 + [True] * 4
    assert res.num_groups == 4 and res.num_kept_groups == 2
    # the kept responses keep their own advantages (no shift when earlier groups are dropped)
    assert res.advantages[8:12].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert res.advantages[12:].tolist() == [0.25, 0.25, 0.25, -0.75]
    assert res.advantages[:8].abs().sum() == 0
    # group accuracy 0.8 is kept (boundary), 0.875 dropped
    r = compute_advantages(torch.tensor([1., 1, 1, 1, 0]), torch.zeros(5, dtype=torch.long))
    assert r.keep.all()
    r = compute_advantages(torch.tensor([1.] * 7 + [0.]), torch.zeros(8, dtype=torch.long))
    assert not r.keep.any()


def test_zscore_zero_std_gives_zero():
    r = compute_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long), kind="zscore", filter_groups=False)
    assert torch.equal(r.advantages, torch.zeros(4))


def test_validation():
    with pytest.raises(ValueError, match="dr_grpo"):
        compute_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long), kind="grpo")
    with pytest.raises(ValueError, match=r"\[N\]"):
        compute_advantages(torch.ones(2), torch.zeros(3, dtype=torch.long))
