"""The one place that chooses the torch / triton / cuda / cpp implementation of an op.

Order of precedence: the call's ``backend=`` argument, then the ``SLIM_OPS_BACKEND`` environment
variable (read at call time), then auto = the fastest available for the tensors' device
(cuda > triton > torch on a CUDA device; cpp > torch on the CPU).

``cpp`` is the C++ CPU kernel of an op in ``slim_ops._C`` (function ``<op>_cpu``), built by every
``pip install`` that has a C++ compiler, with or without nvcc; ``cuda`` needs the CUDA kernels of the
same extension (built when nvcc is found). The extension is loaded by :mod:`slim_ops._ext`.

The triton backend on CPU tensors runs only through the Triton interpreter (``TRITON_INTERPRET=1``
set before slim_ops' kernels are first imported); that is how the test-suite checks kernels without a
GPU. Asking for a backend that cannot run fails with a message saying what to do.
"""

from __future__ import annotations

import functools
import os

import torch

from slim_ops import _ext

BACKENDS = ("torch", "triton", "cuda", "cpp")


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_extension():
    """The compiled ``slim_ops._C`` module, or None when it was not built (see :mod:`slim_ops._ext`)."""
    return _ext.extension()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_not(name: str, device: torch.device, op: str, supported: tuple[str, ...]) -> str | None:
    """None when `name` can run `op` on `device`, else the reason."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {BACKENDS} or None for auto"
    if name not in supported:
        return f"op {op!r} has no {name!r} backend (it has: {', '.join(supported)})"
    if name == "torch":
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return "this torch build or machine has no CUDA device"
    if name == "triton":
        if not _has_triton():
            return "triton is not installed (pip install 'triton==3.6.0' or slim_ops[triton])"
        if device.type == "cuda" or triton_interpret():
            return None
        return (f"the triton backend needs CUDA tensors (got device {device}); on the CPU set "
                "TRITON_INTERPRET=1 before importing slim_ops kernels to use the Triton interpreter")
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors (got device {device})"
        ext = _ext.extension()
        if ext is None:
            return ("slim_ops._C is not built: reinstall with nvcc on PATH, e.g. "
                    "`SLIM_OPS_CUDA=ON pip install --no-build-isolation .`")
        if not _ext.has_cuda_kernels():
            return ("slim_ops._C was built without the CUDA kernels (nvcc was not found): reinstall with nvcc on "
                    "PATH, e.g. `SLIM_OPS_CUDA=ON pip install --no-build-isolation .`")
        if not hasattr(ext, op):
            return f"slim_ops._C was built without {op!r}; rebuild the package"
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"the cpp backend needs CPU tensors (got device {device})"
        ext = _ext.extension()
        if ext is None:
            return ("slim_ops._C is not built: reinstall with a C++ compiler available, e.g. "
                    "`pip install --no-build-isolation .`")
        if not hasattr(ext, f"{op}_cpu"):
            return f"op {op!r} has no C++ CPU kernel in this build of slim_ops._C"
        return None
    return f"unknown backend {name!r}; choose one of {BACKENDS} or None for auto"


def available_backends(device: torch.device | str = "cpu", op: str = "tau_budget_step",
                       supported: tuple[str, ...] = BACKENDS) -> list[str]:
    """Backends that can run `op` on `device`, fastest first."""
    device = torch.device(device)
    return [b for b in ("cuda", "triton", "cpp", "torch") if _why_not(b, device, op, supported) is None]


def pick(op: str, device: torch.device, backend: str | None = None,
         supported: tuple[str, ...] = BACKENDS) -> str:
    """Resolve the backend for one call of `op` on tensors living on `device`."""
    requested = backend if backend is not None else (os.environ.get("SLIM_OPS_BACKEND") or None)
    if requested is not None:
        requested = requested.lower()
        if requested == "auto":
            requested = None
    if requested is not None:
        reason = _why_not(requested, device, op, supported)
        if reason is not None:
            raise RuntimeError(f"slim_ops.{op}: backend {requested!r} unavailable: {reason}")
        return requested
    if device.type != "cuda":
        return "cpp" if _why_not("cpp", device, op, supported) is None else "torch"
    for b in ("cuda", "triton", "torch"):
        if _why_not(b, device, op, supported) is None:
            return b
    return "torch"


def autocast_off(fn):
    """Run an op's implementation exactly as written under an enclosing ``torch.autocast``: a custom op is
    opaque to autocast, but the torch calls inside it would otherwise be autocast one by one (fp32
    accumulations silently turned into bf16 matmuls, mixed dtypes in one expression)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
            return fn(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
