"""Public SLIM-RL policy loss (SPEC §4.4-4.5) and the trainer helper that chains it to masked_logprob.

``slim_policy_loss`` is registered as ``slim_ops::slim_policy_loss`` (forward: per-row segmented
reductions) with a closed-form backward ``slim_ops::slim_policy_loss_bwd``; both have a torch and a
Triton implementation and compute the same function. Gradients flow to ``logp`` only.
"""

from __future__ import annotations

import numbers

import torch

from slim_ops._backend import pick
from slim_ops.ops.policy_loss.reference import LOG_RATIO_CLAMP

LEVELS = ("sequence", "block", "token")
KL_ESTIMATORS = ("k3", "k2", "k1")
DEFAULT_BLOCK_SIZE = 16  # K (SPEC §1)
METRIC_NAMES = ("policy_loss", "kl_loss", "kl", "clip_frac", "ratio_mean", "masked_count")
# per-row statistics produced by every backend: objective J, KL_row, |M|, clipped units, units, sum of ratios
ROW_STATS = 6


# --------------------------------------------------------------------------------------------------
# torch backend: closed-form rows and gradient (the reference's autograd is the independent check)
# --------------------------------------------------------------------------------------------------
def _ratio_bounds(level: str, clip_low: float, clip_high: float, clip_token: float) -> tuple[float, float]:
    if level == "token":
        return 1.0 - clip_token, 1.0 + clip_token
    return 1.0 - clip_low, 1.0 + clip_high


