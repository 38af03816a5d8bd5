"""CUDA ``logprob_from_logits`` kernels (csrc/logprob) on the CPU, against reference.py, with special values.

csrc/logprob/logprob_host_check.cu is built by nvcc (no GPU needed) with -DSLIM_LOGPROB_HOST_LIB into a host
library that runs the kernels' own per-thread code (row_thread_state, the warp-shuffle xor tree and the block
merge replayed in order, row_outputs, row_thread_grad). Each test row holds one NaN, +inf or −inf at a different
position, so every position of the row (every thread of the 512-thread block, every lane of its 16-byte vectors,
the scalar head and tail) carries the special value once. Forward (logp, entropy) and backward (dlogits from the
kernel's own lse) must match logprob_from_logits_ref and autograd through it: the same NaN / ±inf pattern, the
same finite values within the fp32 tolerance.
"""

from __future__ import annotations

import ctypes
import math
import subprocess
from pathlib import Path

import pytest
import torch

from slim_ops import _ext
from slim_ops.ops.masked_logprob.reference import logprob_from_logits_ref
from slim_ops.testing import assert_close, find_nvcc, poison_like

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "csrc" / "logprob" / "logprob_host_check.cu"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the host build of csrc/logprob needs it")
    lib = tmp_path_factory.mktemp("logprob_host") / "logprob_host.so"
    cmd = [nvcc, "-DSLIM_LOGPROB_HOST_LIB", "-shared", "-Xcompiler", "-fPIC", "-O2", "-std=c++17",
           "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}", "-gencode=arch=compute_90a,code=compute_90a", str(SRC),
           "-o", str(lib)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"host build failed:\n{p.stderr[-3000:]}"
    so = ctypes.CDLL(str(lib))
    P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    so.slim_logprob_host_fwd.argtypes = [P, I32, P, P, P, P, I64, I64, I64, F32]
    so.slim_logprob_host_fwd.restype = I32
    so.slim_logprob_host_bwd.argtypes = [P, P, I32, P, P, P, I64, I64, I64, I64, F32]
    so.slim_logprob_host_bwd.restype = I32
    return so


def host_fwd(so, logits, labels, temperature):
    N, V = logits.shape
    logp, lse, ent = (poison_like(torch.empty(N)) for _ in range(3))
    labels = labels.contiguous()
    rc = so.slim_logprob_host_fwd(logits.data_ptr(), _ext.DTYPE_CODES[logits.dtype], labels.data_ptr(),
                                  logp.data_ptr(), lse.data_ptr(), ent.data_ptr(), N, V, logits.stride(0),
                                  1.0 / temperature)
    assert rc == 0
    return logp, lse, ent


def host_bwd(so, grad, logits, labels, lse, temperature):
    N, V = logits.shape
    out = poison_like(torch.empty(N, V, dtype=logits.dtype))
    rc = so.slim_logprob_host_bwd(grad.contiguous().data_ptr(), logits.data_ptr(), _ext.DTYPE_CODES[logits.dtype],
                                  labels.contiguous().data_ptr(), lse.contiguous().data_ptr(), out.data_ptr(), N, V,
                                  logits.stride(0), out.stride(0), 1.0 / temperature)
    assert rc == 0
    return out


def special_rows(V: int, value: float, dtype: torch.dtype, offset: int, gen: torch.Generator):
    """[V, V] rows, row i holding `value` at position i; rows start `offset` elements past 16-byte alignment."""
    base = torch.randn(V * V + 16, generator=gen) * 2
    buf = base.to(dtype)
    rows = buf[offset:offset + V * V].view(V, V)
    idx = torch.arange(V)
    rows[idx, idx] = value
    labels = torch.randint(0, V, (V,), generator=gen)
    labels[::7] = idx[::7]  # some rows take their label at the special value
    return rows, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "posinf", "neginf"])
def test_special_value_at_every_position(host, dtype, value):
    gen = torch.Generator().manual_seed(7)
    # > 512 threads x (16 bytes / element size) lanes: every thread and lane of the vector body, plus the scalar
    # head (rows start one element past 16-byte alignment) and tail
    V = 2051 if dtype == torch.float32 else 4099
    temperature = 0.7
    rows, labels = special_rows(V, value, dtype, 1, gen)
    logp, lse, ent = host_fwd(host, rows, labels, temperature)
    ref_logp, ref_ent = logprob_from_logits_ref(rows, labels, temperature)
    ref_lse = torch.logsumexp(rows.float() / temperature, dim=-1)
    assert_close(logp, ref_logp, name=f"logp ({value} at every position)")
    assert_close(lse, ref_lse, name=f"lse ({value} at every position)")
    assert_close(ent, ref_ent, name=f"entropy ({value} at every position)")
    if math.isnan(value):
        assert torch.isnan(logp).all(), "one NaN logit must make the row's log-prob NaN"
    # backward from the kernel's own lse vs autograd through the reference
    grad = torch.randn(V, generator=gen)
    z = rows.detach().float().requires_grad_()
    lp, _ = logprob_from_logits_ref(z, labels, temperature)
    (lp * grad).sum().backward()
    dz = host_bwd(host, grad, rows, labels, lse, temperature)
    assert_close(dz, z.grad, dtype=dtype, name=f"dlogits ({value} at every position)")


def test_all_neg_inf_and_mixed_rows(host):
    V = 1151
    rows = torch.randn(5, V) * 3
    rows[0] = -math.inf  # no finite logit: lse = -inf, logp = NaN
    rows[1, 500] = math.nan
    rows[1, 20] = math.inf  # NaN wins over +inf
    rows[2, :] = -math.inf
    rows[2, 1000] = 4.0  # one finite logit: logp = 0 at it
    rows[3, [3, 900]] = math.inf  # two +inf: lse = +inf
    labels = torch.tensor([0, 20, 1000, 3, 7])
    logp, lse, ent = host_fwd(host, rows, labels, 1.0)
    ref_logp, ref_ent = logprob_from_logits_ref(rows, labels)
    assert_close(logp, ref_logp, name="logp")
    assert_close(lse, torch.logsumexp(rows, dim=-1), name="lse")
    assert_close(ent, ref_ent, name="entropy")
    assert float(logp[2]) == 0.0 and math.isinf(float(lse[3])) and math.isnan(float(logp[0]))
