"""C++ CPU backend (``cpp``) of the fused decode step: calls ``slim_ops._C`` (csrc/tau_budget/tau_budget_cpu.cpp).

One call, no temporaries of size V: ``torch.get_num_threads()`` std::threads take the R·K slots in turn; each slot
is one pass over its logits in L1-sized blocks (vectorised max / NaN-+inf scan, first index of a new max, Σexp
with a polynomial exp; Gumbel-max with the counter-based RNG of ``reference.py`` for T > 0, the two logarithms
evaluated only where z/T + 17 can still win), then the exact fp32 selection scan per row. The hot loops are
compiled for AVX-512, AVX2+FMA and the x86-64 baseline and chosen at run time. Top-k / top-p filtering
(T > 0) is not in the kernel: op.py builds the filtered distribution with the PyTorch path and runs only the
selection here (:func:`tau_budget_select_cpu`).

The public entry point with full input validation is ``slim_ops.tau_budget_step`` (op.py); the checks here only
guard the raw-pointer contract.
"""

from __future__ import annotations

import torch

from slim_ops import _ext

_FN = "slim_ops.ops.tau_budget.cpu"
_MAX_K = 64
_LOGIT_DTYPES = tuple(_ext.DTYPE_CODES)
ISAS = {"auto": -1, "baseline": 0, "avx2": 1, "avx512": 2}


def supported_isas() -> list[str]:
    """Variants of the hot loops this CPU runs ("baseline", "avx2", "avx512"); empty without the extension."""
    ext = _ext.extension()
    if ext is None or not hasattr(ext, "tau_budget_cpu_isa"):
        return []
    return [name for name, code in ISAS.items() if code >= 0 and ext.tau_budget_cpu_isa(code)]


def _selection_params(fn: str, tau32, bud, floor, strategy_id: int, R: int):
    if strategy_id not in (0, 1, 2):
        raise ValueError(f"{fn}: strategy_id must be 0 (tau_budget), 1 (threshold) or 2 (topk), got {strategy_id}")
    _ext.check_tensor(fn, "tau32", tau32, shape=(R,), dtypes=(torch.float32,), device="cpu")
    _ext.check_tensor(fn, "bud", bud, shape=(R,), dtypes=(torch.float32,), device="cpu")
    _ext.check_tensor(fn, "floor", floor, shape=(R,), dtypes=(torch.int32,), device="cpu")
    return tau32.contiguous(), bud.contiguous(), floor.contiguous()


def tau_budget_step_cpu(logits: torch.Tensor, block: torch.Tensor, mask_id: int, tau32: torch.Tensor,
                        bud: torch.Tensor, floor: torch.Tensor, seed: torch.Tensor, temperature: float,
                        strategy_id: int, *, num_threads: int | None = None, isa: str = "auto"):
    """One decode step on the CPU (docs/decode.md without top-k/top-p; the definition is ``reference.py``).

    Args:
        logits: [R, K, V] bf16/fp16/fp32 CPU tensor with ``stride(-1) == 1`` (other strides arbitrary).
        block: [R, K] int64, the block before the step (slots equal to ``mask_id`` are still masked).
        mask_id: the mask token id (written as the token of invalid slots).
        tau32: [R] fp32 fp32(τ).  bud: [R] fp32 budget b = fp32(m_eff·(1−τ)).  floor: [R] int32 floor f.
        seed: [1] int64 CPU tensor (the RNG seed for T > 0).
        temperature: T >= 0; 0 = greedy (argmax, c = 1/Σexp(z − max z)); T > 0 = Gumbel-max x0 = argmax(z/T + g),
            c = softmax(z/T)[x0].
        strategy_id: 0 = tau_budget, 1 = threshold, 2 = topk.
        num_threads: worker threads (default ``torch.get_num_threads()``).
        isa: "auto" (the widest variant this CPU runs) or one of :func:`supported_isas` (for tests).

    Returns:
        (block_out int64 [R,K], commit bool [R,K], tokens int64 [R,K], confidence fp32 [R,K],
        num_committed int32 [R], risk fp32 [R]). A slot whose logits hold NaN or +inf, or are all −inf, gets
        token = mask_id, confidence = NaN and is never committed.
    """
    fn = f"{_FN}.tau_budget_step_cpu"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"{fn}: logits must be a [R, K, V] tensor, got {getattr(logits, 'shape', logits)}")
    R, K, V = logits.shape
    _ext.check_tensor(fn, "logits", logits, dtypes=_LOGIT_DTYPES, device="cpu", last_dim_contiguous=True)
    if K > _MAX_K:
        raise ValueError(f"{fn}: the cpp backend supports K <= {_MAX_K} slots per block, got K={K}")
    if V >= 2**31:
        raise ValueError(f"{fn}: vocab size V must be < 2^31, got {V}")
    _ext.check_tensor(fn, "block", block, shape=(R, K), dtypes=(torch.int64,), device="cpu")
    _ext.check_tensor(fn, "seed", seed, shape=(1,), dtypes=(torch.int64,), device="cpu")
    if not temperature >= 0.0 or temperature == float("inf"):
        raise ValueError(f"{fn}: temperature must be finite and >= 0, got {temperature}")
    tau32, bud, floor = _selection_params(fn, tau32, bud, floor, strategy_id, R)
    if isa not in ISAS:
        raise ValueError(f"{fn}: isa must be one of {tuple(ISAS)}, got {isa!r}")
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    if threads < 1:
        raise ValueError(f"{fn}: num_threads must be >= 1, got {threads}")
    return launch_step_cpu(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id, threads,
                           ISAS[isa])


