"""Public SLIM-RL policy loss (docs/objective.md, 'The SLIM loss') and the trainer helper that chains it to
masked_logprob.

``slim_policy_loss`` is registered as ``slim_ops::slim_policy_loss`` (forward: per-row segmented
reductions) with a closed-form backward ``slim_ops::slim_policy_loss_bwd``; both have a torch and a
Triton implementation and compute the same function. Gradients flow to ``logp`` only.
"""

from __future__ import annotations

import math
import numbers

import torch

from slim_ops._backend import pick
from slim_ops.ops.policy_loss.reference import LOG_RATIO_CLAMP, LOSS_AGGS, aggregate, default_aggs

LEVELS = ("sequence", "block", "token")
KL_ESTIMATORS = ("k3", "k2", "k1")
DEFAULT_BLOCK_SIZE = 16  # K, the default block length
METRIC_NAMES = ("policy_loss", "kl_loss", "kl", "clip_frac", "ratio_mean", "masked_count", "clip_frac_delta")
# per-row statistics produced by every backend: policy term P (sequence: the row's objective J; block /
# token: Σ_M of the per-token objective), Σ_M κ, |M|, clipped units, units, Σ ratio, δ-capped units
ROW_STATS = 7
NO_DELTA = math.inf  # clip_delta=None inside the registered op


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


def _policy_rows_torch(logp, logp_old, ref, mask, adv, *, level, lo, hi, cap, kl_estimator, block_size):
    """Per-row stats [B, ROW_STATS], the per-position policy derivative gs = ∂(Σ_M objective)/∂ℓ and
    ∂κ/∂ℓ ([B, L] each, fp32, 0 off the mask)."""
    logp = logp.float()
    mask = mask.bool()
    delta = torch.where(mask, logp - logp_old.float(), torch.zeros_like(logp))
    a = adv.float().unsqueeze(1)
    lam, inside, n, expand = _units_torch(delta, mask, level, block_size)
    ratio = torch.exp(lam)
    unit = n > 0
    keep = ((a >= 0) & (ratio <= hi)) | ((a < 0) & (ratio >= lo))
    capped = torch.minimum(ratio, torch.full_like(ratio, cap)) if cap != NO_DELTA else ratio
    if cap != NO_DELTA:
        keep = keep & (ratio <= cap)
    obj = torch.minimum(capped * a, torch.clamp(ratio, lo, hi) * a)
    clipped = ((a > 0) & (ratio > hi)) | ((a < 0) & (ratio < lo))
    dcap = (a < 0) & (ratio > cap)
    weight = n if level == "block" else unit.float()
    P = (weight * torch.where(unit, obj, torch.zeros_like(obj))).sum(1)
    delta_kl = delta if ref is logp_old else torch.where(mask, logp - ref.float(), torch.zeros_like(logp))
    kappa, dkappa = _kl_torch(delta_kl, kl_estimator)
    zero = torch.zeros_like(delta)
    unitf = unit.float()
    stats = torch.stack([P, torch.where(mask, kappa, zero).sum(1), mask.sum(1).float(),
                         (clipped.float() * unitf).sum(1), unitf.sum(1), (ratio * unitf).sum(1),
                         (dcap.float() * unitf).sum(1)], dim=1)
    gs = torch.where(keep & inside, a * ratio, torch.zeros_like(ratio))
    return stats, gs, expand, torch.where(mask, dkappa, zero)


def _agg_terms(mode: str, B: int, n: torch.Tensor, L1: float):
    """(D, d): the aggregated loss is Σ_r w_r (Σ_M x)/(D·d_r); D a scalar tensor, d [B, 1] or float."""
    if mode == "token-mean":
        return n.sum().clamp_min(1), 1.0
    if mode == "seq-mean-token-mean":
        return float(B), n.clamp_min(1).unsqueeze(1)
    if mode == "seq-mean-token-sum":
        return float(B), 1.0
    return float(B), L1


def _combine(rows: torch.Tensor, w: torch.Tensor, kl_coef: float, level: str, pol_agg: str, kl_agg: str,
             L1: float):
    """(loss, stats[len(METRIC_NAMES)]) from per-row stats."""
    P, ksum, n, clipped, units, ratio_sum, dcap = rows.unbind(1)
    if level == "sequence":
        pol = -aggregate(pol_agg, n * P, n, w, L1, mean_row=P)
    else:
        pol = -aggregate(pol_agg, P, n, w, L1)
    kl = aggregate(kl_agg, ksum, n, w, L1)
    kl_loss = kl_coef * kl
    u = units.sum().clamp_min(1)
    stats = torch.stack([pol, kl_loss, kl, clipped.sum() / u, ratio_sum.sum() / u, n.sum(), dcap.sum() / u])
    return pol + kl_loss, stats


