"""Group advantages (docs/objective.md, 'What one RL step trains on'): ``dr_grpo`` (A = r − mean_g r) or ``zscore``, and
the group filter.

Rollouts are grouped by prompt: ``group_ids[i]`` names the prompt of response i (any integers; the
groups need not be contiguous or equally sized). Advantages are returned per response, aligned with
the responses — dropping a group only clears its ``keep`` flags and never shifts anyone else's
advantage (a documented decision, see docs/objective.md, 'What one RL step trains on').
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Advantages", "compute_advantages"]


class Advantages(NamedTuple):
    """advantages [N] fp32 · keep [N] bool (response's group survives the filter) · group_accuracy [N]
    fp32 (mean reward of the response's group) · num_groups · num_kept_groups."""

    advantages: torch.Tensor
    keep: torch.Tensor
    group_accuracy: torch.Tensor
    num_groups: int
    num_kept_groups: int


def compute_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, kind: str = "dr_grpo",
                       filter_groups: bool = True, low: float = 0.2, high: float = 0.8,
                       eps: float = 1e-6) -> Advantages:
    """Per-response advantages within prompt groups.

    dr_grpo: A_i = r_i − mean_{g(i)} r.   zscore: A_i = (r_i − mean)/std (population std; 0 when std = 0).
    Filter: a group is dropped (keep = False for its responses) when its mean reward is > ``high`` or
    < ``low``; dropped responses get advantage 0.

    Args:
        rewards: [N] float rewards. group_ids: [N] integer group labels.
    Returns:
        :class:`Advantages`.
    """
    if kind not in ("dr_grpo", "zscore"):
        raise ValueError(f"advantage kind must be 'dr_grpo' or 'zscore', got {kind!r}")
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [N], got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    if not 0.0 <= low <= high <= 1.0 and filter_groups:
        raise ValueError(f"need 0 <= low <= high <= 1 for the group filter, got low={low}, high={high}")
    r = rewards.to(torch.float32)
    _, g = torch.unique(group_ids, return_inverse=True)
    G = int(g.max()) + 1 if g.numel() else 0
    cnt = torch.zeros(G, dtype=torch.float32, device=r.device).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros(G, dtype=torch.float32, device=r.device).index_add_(0, g, r) / cnt.clamp_min(1)
    dev = r - mean[g]
    if kind == "dr_grpo":
        adv = dev
    else:
        var = torch.zeros(G, dtype=torch.float32, device=r.device).index_add_(0, g, dev * dev)
        var = var / cnt.clamp_min(1)
        std = var.sqrt()[g]
        adv = torch.where(std > eps, dev / std.clamp_min(eps), torch.zeros_like(dev))
    acc = mean[g]
    if filter_groups:
        keep_group = (mean >= low) & (mean <= high)
    else:
        keep_group = torch.ones(G, dtype=torch.bool, device=r.device)
    keep = keep_group[g]
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    return Advantages(adv, keep, acc, G, int(keep_group.sum()))
