"""SLIM-RL policy loss (docs/objective.md, 'The SLIM loss') in plain fp32 PyTorch: the executable spec.

Autograd through :func:`slim_policy_loss_ref` is the reference gradient. ``torch.minimum`` splits the
gradient evenly at ties and ``torch.clamp`` passes it on the closed interval, which together give the
inclusive rule of docs/objective.md, 'The SLIM loss' (``s <= 1 + eps_hi``, ``|lambda| <= 10``, and ``s <= clip_delta``).

Options beyond docs/objective.md, 'The SLIM loss', each matching a public GRPO trainer:
- ``clip_delta`` (δ): the unclipped term uses min(s, δ), J = min(min(s, δ)·A, clamp(s, 1−ε_lo, 1+ε_hi)·A)
  — TRL's and Liger-Kernel's GRPO ``delta`` ("two-sided clipping", INTELLECT-2). For δ ≥ 1+ε_hi it equals
  verl's dual-clip PPO with ``clip_ratio_c = δ`` (for A < 0: max(min(sA, ŝA), δA)).
- ``loss_agg``: how per-token terms become the loss, named as verl / TRL name them (see ``aggregate``).
- ``kl_reference``: KL against a frozen reference policy's log-probs instead of θ_old (TRL / Liger /
  verl ``ref_per_token_logps``, k3 = exp(ref − ℓ) − (ref − ℓ) − 1).
- ``clip_frac`` counts a unit only when its clip is active for its advantage's sign: s > 1+ε_hi with
  A > 0, s < 1−ε_lo with A < 0 (TRL ``clip_ratio/region_mean``, Liger's clip metric); ``clip_frac_delta``
  counts A < 0 with s > δ (verl's ``pg_clipfrac_lower``).
"""

from __future__ import annotations

import math

import torch

LOG_RATIO_CLAMP = 10.0
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _kl_terms(delta: torch.Tensor, estimator: str) -> torch.Tensor:
    if estimator == "k3":
        return torch.exp(torch.clamp(-delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - 1.0 + delta
    if estimator == "k2":
        return 0.5 * delta * delta
    if estimator == "k1":
        return delta
    raise ValueError(f"kl_estimator must be 'k3', 'k2' or 'k1', got {estimator!r}")


def _clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, lo: float, hi: float, cap: float | None):
    """min(min(ratio, δ)*A, clamp(ratio, lo, hi)*A), the TRL clip flag and the δ flag."""
    capped = ratio if cap is None else torch.clamp(ratio, max=cap)
    obj = torch.minimum(capped * adv, torch.clamp(ratio, lo, hi) * adv)
    clipped = ((adv > 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo))
    capped_flag = (adv < 0) & (ratio > cap) if cap is not None else torch.zeros_like(clipped)
    return obj, clipped, capped_flag


def aggregate(mode: str, s_row: torch.Tensor, n_row: torch.Tensor, w: torch.Tensor, L1: float,
              mean_row: torch.Tensor | None = None) -> torch.Tensor:
    """Aggregate per-row token sums ``s_row`` = Σ_{i∈M} x_i (rows weighted by ``w``) into a scalar.

    token-mean:               Σ_r w_r s_r / Σ_r |M_r|        (verl "token-mean", TRL/Liger "dapo"/"bnpo")
    seq-mean-token-mean:      (1/B) Σ_r w_r s_r / |M_r|      (verl "seq-mean-token-mean", TRL "grpo")
    seq-mean-token-sum:       (1/B) Σ_r w_r s_r              (verl "seq-mean-token-sum")
    seq-mean-token-sum-norm:  (1/B) Σ_r w_r s_r / L1         (Dr. GRPO: verl "seq-mean-token-sum-norm",
                                                              TRL/Liger "dr_grpo" with L1 = max length)
    Empty rows count in B (as TRL; verl's seq-mean modes divide by the non-empty rows). ``mean_row``
    replaces s_r/|M_r| where the per-token value is constant over the row (sequence level).
    """
    B = s_row.shape[0]
    if mode == "token-mean":
        return (w * s_row).sum() / n_row.sum().clamp_min(1)
    if mode == "seq-mean-token-mean":
        m = s_row / n_row.clamp_min(1) if mean_row is None else mean_row
        return (w * m).sum() / B
    if mode == "seq-mean-token-sum":
        return (w * s_row).sum() / B
    if mode == "seq-mean-token-sum-norm":
        return (w * (s_row / L1)).sum() / B
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS} or None, got {mode!r}")


