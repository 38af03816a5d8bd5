"""Test helpers shared by the whole suite: the one tolerance table and readable comparisons.

Rules: kernels are compared with the fp32 reference; in low precision a kernel's
error against the fp32 reference may be at most ``THREE_WAY_FACTOR`` times the error of the same
PyTorch code run in that precision (plus a tiny absolute floor for exact-zero cases). Nothing here
depends on the environment.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

# dtype of the *inputs* -> tolerance for outputs computed in fp32 from those inputs
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}
THREE_WAY_FACTOR = 2.0
THREE_WAY_FLOOR = 1e-5


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                 name: str = "output", atol: float | None = None, rtol: float | None = None) -> None:
    """Elementwise |a-e| <= atol + rtol*|e| with a message naming the worst element."""
    tol = TOLERANCES[dtype]
    atol = tol["atol"] if atol is None else atol
    rtol = tol["rtol"] if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[0].tolist()
        raise AssertionError(f"{name}: NaN pattern differs first at {idx}: got {a[tuple(idx)]}, "
                             f"expected {e[tuple(idx)]}")
    a = torch.where(nan_a, 0.0, a)
    e = torch.where(nan_e, 0.0, e)
    inf_ok = torch.isinf(e) & (a == e)
    err = torch.where(inf_ok, 0.0, (a - e).abs())
    bound = atol + rtol * e.abs()
    bad = err > bound
    if bad.any():
        ratio = torch.where(bad, err / bound, torch.zeros_like(err))
        idx = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), ratio.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements outside atol={atol:g} rtol={rtol:g} "
            f"(dtype {dtype}); worst at {list(idx)}: got {a[idx].item():.8g}, expected {e[idx].item():.8g}, "
            f"|diff|={err[idx].item():.3g}; max |diff|={err.max().item():.3g}")


def assert_three_way(kernel: torch.Tensor, reference_fp32: torch.Tensor, torch_lowp: torch.Tensor, *,
                     name: str = "output", factor: float = THREE_WAY_FACTOR,
                     floor: float = THREE_WAY_FLOOR) -> None:
    """max|kernel - ref| <= factor * max|torch_lowp - ref| + floor."""
    ref = reference_fp32.detach().double().cpu()
    k_err = (kernel.detach().double().cpu() - ref).abs().nan_to_num(0.0).max().item()
    t_err = (torch_lowp.detach().double().cpu() - ref).abs().nan_to_num(0.0).max().item()
    if k_err > factor * t_err + floor:
        raise AssertionError(f"{name}: kernel error {k_err:.4g} > {factor} x low-precision PyTorch error "
                             f"{t_err:.4g} + {floor:g}")


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN (floats) or a sentinel (ints/bools) so unwritten slots fail."""
    out = torch.empty_like(t)
    if out.is_floating_point():
        out.fill_(float("nan"))
    elif out.dtype == torch.bool:
        out.fill_(True)
    else:
        out.fill_(-7777777 if out.dtype in (torch.int32, torch.int64) else 77)
    return out


def find_nvcc() -> str | None:
    """nvcc of $CUDA_HOME, $CUDA_PATH or /usr/local/cuda (first found), else on PATH; None without one (the
    host-emulation tests of the CUDA kernels then skip)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")
