"""Quadrature, per-block mask schedules and training-row construction (docs/objective.md).

Everything here is vectorised and runs on the device of its inputs; the only host synchronisations
size the outputs (the row count of :func:`build_trace_rows` depends on the step maps; the other builders
check once whether a row came out empty and must be dropped).

Row layout used by every builder: one row per (response, level / round / draw), ``[R', L1]`` tensors where
L1 is the padded response length. ``noisy_ids`` is the noisy stream X (clean ids with the noise set replaced by
the mask id), ``loss_mask`` is the loss set M (noise set minus pads), ``response_index`` says which
response a row belongs to (advantages stay attached to their responses through it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["SlimRows", "TraceRows", "RandomRows", "quadrature", "block_mask_probs", "build_slim_rows",
           "build_trace_rows", "build_random_rows"]

_SHAPES = ("cosine", "linear")
_SCHEDULES = ("response", "padded")
_NODE_RULES = ("gauss_legendre", "uniform")
_RATE_LEVELS = ("block", "row", "position")


class SlimRows(NamedTuple):
    """Rows of the SLIM objective.

    noisy_ids [R', L1] int64 (the noise set — pads included — replaced by the mask id, so the noise set
    is ``noisy_ids == mask_id``) · loss_mask [R', L1] bool · weights [R'] fp32 (quadrature weight of the
    row's node) · node_index [R'] int64 · response_index [R'] int64.
    """

    noisy_ids: torch.Tensor
    loss_mask: torch.Tensor
    weights: torch.Tensor
    node_index: torch.Tensor
    response_index: torch.Tensor


class TraceRows(NamedTuple):
    """Rows of the TraceRL baseline.

    noisy_ids [R', L1] int64 (noise set = ``noisy_ids == mask_id``) · loss_mask [R', L1] bool (the
    round's targets) · weights [R'] fp32 (all ones: TraceRL has no quadrature weights) · round_index [R']
    int64 · response_index [R'] int64.
    """

    noisy_ids: torch.Tensor
    loss_mask: torch.Tensor
    weights: torch.Tensor
    round_index: torch.Tensor
    response_index: torch.Tensor


class RandomRows(NamedTuple):
    """Rows of the random-masking baselines (:func:`build_random_rows`).

    noisy_ids [R', L1] int64 (noise set = ``noisy_ids == mask_id``) · loss_mask [R', L1] bool ·
    weights [R'] fp32 (all ones) · draw_index [R'] int64 (which of the ``num_rows`` draws of its
    response the row comes from; a coupled pair shares it) · response_index [R'] int64 ·
    complement [R'] bool (the row is the complement of the draw's masked row).
    """

    noisy_ids: torch.Tensor
    loss_mask: torch.Tensor
    weights: torch.Tensor
    draw_index: torch.Tensor
    response_index: torch.Tensor
    complement: torch.Tensor


def quadrature(n: int, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss–Legendre nodes and weights on [0, 1].

    With (x_k, ω_k) the Gauss–Legendre rule on [-1, 1]: t_k = (x_k + 1)/2, w_k = ω_k/2, so Σ w_k = 1
    and Σ w_k f(t_k) integrates polynomials of degree ≤ 2n−1 over [0, 1] exactly.
    n = 3 → t = (0.1127017, 0.5, 0.8872983), w = (5/18, 8/18, 5/18).

    Returns ``(nodes [n], weights [n])`` ascending, computed in fp64 and returned as ``dtype`` (default:
    torch's default dtype, fp32) on ``device``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"quadrature: n must be a positive int (number of nodes), got {n!r}")
    x, w = np.polynomial.legendre.leggauss(int(n))
    nodes = torch.tensor((x + 1.0) / 2.0, dtype=torch.float64)
    weights = torch.tensor(w / 2.0, dtype=torch.float64)
    dtype = dtype or torch.get_default_dtype()
    return nodes.to(device=device, dtype=dtype), weights.to(device=device, dtype=dtype)


def _check_schedule_args(spread: float, shape: str) -> None:
    if shape not in _SHAPES:
        raise ValueError(f"shape must be one of {_SHAPES}, got {shape!r}")
    if not (isinstance(spread, (int, float)) and math.isfinite(spread) and spread >= 0):
        raise ValueError(f"spread must be a finite float >= 0, got {spread!r}")


def _block_probs(t: torch.Tensor, nb: torch.Tensor, j: torch.Tensor, spread: float, shape: str,
                 decreasing: bool) -> torch.Tensor:
    """p for node t, nb blocks, block index j (all broadcastable tensors; t floating)."""
    cap = 2.0 * torch.minimum(t, 1.0 - t) - 1e-6
    sig = torch.clamp(torch.minimum(torch.full_like(t, spread), cap), min=0.0)
    denom = torch.clamp(nb - 1, min=1).to(t.dtype)
    frac = j.to(t.dtype) / denom                        # 0 .. 1 over the blocks
    if not decreasing:
        frac = 1.0 - frac
    if shape == "cosine":
        delta = 0.5 * sig * torch.cos(math.pi * frac)
    else:
        delta = 0.5 * sig - sig * frac
    return torch.where(nb <= 1, t, t + delta)


def block_mask_probs(t: float | torch.Tensor, num_blocks: int, spread: float = 0.2, shape: str = "cosine",
                     decreasing: bool = True, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-block mask probabilities for quadrature node ``t`` over ``num_blocks`` blocks (docs/objective.md, 'SLIM
    rows').

    σ_eff = max(0, min(σ, 2·min(t, 1−t) − 1e−6));  nb = 1 → p_0 = t;
    cosine: p_j = t + (σ_eff/2)·cos(π·j/(nb−1));   linear: p_j = t + σ_eff/2 − σ_eff·j/(nb−1).
    ``decreasing=False`` mirrors the schedule (p_j ↔ p_{nb−1−j}). The mean over blocks is exactly t.

    Args:
        t: node in [0, 1] (float, or a tensor of any shape: the result gets a trailing ``[nb]`` axis).
        num_blocks: nb ≥ 1.
        spread: σ ≥ 0. shape: "cosine" | "linear".
    Returns:
        tensor ``[nb]`` (or ``[*t.shape, nb]``), computed in fp64 and returned as ``dtype`` (default: a
        tensor ``t``'s floating dtype, else torch's default dtype), on ``t``'s device.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
        raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
    _check_schedule_args(spread, shape)
    if isinstance(t, torch.Tensor):
        out_dtype = dtype or (t.dtype if t.is_floating_point() else torch.get_default_dtype())
        tt = t.double()
    else:
        out_dtype = dtype or torch.get_default_dtype()
        tt = torch.tensor(float(t), dtype=torch.float64)
    if bool(((tt < 0) | (tt > 1)).any()):
        raise ValueError(f"t must lie in [0, 1], got {t!r}")
    j = torch.arange(num_blocks, device=tt.device)
    nb = torch.tensor(num_blocks, device=tt.device)
    return _block_probs(tt.unsqueeze(-1), nb, j, float(spread), shape, decreasing).to(out_dtype)


def _check_response(response_ids: torch.Tensor, name: str = "response_ids") -> None:
    if not isinstance(response_ids, torch.Tensor) or response_ids.dim() != 2:
        raise ValueError(f"{name} must be an int64 tensor [B, L1], got "
                         f"{getattr(response_ids, 'shape', type(response_ids))}")
    if response_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 (or int32), got {response_ids.dtype}")


def _check_post_tokens(post_tokens) -> int:
    if isinstance(post_tokens, bool) or not isinstance(post_tokens, (int, np.integer)) or post_tokens < 0:
        raise ValueError(f"post_tokens must be an int >= 0 (pad/EOS positions trained after a response), "
                         f"got {post_tokens!r}")
    return int(post_tokens)


def _check_lengths(response_ids: torch.Tensor, response_len) -> torch.Tensor:
    """response_len as int64 on the ids' device, checked against [0, L1]."""
    if isinstance(response_len, (list, tuple)):
        response_len = torch.as_tensor(response_len, dtype=torch.int64, device=response_ids.device)
    if not isinstance(response_len, torch.Tensor) or response_len.shape != response_ids.shape[:1] or \
            response_len.is_floating_point() or response_len.dtype == torch.bool:
        raise ValueError(f"response_len must be an integer tensor [B]={tuple(response_ids.shape[:1])}, got "
                         f"{getattr(response_len, 'dtype', type(response_len))} "
                         f"{tuple(getattr(response_len, 'shape', ()))}")
    B, L1 = response_ids.shape
    lens = response_len.to(device=response_ids.device, dtype=torch.int64)
    if B and bool(((lens < 0) | (lens > L1)).any()):
        raise ValueError(f"response_len must lie in [0, L1={L1}], got min {int(lens.min())} "
                         f"max {int(lens.max())}")
    return lens


def _tail_pad_slots(end: torch.Tensor, L1: int, block_size: int) -> torch.Tensor:
    """[B, L1] bool: the slots after ``end[b]`` inside the block that holds position ``end[b] − 1``
    (the right-padded slots of a response's last, partly filled block; none when end is 0 or on a
    block boundary)."""
    pos = torch.arange(L1, device=end.device)
    last_blk = torch.div(end - 1, block_size, rounding_mode="floor")
    return (pos[None, :] >= end[:, None]) & ((pos // block_size)[None, :] == last_blk[:, None]) & \
        (end[:, None] > 0)


def build_slim_rows(response_ids: torch.Tensor, response_len: torch.Tensor, *, block_size: int, mask_id: int,
                    pad_id: int, num_nodes: int = 3, spread: float = 0.2, shape: str = "cosine",
                    decreasing: bool = True, schedule_blocks: str = "response", post_tokens: int = 0,
                    generator: torch.Generator | None = None, nodes: str = "gauss_legendre") -> SlimRows:
    """Trace-free random-masking rows: ``num_nodes`` noisy copies of every response (docs/objective.md, 'SLIM rows').

    For response b (valid length n_b = response_len[b]) and quadrature node (t_k, w_k):
      nb = ⌈n_b/K⌉ (``schedule_blocks="response"``) or ⌈L1/K⌉ (``"padded"``, the reference);
      noise_i ~ Bernoulli(p_{⌊i/K⌋}) with p from :func:`block_mask_probs` for blocks ⌊i/K⌋ < nb
      (positions in later blocks are pure padding, never seen by a loss position, and stay clean);
      M = noise ∩ {i < n_b}; when M is empty one uniformly chosen valid position is masked
      (**Decision**: the forced position is drawn among valid positions so a row is only empty —
      and dropped — when n_b = 0); X = where(noise, mask_id, response_ids).

    Args:
        response_ids: [B, L1] int64, right-padded with ``pad_id``; the rollout's own token ids.
        response_len: [B] integer tensor, valid tokens per response (0 ≤ n_b ≤ L1).
        block_size: K ≥ 1. mask_id / pad_id: token ids.
        num_nodes: n_q ≥ 1 quadrature nodes (rows per response).
        post_tokens: train on the first ``post_tokens`` pad/EOS positions after each response as well
            (n_b → min(n_b + post_tokens, L1) everywhere above; TraceRL's ``post_num``). Default 0.
        generator: a ``torch.Generator`` on the tensors' device for determinism.
        nodes: ``"gauss_legendre"`` (the default: the n_q Gauss–Legendre nodes and weights of
            :func:`quadrature`) or ``"uniform"`` (the ablation: every row draws its own level
            t ~ U(0, 1) from ``generator``, weight 1/n_q — a Monte-Carlo estimate with the same count).
    Returns:
        :class:`SlimRows`; rows ordered response-major (row = b·n_q + k before empty rows are dropped).
        Weights sum to 1 per response when none of its rows was dropped.
    """
    _check_response(response_ids)
    lens = _check_lengths(response_ids, response_len)
    post_tokens = _check_post_tokens(post_tokens)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if schedule_blocks not in _SCHEDULES:
        raise ValueError(f"schedule_blocks must be one of {_SCHEDULES}, got {schedule_blocks!r}")
    _check_schedule_args(spread, shape)
    if nodes not in _NODE_RULES:
        raise ValueError(f"nodes must be one of {_NODE_RULES}, got {nodes!r}")
    B, L1 = response_ids.shape
    dev = response_ids.device
    if post_tokens:
        lens = torch.clamp(lens + post_tokens, max=L1)
    levels, weights = quadrature(num_nodes, dtype=torch.float32, device=dev)
    Q = levels.numel()
    ids = response_ids.to(torch.int64)

    R = B * Q
    resp = torch.arange(B, device=dev).repeat_interleave(Q)          # [R]
    node = torch.arange(Q, device=dev).repeat(B)                     # [R]
    if nodes == "uniform":
        t = torch.rand((R,), generator=generator, device=dev)        # [R] one level per row
        weights = torch.full_like(weights, 1.0 / Q)
    else:
        t = levels[node]                                             # [R]
    row_len = lens[resp]                                             # [R]
    if schedule_blocks == "response":
        nb = (row_len + block_size - 1) // block_size
    else:
        nb = torch.full_like(row_len, (L1 + block_size - 1) // block_size)
    pos = torch.arange(L1, device=dev)                               # [L1]
    blk = pos // block_size
    p = _block_probs(t[:, None], nb[:, None], blk[None, :], float(spread), shape, decreasing)  # [R, L1]
    u = torch.rand((R, L1), generator=generator, device=dev)
    noise = (u < p) & (blk[None, :] < nb[:, None])
    valid = pos[None, :] < row_len[:, None]
    loss = noise & valid
    # force one valid position into rows whose loss set is empty
    need = ~loss.any(dim=1) & (row_len > 0)
    u1 = torch.rand((R,), generator=generator, device=dev)
    forced = (u1 * row_len.to(torch.float32)).to(torch.int64)
    forced = torch.minimum(forced, torch.clamp(row_len - 1, min=0))
    force = need[:, None] & (pos[None, :] == forced[:, None])
    noise = noise | force
    loss = loss | force
    keep = loss.any(dim=1)
    if not bool(keep.all()):
        idx = keep.nonzero().squeeze(1)
        resp, node, noise, loss, t = resp[idx], node[idx], noise[idx], loss[idx], t[idx]
    noisy = torch.where(noise, torch.full_like(ids[resp], mask_id), ids[resp])
    return SlimRows(noisy, loss, weights[node], node, resp)


def _dense_block_rank(step_map: torch.Tensor, valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """Dense rank of each valid position's step within its block (0 = earliest step); −1 for invalid."""
    B, L1 = step_map.shape
    nbk = (L1 + block_size - 1) // block_size
    padn = nbk * block_size - L1
    big = torch.iinfo(torch.int64).max
    s = torch.where(valid, step_map.to(torch.int64), torch.full_like(step_map, big, dtype=torch.int64))
    v = valid
    if padn:
        s = torch.nn.functional.pad(s, (0, padn), value=big)
        v = torch.nn.functional.pad(v, (0, padn), value=False)
    s = s.view(B, nbk, block_size)
    v = v.view(B, nbk, block_size)
    k = torch.arange(block_size, device=s.device)
    eq = s[..., :, None] == s[..., None, :]                           # [B, nb, K, K]
    earlier = k[None, :] < k[:, None]                                 # [K(j), K(k)]: k < j
    first = v & ~(eq & earlier & v[..., None, :]).any(dim=-1)         # first occurrence of its value
    less = (s[..., None, :] < s[..., :, None]) & first[..., None, :]  # [.., i, j]: s_j < s_i, j first
    rank = less.sum(dim=-1)
    rank = torch.where(v, rank, torch.full_like(rank, -1))
    return rank.view(B, nbk * block_size)[:, :L1]


def build_trace_rows(response_ids: torch.Tensor, step_map: torch.Tensor, *, block_size: int, shrink: int,
                     mask_id: int, pad_id: int, response_len: torch.Tensor | None = None,
                     post_tokens: int = 0) -> TraceRows:
    """TraceRL trajectory-slicing rows (docs/objective.md, 'TraceRL rows').

    σ_i = step_map[b, i] is the global decode step that committed token i. In every block β the
    distinct σ values u_0 < … < u_{D−1} are grouped in runs of ``shrink`` (group g = ⌊rank/shrink⌋,
    i.e. the run collapses onto its last value). Round r builds one row with, per block,
    targets T_β = {group = r} and noise N_β = {group ≥ r}: X = mask_id on ∪N_β, M = ∪T_β.
    Rows per response = max_β ⌈D_β/shrink⌉.

    Pads (**Decision (pads)**, as the TraceRL code gives right-padded slots σ = max+1): the
    right-padded slots of the response's last, partly filled block are masked in every round and never
    enter M, so no row shows pad/EOS right after its masked targets; blocks wholly beyond the response
    stay pads. Example K=2, L1=2, one valid token with σ=2: one row, X = [μ, μ], M = {0}.

    ``post_tokens = n`` also trains the first n positions after the response (TraceRL's ``post_num``):
    they count as committed after every token of the response (σ = max+1, so they join the last
    group of their block, or form group 0 of a block wholly beyond the response) and the response
    is treated as ending after them (the pad rule above then applies to the slots after them).
    **Decision:** each of those positions is a target exactly once; TraceRL's code keeps the first n
    pads of each row's target set instead, which can train more than n pads per response.

    Args:
        response_ids: [B, L1] int64 right-padded. step_map: [B, L1] integer (any value on pads).
        response_len: optional [B] valid lengths; by default
            valid = (response_ids != pad_id) & (step_map ≥ 0) and the response ends after its last
            valid position.
        post_tokens: n ≥ 0 (default 0).
    Returns:
        :class:`TraceRows`, rows ordered by response then round.
    """
    _check_response(response_ids)
    if not isinstance(step_map, torch.Tensor) or step_map.shape != response_ids.shape or \
            step_map.is_floating_point() or step_map.dtype == torch.bool:
        got = f"{getattr(step_map, 'dtype', type(step_map))} {tuple(getattr(step_map, 'shape', ()))}"
        raise ValueError(f"step_map must be an integer tensor of shape {tuple(response_ids.shape)}, "
                         f"got {got}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if isinstance(shrink, bool) or not isinstance(shrink, int) or shrink < 1:
        raise ValueError(f"shrink must be an int >= 1, got {shrink!r}")
    post_tokens = _check_post_tokens(post_tokens)
    B, L1 = response_ids.shape
    dev = response_ids.device
    ids = response_ids.to(torch.int64)
    pos = torch.arange(L1, device=dev)
    if response_len is not None:
        valid = pos[None, :] < _check_lengths(response_ids, response_len)[:, None]
    else:
        valid = (ids != pad_id) & (step_map.to(dev) >= 0)
    if L1 == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return TraceRows(ids[:0], valid[:0], torch.zeros(0, device=dev), empty, empty)
    steps = step_map.to(device=dev, dtype=torch.int64)
    end = (valid.to(torch.int64) * (pos + 1)[None, :]).amax(dim=1)           # [B] 1 + last valid position
    if post_tokens:
        post = (pos[None, :] >= end[:, None]) & (pos[None, :] < end[:, None] + post_tokens)
        low = torch.iinfo(torch.int64).min
        smax = torch.where(valid, steps, torch.full_like(steps, low)).amax(dim=1)
        smax = torch.where(valid.any(dim=1), smax, torch.zeros_like(smax))
        steps = torch.where(post, (smax + 1)[:, None], steps)
        valid = valid | post
        end = torch.clamp(end + post_tokens, max=L1)
    tail = _tail_pad_slots(end, L1, block_size)                                # [B, L1]
    rank = _dense_block_rank(steps, valid, block_size)
    group = torch.where(valid, rank // shrink, torch.full_like(rank, -1))  # [B, L1]
    rounds = (group.max(dim=1).values + 1).clamp(min=0)
    resp = torch.arange(B, device=dev).repeat_interleave(rounds)          # one host sync (row count)
    starts = torch.cumsum(rounds, 0) - rounds
    rnd = torch.arange(resp.numel(), device=dev) - starts[resp]
    g = group[resp]
    loss = g == rnd[:, None]
    noise = (g >= rnd[:, None]) | tail[resp]
    noisy = torch.where(noise, torch.full_like(g, mask_id), ids[resp])
    w = torch.ones(resp.numel(), dtype=torch.float32, device=dev)
    return TraceRows(noisy, loss, w, rnd, resp)


def build_random_rows(response_ids: torch.Tensor, response_len: torch.Tensor, *, block_size: int,
                      mask_id: int, pad_id: int, lower: float = 0.1, upper: float = 0.9, num_rows: int = 1,
                      coupled: bool = False, rate_level: str = "block", post_tokens: int = 0,
                      generator: torch.Generator | None = None) -> RandomRows:
    """TraceRL's "random masking" and "coupled" baselines: uniform-rate random masks, optionally each
    paired with its complement.

    For response b (valid length n_b, n'_b = min(n_b + ``post_tokens``, L1)) and each of its
    ``num_rows`` draws:
      a mask rate t ~ Uniform(lower, upper) per block (``rate_level="block"``, the default), per row
      (``"row"``: TraceRL's LLaDA/Dream trainers) or per position (``"position"``: TraceRL's SDAR
      trainer, which compares every position with its own uniform threshold);
      M = {i < n'_b : u_i < t_{⌊i/K⌋}} with u_i ~ Uniform[0, 1);
      ``coupled=True`` adds the complement row M^c = {i < n'_b} − M right after it, so the pair
      covers every position of the response exactly once (TraceRL's "coupled" method);
      X = mask_id on M (M^c for the complement) and on the right-padded slots of the response's last,
      partly filled block (masked in every row, never in M, as in :func:`build_trace_rows`); blocks
      wholly beyond the response stay pads. Rows with M = ∅ are dropped (as TraceRL does; nothing is
      forced in, unlike :func:`build_slim_rows`).

    Args:
        response_ids: [B, L1] int64 right-padded; response_len: [B] valid lengths (0 ≤ n_b ≤ L1).
        block_size: K ≥ 1. mask_id / pad_id: token ids.
        lower, upper: 0 ≤ lower ≤ upper ≤ 1 (TraceRL's ``lower_p`` / ``upper_p``, default 0.1 / 0.9).
        num_rows: draws per response (TraceRL's ``mask_times_per_sample``), default 1.
        coupled: add the complement of every draw. rate_level: "block" | "row" | "position".
        post_tokens: also train the first ``post_tokens`` pad/EOS positions after the response.
        generator: a ``torch.Generator`` on the tensors' device for determinism.
    Returns:
        :class:`RandomRows`, ordered by response, then draw, then (masked row, complement); weights 1.
    """
    _check_response(response_ids)
    lens = _check_lengths(response_ids, response_len)
    post_tokens = _check_post_tokens(post_tokens)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) or num_rows < 1:
        raise ValueError(f"num_rows must be an int >= 1, got {num_rows!r}")
    for name, v in (("lower", lower), ("upper", upper)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be a float in [0, 1], got {v!r}")
    if float(lower) > float(upper):
        raise ValueError(f"lower must be <= upper, got lower={lower}, upper={upper}")
    if rate_level not in _RATE_LEVELS:
        raise ValueError(f"rate_level must be one of {_RATE_LEVELS}, got {rate_level!r}")
    if not isinstance(coupled, bool):
        raise ValueError(f"coupled must be a bool, got {coupled!r}")
    B, L1 = response_ids.shape
    dev = response_ids.device
    ids = response_ids.to(torch.int64)
    n = torch.clamp(lens + post_tokens, max=L1)
    Q = int(num_rows)
    R = B * Q
    resp = torch.arange(B, device=dev).repeat_interleave(Q)                  # [R]
    draw = torch.arange(Q, device=dev).repeat(B)                             # [R]
    pos = torch.arange(L1, device=dev)
    blk = pos // block_size
    nbk = -(-L1 // block_size)
    lo, hi = float(lower), float(upper)
    cols = {"block": nbk, "row": 1, "position": L1}[rate_level]
    t = lo + (hi - lo) * torch.rand((R, cols), generator=generator, device=dev)
    if rate_level == "block":
        t = t[:, blk]
    u = torch.rand((R, L1), generator=generator, device=dev)
    inside = pos[None, :] < n[resp][:, None]                                 # [R, L1]
    loss = (u < t) & inside
    tail = _tail_pad_slots(n, L1, block_size)[resp]
    if coupled:
        loss = torch.stack([loss, inside & ~loss], dim=1).reshape(2 * R, L1)
        tail = tail.repeat_interleave(2, dim=0)
        resp = resp.repeat_interleave(2)
        draw = draw.repeat_interleave(2)
        comp = torch.tensor([False, True], device=dev).repeat(R)
    else:
        comp = torch.zeros(R, dtype=torch.bool, device=dev)
    keep = loss.any(dim=1)
    if not bool(keep.all()):
        idx = keep.nonzero().squeeze(1)
        loss, tail, resp, draw, comp = loss[idx], tail[idx], resp[idx], draw[idx], comp[idx]
    noise = loss | tail
    noisy = torch.where(noise, torch.full_like(noise, mask_id, dtype=torch.int64), ids[resp])
    w = torch.ones(resp.numel(), dtype=torch.float32, device=dev)
    return RandomRows(noisy, loss, w, draw, resp, comp)
