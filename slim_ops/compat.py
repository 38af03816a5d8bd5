"""Drop-in replacements for the decode-step helpers of existing diffusion-LM code, backed by slim_ops' fused pass.

Each function keeps the signature, argument conventions, return tuple order and dtypes of the function it
replaces, and returns the same values on the same inputs, so adopting slim_ops is a one-line import change
(``docs/adopting.md``):

================================  ===========================================================================
function here                     replaces
================================  ===========================================================================
:func:`slim_rl_get_transfer_index`  the SLIM-RL reference's ``get_transfer_index`` (``sample/llada_sample.py``):
                                    targets ``confidence`` / ``margin_confidence`` / ``neg_entropy`` / ``random``,
                                    strategies ``tau_budget_dynamic``, threshold, top-k
:func:`fast_dllm_get_transfer_index`  Fast-dLLM's ``get_transfer_index`` (``llada/generate.py``): ``low_confidence``
                                    / ``random``, top-k or threshold
:func:`get_num_transfer_tokens`     LLaDA's and Fast-dLLM's ``get_num_transfer_tokens(mask_index, steps)``
:func:`sdar_get_num_transfer_tokens`  SDAR's ``get_num_transfer_tokens(block_length, steps)``
:func:`sdar_block_step`             the body of SDAR's denoising loop (``block_diffusion_generate``): sampling,
                                    ``sequential`` / ``low_confidence_static`` / ``low_confidence_dynamic``
================================  ===========================================================================

How exact equality is kept (the quirks the originals have, reproduced on purpose):

* **fp64 confidences.** The originals rank slots by ``softmax(logits.double())[x0]``. Here one fused fp32 pass
  (:func:`slim_ops.tau_budget_step`) gives x0 and c for every slot; a slot whose fp32 score is within a relative
  ``1e-4`` of another masked slot's score, of the threshold, or (τ-budget) whose row's running budget sum is
  within ``K·1e-4`` of the budget, is recomputed with the original fp64 formula on its own logits row. Every
  comparison the selection makes is then decided as in fp64 (the fp32 pass is accurate to ~1e-6 relative).
  This costs one host synchronisation per call (the originals synchronise once per row).
* **Ties.** Where the k-th and (k+1)-th scores of a row are equal (e.g. ``-inf`` slots when k exceeds the
  masked count, which the originals then commit), that row is selected with ``torch.topk`` exactly as the
  original does; every other row is selected by one vectorised sort.
* **Random draws.** ``temperature > 0`` (Gumbel noise from ``torch.rand_like`` in fp64, or SDAR's
  ``torch.multinomial``) and ``random`` remasking (``torch.rand``) consume the global torch RNG exactly as the
  originals, so they need the same full-vocabulary tensors and are not faster; greedy decoding
  (``temperature=0``) is where the fused pass replaces the full-vocabulary softmax.
* ``neg_entropy`` (SLIM-RL) is computed with the original fp64 formula (no fused entropy pass yet).

Inputs with NaN / ±inf logits follow the fused op's rule only on the greedy fast path: such slots get
confidence NaN there, whereas the originals' behaviour on them is undefined; give finite logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "slim_rl_get_transfer_index",
    "fast_dllm_get_transfer_index",
    "get_num_transfer_tokens",
    "sdar_get_num_transfer_tokens",
    "sdar_block_step",
]

_REL_TOL = 1e-4     # fp32 scores closer than this (relative) are re-decided in fp64
_MAX_SLOTS = 64     # slots per fused call (tau_budget_step's block limit)


def _fail(fn: str, msg: str) -> None:
    raise ValueError(f"slim_ops.compat.{fn}: {msg}")


def _check_common(fn: str, logits: Tensor, mask_index: Tensor, x: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        _fail(fn, f"logits must be a floating [B, L, V] tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    B, L, _ = logits.shape
    if not isinstance(mask_index, Tensor) or mask_index.shape != (B, L) or mask_index.dtype != torch.bool:
        _fail(fn, f"mask_index must be a bool [B, L] = [{B}, {L}] tensor, got "
                  f"{getattr(mask_index, 'dtype', None)} {tuple(getattr(mask_index, 'shape', ()))}")
    if not isinstance(x, Tensor) or x.shape != (B, L):
        _fail(fn, f"x must be a [B, L] = [{B}, {L}] tensor, got {tuple(getattr(x, 'shape', ()))}")


# ---------------------------------------------------------------------------------------------------------------
# x0 and scores
# ---------------------------------------------------------------------------------------------------------------

def _fused_argmax_conf(logits: Tensor) -> tuple[Tensor, Tensor]:
    """x0 = argmax z and c = softmax(z)[x0] (fp32) for every slot, by the fused pass, ≤ 64 slots per call."""
    from slim_ops.ops.tau_budget.op import tau_budget_step

    B, L, V = logits.shape
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # fp64 logits: no fp32 pass
        x0 = torch.argmax(logits, dim=-1)
        return x0, F.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None])[..., 0]
    lg = logits
    toks, confs = [], []
    for s in range(0, L, _MAX_SLOTS):
        blk = torch.zeros((B, min(_MAX_SLOTS, L - s)), dtype=torch.int64, device=logits.device)  # commits nothing
        out = tau_budget_step(lg[:, s:s + _MAX_SLOTS], blk, 0, strategy="topk", floor=0)
        toks.append(out.tokens)
        confs.append(out.confidence)
    return torch.cat(toks, 1), torch.cat(confs, 1)


def _score64_rows(rows: Tensor, x0: Tensor, target: str) -> Tensor:
    """The originals' fp64 score of each given logits row [n, V] (their formula, row by row identical)."""
    p = F.softmax(rows.to(torch.float64), dim=-1)
    if target == "margin_confidence":
        top2 = torch.topk(p, 2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    return p.gather(-1, x0[:, None])[:, 0]


def _gumbel_x0(logits: Tensor, temperature: float) -> Tensor:
    """argmax of exp(z)/(-log u)^T with u ~ U(0,1) drawn in fp64 by torch.rand_like, as the originals draw it."""
    z = logits.to(torch.float64)
    noise = torch.rand_like(z, dtype=torch.float64)
    return torch.argmax(z.exp() / (-torch.log(noise)) ** temperature, dim=-1)


def _flag_close(score: Tensor, eligible: Tensor, *, thresholds=()) -> Tensor:
    """Slots whose fp32 score is within _REL_TOL of another eligible slot's score or of a threshold."""
    ninf = torch.tensor(float("-inf"), dtype=score.dtype, device=score.device)
    s = torch.where(eligible, score, ninf)
    srt, order = torch.sort(s, dim=1, descending=True)
    a, b = srt[:, :-1], srt[:, 1:]
    close = torch.isfinite(b) & ((a - b).abs() <= _REL_TOL * a.abs().clamp_min(1e-30))
    flag_sorted = torch.zeros_like(srt, dtype=torch.bool)
    flag_sorted[:, :-1] |= close
    flag_sorted[:, 1:] |= close
    flag = torch.zeros_like(flag_sorted).scatter(1, order, flag_sorted)
    for t in thresholds:
        flag |= (score - t).abs() <= _REL_TOL * max(abs(float(t)), 1e-30)
    return flag & eligible


def _refine(logits: Tensor, x0: Tensor, score32: Tensor, flag: Tensor, target: str) -> Tensor:
    """fp64 scores: the original formula at flagged slots, the fp32 score elsewhere (same decisions)."""
    score = score32.to(torch.float64)
    idx = flag.nonzero()  # one host synchronisation
    if idx.numel():
        b, l = idx[:, 0], idx[:, 1]
        score[b, l] = _score64_rows(logits[b, l], x0[b, l], target)
    return score


# ---------------------------------------------------------------------------------------------------------------
# selection (vectorised over rows; per-row torch.topk only where the originals' tie order decides)
# ---------------------------------------------------------------------------------------------------------------

def _topk_rows(conf: Tensor, k: Tensor) -> Tensor:
    """transfer[j, topk(conf[j], k[j]).indices] = True for every row with k[j] > 0 (k [B] int64)."""
    B, L = conf.shape
    if bool((k > L).any()):  # torch.topk's own error, as the originals raise it
        raise RuntimeError("selected index k out of range")
    srt, order = torch.sort(conf, dim=1, descending=True, stable=True)
    kk = k.clamp(0, L)
    rank = torch.arange(L, device=conf.device)
    chosen = rank[None, :] < kk[:, None]
    sel = torch.zeros_like(chosen).scatter(1, order, chosen)
    # a tie across the k-boundary: the original's torch.topk decides which slots; use it for those rows
    inner = (kk > 0) & (kk < L)
    kth = srt.gather(1, (kk - 1).clamp(0, L - 1)[:, None])[:, 0]
    nxt = srt.gather(1, kk.clamp(0, L - 1)[:, None])[:, 0]
    tied = inner & ((kth == nxt) | (torch.isnan(kth) | torch.isnan(nxt)))
    rows = tied.nonzero()[:, 0].tolist()
    for j in rows:
        row = torch.zeros(L, dtype=torch.bool, device=conf.device)
        row[torch.topk(conf[j], int(kk[j])).indices] = True
        sel[j] = row
    return sel


def _as_counts(fn: str, num_transfer_tokens, B: int, device) -> Tensor:
    t = torch.as_tensor(num_transfer_tokens, device=device)
    if t.dim() == 0:
        t = t.expand(B)
    t = t.reshape(B, -1) if t.numel() == B else None
    if t is None:
        _fail(fn, f"num_transfer_tokens must hold one count per row ({B}), got shape "
                  f"{tuple(torch.as_tensor(num_transfer_tokens).shape)}")
    return t[:, 0].to(torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# public drop-ins
# ---------------------------------------------------------------------------------------------------------------

def get_num_transfer_tokens(mask_index: Tensor, steps: int) -> Tensor:
    """LLaDA / Fast-dLLM: tokens to commit per step when a row's masked count n is spread over ``steps`` steps.

    Returns int64 [B, steps] on ``mask_index``'s device: ⌊n/steps⌋ everywhere plus one in the first
    ``n mod steps`` columns (vectorised; the original loops over rows)."""
    if not isinstance(mask_index, Tensor) or mask_index.dim() != 2:
        _fail("get_num_transfer_tokens", f"mask_index must be a [B, L] tensor, got "
                                         f"{getattr(mask_index, 'shape', type(mask_index).__name__)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        _fail("get_num_transfer_tokens", f"steps must be an int >= 1, got {steps!r}")
    n = mask_index.sum(dim=1, keepdim=True)
    base, rem = n // steps, n % steps
    col = torch.arange(steps, device=mask_index.device)
    return (base + (col[None, :] < rem)).to(torch.int64)


def sdar_get_num_transfer_tokens(block_length: int, steps: int) -> Tensor:
    """SDAR: int64 [steps] (CPU), ⌊K/S⌋ per step plus one in the first K mod S steps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        _fail("sdar_get_num_transfer_tokens", f"steps must be an int >= 1, got {steps!r}")
    base, rem = divmod(int(block_length), steps)
    return base + (torch.arange(steps) < rem).to(torch.int64)


def fast_dllm_get_transfer_index(logits: Tensor, temperature: float, remasking: str, mask_index: Tensor, x: Tensor,
                                 num_transfer_tokens, threshold: float | None = None) -> tuple[Tensor, Tensor]:
    """Fast-dLLM's ``get_transfer_index``: ``(x0, transfer_index)``.

    x0 [B, L] int64: argmax of the (Gumbel-noised when T > 0) logits at masked slots, ``x`` elsewhere.
    Scores: ``low_confidence`` = fp64 softmax probability of x0, ``random`` = ``torch.rand``; unmasked slots -inf.
    ``threshold=None``: the ``num_transfer_tokens[j]`` best slots of each row (top-k; may include unmasked slots
    when k exceeds the masked count, as in the original). With a threshold: the best masked slot plus every
    masked slot whose score is ``>= threshold`` (``num_transfer_tokens`` is ignored).
    transfer_index [B, L] bool."""
    fn = "fast_dllm_get_transfer_index"
    _check_common(fn, logits, mask_index, x)
    if remasking not in ("low_confidence", "random"):
        raise NotImplementedError(remasking)
    B, L, _ = logits.shape
    eligible = mask_index
    if temperature == 0 and remasking == "low_confidence":
        x0, c32 = _fused_argmax_conf(logits)
        flag = _flag_close(c32, eligible, thresholds=() if threshold is None else (threshold,))
        score = _refine(logits, x0, c32, flag, "confidence")
    else:
        x0 = torch.argmax(logits, dim=-1) if temperature == 0 else _gumbel_x0(logits, temperature)
        if remasking == "low_confidence":
            score = F.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None])[..., 0]
        else:
            score = torch.rand((B, L), device=x0.device)
    x0 = torch.where(mask_index, x0, x)
    conf = torch.where(mask_index, score, torch.tensor(float("-inf"), dtype=score.dtype, device=score.device))
    if threshold is not None:
        # the original takes topk(conf, n_masked) and keeps rank 0 plus the ranks >= threshold
        n = mask_index.sum(dim=1)
        best = conf.argmax(dim=1)
        top1 = torch.zeros_like(mask_index).scatter(1, best[:, None], (n > 0)[:, None])
        top = conf.max(dim=1).values
        tied = (n > 0) & ((conf == top[:, None]).sum(dim=1) > 1) & (top < threshold)
        for j in tied.nonzero()[:, 0].tolist():  # which tied slot is rank 0 is torch.topk's choice
            top1[j] = False
            top1[j, torch.topk(conf[j], int(n[j])).indices[0]] = True
        return x0, (mask_index & (conf >= threshold)) | top1
    k = _as_counts(fn, num_transfer_tokens, B, logits.device)
    return x0, _topk_rows(conf, k)


def slim_rl_get_transfer_index(logits: Tensor, temperature: float, target: str, mask_index: Tensor, x: Tensor,
                               num_transfer_tokens, threshold: float | None = None, remasking_strategy=None,
                               tau_budget_m: float = 1.0) -> tuple[Tensor, Tensor]:
    """The SLIM-RL reference's ``get_transfer_index``: ``(x0, transfer_index)``.

    target (score per slot): ``confidence`` (fp64 probability of x0), ``margin_confidence`` (top-1 minus top-2
    probability), ``neg_entropy`` (−Σ p log(p + 1e-10), fp64), ``random`` (``torch.rand``).
    Selection, per row with masked slots:

    * ``remasking_strategy="tau_budget_dynamic"`` and a threshold τ: among the masked slots with score > τ, the
      most confident while Σ(1 − c) <= m_eff·(1 − τ) (fp64), m_eff = ``tau_budget_m`` (or the row's
      ``num_transfer_tokens`` when m <= 0); at least ``num_transfer_tokens[j]``, at most the masked count.
    * another strategy with a threshold: masked slots with score >= threshold, else the best masked slot.
    * no threshold: the ``num_transfer_tokens[j]`` best slots (top-k).

    x0 [B, L] int64 (``x`` at unmasked slots), transfer_index [B, L] bool."""
    fn = "slim_rl_get_transfer_index"
    _check_common(fn, logits, mask_index, x)
    if target not in ("confidence", "margin_confidence", "neg_entropy", "random"):
        raise NotImplementedError(target)
    B, L, V = logits.shape
    tau_mode = remasking_strategy == "tau_budget_dynamic" and threshold is not None
    if temperature == 0:
        x0 = None
        if target in ("confidence", "margin_confidence"):
            x0, c32 = _fused_argmax_conf(logits)
            if target == "margin_confidence":
                z2 = torch.topk(logits, 2, dim=-1).values.float()
                c32 = c32 * -torch.expm1(z2[..., 1] - z2[..., 0])
            thr = () if threshold is None else (threshold,)
            flag = _flag_close(c32, mask_index, thresholds=thr)
            if tau_mode:
                flag |= _budget_close_rows(c32, mask_index, num_transfer_tokens, threshold, tau_budget_m, B, fn)
            score = _refine(logits, x0, c32, flag, target)
        else:
            x0 = torch.argmax(logits, dim=-1)
    else:
        x0 = _gumbel_x0(logits, temperature)
    if target == "random":
        score = torch.rand((B, L), device=x0.device)
    elif target == "neg_entropy" or temperature != 0:
        p = F.softmax(logits.to(torch.float64), dim=-1)
        if target == "confidence":
            score = p.gather(-1, x0[..., None])[..., 0]
        elif target == "margin_confidence":
            top2 = torch.topk(p, 2, dim=-1).values
            score = top2[..., 0] - top2[..., 1]
        else:
            score = -torch.sum(p * torch.log(p + 1e-10), dim=-1)
        del p
    x0 = torch.where(mask_index, x0, x)
    ninf = torch.tensor(float("-inf"), dtype=score.dtype, device=score.device)
    conf = torch.where(mask_index, score, ninf)
    if tau_mode:
        return x0, _tau_budget_dynamic(conf, mask_index, num_transfer_tokens, float(threshold), tau_budget_m, fn)
    if threshold is not None:
        selected = mask_index & (score >= threshold)
        none_sel = ~selected.any(dim=-1) & mask_index.any(dim=-1)
        best = conf.argmax(dim=-1)
        add = torch.zeros_like(selected).scatter(1, best[:, None], none_sel[:, None])
        return x0, selected | add
    k = _as_counts(fn, num_transfer_tokens, B, logits.device)
    return x0, _topk_rows(conf, k)


def _budget(num_transfer_tokens, B, device, tau, m, fn):
    base = _as_counts(fn, num_transfer_tokens, B, device)
    if m > 0:
        budget = torch.full((B,), m * (1.0 - tau), dtype=torch.float64, device=device)
    else:
        budget = base.to(torch.float64) * (1.0 - tau)
    return base, budget


def _budget_close_rows(c32, mask_index, num_transfer_tokens, tau, m, B, fn) -> Tensor:
    """Rows whose fp32 running sum Σ(1 − c) over the above-τ slots comes within K·tol of the budget."""
    _, budget = _budget(num_transfer_tokens, B, c32.device, float(tau), m, fn)
    s = torch.where(mask_index, c32.double(), torch.tensor(float("-inf"), dtype=torch.float64, device=c32.device))
    srt, _ = torch.sort(s, dim=1, descending=True)
    above = srt > tau
    cs = torch.cumsum(torch.where(above, 1.0 - srt, 0.0), dim=1)
    close = above & ((cs - budget[:, None]).abs() <= c32.shape[1] * _REL_TOL)
    return close.any(dim=1, keepdim=True) & mask_index


def _tau_budget_dynamic(conf, mask_index, num_transfer_tokens, tau, m, fn) -> Tensor:
    B, L = conf.shape
    base, budget = _budget(num_transfer_tokens, B, conf.device, tau, m, fn)
    srt, _ = torch.sort(conf, dim=1, descending=True)
    above = srt > tau  # a prefix of the sorted row
    cs = torch.cumsum(torch.where(above, 1.0 - srt, torch.zeros_like(srt)), dim=1)
    k_budget = (above & (cs <= budget[:, None])).sum(dim=1)
    n = mask_index.sum(dim=1)
    k = torch.minimum(torch.maximum(k_budget, base), n)
    k = torch.where(n > 0, k, torch.zeros_like(k))
    return _topk_rows(conf, k)


def _sdar_sample(logits: Tensor, temperature: float, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """SDAR's sampling: softmax of (z / T, top-k, top-p filtered) in the logits' dtype, torch.multinomial."""
    shape, V = logits.shape[:-1], logits.shape[-1]
    z = logits.reshape(-1, V)
    if temperature != 1.0:
        z = z / temperature
    if top_k > 0:
        kth = torch.topk(z, top_k).values[..., -1, None]
        z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
    if top_p < 1.0:
        srt, idx = torch.sort(z, descending=True)
        over = torch.cumsum(F.softmax(srt, dim=-1), dim=-1) > top_p
        drop = torch.zeros_like(over)
        drop[..., 1:] = over[..., :-1]
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    probs = F.softmax(z, dim=-1)
    tok = torch.multinomial(probs, num_samples=1)
    return tok.view(*shape), probs.gather(-1, tok).view(*shape)


def sdar_block_step(logits: Tensor, cur_x: Tensor, mask_id: int, num_transfer_tokens: Tensor, step: int, *,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    remasking_strategy: str = "low_confidence_dynamic",
                    confidence_threshold: float = 0.85) -> Tensor:
    """One denoising step of SDAR's ``block_diffusion_generate`` loop body, in place: returns ``cur_x``.

    ``logits`` [B, K, V] of the block, ``cur_x`` [B, K] int64 (modified in place, as the original does),
    ``num_transfer_tokens`` from :func:`sdar_get_num_transfer_tokens`, ``step`` the step index. Sampling as
    SDAR's ``sample_with_temperature_topk_topp`` (same RNG draws; every slot's token is written when selected,
    committed slots included, as in the original); ``temperature=0`` (which the original cannot run) is greedy
    through the fused pass. Strategies: ``sequential`` (the n slots from the first masked one),
    ``low_confidence_static`` (top-n by confidence among masked), ``low_confidence_dynamic`` (every masked slot
    with confidence > threshold when there are at least n, else top-n)."""
    fn = "sdar_block_step"
    mask_index = cur_x == mask_id
    _check_common(fn, logits, mask_index, cur_x)
    if remasking_strategy not in ("sequential", "low_confidence_static", "low_confidence_dynamic"):
        raise ValueError(f"slim_ops.compat.{fn}: remasking_strategy must be 'sequential', 'low_confidence_static' "
                         f"or 'low_confidence_dynamic', got {remasking_strategy!r} (SDAR's entropy_bounded branch "
                         "does not run as published; use slim_ops.tau_budget_step(strategy='entropy_bounded'))")
    B, K, _ = logits.shape
    n = int(num_transfer_tokens[step])
    if temperature == 0:
        x0, c32 = _fused_argmax_conf(logits)
        thr = (confidence_threshold,) if remasking_strategy == "low_confidence_dynamic" else ()
        flag = _flag_close(c32, mask_index, thresholds=thr)
        x0_p = _refine(logits, x0, c32, flag, "confidence")
    else:
        x0, x0_p = _sdar_sample(logits, temperature, top_k, top_p)
    ks = torch.full((B,), n, dtype=torch.int64, device=logits.device)
    if remasking_strategy == "sequential":
        if not bool(mask_index.any(dim=1).all()):
            raise ValueError("No mask tokens found in the current block.")
        first = mask_index.to(torch.int8).argmax(dim=1)
        pos = torch.arange(K, device=logits.device)
        transfer = (pos[None, :] >= first[:, None]) & (pos[None, :] < first[:, None] + n)
    else:
        conf = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=x0_p.dtype, device=x0_p.device))
        transfer = _topk_rows(conf, ks)
        if remasking_strategy == "low_confidence_dynamic":
            high = conf > confidence_threshold
            enough = high.sum(dim=1) >= n
            transfer = torch.where(enough[:, None], high, transfer)
    cur_x[transfer] = x0[transfer]
    return cur_x
