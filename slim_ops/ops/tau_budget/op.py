"""Public decode-step API: ``tau_budget_step`` and ``tau_budget_select`` (docs/decode.md).

Both are registered as ``slim_ops::tau_budget_step`` / ``slim_ops::tau_budget_select`` custom ops (opaque to
torch.compile, with fake kernels) and dispatch through :func:`slim_ops._backend.pick`.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from slim_ops import _backend

from .reference import STRATEGIES, static_floor
from .torch_impl import defer_slots, select_torch, slot_ranks, tau_budget_step_torch

__all__ = ["StepOutput", "PreparedStep", "prepare_step", "tau_budget_step", "tau_budget_select", "static_floor"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_BLOCK = 64


class StepOutput(NamedTuple):
    """Result of one denoising step for R rows of a K-slot block.

    block [R,K] int64 (the block after committing), commit [R,K] bool, tokens [R,K] int64 (x0 for every slot;
    mask_id for invalid slots), confidence [R,K] fp32 (c; NaN for invalid slots), num_committed [R] int32 (a
    count <= K <= 64, written by every backend's selection in 32-bit; ids and positions are int64),
    risk [R] fp32 (Σ_{j∈C} 1 − c_j, the expected number of wrong commits)."""

    block: Tensor
    commit: Tensor
    tokens: Tensor
    confidence: Tensor
    num_committed: Tensor
    risk: Tensor


# ---------------------------------------------------------------------------------------------------------------
# input checking and per-row parameter tensors
# ---------------------------------------------------------------------------------------------------------------

def _fail(fn: str, msg: str) -> None:
    raise ValueError(f"slim_ops.{fn}: {msg}")


def _row_param(fn: str, name: str, value, R: int, device: torch.device, *, integer: bool,
               lo: float, hi: float | None, lo_open: bool, hi_open: bool) -> Tensor | float | int:
    """Check a scalar or [R] tensor parameter; returns the scalar or an fp64 / int64 tensor on `device`."""
    def in_range_msg() -> str:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        return f"{left}{lo}, {hi if hi is not None else 'inf'}{right}"

    if isinstance(value, Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(R)
        if value.dim() != 1 or value.shape[0] != R:
            _fail(fn, f"{name} must be a scalar or a 1-D tensor of length R={R}, got shape {tuple(value.shape)}")
        if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            _fail(fn, f"{name} tensor must have an integer dtype, got {value.dtype}")
        if not integer and not value.is_floating_point():
            _fail(fn, f"{name} tensor must have a floating dtype (float64 for exact budgets), got {value.dtype}")
        t = value.to(device=device, dtype=torch.int64 if integer else torch.float64)
        ok = t > lo if lo_open else t >= lo
        if hi is not None:
            ok = ok & (t < hi if hi_open else t <= hi)
        if not integer:
            ok = ok & ~torch.isnan(t)
        torch._assert_async(ok.all(), f"slim_ops.{fn}: every {name} must lie in {in_range_msg()}")
        return t
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            integer and not isinstance(value, numbers.Integral)):
        _fail(fn, f"{name} must be {'an int' if integer else 'a float'} or a [R] tensor, got {type(value).__name__}")
    value = int(value) if integer else float(value)
    v = float(value)
    ok = (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi)) and not math.isnan(v)
    if not ok:
        _fail(fn, f"{name} must lie in {in_range_msg()}, got {value}")
    return value


@functools.lru_cache(maxsize=64)
def _scalar_params(R: int, device: torch.device, tau: float, m: float, floor: int):
    b = (m if m > 0 else float(floor)) * (1.0 - tau)  # fp64 product, rounded to fp32 below
    return (torch.full((R,), tau, dtype=torch.float32, device=device),
            torch.full((R,), b, dtype=torch.float64, device=device).to(torch.float32),
            torch.full((R,), floor, dtype=torch.int32, device=device))


def _params(fn: str, R: int, device: torch.device, tau, m, floor):
    tau = _row_param(fn, "tau", tau, R, device, integer=False, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    m = _row_param(fn, "m", m, R, device, integer=False, lo=0.0, hi=None, lo_open=False, hi_open=False)
    floor = _row_param(fn, "floor", floor, R, device, integer=True, lo=0, hi=None, lo_open=False, hi_open=False)
    if not any(isinstance(x, Tensor) for x in (tau, m, floor)) and not torch.compiler.is_compiling():
        return _scalar_params(R, device, float(tau), float(m), int(floor))
    tau64 = tau if isinstance(tau, Tensor) else torch.full((R,), float(tau), dtype=torch.float64, device=device)
    m64 = m if isinstance(m, Tensor) else torch.full((R,), float(m), dtype=torch.float64, device=device)
    fl = floor if isinstance(floor, Tensor) else torch.full((R,), int(floor), dtype=torch.int64, device=device)
    m_eff = torch.where(m64 > 0, m64, fl.to(torch.float64))
    bud = (m_eff * (1.0 - tau64)).to(torch.float32)
    return tau64.to(torch.float32), bud, fl.to(torch.int32)


_SPLIT = 3  # strategy ids >= this (entropy_bounded, factor, random) select in the shared torch selection


def _strategy_param(fn: str, R: int, device: torch.device, sid: int, gamma, factor) -> Tensor | None:
    """[R] fp64 γ (entropy_bounded) or factor (factor) checked like tau; None for the other strategies."""
    if sid == 3:
        g = _row_param(fn, "gamma", gamma, R, device, integer=False, lo=0.0, hi=None, lo_open=False, hi_open=False)
        return g if isinstance(g, Tensor) else torch.full((R,), g, dtype=torch.float64, device=device)
    if sid == 4:
        f = _row_param(fn, "factor", factor, R, device, integer=False, lo=0.0, hi=None, lo_open=True, hi_open=False)
        return f if isinstance(f, Tensor) else torch.full((R,), f, dtype=torch.float64, device=device)
    return None


def _defer_ids(fn: str, ids, V: int, device: torch.device) -> Tensor | None:
    if ids is None:
        return None
    t = torch.as_tensor(ids)
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        _fail(fn, f"defer_ids must be a 1-D sequence of int token ids, got {getattr(t, 'dtype', None)} "
                  f"{tuple(t.shape)}")
    if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
        _fail(fn, f"defer_ids must lie in [0, V={V})")
    return t.to(device=device, dtype=torch.int64)


def _strategy_id(fn: str, strategy: str) -> int:
    if strategy not in STRATEGIES:
        _fail(fn, f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return STRATEGIES.index(strategy)


# ---------------------------------------------------------------------------------------------------------------
# registered ops
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("slim_ops::tau_budget_step", mutates_args=())
def _tau_budget_step_op(logits: Tensor, block: Tensor, mask_id: int, tau32: Tensor, bud: Tensor, floor: Tensor,
                        seed: Tensor, temperature: float, strategy_id: int, top_k: int, top_p: float,
                        backend: str, sparam: Tensor | None = None,
                        defer_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _step_impl(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id, top_k, top_p,
                      backend, sparam, defer_ids)


def _step_impl(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id, top_k, top_p, backend,
               sparam=None, defer_ids=None):
    """The op's implementation: the backend's fused step (or the slot pass + the shared selection)."""
    if strategy_id >= _SPLIT or defer_ids is not None:
        return _split_step(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id, top_k, top_p,
                           backend, sparam, defer_ids)
    if backend == "torch" or (temperature > 0 and (top_k > 0 or top_p < 1.0)):
        if backend != "torch":  # documented path: the filtered distribution is built in PyTorch, select in-kernel
            from .torch_impl import slot_pass_torch

            tokens, conf = slot_pass_torch(logits, mask_id, seed, temperature, top_k, top_p)
            commit, num, risk = _select_dispatch(conf, block == mask_id, tau32, bud, floor, strategy_id, backend)
            return torch.where(commit, tokens, block), commit, tokens, conf, num, risk
        return tau_budget_step_torch(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id,
                                     top_k, top_p)
    if backend == "cpp":  # the contract is the op's own (checked by its entry points)
        from .cpu import launch_step_cpu

        return launch_step_cpu(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id)
    if backend == "triton":
        from .triton import tau_budget_step_triton

        return tau_budget_step_triton(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id)
    from .cuda import tau_budget_step_cuda

    return tau_budget_step_cuda(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id)


def _split_step(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id, top_k, top_p, backend,
                sparam, defer_ids):
    """Slot pass, then the shared vectorised selection (``torch_impl.select_torch``, on the device, no host sync).

    factor, random and the tau_budget/threshold/topk rules with ``defer_ids`` need only (tokens, confidence) from the
    slot pass: every backend's own fused step, run with strategy topk and floor 0 (it commits nothing), gives them, so
    the result is exact for every backend. entropy_bounded also needs the per-slot entropy: the triton kernel computes
    it in the same pass over V (ENTROPY); for the cuda / cpp backends (and top-k / top-p sampling) its slot pass runs
    in the torch backend (chunked, same function) until their kernels fuse it."""
    if strategy_id == 3 and backend == "triton" and not (temperature > 0 and (top_k > 0 or top_p < 1.0)):
        from .triton import tau_budget_step_entropy_triton

        return tau_budget_step_entropy_triton(logits, block, mask_id, tau32, bud, floor, seed, temperature, sparam,
                                              defer_ids)
    if backend == "torch" or strategy_id == 3:
        return tau_budget_step_torch(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id,
                                     top_k, top_p, sparam, defer_ids)
    out = torch.ops.slim_ops.tau_budget_step.default(logits, block, mask_id, tau32, bud, torch.zeros_like(floor),
                                                     seed, temperature, 2, top_k, top_p, backend)
    tokens, conf = out[2], out[3]
    if defer_ids is not None:
        conf, _ = defer_slots(tokens, conf, None, defer_ids)
    rank = slot_ranks(seed, *block.shape, block.device) if strategy_id == 5 else None
    commit, num, risk = select_torch(conf, block == mask_id, tau32, bud, floor, strategy_id, sparam, None, rank)
    return torch.where(commit, tokens, block), commit, tokens, conf, num, risk


@_tau_budget_step_op.register_fake
def _(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id, top_k, top_p, backend, sparam=None,
      defer_ids=None):
    R, K, _ = logits.shape
    e = logits.new_empty
    return (e((R, K), dtype=torch.int64), e((R, K), dtype=torch.bool), e((R, K), dtype=torch.int64),
            e((R, K), dtype=torch.float32), e((R,), dtype=torch.int32), e((R,), dtype=torch.float32))


def _select_dispatch(conf, masked, tau32, bud, floor, strategy_id, backend, sparam=None, entropy=None, seed=None):
    if strategy_id >= _SPLIT:  # entropy_bounded / factor / random: the shared selection for every backend
        rank = slot_ranks(seed, *conf.shape, conf.device) if strategy_id == 5 else None
        return select_torch(conf, masked, tau32, bud, floor, strategy_id, sparam, entropy, rank)
    if backend == "triton":
        from .triton import tau_budget_select_triton

        return tau_budget_select_triton(conf, masked, tau32, bud, floor, strategy_id)
    if backend == "cuda":
        from .cuda import tau_budget_select_cuda

        return tau_budget_select_cuda(conf, masked, tau32, bud, floor, strategy_id)
    if backend == "cpp":
        from .cpu import tau_budget_select_cpu

        return tau_budget_select_cpu(conf, masked, tau32, bud, floor, strategy_id)
    return select_torch(conf, masked, tau32, bud, floor, strategy_id)


@torch.library.custom_op("slim_ops::tau_budget_select", mutates_args=())
def _tau_budget_select_op(confidence: Tensor, masked: Tensor, tau32: Tensor, bud: Tensor, floor: Tensor,
                          strategy_id: int, backend: str, sparam: Tensor | None = None, entropy: Tensor | None = None,
                          seed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    return _select_dispatch(confidence, masked, tau32, bud, floor, strategy_id, backend, sparam, entropy, seed)


@_tau_budget_select_op.register_fake
def _(confidence, masked, tau32, bud, floor, strategy_id, backend, sparam=None, entropy=None, seed=None):
    R, K = confidence.shape
    e = confidence.new_empty
    return e((R, K), dtype=torch.bool), e((R,), dtype=torch.int32), e((R,), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------------------

def tau_budget_step(logits: Tensor, block: Tensor, mask_id: int, *, tau: float | Tensor = 0.9,
                    m: float | Tensor = 1.0, floor: int | Tensor = 1, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, generator: torch.Generator | None = None, strategy: str = "tau_budget",
                    backend: str | None = None, gamma: float | Tensor = 0.1, factor: float | Tensor = 1.0,
                    defer_ids=None) -> StepOutput:
    """One denoising step of one block for R sequences (docs/decode.md).

    Args:
        logits: [R, K, V] bf16/fp16/fp32 logits of the K block slots (already un-shifted: row j scores slot j).
            Any strides; the vocabulary dimension is read contiguously (a copy is made if it is not).
        block: [R, K] int64 current block; slots equal to ``mask_id`` are the masked set M.
        mask_id: the mask token id, 0 <= mask_id < V.
        tau: threshold τ in (0, 1), scalar or [R] tensor (float64 keeps the budget exact).
        m: budget multiplier m >= 0 (0 means m_eff = floor), scalar or [R] tensor.
        floor: least commits f >= 0 this step (see :func:`static_floor`), int or [R] integer tensor.
        temperature: 0 = greedy (x0 = argmax z, c = softmax(z)[x0]); T > 0 samples x0 ~ softmax(z/T) by Gumbel-max
            with a counter-based RNG (reference.py) seeded from ``generator`` and returns c = p̃[x0].
        top_k, top_p: filters applied before sampling (T > 0 only). When active, the filtered distribution is
            built by the documented PyTorch path (full-vocab sort per slot), then selection runs in the backend.
        generator: torch.Generator for the seed (one int64 drawn per call, on the generator's device).
        strategy: "tau_budget" (commit the most confident above-τ slots while Σ(1−c) <= fp32(m_eff·(1−τ)), at least
            f), "threshold" (all above τ, at least f), "topk" (exactly f), or the peers' rules (exact definitions in
            ``reference.select_row_ref``): "entropy_bounded" (EB-sampler: the lowest-entropy slots while
            Σ H − max H <= γ), "factor" (Fast-dLLM: the n most confident while (n+1)(1 − c_n) < factor, at least
            one) and "random" (LLaDA's random remasking: f uniformly random slots, from the counter-based RNG of
            reference.py seeded by ``generator``). Every rule is clamped to |M| and takes at least f slots where M
            has them (the peers' top-k can pick already-committed slots when f > |M|; here it cannot).
        backend: "torch" | "triton" | "cuda" | "cpp" | None (auto: fastest for the device; see slim_ops._backend).
            entropy_bounded takes the entropy from the triton kernel's own pass over V; the cuda / cpp backends run
            its slot pass in the torch backend (their kernels do not compute the entropy yet); factor / random /
            defer_ids use the backend's slot pass and the shared selection.
        gamma: γ >= 0 of "entropy_bounded" (float or [R] tensor), compared as fp32(γ).
        factor: factor > 0 of "factor" (float or [R] tensor); the comparison is exact (fp64).
        defer_ids: token ids (sequence or 1-D tensor) whose slots get confidence 0 and entropy +inf before the
            selection (LLaDA's confidence_eos_eot_inf): committed only when the floor needs them; the returned
            confidence is the one the selection used.

    Returns:
        :class:`StepOutput` (block, commit, tokens, confidence, num_committed, risk); everything stays on the device
        and no host synchronisation happens. Slots whose logits hold NaN or +inf, or are all -inf, are invalid:
        token = mask_id, confidence = NaN, never committed.
    """
    fn = "tau_budget_step"
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        _fail(fn, f"logits must be a [R, K, V] tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    if logits.dtype not in _FLOAT_DTYPES:
        _fail(fn, f"logits must be bfloat16, float16 or float32, got {logits.dtype}")
    R, K, V = logits.shape
    if not 1 <= K <= MAX_BLOCK:
        _fail(fn, f"block length K must be in [1, {MAX_BLOCK}], got K={K}")
    if V < 1 or V >= 2**31:
        _fail(fn, f"vocab size V must be in [1, 2^31), got {V}")
    if not isinstance(block, Tensor) or block.shape != (R, K):
        _fail(fn, f"block must be a [R, K] = [{R}, {K}] tensor, got {getattr(block, 'shape', type(block).__name__)}")
    if block.dtype != torch.int64:
        _fail(fn, f"block must be int64, got {block.dtype}")
    if block.device != logits.device:
        _fail(fn, f"block is on {block.device} but logits are on {logits.device}")
    _check_options(fn, V, mask_id, temperature, top_k, top_p, generator)
    sid = _strategy_id(fn, strategy)
    tau32, bud, fl = _params(fn, R, logits.device, tau, m, floor)
    sparam = _strategy_param(fn, R, logits.device, sid, gamma, factor)
    dids = _defer_ids(fn, defer_ids, V, logits.device)
    name = _backend.pick(fn, logits.device, backend)
    logits = logits.detach()  # the decode step is not differentiable
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    temperature = float(temperature)
    seed = _draw_seed(generator, logits.device) if temperature > 0 or strategy == "random" else \
        _zero_seed(logits.device)
    out = _tau_budget_step_op(logits, block, mask_id, tau32, bud, fl, seed, temperature, sid, int(top_k),
                              float(top_p), name, sparam, dids)
    return StepOutput(*out)


def _check_options(fn: str, V: int, mask_id, temperature, top_k, top_p, generator) -> None:
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < V:
        _fail(fn, f"mask_id must be an int in [0, V={V}), got {mask_id!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        _fail(fn, f"temperature must be a finite float >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        _fail(fn, f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        _fail(fn, f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        _fail(fn, f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One int64 seed per call from ``generator`` (on the generator's device), moved to ``device`` without a sync."""
    gdev = generator.device if generator is not None else device
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), generator=generator, device=gdev, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


@functools.lru_cache(maxsize=8)
def _zero_seed(device: torch.device) -> Tensor:
    return torch.zeros(1, dtype=torch.int64, device=device)


class PreparedStep:
    """:func:`tau_budget_step` for an engine that calls it every step with the same options: everything but
    the per-step inputs is checked and resolved once (rule, backend, τ / m / γ / factor, the deferred ids),
    and each call goes straight to the op's implementation (through the registered op while torch.compile
    traces). Made by :func:`prepare_step`.

    ``step(logits, block, floor)``: logits [R, K, V] on the prepared device with the prepared V, block [R, K]
    int64, floor an int or an [R] integer tensor. R may change between calls. The caller owns these inputs:
    they are not checked again (the public entry point checks them on every call). Results are identical to
    :func:`tau_budget_step` with the same arguments (and the same generator state)."""

    def __init__(self, V: int, mask_id: int, device: torch.device | str, *, tau: float = 0.9, m: float = 1.0,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, strategy: str = "tau_budget", backend: str | None = None,
                 gamma: float = 0.1, factor: float = 1.0, defer_ids=None):
        fn = "prepare_step"
        if isinstance(V, bool) or not isinstance(V, int) or not 1 <= V < 2**31:
            _fail(fn, f"V must be an int in [1, 2^31), got {V!r}")
        _check_options(fn, V, mask_id, temperature, top_k, top_p, generator)
        for name, value in (("tau", tau), ("m", m), ("gamma", gamma), ("factor", factor)):
            if isinstance(value, Tensor):
                _fail(fn, f"{name} must be a float here (per-row tensors: call tau_budget_step), got a tensor")
        self.device = torch.device(device)
        self.sid = _strategy_id(fn, strategy)
        self.tau = float(_row_param(fn, "tau", tau, 1, self.device, integer=False, lo=0.0, hi=1.0, lo_open=True,
                                    hi_open=True))
        self.m = float(_row_param(fn, "m", m, 1, self.device, integer=False, lo=0.0, hi=None, lo_open=False,
                                  hi_open=False))
        self.sval = None
        if self.sid in (3, 4):
            self.sval = float(_strategy_param(fn, 1, self.device, self.sid, gamma, factor)[0])
        self.defer = _defer_ids(fn, defer_ids, V, self.device)
        self.backend = _backend.pick("tau_budget_step", self.device, backend)
        self.V = V
        self.mask_id, self.temperature, self.top_k, self.top_p = mask_id, float(temperature), int(top_k), float(top_p)
        self.generator = generator
        self.seeded = self.temperature > 0 or strategy == "random"
        self._rows: dict[int, tuple[Tensor, Tensor, Tensor | None]] = {}

    def _row_tensors(self, R: int) -> tuple[Tensor, Tensor, Tensor | None]:
        got = self._rows.get(R)
        if got is None:
            tau32, bud, _ = _scalar_params(R, self.device, self.tau, self.m, 0)
            sp = None if self.sval is None else torch.full((R,), self.sval, dtype=torch.float64, device=self.device)
            got = self._rows[R] = (tau32, bud, sp)
        return got

    def __call__(self, logits: Tensor, block: Tensor, floor: int | Tensor) -> StepOutput:
        # the kernels' memory contract, in a few attribute reads (values are the caller's business)
        if not (isinstance(logits, Tensor) and logits.dim() == 3 and logits.shape[2] == self.V
                and 1 <= logits.shape[1] <= MAX_BLOCK and logits.dtype in _FLOAT_DTYPES
                and logits.device.type == self.device.type and isinstance(block, Tensor)
                and block.shape == logits.shape[:2] and block.dtype == torch.int64 and block.device == logits.device):
            _fail("PreparedStep", f"expects logits [R, K<={MAX_BLOCK}, V={self.V}] bf16/fp16/fp32 on "
                                  f"{self.device.type} and block [R, K] int64 beside them, got "
                                  f"{_describe(logits)} and {_describe(block)}")
        if isinstance(floor, Tensor) and (floor.shape != logits.shape[:1] or floor.is_floating_point()):
            _fail("PreparedStep", f"floor must be an int or an integer [R] tensor, got {_describe(floor)}")
        R = logits.shape[0]
        if isinstance(floor, Tensor):
            tau32, bud, sparam = self._row_tensors(R)
            fl = floor.to(torch.int32)
            if self.m <= 0:  # m_eff = floor: b = fp32(f · (1 − τ)), the product in fp64
                bud = (fl.to(torch.float64) * (1.0 - self.tau)).to(torch.float32)
        else:
            tau32, bud, fl = _scalar_params(R, self.device, self.tau, self.m, int(floor))
            sparam = self._row_tensors(R)[2]
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        seed = _draw_seed(self.generator, logits.device) if self.seeded else _zero_seed(logits.device)
        args = (logits.detach(), block, self.mask_id, tau32, bud, fl, seed, self.temperature, self.sid, self.top_k,
                self.top_p, self.backend, sparam, self.defer)
        out = _tau_budget_step_op(*args) if torch.compiler.is_compiling() else _step_impl(*args)
        return StepOutput(*out)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{str(x.dtype).replace('torch.', '')} {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def prepare_step(V: int, mask_id: int, device: torch.device | str, **options) -> PreparedStep:
    """A :class:`PreparedStep`: ``tau_budget_step`` with ``options`` (tau, m, temperature, top_k, top_p,
    generator, strategy, backend, gamma, factor, defer_ids; scalars) checked once, for a decode loop."""
    return PreparedStep(V, mask_id, device, **options)


def tau_budget_select(confidence: Tensor, masked: Tensor, *, tau: float | Tensor = 0.9, m: float | Tensor = 1.0,
                      floor: int | Tensor = 1, strategy: str = "tau_budget",
                      backend: str | None = None, gamma: float | Tensor = 0.1, factor: float | Tensor = 1.0,
                      entropy: Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Commit selection alone (docs/decode.md, 'The τ-budget rule' and 'Other selection rules' and the peer rules) on
    given confidences.

    Args: confidence [R, K] float (computed in fp32; NaN = not eligible), masked [R, K] bool (the set M); tau, m,
    floor, strategy, gamma, factor as in :func:`tau_budget_step`; entropy [R, K] float (fp32; NaN = not eligible),
    required by "entropy_bounded"; generator seeds "random" (one int64 per call; ranks of slots r*K + j).
    Returns: (commit [R, K] bool, num_committed [R] int32, risk [R] fp32)."""
    fn = "tau_budget_select"
    if not isinstance(confidence, Tensor) or confidence.dim() != 2:
        _fail(fn, f"confidence must be a [R, K] tensor, got {getattr(confidence, 'shape', type(confidence).__name__)}")
    if not confidence.is_floating_point():
        _fail(fn, f"confidence must be a floating tensor, got {confidence.dtype}")
    R, K = confidence.shape
    if not 1 <= K <= MAX_BLOCK:
        _fail(fn, f"block length K must be in [1, {MAX_BLOCK}], got K={K}")
    if not isinstance(masked, Tensor) or masked.shape != (R, K) or masked.dtype != torch.bool:
        _fail(fn, f"masked must be a bool [R, K] = [{R}, {K}] tensor, got "
                  f"{getattr(masked, 'dtype', None)} {tuple(getattr(masked, 'shape', ()))}")
    if masked.device != confidence.device:
        _fail(fn, f"masked is on {masked.device} but confidence is on {confidence.device}")
    sid = _strategy_id(fn, strategy)
    tau32, bud, fl = _params(fn, R, confidence.device, tau, m, floor)
    sparam = _strategy_param(fn, R, confidence.device, sid, gamma, factor)
    if sid == 3:
        if not isinstance(entropy, Tensor) or entropy.shape != (R, K) or not entropy.is_floating_point():
            _fail(fn, f"strategy 'entropy_bounded' needs entropy, a float [R, K] = [{R}, {K}] tensor, got "
                      f"{getattr(entropy, 'dtype', type(entropy).__name__)} {tuple(getattr(entropy, 'shape', ()))}")
        if entropy.device != confidence.device:
            _fail(fn, f"entropy is on {entropy.device} but confidence is on {confidence.device}")
        entropy = entropy.detach().to(torch.float32)
    else:
        entropy = None
    seed = None
    if sid == 5:
        if generator is not None and not isinstance(generator, torch.Generator):
            _fail(fn, f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        seed = _draw_seed(generator, confidence.device)
    name = _backend.pick(fn, confidence.device, backend)
    return _tau_budget_select_op(confidence.detach().to(torch.float32), masked, tau32, bud, fl, sid, name, sparam,
                                 entropy, seed)