def launch_step_cpu(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id, threads=None,
                    isa_code=-1):
    """The kernel call behind :func:`tau_budget_step_cpu`, for callers that have established its contract
    already (the op's entry points: logits [R, K<=64, V<2^31] bf16/fp16/fp32 CPU with stride(-1) == 1, block
    [R, K] int64, tau32 / bud / floor [R] fp32 / fp32 / int32, seed [1] int64, strategy 0..2): no check is
    repeated on the per-step path."""
    fn = f"{_FN}.tau_budget_step_cpu"
    R, K, V = logits.shape
    threads = torch.get_num_threads() if threads is None else threads
    block = block.contiguous()
    seed = seed.contiguous()
    block_out = torch.empty((R, K), dtype=torch.int64)
    commit = torch.empty((R, K), dtype=torch.bool)
    tokens = torch.empty((R, K), dtype=torch.int64)
    conf = torch.empty((R, K), dtype=torch.float32)
    num = torch.empty((R,), dtype=torch.int32)
    risk = torch.empty((R,), dtype=torch.float32)
    if R == 0:
        return block_out, commit, tokens, conf, num, risk
    ext = _ext.require("tau_budget_step_cpu", "cpu")
    code = ext.tau_budget_step_cpu(
        logits.data_ptr(), _ext.dtype_code(fn, "logits", logits), R, K, V, logits.stride(0), logits.stride(1),
        block.data_ptr(), int(mask_id), tau32.data_ptr(), bud.data_ptr(), floor.data_ptr(), seed.data_ptr(),
        float(temperature), int(strategy_id), threads, isa_code, block_out.data_ptr(), commit.data_ptr(),
        tokens.data_ptr(), conf.data_ptr(), num.data_ptr(), risk.data_ptr())
    _ext.check_status(code, "tau_budget_step_cpu", "cpu")
    return block_out, commit, tokens, conf, num, risk


def tau_budget_select_cpu(confidence: torch.Tensor, masked: torch.Tensor, tau32: torch.Tensor, bud: torch.Tensor,
                          floor: torch.Tensor, strategy_id: int):
    """Selection of docs/decode.md, 'The τ-budget rule' and 'Other selection rules' on given confidences
    (``reference.select_row_ref`` per row) on the CPU.

    Args: confidence [R, K] fp32 CPU, masked [R, K] bool (NaN confidences are excluded too); tau32, bud, floor,
    strategy_id as in :func:`tau_budget_step_cpu`.
    Returns: (commit bool [R,K], num_committed int32 [R], risk fp32 [R]).
    """
    fn = f"{_FN}.tau_budget_select_cpu"
    if not isinstance(confidence, torch.Tensor) or confidence.dim() != 2:
        raise ValueError(f"{fn}: confidence must be a [R, K] tensor, got {getattr(confidence, 'shape', confidence)}")
    R, K = confidence.shape
    _ext.check_tensor(fn, "confidence", confidence, dtypes=(torch.float32,), device="cpu")
    if K > _MAX_K:
        raise ValueError(f"{fn}: the cpp backend supports K <= {_MAX_K} slots per block, got K={K}")
    _ext.check_tensor(fn, "masked", masked, shape=(R, K), dtypes=(torch.bool,), device="cpu")
    tau32, bud, floor = _selection_params(fn, tau32, bud, floor, strategy_id, R)
    confidence = confidence.contiguous()
    masked = masked.contiguous()
    commit = torch.empty((R, K), dtype=torch.bool)
    num = torch.empty((R,), dtype=torch.int32)
    risk = torch.empty((R,), dtype=torch.float32)
    if R == 0:
        return commit, num, risk
    ext = _ext.require("tau_budget_select_cpu", "cpu")
    code = ext.tau_budget_select_cpu(confidence.data_ptr(), masked.data_ptr(), R, K, tau32.data_ptr(),
                                     bud.data_ptr(), floor.data_ptr(), int(strategy_id), commit.data_ptr(),
                                     num.data_ptr(), risk.data_ptr())
    _ext.check_status(code, "tau_budget_select_cpu", "cpu")
    return commit, num, risk