def _grad_torch(grad_loss, logp, logp_old, ref, loss_mask, advantages, weights, *, level, lo, hi, cap,
                kl_coef, kl_estimator, L1, block_size, pol_agg, kl_agg):
    _, gs, expand, dkappa = _policy_rows_torch(logp, logp_old, ref, loss_mask, advantages, level=level, lo=lo,
                                               hi=hi, cap=cap, kl_estimator=kl_estimator, block_size=block_size)
    B = logp.shape[0]
    mask = loss_mask.bool()
    n = mask.sum(1).float()
    Dp, dp = _agg_terms(pol_agg, B, n, L1)
    Dk, dk = _agg_terms(kl_agg, B, n, L1)
    if pol_agg == "seq-mean-token-mean" and level == "sequence":
        dp = 1.0  # the row's objective is already per token: ∂J/∂ℓ_i = gs / |M|
        gs = gs / n.clamp_min(1).unsqueeze(1)
    zero = torch.zeros_like(dkappa)
    g = grad_loss.float() * weights.float()
    dJ = torch.where(mask, expand(gs / dp), zero)
    dkl = dkappa / dk
    if isinstance(Dp, float) and isinstance(Dk, float) and Dp == Dk:
        return ((g / Dp).unsqueeze(1) * (kl_coef * dkl - dJ)).to(logp.dtype)
    return ((g / Dk).unsqueeze(1) * (kl_coef * dkl) - (g / Dp).unsqueeze(1) * dJ).to(logp.dtype)


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("slim_ops::slim_policy_loss", mutates_args=())
def _policy_loss_fwd(logp: torch.Tensor, logp_old: torch.Tensor, loss_mask: torch.Tensor,
                     advantages: torch.Tensor, weights: torch.Tensor, kl_reference: torch.Tensor, level: str,
                     clip_low: float, clip_high: float, clip_token: float, kl_coef: float, kl_estimator: str,
                     response_len: int, block_size: int, clip_delta: float, pol_agg: str, kl_agg: str,
                     has_ref: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = _ratio_bounds(level, clip_low, clip_high, clip_token)
    ref = kl_reference if has_ref else logp_old
    if backend == "triton":
        from slim_ops.ops.policy_loss.triton import policy_loss_rows_triton

        rows = policy_loss_rows_triton(logp, logp_old, ref if has_ref else None, loss_mask, advantages,
                                       level=level, lo=lo, hi=hi, cap=clip_delta, kl_estimator=kl_estimator,
                                       block_size=block_size)
    else:
        rows, _, _, _ = _policy_rows_torch(logp, logp_old, ref, loss_mask, advantages, level=level, lo=lo, hi=hi,
                                           cap=clip_delta, kl_estimator=kl_estimator, block_size=block_size)
    return _combine(rows, weights.float(), kl_coef, level, pol_agg, kl_agg, float(response_len))


@_policy_loss_fwd.register_fake
def _(logp, logp_old, loss_mask, advantages, weights, kl_reference, level, clip_low, clip_high, clip_token,
      kl_coef, kl_estimator, response_len, block_size, clip_delta, pol_agg, kl_agg, has_ref, backend):
    return (logp.new_empty((), dtype=torch.float32),
            logp.new_empty((len(METRIC_NAMES),), dtype=torch.float32))


@torch.library.custom_op("slim_ops::slim_policy_loss_bwd", mutates_args=())
def _policy_loss_bwd(grad_loss: torch.Tensor, logp: torch.Tensor, logp_old: torch.Tensor,
                     loss_mask: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                     kl_reference: torch.Tensor, level: str, clip_low: float, clip_high: float,
                     clip_token: float, kl_coef: float, kl_estimator: str, response_len: int, block_size: int,
                     clip_delta: float, pol_agg: str, kl_agg: str, has_ref: bool,
                     backend: str) -> torch.Tensor:
    lo, hi = _ratio_bounds(level, clip_low, clip_high, clip_token)
    ref = kl_reference if has_ref else logp_old
    if backend == "triton":
        from slim_ops.ops.policy_loss.triton import policy_loss_grad_triton

        return policy_loss_grad_triton(grad_loss, logp, logp_old, ref if has_ref else None, loss_mask, advantages,
                                       weights, level=level, lo=lo, hi=hi, cap=clip_delta, kl_coef=kl_coef,
                                       kl_estimator=kl_estimator, L1=response_len, block_size=block_size,
                                       pol_agg=pol_agg, kl_agg=kl_agg)
    return _grad_torch(grad_loss, logp, logp_old, ref, loss_mask, advantages, weights, level=level, lo=lo, hi=hi,
                       cap=clip_delta, kl_coef=kl_coef, kl_estimator=kl_estimator, L1=float(response_len),
                       block_size=block_size, pol_agg=pol_agg, kl_agg=kl_agg)


@_policy_loss_bwd.register_fake
def _(grad_loss, logp, logp_old, loss_mask, advantages, weights, kl_reference, level, clip_low, clip_high,
      clip_token, kl_coef, kl_estimator, response_len, block_size, clip_delta, pol_agg, kl_agg, has_ref, backend):
    return torch.empty_like(logp)


_ARG_NAMES = ("level", "clip_low", "clip_high", "clip_token", "kl_coef", "kl_estimator", "response_len",
              "block_size", "clip_delta", "pol_agg", "kl_agg", "has_ref", "backend")
_TENSOR_NAMES = ("logp", "logp_old", "loss_mask", "advantages", "weights", "kl_reference")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:len(_TENSOR_NAMES)])
    ctx.args = dict(zip(_ARG_NAMES, inputs[len(_TENSOR_NAMES):], strict=True))


