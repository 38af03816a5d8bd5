"""SLIM-RL policy loss (SPEC §4.4-4.5) in plain fp32 PyTorch: the executable spec.

Autograd through :func:`slim_policy_loss_ref` is the reference gradient. ``torch.minimum`` splits the
gradient evenly at ties and ``torch.clamp`` passes it on the closed interval, which together give the
inclusive rule of SPEC §4.5 (``s <= 1 + eps_hi``, ``|lambda| <= 10``).
"""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 10.0


def _kl_terms(delta: torch.Tensor, estimator: str) -> torch.Tensor:
    if estimator == "k3":
        return torch.exp(torch.clamp(-delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - 1.0 + delta
    if estimator == "k2":
        return 0.5 * delta * delta
    if estimator == "k1":
        return delta
    raise ValueError(f"kl_estimator must be 'k3', 'k2' or 'k1', got {estimator!r}")


def _clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, lo: float, hi: float):
    """min(ratio*A, clamp(ratio, lo, hi)*A) and the 'policy gradient is zero' flag (SPEC §4.5 g = 0)."""
    obj = torch.minimum(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
    clipped = ~(((adv >= 0) & (ratio <= hi)) | ((adv < 0) & (ratio >= lo)))
    return obj, clipped


def slim_policy_loss_ref(logp: torch.Tensor, logp_old: torch.Tensor, loss_mask: torch.Tensor,
                         advantages: torch.Tensor, weights: torch.Tensor | None = None, *,
                         level: str = "sequence", clip_low: float = 0.1, clip_high: float = 0.1,
                         clip_token: float = 0.2, kl_coef: float = 0.01, kl_estimator: str = "k3",
                         response_len: int | None = None, block_size: int | None = None):
    """Reference loss. logp/logp_old [B, L] (values off the mask are ignored), loss_mask [B, L] bool,
    advantages [B], weights [B] or None (= 1). Returns (loss, metrics) like ``slim_policy_loss``."""
    logp = logp.float()
    B, L = logp.shape
    L1 = float(response_len if response_len is not None else L)
    mask = loss_mask.bool()
    adv = advantages.float().reshape(B, 1)
    w = torch.ones(B, device=logp.device) if weights is None else weights.float()
    delta = torch.where(mask, logp - logp_old.float(), torch.zeros_like(logp))
    n = mask.sum(1).float()  # [B]

    if level == "sequence":
        lam = torch.clamp(delta.sum(1, keepdim=True) / n.clamp_min(1).unsqueeze(1),
                          -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(lam)  # [B, 1]
        obj, clipped = _clipped_objective(ratio, adv, 1.0 - clip_low, 1.0 + clip_high)
        unit = (n > 0).unsqueeze(1)
        J = torch.where(unit, obj, torch.zeros_like(obj)).sum(1)
    elif level == "block":
        K = int(block_size) if block_size is not None else 16  # SPEC §1 default block length
        nb = -(-L // K)
        pad = nb * K - L
        d = torch.nn.functional.pad(delta, (0, pad)).reshape(B, nb, K)
        nbk = torch.nn.functional.pad(mask.float(), (0, pad)).reshape(B, nb, K).sum(2)  # [B, nb]
        lam = torch.clamp(d.sum(2) / nbk.clamp_min(1), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(lam)
        obj, clipped = _clipped_objective(ratio, adv, 1.0 - clip_low, 1.0 + clip_high)
        unit = nbk > 0
        J = (nbk * obj).sum(1) / L1
    elif level == "token":
        ratio = torch.exp(torch.clamp(delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        obj, clipped = _clipped_objective(ratio, adv, 1.0 - clip_token, 1.0 + clip_token)
        unit = mask
        J = torch.where(mask, obj, torch.zeros_like(obj)).sum(1) / L1
    else:
        raise ValueError(f"level must be 'sequence', 'block' or 'token', got {level!r}")

    kappa = torch.where(mask, _kl_terms(delta, kl_estimator), torch.zeros_like(delta))
    kl_row = kappa.sum(1) / L1
    policy_loss = -(w * J).sum() / B
    kl = (w * kl_row).sum() / B
    loss = policy_loss + kl_coef * kl
    units = unit.sum().float()
    metrics = {
        "policy_loss": policy_loss.detach(),
        "kl_loss": (kl_coef * kl).detach(),
        "kl": kl.detach(),
        "clip_frac": ((clipped & unit).sum().float() / units.clamp_min(1)).detach(),
        "ratio_mean": (torch.where(unit, ratio, torch.zeros_like(ratio)).sum() / units.clamp_min(1)).detach(),
        "masked_count": n.sum().detach(),
    }
    return loss, metrics
