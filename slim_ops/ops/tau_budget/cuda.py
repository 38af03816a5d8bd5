"""CUDA backend of the fused decode step: calls ``slim_ops._C`` (csrc/tau_budget).

Two kernels on the current stream, no host synchronisation:

1. one block per (slot, V-split): a single pass over the logits with 16-byte vector loads, online
   max and Σexp, argmax (T = 0) or Gumbel-max with the counter-based RNG of ``reference.py`` (T > 0),
   NaN / +inf / all −inf detection; V is split over several blocks per slot when R·K is too small
   to fill the GPU;
2. one block per row: combines the splits into token and confidence, then sorts the K ≤ 64 slots by
   (confidence desc, index asc), the sequential fp32 prefix sum, k, commit mask, new block and risk.

The public entry point with full input validation is ``slim_ops.tau_budget_step`` (op.py); the checks
here only guard the raw-pointer contract.
"""

from __future__ import annotations

import functools
import math

import torch

from slim_ops import _ext

_FN = "slim_ops.ops.tau_budget.cuda"
_MAX_K = 64
_BLOCKS_PER_SM = 8  # resident 256-thread slot blocks per SM (31-40 registers, no shared memory to speak of)
_MIN_SPLIT = 4096  # elements per split: at least two 16-byte loads per thread of a 256-thread block
_MAX_SPLITS = 64


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=1024)
def choose_splits(slots: int, vocab: int, resident_blocks: int) -> int:
    """V-splits per slot for `slots` slots on a GPU holding `resident_blocks` slot blocks at once.

    The fewest splits whose block count fills its last wave to >= 90% (waves = blocks / resident_blocks),
    otherwise the split count with the fullest last wave; every split keeps >= _MIN_SPLIT elements and there
    are at most _MAX_SPLITS. Small grids thus spread each slot over many SMs, and mid-size grids (e.g. 1100
    slots on 1056 resident blocks) avoid a nearly empty second wave.
    """
    max_splits = max(1, min(vocab // _MIN_SPLIT, _MAX_SPLITS))
    if slots <= 0 or resident_blocks <= 0:
        return 1
    best, best_fill = 1, 0.0
    for s in range(1, max_splits + 1):
        waves = slots * s / resident_blocks
        fill = waves / math.ceil(waves)
        if fill >= 0.9:
            return s
        if fill > best_fill:
            best, best_fill = s, fill
    return best


def num_splits(slots: int, vocab: int, device: torch.device) -> int:
    """V-splits per slot on `device` (see :func:`choose_splits`)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return choose_splits(slots, vocab, _num_sms(index) * _BLOCKS_PER_SM)


def _selection_params(fn: str, tau32, bud, floor, strategy_id: int, R: int, dev):
    if strategy_id not in (0, 1, 2):
        raise ValueError(f"{fn}: strategy_id must be 0 (tau_budget), 1 (threshold) or 2 (topk), got {strategy_id}")
    _ext.check_tensor(fn, "tau32", tau32, shape=(R,), dtypes=(torch.float32,), device=dev)
    _ext.check_tensor(fn, "bud", bud, shape=(R,), dtypes=(torch.float32,), device=dev)
    _ext.check_tensor(fn, "floor", floor, shape=(R,), dtypes=(torch.int32,), device=dev)
    return tau32.contiguous(), bud.contiguous(), floor.contiguous()


def tau_budget_step_cuda(
    logits: torch.Tensor,
    block: torch.Tensor,
    mask_id: int,
    tau32: torch.Tensor,
    bud: torch.Tensor,
    floor: torch.Tensor,
    seed: torch.Tensor,
    temperature: float,
    strategy_id: int,
    *,
    splits: int | None = None,
):
    """One decode step on the GPU (docs/decode.md without top-k/top-p; the definition is ``reference.py``).

    Args:
        logits: [R, K, V] bf16/fp16/fp32 CUDA tensor with ``stride(-1) == 1`` (other strides arbitrary).
        block: [R, K] int64, the block before the step (slots equal to ``mask_id`` are still masked).
        mask_id: the mask token id μ (written as the token of invalid slots).
        tau32: [R] fp32, fp32(τ) per row.  bud: [R] fp32, the budget b = fp32(m_eff·(1−τ)) per row.
        floor: [R] int32, the floor f per row.  seed: [1] int64 device tensor (read by the kernel).
        temperature: T ≥ 0; 0 is greedy (argmax, c = 1/Σexp(z − max z)), T > 0 is Gumbel-max sampling
            x0 = argmax(z/T + g), c = softmax(z/T)[x0].
        strategy_id: 0 = tau_budget, 1 = threshold, 2 = topk.
        splits: V-splits per slot (default: enough blocks to fill the GPU); for tests.

    Returns:
        (block_out int64 [R,K], commit bool [R,K], tokens int64 [R,K], confidence fp32 [R,K],
        num_committed int32 [R], risk fp32 [R]), new tensors on ``logits.device``. A slot whose logits hold
        NaN or +inf, or are all −inf, gets token = mask_id, confidence = NaN and is never committed.
    """
    fn = f"{_FN}.tau_budget_step_cuda"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"{fn}: logits must be a [R, K, V] tensor, got {getattr(logits, 'shape', logits)}")
    R, K, V = logits.shape
    dev = logits.device
    _ext.check_tensor(fn, "logits", logits, dtypes=tuple(_ext.DTYPE_CODES), device="cuda", last_dim_contiguous=True)
    if K > _MAX_K:
        raise ValueError(f"{fn}: the cuda backend supports K <= {_MAX_K} slots per block, got K={K}")
    _ext.check_tensor(fn, "block", block, shape=(R, K), dtypes=(torch.int64,), device=dev)
    if seed.numel() != 1:
        raise ValueError(f"{fn}: seed must hold one int64, got shape {tuple(seed.shape)}")
    _ext.check_tensor(fn, "seed", seed, dtypes=(torch.int64,), device=dev)
    if not temperature >= 0.0 or temperature == float("inf"):
        raise ValueError(f"{fn}: temperature must be finite and >= 0, got {temperature}")
    tau32, bud, floor = _selection_params(fn, tau32, bud, floor, strategy_id, R, dev)
    block = block.contiguous()
    seed = seed.reshape(1).contiguous()
    n_split = num_splits(R * K, V, dev) if splits is None else int(splits)
    if n_split < 1:
        raise ValueError(f"{fn}: splits must be >= 1, got {n_split}")

    block_out = torch.empty((R, K), dtype=torch.int64, device=dev)
    commit = torch.empty((R, K), dtype=torch.bool, device=dev)
    tokens = torch.empty((R, K), dtype=torch.int64, device=dev)
    conf = torch.empty((R, K), dtype=torch.float32, device=dev)
    num = torch.empty((R,), dtype=torch.int32, device=dev)
    risk = torch.empty((R,), dtype=torch.float32, device=dev)
    if R == 0:
        return block_out, commit, tokens, conf, num, risk
    ext = _ext.require("tau_budget_step", "cuda")
    ws = torch.empty((max(1, ext.tau_budget_workspace_bytes(R * K, n_split)),), dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        code = ext.tau_budget_step(
            logits.data_ptr(),
            _ext.dtype_code(fn, "logits", logits),
            R,
            K,
            V,
            logits.stride(0),
            logits.stride(1),
            block.data_ptr(),
            int(mask_id),
            tau32.data_ptr(),
            bud.data_ptr(),
            floor.data_ptr(),
            seed.data_ptr(),
            float(temperature),
            int(strategy_id),
            n_split,
            ws.data_ptr(),
            block_out.data_ptr(),
            commit.data_ptr(),
            tokens.data_ptr(),
            conf.data_ptr(),
            num.data_ptr(),
            risk.data_ptr(),
            stream,
        )
    _ext.check_status(code, "tau_budget_step", "cuda")
    return block_out, commit, tokens, conf, num, risk


def tau_budget_select_cuda(
    confidence: torch.Tensor,
    masked: torch.Tensor,
    tau32: torch.Tensor,
    bud: torch.Tensor,
    floor: torch.Tensor,
    strategy_id: int,
):
    """Selection of docs/decode.md, 'The τ-budget rule' and 'Other selection rules' on given confidences
    (``reference.select_row_ref`` per row).

    Args:
        confidence: [R, K] fp32 CUDA.  masked: [R, K] bool (slots still μ; NaN confidences are excluded too).
        tau32, bud, floor, strategy_id: as in :func:`tau_budget_step_cuda`.

    Returns:
        (commit bool [R,K], num_committed int32 [R], risk fp32 [R]) with risk = Σ_{j∈C} (1 − c_j)
        summed in fp32 in sorted order.
    """
    fn = f"{_FN}.tau_budget_select_cuda"
    if not isinstance(confidence, torch.Tensor) or confidence.dim() != 2:
        raise ValueError(f"{fn}: confidence must be a [R, K] tensor, got {getattr(confidence, 'shape', confidence)}")
    R, K = confidence.shape
    dev = confidence.device
    _ext.check_tensor(fn, "confidence", confidence, dtypes=(torch.float32,), device="cuda")
    if K > _MAX_K:
        raise ValueError(f"{fn}: the cuda backend supports K <= {_MAX_K} slots per block, got K={K}")
    _ext.check_tensor(fn, "masked", masked, shape=(R, K), dtypes=(torch.bool,), device=dev)
    tau32, bud, floor = _selection_params(fn, tau32, bud, floor, strategy_id, R, dev)
    confidence = confidence.contiguous()
    masked = masked.contiguous()
    commit = torch.empty((R, K), dtype=torch.bool, device=dev)
    num = torch.empty((R,), dtype=torch.int32, device=dev)
    risk = torch.empty((R,), dtype=torch.float32, device=dev)
    if R == 0:
        return commit, num, risk
    ext = _ext.require("tau_budget_select", "cuda")
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        code = ext.tau_budget_select(
            confidence.data_ptr(),
            masked.data_ptr(),
            R,
            K,
            tau32.data_ptr(),
            bud.data_ptr(),
            floor.data_ptr(),
            int(strategy_id),
            commit.data_ptr(),
            num.data_ptr(),
            risk.data_ptr(),
            stream,
        )
    _ext.check_status(code, "tau_budget_select", "cuda")
    return commit, num, risk