def _backward(ctx, grad_loss, grad_stats):
    logp, logp_old, loss_mask, advantages, weights, kl_reference = ctx.saved_tensors
    grad = _policy_loss_bwd(grad_loss, logp, logp_old, loss_mask, advantages, weights, kl_reference, **ctx.args)
    return (grad,) + (None,) * (len(_TENSOR_NAMES) - 1 + len(_ARG_NAMES))


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
                         clip_token, kl_coef, kl_estimator, response_len, block_size, clip_delta=None,
                         loss_agg=None, kl_reference=None):
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
    if kl_reference is not None:
        if not isinstance(kl_reference, torch.Tensor) or tuple(kl_reference.shape) != (B, L) or \
                not kl_reference.is_floating_point():
            raise ValueError(f"slim_policy_loss: kl_reference must be a floating tensor of the shape of logp "
                             f"{(B, L)} (reference-model log-probs), got "
                             f"{getattr(kl_reference, 'shape', type(kl_reference))} "
                             f"{getattr(kl_reference, 'dtype', '')}")
        if kl_reference.device != logp.device:
            raise ValueError(f"slim_policy_loss: kl_reference is on {kl_reference.device} but logp is on "
                             f"{logp.device}")
    if clip_delta is not None:
        if not isinstance(clip_delta, numbers.Real) or isinstance(clip_delta, bool) or \
                not math.isfinite(float(clip_delta)) or float(clip_delta) <= 1.0:
            raise ValueError(f"slim_policy_loss: clip_delta must be a finite float > 1 (upper bound of the "
                             f"unclipped ratio, e.g. 3.0), or None, got {clip_delta!r}")
    if loss_agg is not None and loss_agg not in LOSS_AGGS:
        raise ValueError(f"slim_policy_loss: loss_agg must be one of {LOSS_AGGS} or None, got {loss_agg!r}")