def default_aggs(level: str, loss_agg: str | None) -> tuple[str, str]:
    """(policy aggregation, KL aggregation). ``None`` is docs/objective.md, 'The SLIM loss': the sequence ratio is one
    term per row (seq-mean-token-mean of a constant), the block/token terms and the KL are normalised by L1."""
    if loss_agg is not None:
        return loss_agg, loss_agg
    pol = "seq-mean-token-mean" if level == "sequence" else "seq-mean-token-sum-norm"
    return pol, "seq-mean-token-sum-norm"


def slim_policy_loss_ref(logp: torch.Tensor, logp_old: torch.Tensor, loss_mask: torch.Tensor,
                         advantages: torch.Tensor, weights: torch.Tensor | None = None, *,
                         level: str = "sequence", clip_low: float = 0.1, clip_high: float = 0.1,
                         clip_token: float = 0.2, kl_coef: float = 0.01, kl_estimator: str = "k3",
                         response_len: int | None = None, block_size: int | None = None,
                         clip_delta: float | None = None, loss_agg: str | None = None,
                         kl_reference: torch.Tensor | None = None):
    """Reference loss. logp/logp_old [B, L] (values off the mask are ignored), loss_mask [B, L] bool,
    advantages [B], weights [B] or None (= 1), kl_reference [B, L] or None (= logp_old).
    Returns (loss, metrics) like ``slim_policy_loss``."""
    logp = logp.float()
    B, L = logp.shape
    L1 = float(response_len if response_len is not None else L)
    mask = loss_mask.bool()
    adv = advantages.float().reshape(B, 1)
    w = torch.ones(B, device=logp.device) if weights is None else weights.float()
    cap = None if clip_delta is None or math.isinf(clip_delta) else float(clip_delta)
    pol_agg, kl_agg = default_aggs(level, loss_agg)
    delta = torch.where(mask, logp - logp_old.float(), torch.zeros_like(logp))
    ref = logp_old if kl_reference is None else kl_reference
    delta_kl = torch.where(mask, logp - ref.float(), torch.zeros_like(logp))
    n = mask.sum(1).float()  # [B]

    mean_row = None
    if level == "sequence":
        lam = torch.clamp(delta.sum(1, keepdim=True) / n.clamp_min(1).unsqueeze(1),
                          -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(lam)  # [B, 1]
        obj, clipped, capped = _clipped_objective(ratio, adv, 1.0 - clip_low, 1.0 + clip_high, cap)
        unit = (n > 0).unsqueeze(1)
        mean_row = torch.where(unit, obj, torch.zeros_like(obj)).sum(1)  # the per-token value of the row
        s_row = n * mean_row
    elif level == "block":
        K = int(block_size) if block_size is not None else 16  # default block length K
        nb = -(-L // K)
        pad = nb * K - L
        d = torch.nn.functional.pad(delta, (0, pad)).reshape(B, nb, K)
        nbk = torch.nn.functional.pad(mask.float(), (0, pad)).reshape(B, nb, K).sum(2)  # [B, nb]
        lam = torch.clamp(d.sum(2) / nbk.clamp_min(1), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(lam)
        obj, clipped, capped = _clipped_objective(ratio, adv, 1.0 - clip_low, 1.0 + clip_high, cap)
        unit = nbk > 0
        s_row = (nbk * obj).sum(1)
    elif level == "token":
        ratio = torch.exp(torch.clamp(delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        obj, clipped, capped = _clipped_objective(ratio, adv, 1.0 - clip_token, 1.0 + clip_token, cap)
        unit = mask
        s_row = torch.where(mask, obj, torch.zeros_like(obj)).sum(1)
    else:
        raise ValueError(f"level must be 'sequence', 'block' or 'token', got {level!r}")

    kappa = torch.where(mask, _kl_terms(delta_kl, kl_estimator), torch.zeros_like(delta_kl))
    policy_loss = -aggregate(pol_agg, s_row, n, w, L1, mean_row)
    kl = aggregate(kl_agg, kappa.sum(1), n, w, L1)
    loss = policy_loss + kl_coef * kl
    units = unit.sum().float()
    metrics = {
        "policy_loss": policy_loss.detach(),
        "kl_loss": (kl_coef * kl).detach(),
        "kl": kl.detach(),
        "clip_frac": ((clipped & unit).sum().float() / units.clamp_min(1)).detach(),
        "ratio_mean": (torch.where(unit, ratio, torch.zeros_like(ratio)).sum() / units.clamp_min(1)).detach(),
        "masked_count": n.sum().detach(),
        "clip_frac_delta": ((capped & unit).sum().float() / units.clamp_min(1)).detach(),
    }
    return loss, metrics
