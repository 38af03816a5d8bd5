"""masked_logprob / logprob_from_logits / slim_loss_from_hidden (docs/objective.md, 'Log-probabilities'): values,
entropy and gradients (random upstream gradients) against fp64 autograd through full logits; low precision by the
three-way rule; odd V, N = 1, V not a multiple of any tile; Triton through the interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

import slim_ops
import slim_ops.ops.masked_logprob.op as mlp_op
from slim_ops.ops.masked_logprob.reference import logprob_from_logits_ref, masked_logprob_ref
from slim_ops.ops.policy_loss.reference import slim_policy_loss_ref
from slim_ops.testing import assert_close, assert_three_way

BACKENDS = ["torch", "triton"]


@pytest.fixture
def small_torch_tiles(monkeypatch):
    """Force the torch backend through several row and vocabulary chunks on small shapes."""
    monkeypatch.setattr(mlp_op, "TORCH_TILE_ELEMS", 1 << 11)
    monkeypatch.setattr(mlp_op, "TORCH_MAX_ROWS", 5)


def _inputs(N, d, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, d, generator=g) * 0.5).to(dtype)
    w = (torch.randn(V, d, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g)
    return h, w, y, up


def _fp64_reference(h, w, y, up, temperature):
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    logp, ent = masked_logprob_ref(h64, w64, y, temperature)
    (logp * up.double()).sum().backward()
    return logp.detach(), ent, h64.grad, w64.grad


def _run(backend, h, w, y, up, temperature):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    logp, ent = slim_ops.masked_logprob(h, w, y, temperature=temperature, return_entropy=True,
                                        backend=backend)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32 and not ent.requires_grad
    (logp * up).sum().backward()
    return logp.detach(), ent, h.grad, w.grad


@pytest.mark.parametrize("backend", ["torch"])
def test_masked_logprob_under_autocast_keeps_fp32(backend, small_torch_tiles):
    """Under an enclosing torch.autocast (a mixed-precision trainer), forward and backward (here inside the
    autocast region too) compute as written: fp32 inputs give the fp32 result, not bf16-rounded matmuls."""
    h, w, y, up = _inputs(37, 40, 1151, torch.float32)
    exp = _fp64_reference(h, w, y, up, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(backend, h, w, y, up, 1.0)
    for name, a, e in zip(("logp", "entropy", "dhidden", "dweight"), got, exp):
        assert_close(a, e, name=f"{backend} under autocast {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, d, V, temperature", [(37, 40, 1151, 1.0), (1, 24, 1151, 0.7), (5, 16, 200, 1.3)])
def test_masked_logprob_fp32(backend, N, d, V, temperature, small_torch_tiles):
    h, w, y, up = _inputs(N, d, V, torch.float32)
    got = _run(backend, h, w, y, up, temperature)
    exp = _fp64_reference(h, w, y, up, temperature)
    for name, a, e in zip(("logp", "entropy", "dhidden", "dweight"), got, exp):
        assert_close(a, e, name=f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_logprob_low_precision_three_way(backend, dtype, small_torch_tiles):
    N, d, V, T = 21, 32, 1151, 1.0
    h, w, y, up = _inputs(N, d, V, dtype, seed=1)
    got = _run(backend, h, w, y, up, T)
    ref = _fp64_reference(h, w, y, up, T)  # the low-precision inputs, upcast: the fp32 (here fp64) reference
    # the same PyTorch code run in the low precision
    hl = h.clone().requires_grad_()
    wl = w.clone().requires_grad_()
    z = (hl @ wl.t()) / T
    lse = torch.logsumexp(z, -1)
    lp_low = z.gather(1, y[:, None])[:, 0] - lse
    ent_low = lse - (torch.softmax(z, -1) * z).sum(-1)
    (lp_low * up.to(dtype)).sum().backward()
    low = (lp_low.detach(), ent_low.detach(), hl.grad, wl.grad)
    for name, a, e, lo in zip(("logp", "entropy", "dhidden", "dweight"), got, ref, low):
        assert_three_way(a, e, lo, name=f"{backend} {dtype} {name}")
    assert got[2].dtype == dtype and got[3].dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_logprob_no_entropy_and_empty(backend):
    h, w, y, _ = _inputs(3, 16, 70, torch.float32)
    out = slim_ops.masked_logprob(h, w, y, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == (3,)
    assert_close(out, masked_logprob_ref(h, w, y)[0])
    empty = slim_ops.masked_logprob(h[:0], w, y[:0], backend=backend)
    assert empty.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, small_torch_tiles):
    h, w, y, _ = _inputs(4, 16, 50, torch.float32)
    torch.library.opcheck(torch.ops.slim_ops.masked_logprob.default,
                          (h.requires_grad_(), w.requires_grad_(), y, 0.9, True, backend))
    logits = torch.randn(4, 50, requires_grad=True)
    torch.library.opcheck(torch.ops.slim_ops.logprob_from_logits.default, (logits, y, 1.1, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_from_logits(backend, dtype):
    N, V, T = 9, 1151, 0.8
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g)
    lg = logits.clone().requires_grad_()
    lp, ent = slim_ops.logprob_from_logits(lg, y, temperature=T, return_entropy=True, backend=backend)
    (lp * up).sum().backward()
    l64 = logits.double().requires_grad_()
    lr, er = logprob_from_logits_ref(l64, y, T)
    (lr * up.double()).sum().backward()
    assert_close(lp, lr, name="logp")  # fp32 math from the given logits: fp32 tolerance in any dtype
    assert_close(ent, er, name="entropy")
    if dtype == torch.float32:
        assert_close(lg.grad, l64.grad, name="dlogits")
    else:
        ll = logits.clone().requires_grad_()
        lp_low = torch.log_softmax(ll / T, -1).gather(1, y[:, None])[:, 0]
        (lp_low * up.to(dtype)).sum().backward()
        assert_three_way(lg.grad, l64.grad, ll.grad, name="dlogits")
        assert lg.grad.dtype == dtype


def test_backends_agree_on_rows_with_extreme_logits():
    # a row with one dominant logit (p ≈ 1) and a row of equal logits (maximal entropy)
    V = 300
    logits = torch.zeros(2, V)
    logits[0, 7] = 60.0
    y = torch.tensor([7, 3])
    for backend in BACKENDS:
        lp, ent = slim_ops.logprob_from_logits(logits, y, return_entropy=True, backend=backend)
        assert_close(lp, torch.tensor([0.0, -torch.log(torch.tensor(float(V))).item()]), name=backend)
        assert_close(ent, torch.tensor([0.0, torch.log(torch.tensor(float(V))).item()]), name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slim_loss_from_hidden_matches_reference_chain(backend):
    B, L, d, V = 3, 6, 16, 97
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(B, L, generator=g) < 0.5
    mask[0, 0] = True
    n = int(mask.sum())
    h, w, y, _ = _inputs(n, d, V, torch.float32, seed=5)
    old_packed = masked_logprob_ref(h, w, y)[0].detach() + 0.1 * torch.randn(n, generator=g)
    adv = torch.tensor([0.5, -0.4, 1.0])
    wts = torch.tensor([5 / 18, 8 / 18, 5 / 18])
    kw = dict(level="block", block_size=2, kl_coef=0.05)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, metrics, logp = slim_ops.slim_loss_from_hidden(hh, ww, y, old_packed, mask, adv, wts,
                                                          backend=backend, **kw)
    loss.backward()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    lr, er = masked_logprob_ref(hr, wr, y)
    dense = torch.zeros(B, L).masked_scatter(mask, lr)
    old_dense = torch.zeros(B, L).masked_scatter(mask, old_packed)
    ref, ref_m = slim_policy_loss_ref(dense, old_dense, mask, adv, wts, **kw)
    ref.backward()
    assert_close(loss, ref, name="loss")
    assert_close(hh.grad, hr.grad, name="dhidden")
    assert_close(ww.grad, wr.grad, name="dweight")
    assert_close(logp, lr, name="packed logp")
    assert_close(metrics["entropy"], er.mean(), name="entropy")
    for k, v in ref_m.items():
        assert_close(metrics[k], v, name=k)
    # dense logp_old gives the same loss
    loss2, _, _ = slim_ops.slim_loss_from_hidden(h, w, y, old_dense, mask, adv, wts, backend=backend, **kw)
    assert_close(loss2, ref)


def test_validation_messages():
    h, w, y, _ = _inputs(4, 8, 50, torch.float32)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V=50\)"):
        slim_ops.masked_logprob(h, w, torch.tensor([0, 1, 2, 50]))
    with pytest.raises(ValueError, match="weight must be a \\[V, d\\] tensor with d=8"):
        slim_ops.masked_logprob(h, w[:, :4], y)
    with pytest.raises(ValueError, match="weight dtype torch.bfloat16 must match hidden dtype"):
        slim_ops.masked_logprob(h, w.bfloat16(), y)
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor of length N=4"):
        slim_ops.masked_logprob(h, w, y[:3])
    with pytest.raises(ValueError, match="temperature must be a float > 0"):
        slim_ops.masked_logprob(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="labels must be int64 or int32"):
        slim_ops.logprob_from_logits(torch.randn(4, 50), y.float())
    with pytest.raises(RuntimeError, match="op 'masked_logprob' has no 'cuda' backend"):
        slim_ops.masked_logprob(h, w, y, backend="cuda")
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(ValueError, match="hidden has 4 rows but loss_mask selects 3 positions"):
        slim_ops.slim_loss_from_hidden(h, w, y, torch.zeros(4), mask, torch.zeros(2))


def test_triton_masked_logprob_many_row_blocks():
    """More row blocks than one group of the backward's program order (a partial last group), several
    vocabulary tiles and forward splits, against fp64."""
    from slim_ops.ops.masked_logprob.triton import BWD_GROUP, INTERPRET_TILES

    N = (BWD_GROUP + 1) * INTERPRET_TILES[0] + 5
    h, w, y, up = _inputs(N, 16, 300, torch.float32, seed=4)
    got = _run("triton", h, w, y, up, 0.9)
    exp = _fp64_reference(h, w, y, up, 0.9)
    for name, a, e in zip(("logp", "entropy", "dhidden", "dweight"), got, exp, strict=True):
        assert_close(a, e, name=f"triton {name}")


def test_triton_programs_follow_the_device_sm_count(monkeypatch):
    """The forward's program count comes from the device's SM count (not a fixed 132-SM H100)."""
    import slim_ops.ops.masked_logprob.triton as mt

    class Props:
        multi_processor_count = 78

    monkeypatch.setattr(mt, "triton_interpret", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    mt._sm_count.cache_clear()
    try:
        dev = torch.device("cuda", 0)
        assert mt._target_programs(dev) == 2 * 78
        assert mt._splits(128, 1187, dev) == 9  # sqrt(78) + 1 splits: in-flight programs share L2 both ways
        assert mt._splits(4, 1187, dev) == 39  # few row blocks: enough splits for two waves
        assert mt._splits(4, 20, dev) == 20  # never more splits than vocabulary tiles
    finally:
        mt._sm_count.cache_clear()


def test_mm_f32_support_is_detected_once_and_errors_propagate(monkeypatch):
    a = torch.randn(4, 8).bfloat16()
    b = torch.randn(8, 3).bfloat16()
    assert mlp_op.mm_out_dtype_supported("cpu") is False
    out = mlp_op._mm_f32(a, b)
    assert out.dtype == torch.float32
    assert_close(out, a.double() @ b.double(), name="mm f32")
    with pytest.raises(RuntimeError):
        mlp_op._mm_f32(a, torch.randn(5, 3).bfloat16())  # a shape error is an error, not a fallback
    assert_close(mlp_op._mm_f32(a, b), out, name="after an error")
    # where the fp32-output GEMM is declared supported, its own failure reaches the caller
    monkeypatch.setattr(mlp_op, "mm_out_dtype_supported", lambda device_type: True)
    with pytest.raises((RuntimeError, NotImplementedError)):
        mlp_op._mm_f32(a, b)


# --------------------------------------------------------------------------------------------------
# GPU: real vocabularies, every backend against the reference (run by benchmarks/gpu_check.sh)
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("V", [151936, 126464, 152064])
def test_gpu_masked_logprob_real_vocab(V):
    N, d, T = 512, 2560, 1.0
    h, w, y, up = (t.cuda() for t in _inputs(N, d, V, torch.bfloat16, seed=9))
    hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
    lr, er = masked_logprob_ref(hf, wf, y, T)
    (lr * up).sum().backward()
    ref = (lr.detach(), er, hf.grad, wf.grad)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    z = hl @ wl.t()
    lp_low = z.gather(1, y[:, None])[:, 0] - torch.logsumexp(z, -1)
    (lp_low * up.bfloat16()).sum().backward()
    low = (lp_low.detach(), er, hl.grad, wl.grad)
    for backend in ("triton", "torch"):
        got = _run(backend, h, w, y, up, T)
        for name, a, e, lo in zip(("logp", "entropy", "dhidden", "dweight"), got, ref, low):
            if name == "entropy":
                assert_close(a, e, name=f"{backend} entropy")
            else:
                assert_three_way(a, e, lo, name=f"{backend} {name} V={V}")


@pytest.mark.gpu
def test_gpu_mm_f32_uses_the_fp32_output_gemm():
    assert mlp_op.mm_out_dtype_supported("cuda"), "this torch has no aten::mm.dtype CUDA kernel"
    a = torch.randn(256, 512, device="cuda").bfloat16()
    b = torch.randn(512, 128, device="cuda").bfloat16()
    assert_close(mlp_op._mm_f32(a, b), a.double() @ b.double(), dtype=torch.bfloat16, name="mm f32")
    with pytest.raises(RuntimeError):
        mlp_op._mm_f32(a, b.t())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_gpu_logprob_from_logits(backend):
    N, V = 256, 151936
    logits = (torch.randn(N, V, device="cuda") * 4).bfloat16()
    y = torch.randint(0, V, (N,), device="cuda")
    up = torch.randn(N, device="cuda")
    lg = logits.clone().requires_grad_()
    lp, ent = slim_ops.logprob_from_logits(lg, y, return_entropy=True, backend=backend)
    (lp * up).sum().backward()
    lf = logits.float().requires_grad_()
    lr, er = logprob_from_logits_ref(lf, y)
    (lr * up).sum().backward()
    assert_close(lp, lr, name="logp")
    assert_close(ent, er, name="entropy")
    assert_close(lg.grad.float(), lf.grad, dtype=torch.bfloat16, name="dlogits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    # strided rows of logits (a vocabulary slice of a padded buffer), transposed LM head, strided hidden
    N, d, V = 6, 16, 300
    g = torch.Generator().manual_seed(8)
    padded = torch.randn(N, V + 17, generator=g)
    logits = padded[:, :V]
    y = torch.randint(0, V, (N,), generator=g)
    lg = logits.detach().double().requires_grad_()
    lp = slim_ops.logprob_from_logits(logits.requires_grad_(), y, backend=backend)
    lr = logprob_from_logits_ref(lg, y)[0]
    assert_close(lp, lr, name="strided logits")
    lp.sum().backward()
    lr.sum().backward()
    assert_close(logits.grad, lg.grad, name="strided dlogits")
    h = torch.randn(N, 2 * d, generator=g)[:, ::2]
    w = torch.randn(d, V, generator=g).t()
    got = slim_ops.masked_logprob(h, w, y, backend=backend)
    assert_close(got, masked_logprob_ref(h, w, y)[0], name="strided hidden / transposed weight")


def test_masked_logprob_under_torch_compile():
    h, w, y, up = _inputs(5, 16, 70, torch.float32)

    def f(hh, ww):
        return slim_ops.masked_logprob(hh, ww, y, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    (f(h1, w1) * up).sum().backward()
    (compiled(h2, w2) * up).sum().backward()
    assert_close(h2.grad, h1.grad)
    assert_close(w2.grad, w1.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_or_frozen_hidden(backend):
    # only the gradients that are asked for are computed (and they are the same)
    h, w, y, up = _inputs(7, 16, 130, torch.float32)
    hh = h.clone().requires_grad_()
    (slim_ops.masked_logprob(hh, w, y, backend=backend) * up).sum().backward()
    ww = w.clone().requires_grad_()
    (slim_ops.masked_logprob(h, ww, y, backend=backend) * up).sum().backward()
    _, _, dh, dw = _fp64_reference(h, w, y, up, 1.0)
    assert_close(hh.grad, dh, name="dhidden with a frozen head")
    assert_close(ww.grad, dw, name="dweight with frozen hidden states")


def _nvcc() -> str | None:
    import os
    import shutil

    found = shutil.which("nvcc")
    if found:
        return found
    cand = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return cand if os.path.exists(cand) else None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not installed")
def test_cuda_kernel_code_on_host(tmp_path):
    """The CUDA kernels' per-thread code (csrc/logprob) run on the CPU: thread loop, warp-shuffle xor tree and
    block merge emulated in order, every row alignment (16-byte body, scalar head/tail, misaligned output),
    fp32/bf16/fp16, V up to 151936, against a double-precision reference."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    exe = tmp_path / "logprob_host_check"
    build = subprocess.run([_nvcc(), "-O2", "-std=c++17", "--expt-relaxed-constexpr", f"-I{root / 'csrc'}",
                            "-gencode=arch=compute_90a,code=sm_90a",
                            str(root / "csrc" / "logprob" / "logprob_host_check.cu"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("OK"), run.stdout[-3000:]


def test_leading_dimensions_are_flattened():
    h, w, y, _ = _inputs(12, 16, 90, torch.float32)
    lp, ent = slim_ops.masked_logprob(h.reshape(3, 4, 16), w, y.reshape(3, 4), return_entropy=True)
    assert lp.shape == (3, 4) and ent.shape == (3, 4)
    ref_lp, ref_ent = masked_logprob_ref(h, w, y)
    assert_close(lp.reshape(-1), ref_lp)
    assert_close(ent.reshape(-1), ref_ent)
    logits = torch.randn(2, 6, 90)
    out = slim_ops.logprob_from_logits(logits, y.reshape(2, 6))
    assert_close(out.reshape(-1), logprob_from_logits_ref(logits.reshape(12, 90), y)[0])
    with pytest.raises(ValueError, match=r"needs labels of shape \(3, 4\)"):
        slim_ops.masked_logprob(h.reshape(3, 4, 16), w, y)