def slim_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, loss_mask: torch.Tensor,
                     advantages: torch.Tensor, weights: torch.Tensor | None = None, *,
                     level: str = "sequence", clip_low: float = 0.1, clip_high: float = 0.1,
                     clip_token: float = 0.2, kl_coef: float = 0.01, kl_estimator: str = "k3",
                     response_len: int | None = None, block_size: int | None = None,
                     clip_delta: float | None = None, loss_agg: str | None = None,
                     kl_reference: torch.Tensor | None = None,
                     backend: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SLIM-RL clipped policy loss with a KL penalty (docs/objective.md, 'The SLIM loss').

    Args:
        logp: [B, L] current log-probs ℓ_i(θ) of the response positions (fp32, bf16 or fp16; only
            entries with ``loss_mask`` are read). Gradients flow to ``logp`` only.
        logp_old: [B, L] log-probs under θ_old (no gradient).
        loss_mask: [B, L] bool, the loss set M of each row (0/1 integer or float masks: nonzero = in M).
        advantages: [B] advantage A of each row; weights: [B] quadrature weight w_row (None = 1).
        level: ``"sequence"`` (default), ``"block"`` or ``"token"``.
        block_size: K, the block length of ``level="block"`` (default 16).
        clip_low, clip_high: ε_lo, ε_hi of the sequence/block ratio; clip_token: ε of the token ratio.
        kl_coef: β; kl_estimator: ``"k3"`` (default), ``"k2"`` or ``"k1"``.
        response_len: L1 used by the 1/L1 normalisations (default L).
        clip_delta: δ > 1 or None (default): cap of the unclipped ratio, J = min(min(s, δ)A, ŝA) — TRL's and
            Liger-Kernel's GRPO ``delta`` (two-sided clipping); for δ ≥ 1+ε_hi the same function as verl's
            dual-clip ``clip_ratio_c = δ`` (A < 0: the objective is bounded below by δA, no gradient past it).
        loss_agg: ``None`` (docs/objective.md, 'The SLIM loss', below) or one of ``"token-mean"`` (DAPO; verl
            token-mean, TRL dapo/bnpo), ``"seq-mean-token-mean"`` (verl; TRL grpo), ``"seq-mean-token-sum"`` (verl),
            ``"seq-mean-token-sum-norm"`` (Dr. GRPO; verl, TRL dr_grpo with L1 as the max length): how the
            per-token terms — policy and KL alike — are reduced (see ``reference.aggregate``; empty rows
            count in B as in TRL).
        kl_reference: [B, L] log-probs of a frozen reference model; the KL term uses ℓ − ref instead of
            δ = ℓ − ℓ_old (TRL / Liger / verl ``ref_per_token_logps``). None (default): θ_old.
        backend: ``None`` (auto), ``"torch"`` or ``"triton"``.

    With δ_i = ℓ_i − ℓ_i^old on M (log-ratios clamped at ±10) and loss_agg=None:
        sequence: s = exp(clamp(mean_M δ)), J = min(sA, clamp(s, 1−ε_lo, 1+ε_hi)A)
        block:    J = (1/L1) Σ_β n_β min(s_β A, ŝ_β A) over blocks of ``block_size`` with n_β > 0
        token:    J = (1/L1) Σ_M min(r_i A, clamp(r_i, 1−ε, 1+ε)A), r_i = exp(clamp(δ_i))
        KL_row = (1/L1) Σ_M κ(δ_i), κ: k3 exp(clamp(−δ)) − 1 + δ, k2 δ²/2, k1 δ
        L = −(1/B) Σ w J + β (1/B) Σ w KL_row.  Rows with M = ∅ contribute nothing.
    With a ``loss_agg``, every position of M carries its unit's objective (sequence: J of the row, block:
    that of its block) and its κ, and both sums are reduced by that mode.

    Returns:
        (loss, metrics): loss is a 0-d fp32 tensor; metrics maps ``policy_loss``, ``kl_loss`` (β·KL),
        ``kl`` (the aggregated KL), ``clip_frac`` (fraction of ratio units — rows, non-empty blocks or
        masked tokens — whose clip is active for their advantage: s > 1+ε_hi with A > 0 or s < 1−ε_lo with
        A < 0, as TRL and Liger-Kernel count it), ``ratio_mean`` (mean ratio over those units),
        ``masked_count`` (Σ|M|) and ``clip_frac_delta`` (units with A < 0 and s > δ; verl's
        pg_clipfrac_lower) to detached 0-d fp32 tensors (no host sync).
    """
    _check_policy_inputs(logp, logp_old, loss_mask, advantages, weights, level, clip_low, clip_high,
                         clip_token, kl_coef, kl_estimator, response_len, block_size, clip_delta, loss_agg,
                         kl_reference)
    be = pick("slim_policy_loss", logp.device, backend, supported=("torch", "triton"))
    if weights is None:
        weights = torch.ones(logp.shape[0], dtype=torch.float32, device=logp.device)
    L1 = int(response_len) if response_len is not None else logp.shape[1]
    K = int(block_size) if block_size is not None else DEFAULT_BLOCK_SIZE
    if loss_mask.dtype != torch.bool:
        loss_mask = loss_mask != 0
    pol_agg, kl_agg = default_aggs(level, loss_agg)
    has_ref = kl_reference is not None
    ref = kl_reference.detach() if has_ref else logp_old.detach()
    cap = float(clip_delta) if clip_delta is not None else NO_DELTA
    loss, stats = _policy_loss_fwd(logp, logp_old.detach(), loss_mask, advantages.detach(), weights.detach(),
                                   ref, level, float(clip_low), float(clip_high), float(clip_token),
                                   float(kl_coef), kl_estimator, L1, K, cap, pol_agg, kl_agg, has_ref, be)
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
            block_size, clip_delta, loss_agg, kl_reference ([n] packed like ``logp_old``, or [B, L]) of
            :func:`slim_policy_loss`.

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
    ref = loss_kwargs.get("kl_reference")
    if isinstance(ref, torch.Tensor) and ref.dim() == 1:
        if ref.shape[0] != hidden.shape[0]:
            raise ValueError(f"slim_loss_from_hidden: packed kl_reference has {ref.shape[0]} entries, "
                             f"expected n={hidden.shape[0]}")
        loss_kwargs = dict(loss_kwargs, kl_reference=zeros.masked_scatter(loss_mask, ref.detach().float()))
    loss_backend = backend if backend in ("torch", "triton") else None
    loss, metrics = slim_policy_loss(dense, old, loss_mask, advantages, weights, backend=loss_backend,
                                     **loss_kwargs)
    if ent is not None:
        metrics["entropy"] = ent.detach().sum() / max(ent.numel(), 1)
    return loss, metrics, logp.detach()