def _units_torch(delta: torch.Tensor, mask: torch.Tensor, level: str, block_size: int):
    """Per-unit (row / block / token) clamped log-ratio, its 'inside the clamp' flag, masked counts and a
    function mapping unit values back to positions."""
    B, L = delta.shape
    if level == "sequence":
        n = mask.sum(1, keepdim=True).float()
        raw = delta.sum(1, keepdim=True) / n.clamp_min(1)
        expand = lambda u: u.expand(B, L)
    elif level == "block":
        K = block_size
        nb = -(-L // K)
        pad = nb * K - L
        n = torch.nn.functional.pad(mask.float(), (0, pad)).reshape(B, nb, K).sum(2)
        raw = torch.nn.functional.pad(delta, (0, pad)).reshape(B, nb, K).sum(2) / n.clamp_min(1)
        expand = lambda u: u.repeat_interleave(K, dim=1)[:, :L]
    else:
        n = mask.float()
        raw = delta
        expand = lambda u: u
    lam = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    inside = raw.abs() <= LOG_RATIO_CLAMP
    return lam, inside, n, expand


def _kl_torch(delta: torch.Tensor, kl_estimator: str):
    if kl_estimator == "k3":
        e = torch.exp(torch.clamp(-delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        return e - 1.0 + delta, 1.0 - torch.where(delta.abs() <= LOG_RATIO_CLAMP, e, torch.zeros_like(e))
    if kl_estimator == "k2":
        return 0.5 * delta * delta, delta
    return delta, torch.ones_like(delta)


def _policy_rows_torch(logp, logp_old, mask, adv, *, level, lo, hi, kl_estimator, L1, block_size):
    """Per-row stats [B, ROW_STATS] and dJ/dl, dKL_row/dl ([B, L] each, fp32)."""
    logp = logp.float()
    mask = mask.bool()
    delta = torch.where(mask, logp - logp_old.float(), torch.zeros_like(logp))
    a = adv.float().unsqueeze(1)
    lam, inside, n, expand = _units_torch(delta, mask, level, block_size)
    ratio = torch.exp(lam)
    unit = n > 0
    keep = ((a >= 0) & (ratio <= hi)) | ((a < 0) & (ratio >= lo))
    obj = torch.minimum(ratio * a, torch.clamp(ratio, lo, hi) * a)
    weight = n if level == "block" else unit.float()
    J = (weight * torch.where(unit, obj, torch.zeros_like(obj))).sum(1)
    if level != "sequence":
        J = J / L1
    kappa, dkappa = _kl_torch(delta, kl_estimator)
    zero = torch.zeros_like(delta)
    kl_row = torch.where(mask, kappa, zero).sum(1) / L1
    unitf = unit.float()
    stats = torch.stack([J, kl_row, mask.sum(1).float(), ((~keep).float() * unitf).sum(1), unitf.sum(1),
                         (ratio * unitf).sum(1)], dim=1)
    # gradients per position
    gs = torch.where(keep & inside, a * ratio, torch.zeros_like(ratio))
    if level == "sequence":
        gs = gs / n.clamp_min(1)
    else:
        gs = gs / L1
    dJ = torch.where(mask, expand(gs), zero)
    dkl = torch.where(mask, dkappa / L1, zero)
    return stats, dJ, dkl


def _combine(rows: torch.Tensor, w: torch.Tensor, kl_coef: float):
    """(loss, stats[len(METRIC_NAMES)]) from per-row stats."""
    B = rows.shape[0]
    J, kl_row, n, clipped, units, ratio_sum = rows.unbind(1)
    pol = -(w * J).sum() / B
    kl = (w * kl_row).sum() / B
    kl_loss = kl_coef * kl
    u = units.sum().clamp_min(1)
    stats = torch.stack([pol, kl_loss, kl, clipped.sum() / u, ratio_sum.sum() / u, n.sum()])
    return pol + kl_loss, stats


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("slim_ops::slim_policy_loss", mutates_args=())
def _policy_loss_fwd(logp: torch.Tensor, logp_old: torch.Tensor, loss_mask: torch.Tensor,
                     advantages: torch.Tensor, weights: torch.Tensor, level: str, clip_low: float,
                     clip_high: float, clip_token: float, kl_coef: float, kl_estimator: str,
                     response_len: int, block_size: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = _ratio_bounds(level, clip_low, clip_high, clip_token)
    if backend == "triton":
        from slim_ops.ops.policy_loss.triton import policy_loss_rows_triton

        rows = policy_loss_rows_triton(logp, logp_old, loss_mask, advantages, level=level, lo=lo, hi=hi,
                                       kl_estimator=kl_estimator, L1=response_len, block_size=block_size)
    else:
        rows, _, _ = _policy_rows_torch(logp, logp_old, loss_mask, advantages, level=level, lo=lo, hi=hi,
                                        kl_estimator=kl_estimator, L1=float(response_len),
                                        block_size=block_size)
    return _combine(rows, weights.float(), kl_coef)


@_policy_loss_fwd.register_fake
def _(logp, logp_old, loss_mask, advantages, weights, level, clip_low, clip_high, clip_token, kl_coef,
      kl_estimator, response_len, block_size, backend):
    return (logp.new_empty((), dtype=torch.float32),
            logp.new_empty((len(METRIC_NAMES),), dtype=torch.float32))


@torch.library.custom_op("slim_ops::slim_policy_loss_bwd", mutates_args=())
def _policy_loss_bwd(grad_loss: torch.Tensor, logp: torch.Tensor, logp_old: torch.Tensor,
                     loss_mask: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor, level: str,
                     clip_low: float, clip_high: float, clip_token: float, kl_coef: float,
                     kl_estimator: str, response_len: int, block_size: int, backend: str) -> torch.Tensor:
    lo, hi = _ratio_bounds(level, clip_low, clip_high, clip_token)
    if backend == "triton":
        from slim_ops.ops.policy_loss.triton import policy_loss_grad_triton

        return policy_loss_grad_triton(grad_loss, logp, logp_old, loss_mask, advantages, weights, level=level,
                                       lo=lo, hi=hi, kl_coef=kl_coef, kl_estimator=kl_estimator,
                                       L1=response_len, block_size=block_size)
    _, dJ, dkl = _policy_rows_torch(logp, logp_old, loss_mask, advantages, level=level, lo=lo, hi=hi,
                                    kl_estimator=kl_estimator, L1=float(response_len), block_size=block_size)
    B = logp.shape[0]
    scale = (grad_loss.float() * weights.float() / B).unsqueeze(1)
    return (scale * (kl_coef * dkl - dJ)).to(logp.dtype)


@_policy_loss_bwd.register_fake
def _(grad_loss, logp, logp_old, loss_mask, advantages, weights, level, clip_low, clip_high, clip_token,
      kl_coef, kl_estimator, response_len, block_size, backend):
    return torch.empty_like(logp)


_ARG_NAMES = ("level", "clip_low", "clip_high", "clip_token", "kl_coef", "kl_estimator", "response_len",
              "block_size", "backend")


def _setup_context(ctx, inputs, output):
    logp, logp_old, loss_mask, advantages, weights = inputs[:5]
    ctx.save_for_backward(logp, logp_old, loss_mask, advantages, weights)
    ctx.args = dict(zip(_ARG_NAMES, inputs[5:], strict=True))


def _backward(ctx, grad_loss, grad_stats):
    logp, logp_old, loss_mask, advantages, weights = ctx.saved_tensors
    grad = _policy_loss_bwd(grad_loss, logp, logp_old, loss_mask, advantages, weights, **ctx.args)
    return (grad,) + (None,) * (4 + len(_ARG_NAMES))


_policy_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    """Python / NumPy integers and 0-d integer tensors (not bool)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_floating_point() and v.dtype != torch.bool
    return isinstance(v, numbers.Integral)


def _check_policy_inputs(logp, logp_old, loss_mask, advantages, weights, level, clip_low, clip_high,
                         clip_token, kl_coef, kl_estimator, response_len, block_size):
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError("slim_policy_loss: logp must be a floating tensor of shape [B, L] (rows x response "
                         f"positions), got {getattr(logp, 'shape', type(logp))}")
    B, L = logp.shape
    if B == 0 or L == 0:
        raise ValueError("slim_policy_loss: logp must have B >= 1 rows and L >= 1 positions, "
                         f"got {tuple(logp.shape)}")
    for name, t in (("logp_old", logp_old), ("loss_mask", loss_mask)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, L):
            raise ValueError(f"slim_policy_loss: {name} must have the shape of logp {(B, L)}, "
                             f"got {getattr(t, 'shape', type(t))}")
    if not logp_old.is_floating_point():
        raise ValueError(f"slim_policy_loss: logp_old must be floating point, got {logp_old.dtype}")
    if loss_mask.is_complex():
        raise ValueError(f"slim_policy_loss: loss_mask must be a bool (or 0/1 integer/float) tensor, "
                         f"got {loss_mask.dtype}")
    for name, t in (("advantages", advantages), ("weights", weights)):
        if t is None and name == "weights":
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B,) or not t.is_floating_point():
            raise ValueError(f"slim_policy_loss: {name} must be a floating tensor of shape [B]=({B},), "
                             f"got {getattr(t, 'shape', type(t))} {getattr(t, 'dtype', '')}")
    for name, t in (("logp_old", logp_old), ("loss_mask", loss_mask), ("advantages", advantages),
                    ("weights", weights)):
        if t is not None and t.device != logp.device:
            raise ValueError(f"slim_policy_loss: {name} is on {t.device} but logp is on {logp.device}")
    if level not in LEVELS:
        raise ValueError(f"slim_policy_loss: level must be one of {LEVELS}, got {level!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"slim_policy_loss: kl_estimator must be one of {KL_ESTIMATORS}, "
                         f"got {kl_estimator!r}")
    for name, v in (("clip_low", clip_low), ("clip_high", clip_high), ("clip_token", clip_token)):
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not (0.0 <= float(v)):
            raise ValueError(f"slim_policy_loss: {name} must be a float >= 0, got {v!r}")
    if clip_low >= 1.0 or clip_token >= 1.0:
        raise ValueError(f"slim_policy_loss: clip_low and clip_token must be < 1 (the lower ratio bound "
                         f"1 - eps must stay positive), got clip_low={clip_low}, clip_token={clip_token}")
    if not isinstance(kl_coef, numbers.Real) or isinstance(kl_coef, bool) or kl_coef < 0:
        raise ValueError(f"slim_policy_loss: kl_coef must be a float >= 0, got {kl_coef!r}")
    if response_len is not None and (not _is_int(response_len) or response_len < 1):
        raise ValueError(f"slim_policy_loss: response_len must be a positive int (L1), got {response_len!r}")
    if block_size is not None and (not _is_int(block_size) or block_size < 1):
        raise ValueError(f"slim_policy_loss: block_size must be a positive int, got {block_size!r}")


def slim_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, loss_mask: torch.Tensor,
                     advantages: torch.Tensor, weights: torch.Tensor | None = None, *,
                     level: str = "sequence", clip_low: float = 0.1, clip_high: float = 0.1,
                     clip_token: float = 0.2, kl_coef: float = 0.01, kl_estimator: str = "k3",
                     response_len: int | None = None, block_size: int | None = None,
                     backend: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SLIM-RL clipped policy loss with a KL penalty (SPEC §4.4-4.5).

    Args:
        logp: [B, L] current log-probs ℓ_i(θ) of the response positions (fp32, bf16 or fp16; only
            entries with ``loss_mask`` are read). Gradients flow to ``logp`` only.
        logp_old: [B, L] log-probs under θ_old (no gradient).
        loss_mask: [B, L] bool, the loss set M of each row (0/1 integer or float masks: nonzero = in M).
        advantages: [B] advantage A of each row; weights: [B] quadrature weight w_row (None = 1).
        level: ``"sequence"`` (default), ``"block"`` or ``"token"``.
        block_size: K, the block length of ``level="block"`` (default 16, SPEC §1).
        clip_low, clip_high: ε_lo, ε_hi of the sequence/block ratio; clip_token: ε of the token ratio.
        kl_coef: β; kl_estimator: ``"k3"`` (default), ``"k2"`` or ``"k1"``.
        response_len: L1 used by the 1/L1 normalisations (default L).
        backend: ``None`` (auto), ``"torch"`` or ``"triton"``.

    With δ_i = ℓ_i − ℓ_i^old on M (log-ratios clamped at ±10):
        sequence: s = exp(clamp(mean_M δ)), J = min(sA, clamp(s, 1−ε_lo, 1+ε_hi)A)
        block:    J = (1/L1) Σ_β n_β min(s_β A, ŝ_β A) over blocks of ``block_size`` with n_β > 0
        token:    J = (1/L1) Σ_M min(r_i A, clamp(r_i, 1−ε, 1+ε)A), r_i = exp(clamp(δ_i))
        KL_row = (1/L1) Σ_M κ(δ_i), κ: k3 exp(clamp(−δ)) − 1 + δ, k2 δ²/2, k1 δ
        L = −(1/B) Σ w J + β (1/B) Σ w KL_row.  Rows with M = ∅ contribute nothing.

    Returns:
        (loss, metrics): loss is a 0-d fp32 tensor; metrics maps ``policy_loss``, ``kl_loss`` (β·KL),
        ``kl`` ((1/B) Σ w KL_row), ``clip_frac`` (fraction of ratio units — rows, non-empty blocks or
        masked tokens — whose policy gradient is cut by the clip), ``ratio_mean`` (mean ratio over
        those units) and ``masked_count`` (Σ|M|) to detached 0-d fp32 tensors (no host sync).
    """
    _check_policy_inputs(logp, logp_old, loss_mask, advantages, weights, level, clip_low, clip_high,
                         clip_token, kl_coef, kl_estimator, response_len, block_size)
    be = pick("slim_policy_loss", logp.device, backend, supported=("torch", "triton"))
    if weights is None:
        weights = torch.ones(logp.shape[0], dtype=torch.float32, device=logp.device)
    L1 = int(response_len) if response_len is not None else logp.shape[1]
    K = int(block_size) if block_size is not None else DEFAULT_BLOCK_SIZE
    if loss_mask.dtype != torch.bool:
        loss_mask = loss_mask != 0
    loss, stats = _policy_loss_fwd(logp, logp_old.detach(), loss_mask, advantages.detach(), weights.detach(),
                                   level, float(clip_low), float(clip_high), float(clip_token),
                                   float(kl_coef), kl_estimator, L1, K, be)
    stats = stats.detach()
    return loss, {name: stats[i] for i, name in enumerate(METRIC_NAMES)}


def slim_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          logp_old: torch.Tensor, loss_mask: torch.Tensor, advantages: torch.Tensor,
                          weights: torch.Tensor | None = None, *, temperature: float = 1.0,
                          return_entropy: bool = True, backend: str | None = None, **loss_kwargs):
    """One call per micro-batch: hidden states of the masked rows -> log-probs -> SLIM-RL loss.

    Args:
        hidden: [n, d] final hidden states of the masked positions, in the row-major order of
            ``loss_mask.nonzero()`` (n = loss_mask.sum()); weight: [V, d] LM head; labels: [n] clean tokens.
        logp_old: [n] (same packing) or [B, L] (dense) log-probs under θ_old.
        loss_mask: [B, L] bool; advantages: [B]; weights: [B] or None.
        temperature, backend: passed to :func:`slim_ops.masked_logprob` (and ``backend`` to the loss).
        **loss_kwargs: level, clip_low, clip_high, clip_token, kl_coef, kl_estimator, response_len,
            block_size of :func:`slim_policy_loss`.

    Returns:
        (loss, metrics, logp): metrics are those of :func:`slim_policy_loss` plus ``entropy`` (mean
        entropy over M, when ``return_entropy``); logp is the packed [n] fp32 log-prob, detached.
        Gradients reach ``hidden`` and ``weight``; memory stays O(n + tile) — no [n, V] tensor.
    """
    from slim_ops.ops.masked_logprob.op import masked_logprob

    if not isinstance(loss_mask, torch.Tensor) or loss_mask.dim() != 2 or loss_mask.dtype != torch.bool:
        raise ValueError(f"slim_loss_from_hidden: loss_mask must be a bool [B, L] tensor, got "
                         f"{getattr(loss_mask, 'shape', type(loss_mask))} {getattr(loss_mask, 'dtype', '')}")
    if hidden.dim() != 2:
        raise ValueError(f"slim_loss_from_hidden: hidden must be [n, d] rows of the masked positions, got "
                         f"{tuple(hidden.shape)}")
    if hidden.device.type == "cpu" and not torch.compiler.is_compiling():
        n_mask = int(loss_mask.sum())
        if n_mask != hidden.shape[0]:
            raise ValueError(f"slim_loss_from_hidden: hidden has {hidden.shape[0]} rows but loss_mask "
                             f"selects {n_mask} positions; pass exactly the masked rows in row-major order")
    out = masked_logprob(hidden, weight, labels, temperature=temperature, return_entropy=return_entropy,
                         backend=backend)
    logp, ent = out if return_entropy else (out, None)
    zeros = torch.zeros(loss_mask.shape, dtype=torch.float32, device=logp.device)
    dense = zeros.masked_scatter(loss_mask, logp)
    if logp_old.dim() == 1:
        if logp_old.shape[0] != hidden.shape[0]:
            raise ValueError(f"slim_loss_from_hidden: packed logp_old has {logp_old.shape[0]} entries, "
                             f"expected n={hidden.shape[0]}")
        old = zeros.masked_scatter(loss_mask, logp_old.detach().float())
    else:
        old = logp_old
    loss_backend = backend if backend in ("torch", "triton") else None
    loss, metrics = slim_policy_loss(dense, old, loss_mask, advantages, weights, backend=loss_backend,
                                     **loss_kwargs)
    if ent is not None:
        metrics["entropy"] = ent.detach().sum() / max(ent.numel(), 1)
    return loss, metrics, logp.detach()
