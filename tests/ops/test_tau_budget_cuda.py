"""CUDA backend of the decode step (csrc/tau_budget) against the definition in reference.py.

Two layers:
- CPU tests (no GPU needed): csrc/tau_budget/tau_budget_host_check.cu (which includes tau_budget.cu) is compiled
  by nvcc into a host library that runs the kernels' own per-thread scan, warp/block
  combine order, split combine and row selection on the CPU (ex2.approx / logf replaced by the host libm).
  Small shapes, vs reference.py.
- GPU tests (`gpu` marker, run by benchmarks/gpu_check.sh): the real kernels at real sizes (V = 151936,
  K = 16, R = 256, bf16), K = 1 / 7 / 64, non-contiguous and misaligned rows, NaN / inf slots, V-splits,
  int64 offsets, sampling (same tokens as the fp32 Gumbel reference except near-ties, also through the
  public API's seed draw, and a chi-square test). No backend is compared with another.

Selection is checked exactly: commit / num_committed / risk must equal ``select_row_ref`` run on the
kernel's own confidences (fp32 arithmetic in the same order); confidences are compared with the fp32
tolerance (both sides compute in fp32 from identical upcast inputs).
"""

from __future__ import annotations

import ctypes
import math
import subprocess
from pathlib import Path

import pytest
import torch

from slim_ops import _ext
from slim_ops.ops.tau_budget import reference as ref
from slim_ops.testing import assert_close, find_nvcc

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "csrc" / "tau_budget" / "tau_budget_host_check.cu"
STRATEGY_IDS = {"tau_budget": 0, "threshold": 1, "topk": 2}
DTYPE_IDS = _ext.DTYPE_CODES  # the one dtype-code table (csrc/dtype_codes.h)


# ------------------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------------------


def row_params(R: int, tau, m, floor, device="cpu"):
    """Per-row (tau32, bud, floor) as the op passes them to the backends."""
    taus = [tau] * R if isinstance(tau, float) else list(tau)
    ms = [m] * R if isinstance(m, float) else list(m)
    fls = [floor] * R if isinstance(floor, int) else list(floor)
    tau32 = torch.tensor(taus, dtype=torch.float32, device=device)
    bud = torch.tensor(
        [ref.budget(t, mm, f) for t, mm, f in zip(taus, ms, fls)], dtype=torch.float32, device=device
    )
    return tau32, bud, torch.tensor(fls, dtype=torch.int32, device=device), taus, ms, fls


def make_block(R: int, K: int, mask_id: int, p_masked: float = 0.7, gen: torch.Generator | None = None):
    keep = torch.rand(R, K, generator=gen) >= p_masked
    toks = torch.randint(0, 50, (R, K), generator=gen)
    return torch.where(keep, toks, torch.full_like(toks, mask_id))


def tied_logits(R: int, K: int, V: int, dtype: torch.dtype, gen: torch.Generator | None = None):
    """Random logits on a coarse grid (many exact ties, exact in every dtype) with a few sharp slots."""
    z = torch.randint(-40, 12, (R, K, V), generator=gen).to(torch.float32) / 4
    sharp = torch.rand(R, K, generator=gen) < 0.5
    peak = torch.randint(0, V, (R, K), generator=gen)
    z[sharp, peak[sharp]] = 14.0  # confident slots, so that τ-commits happen
    return z.to(dtype)


def check_selection(out, block, mask_id, taus, ms, fls, strategy):
    """commit / num / risk / block_out equal select_row_ref on the kernel's own confidences, exactly."""
    block_out, commit, tokens, conf, num, risk = (t.cpu() for t in out)
    block = block.cpu()
    for r in range(block.shape[0]):
        c_ref, k_ref, risk_ref = ref.select_row_ref(
            conf[r], block[r] == mask_id, taus[r], ms[r], fls[r], strategy
        )
        assert torch.equal(commit[r], c_ref), f"row {r}: commit {commit[r].tolist()} != {c_ref.tolist()}"
        assert int(num[r]) == k_ref, f"row {r}: num_committed {int(num[r])} != {k_ref}"
        assert float(risk[r]) == risk_ref, f"row {r}: risk {float(risk[r])!r} != {risk_ref!r}"
        expect_block = torch.where(c_ref, tokens[r], block[r])
        assert torch.equal(block_out[r], expect_block), f"row {r}: block_out differs"
    invalid = torch.isnan(conf)
    assert torch.all(tokens[invalid] == mask_id), "invalid slots must get token = mask_id"
    assert not torch.any(commit & invalid), "invalid slots must never be committed"


def greedy_expected(logits: torch.Tensor, mask_id: int):
    """fp32 reference of docs/decode.md, 'Candidate token and confidence' for T = 0, vectorised over slots: (tokens,
    confidence, invalid)."""
    z = logits.float()
    invalid = torch.isnan(z).any(-1) | torch.isposinf(z).any(-1) | torch.isneginf(z).all(-1)
    tok = torch.argmax(z, dim=-1)  # first index among equal maxima
    mx = z.max(-1, keepdim=True).values
    conf = 1.0 / torch.exp(z - mx).sum(-1)
    return torch.where(invalid, mask_id, tok), torch.where(invalid, torch.nan, conf), invalid


def sample_expected(logits: torch.Tensor, seed: torch.Tensor, temperature: float, rows_per_chunk: int = 8):
    """fp32 Gumbel-max reference (reference.gumbel_noise).

    Returns (tokens, confidence, score gap best − second best)."""
    R, K, V = logits.shape
    toks, confs, gaps = [], [], []
    for r0 in range(0, R, rows_per_chunk):
        z = logits[r0 : r0 + rows_per_chunk].float().reshape(-1, V)
        slots = torch.arange(r0 * K, r0 * K + z.shape[0], device=z.device)
        g = ref.gumbel_noise(seed.to(z.device), slots, V)
        zt = z / temperature
        score = zt + g
        top = score.topk(2, dim=-1)
        tok = torch.argmax(score, dim=-1)  # first index among equal maxima
        p = torch.softmax(zt, dim=-1).gather(1, tok[:, None])[:, 0]
        toks.append(tok)
        confs.append(p)
        gaps.append(top.values[:, 0] - top.values[:, 1])
    return (torch.cat(toks).reshape(R, K), torch.cat(confs).reshape(R, K), torch.cat(gaps).reshape(R, K))


def check_sampled_tokens(tokens: torch.Tensor, expected: torch.Tensor, gap: torch.Tensor, near: float = 1e-4):
    """Equal tokens except where the reference's best two scores are within `near` (rounding of log/div)."""
    differ = tokens.cpu() != expected.cpu()
    near_tie = gap.cpu() <= near
    bad = differ & ~near_tie
    assert not bad.any(), (
        f"{int(bad.sum())} sampled tokens differ away from near-ties, first at {bad.nonzero()[0]}"
    )
    assert int(near_tie.sum()) <= max(2, tokens.numel() // 100), "too many near-ties for a meaningful check"


def chi2_uniformity(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = n * probs
    return float(((counts - expected) ** 2 / expected).sum())


# ------------------------------------------------------------------------------------------------------------
# CPU: host emulation of the kernels' code
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the host emulation of csrc/tau_budget needs it")
    lib = tmp_path_factory.mktemp("tau_budget_emu") / "tau_budget_emu.so"
    cmd = [
        nvcc,
        "-shared",
        "-Xcompiler",
        "-fPIC",
        "-O2",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        f"-I{ROOT / 'csrc'}",
        "-gencode=arch=compute_90a,code=compute_90a",
        str(SRC),
        "-o",
        str(lib),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"host emulation build failed:\n{p.stderr[-3000:]}"
    so = ctypes.CDLL(str(lib))
    P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    so.slim_ops_tau_budget_step_emu.argtypes = [
        P,
        I32,
        I64,
        I64,
        I64,
        I64,
        I64,
        P,
        I64,
        P,
        P,
        P,
        P,
        F32,
        I32,
        I32,
        P,
        P,
        P,
        P,
        P,
        P,
    ]
    so.slim_ops_tau_budget_step_emu.restype = I32
    so.slim_ops_tau_budget_select_emu.argtypes = [P, P, I64, I64, P, P, P, I32, P, P, P]
    so.slim_ops_tau_budget_select_emu.restype = I32
    return so


def emu_step(so, logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy_id, splits=1):
    R, K, V = logits.shape
    assert logits.stride(-1) == 1
    block = block.contiguous()
    outs = (
        torch.full((R, K), -7, dtype=torch.int64),
        torch.ones(R, K, dtype=torch.bool),
        torch.full((R, K), -7, dtype=torch.int64),
        torch.full((R, K), -1.0),
        torch.full((R,), -7, dtype=torch.int32),
        torch.full((R,), -1.0),
    )
    rc = so.slim_ops_tau_budget_step_emu(
        logits.data_ptr(),
        DTYPE_IDS[logits.dtype],
        R,
        K,
        V,
        logits.stride(0),
        logits.stride(1),
        block.data_ptr(),
        mask_id,
        tau32.data_ptr(),
        bud.data_ptr(),
        floor.data_ptr(),
        seed.data_ptr(),
        temperature,
        strategy_id,
        splits,
        *(o.data_ptr() for o in outs),
    )
    assert rc == 0
    return outs


def ref_step(logits, block, mask_id, taus, ms, fls, temperature, seed, strategy):
    return ref.tau_budget_step_ref(
        logits,
        block,
        mask_id,
        tau=torch.tensor(taus, dtype=torch.float64),
        m=torch.tensor(ms, dtype=torch.float64),
        floor=torch.tensor(fls),
        temperature=temperature,
        seed=seed,
        strategy=strategy,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["tau_budget", "threshold", "topk"])
def test_emu_greedy_matches_reference(emu, dtype, strategy):
    gen = torch.Generator().manual_seed(1)
    R, K, V, mask_id = 3, 7, 1151, 1150
    base = tied_logits(R, K + 1, V + 3, dtype, gen)
    logits = base[
        :, 1:, 1 : V + 1
    ]  # odd row stride, start off 16-byte alignment: scalar head + vector body + tail
    block = make_block(R, K, mask_id, gen=gen)
    tau32, bud, fl, taus, ms, fls = row_params(R, [0.9, 0.5, 0.75], [1.0, 0.0, 2.0], [1, 2, 0])
    seed = torch.zeros(1, dtype=torch.int64)
    out = emu_step(emu, logits, block, mask_id, tau32, bud, fl, seed, 0.0, STRATEGY_IDS[strategy], splits=2)
    exp = ref_step(logits, block, mask_id, taus, ms, fls, 0.0, seed, strategy)
    assert torch.equal(out[2], exp[2]), "greedy tokens differ from the reference"
    assert_close(out[3], exp[3], name="confidence")
    check_selection(out, block, mask_id, taus, ms, fls, strategy)
    assert out[1].any(), "nothing committed: the test data lost its purpose"


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.7])
def test_emu_sampling_matches_reference(emu, temperature):
    gen = torch.Generator().manual_seed(2)
    R, K, V, mask_id = 2, 5, 777, 3
    logits = (torch.randn(R, K, V, generator=gen) * 3).to(torch.bfloat16)
    block = make_block(R, K, mask_id, gen=gen)
    tau32, bud, fl, taus, ms, fls = row_params(R, 0.9, 1.0, 1)
    seed = torch.tensor([-0x1234_5678_9ABC_DEF1], dtype=torch.int64)
    out = emu_step(emu, logits, block, mask_id, tau32, bud, fl, seed, temperature, 0, splits=3)
    exp_tok, exp_conf, gap = sample_expected(logits, seed, temperature)
    check_sampled_tokens(out[2], exp_tok, gap)
    same = out[2] == exp_tok
    assert_close(out[3][same], exp_conf[same], name="confidence")
    check_selection(out, block, mask_id, taus, ms, fls, "tau_budget")
    e2e = ref_step(logits, block, mask_id, taus, ms, fls, temperature, seed, "tau_budget")
    assert torch.equal(out[2][same], e2e[2][same])


# A seed whose top RNG bits are all ones at slot 0, v = 127: the uniform must stay below 1 there (an earlier
# definition rounded it to 1, g = +inf, and v = 127 then won whatever the logits); a logit of 40 must win.
U1_SEED, U1_V = 16053, 127


def unit_uniform_case(device="cpu"):
    V = 512
    logits = torch.zeros(1, 1, V, device=device)
    logits[0, 0, 124] = 40.0  # same 16-byte vector as v = 127, visited first
    seed = torch.tensor([U1_SEED], dtype=torch.int64, device=device)
    g = ref.gumbel_noise(seed.cpu(), torch.tensor([0]), V)[0]
    assert torch.isfinite(g).all() and g[U1_V] > 15.0  # the largest noise the definition can give
    block = torch.zeros(1, 1, dtype=torch.int64, device=device)
    exp = ref_step(logits.cpu(), block.cpu(), 0, [0.9], [1.0], [1], 1.0, seed.cpu(), "tau_budget")
    assert int(exp[2][0, 0]) == 124
    return logits, block, seed, exp


def test_emu_sampling_unit_uniform(emu):
    logits, block, seed, exp = unit_uniform_case()
    tau32, bud, fl, *_ = row_params(1, 0.9, 1.0, 1)
    out = emu_step(emu, logits, block, 0, tau32, bud, fl, seed, 1.0, 0)
    assert int(out[2][0, 0]) == int(exp[2][0, 0]) == 124
    assert_close(out[3], exp[3], name="confidence")


def test_emu_invalid_slots(emu):
    R, K, V, mask_id = 2, 6, 300, 299
    logits = torch.randn(R, K, V)
    logits[0, 0, 17] = math.nan
    logits[0, 1, 299] = math.inf
    logits[0, 2] = -math.inf
    logits[0, 3, :] = -math.inf
    logits[0, 3, 5] = 2.0  # one finite value: valid, certain
    logits[1, 4, 100:] = -math.inf  # partly -inf: valid
    block = torch.full((R, K), mask_id)
    tau32, bud, fl, taus, ms, fls = row_params(R, 0.9, 1.0, 6)
    for temperature in (0.0, 0.7):
        seed = torch.tensor([99], dtype=torch.int64)
        out = emu_step(emu, logits, block, mask_id, tau32, bud, fl, seed, temperature, 0, splits=2)
        for j in range(3):
            assert int(out[2][0, j]) == mask_id and math.isnan(out[3][0, j]) and not out[1][0, j]
        assert int(out[2][0, 3]) == 5 and float(out[3][0, 3]) == 1.0
        assert int(out[2][1, 4]) < 100
        assert int(out[4][0]) == 3, "floor 6 is clamped to the 3 valid masked slots"
        check_selection(out, block, mask_id, taus, ms, fls, "tau_budget")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "posinf", "neginf"])
def test_emu_special_value_at_every_position(emu, dtype, value):
    """Slot i holds `value` at position i: every thread of the 256-thread block, every lane of its 16-byte vectors,
    the scalar head and tail, and both V-splits see it once; the split / warp / block merges must keep it."""
    gen = torch.Generator().manual_seed(17)
    V = 1029 if dtype == torch.float32 else 2051  # > 256 threads x (16 bytes / element size) lanes
    K = 64
    R = (V + K - 1) // K
    base = (torch.randn(R * K * V + 8, generator=gen) * 2).to(dtype)
    logits = base[1 : 1 + R * K * V].view(R, K, V)  # rows one element past 16-byte alignment
    flat = logits.view(R * K, V)
    pos = torch.arange(R * K) % V
    flat[torch.arange(R * K), pos] = value
    mask_id = V - 1
    block = torch.full((R, K), mask_id)
    tau32, bud, fl, taus, ms, fls = row_params(R, 0.9, 1.0, 2)
    seed = torch.tensor([0x5EED], dtype=torch.int64)
    for temperature, splits in ((0.0, 1), (0.0, 2), (0.8, 2)):
        out = emu_step(emu, logits, block, mask_id, tau32, bud, fl, seed, temperature, 0, splits=splits)
        if temperature == 0.0:
            tok, conf, invalid = greedy_expected(logits, mask_id)
            assert torch.equal(out[2], tok), "greedy tokens differ from the reference"
        else:
            tok, conf, gap = sample_expected(logits, seed, temperature)
            z = logits.float()
            invalid = torch.isnan(z).any(-1) | torch.isposinf(z).any(-1) | torch.isneginf(z).all(-1)
            tok = torch.where(invalid, mask_id, tok)
            conf = torch.where(invalid, math.nan, conf)
            check_sampled_tokens(torch.where(invalid, mask_id, out[2]), tok, torch.where(invalid, 1.0, gap))
        assert torch.equal(torch.isnan(out[3]), invalid), "invalid-slot pattern differs from the reference"
        assert bool(invalid.all()) == (not math.isinf(value) or value > 0)
        same = out[2] == tok
        assert_close(out[3][same], conf[same], name="confidence")
        check_selection(out, block, mask_id, taus, ms, fls, "tau_budget")


def test_emu_splits_agree(emu):
    gen = torch.Generator().manual_seed(3)
    R, K, V, mask_id = 2, 3, 4099, 0
    logits = tied_logits(R, K, V, torch.bfloat16, gen)
    block = torch.full((R, K), mask_id)
    tau32, bud, fl, *_ = row_params(R, 0.9, 1.0, 1)
    seed = torch.tensor([5], dtype=torch.int64)
    for temperature in (0.0, 1.0):
        outs = [
            emu_step(emu, logits, block, mask_id, tau32, bud, fl, seed, temperature, 0, splits=s)
            for s in (1, 2, 7, 64)
        ]
        for o in outs[1:]:
            assert torch.equal(o[2], outs[0][2])
            assert_close(o[3], outs[0][3], name="confidence across splits")


def test_emu_sampling_distribution(emu):
    V = 8
    z = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 1.5])
    R, K, T = 128, 64, 1.3
    logits = z.view(1, 1, V).expand(R, K, V)  # stride-0 rows
    block = torch.zeros(R, K, dtype=torch.int64)
    tau32, bud, fl, *_ = row_params(R, 0.9, 1.0, 1)
    seed = torch.tensor([123456789], dtype=torch.int64)
    out = emu_step(emu, logits, block, 7, tau32, bud, fl, seed, T, 0)
    counts = torch.bincount(out[2].flatten(), minlength=V).double()
    probs = torch.softmax(z.double() / T, 0)
    assert chi2_uniformity(counts, probs) < 29.0  # χ²(7) p ≈ 1.4e-4
    assert_close(out[3], probs[out[2]].float(), name="sampled confidence")


WORKED_EXAMPLES = [  # (c, masked, tau, m, floor, {strategy: commit set})
    (
        [0.97, 0.95, 0.40, 0.99, 0.92, 0.10, 0.96, 0.60],
        None,
        0.9,
        1.0,
        1,
        {"tau_budget": {0, 3, 6}, "threshold": {0, 1, 3, 4, 6}, "topk": {3}},
    ),
    (
        [0.999, 0.999, 0.999, 0.50, 0.85, 0.30, 0.90, 0.20],
        [0, 0, 0, 1, 1, 1, 1, 1],
        0.9,
        1.0,
        1,
        {"tau_budget": {6}, "threshold": {6}, "topk": {6}},
    ),
    (
        [0.99, 0.50, 0.40, 0.95, 0.30, 0.20, 0.10, 0.60],
        None,
        0.9,
        1.0,
        4,
        {"tau_budget": {0, 3, 7, 1}, "threshold": {0, 3, 7, 1}, "topk": {0, 3, 7, 1}},
    ),
    ([0.95, 0.95, 0.95, 0.30], None, 0.9, 1.0, 1, {"tau_budget": {0}}),
    (
        [0.99, 0.98, 0.95, 0.93, 0.92, 0.91, 0.50, 0.40, 0.30, 0.20, 0.85, 0.10, 0.97, 0.05, 0.60, 0.70],
        None,
        0.9,
        0.0,
        4,
        {"tau_budget": {0, 1, 2, 3, 4, 5, 12}},
    ),
    (
        [0.99, 0.98, 0.95, 0.93, 0.92, 0.91, 0.50, 0.40, 0.30, 0.20, 0.85, 0.10, 0.97, 0.05, 0.60, 0.70],
        None,
        0.9,
        1.0,
        4,
        {"tau_budget": {0, 1, 2, 12}},
    ),
    ([0.99, 0.98], [0, 0], 0.9, 1.0, 1, {"tau_budget": set(), "threshold": set(), "topk": set()}),
]


def _spec_cases():
    for i, (c, masked, tau, m, f, sets) in enumerate(WORKED_EXAMPLES):
        for strategy, expect in sets.items():
            yield pytest.param(c, masked, tau, m, f, strategy, expect, id=f"ex{i + 1}-{strategy}")


def emu_select(so, conf, masked, tau32, bud, floor, strategy_id):
    R, K = conf.shape
    commit = torch.ones(R, K, dtype=torch.bool)
    num = torch.full((R,), -7, dtype=torch.int32)
    risk = torch.full((R,), -1.0)
    rc = so.slim_ops_tau_budget_select_emu(
        conf.contiguous().data_ptr(),
        masked.contiguous().data_ptr(),
        R,
        K,
        tau32.data_ptr(),
        bud.data_ptr(),
        floor.data_ptr(),
        strategy_id,
        commit.data_ptr(),
        num.data_ptr(),
        risk.data_ptr(),
    )
    assert rc == 0
    return commit, num, risk


@pytest.mark.parametrize("c,masked,tau,m,f,strategy,expect", list(_spec_cases()))
def test_emu_select_spec_examples(emu, c, masked, tau, m, f, strategy, expect):
    conf = torch.tensor([c], dtype=torch.float32)
    msk = (
        torch.ones_like(conf, dtype=torch.bool)
        if masked is None
        else torch.tensor([masked], dtype=torch.bool)
    )
    tau32, bud, fl, *_ = row_params(1, tau, m, f)
    commit, num, risk = emu_select(emu, conf, msk, tau32, bud, fl, STRATEGY_IDS[strategy])
    assert set(commit[0].nonzero().flatten().tolist()) == expect
    _, k_ref, risk_ref = ref.select_row_ref(conf[0], msk[0], tau, m, f, strategy)
    assert int(num[0]) == k_ref == len(expect) and float(risk[0]) == risk_ref


def test_emu_select_random_rows(emu):
    gen = torch.Generator().manual_seed(4)
    R, K = 40, 64
    conf = torch.rand(R, K, generator=gen) ** 0.1
    conf[:, ::5] = conf[:, 1::5][:, : conf[:, ::5].shape[1]]  # exact ties between slots
    conf[3, 7] = math.nan
    masked = torch.rand(R, K, generator=gen) < 0.8
    taus = (0.5 + 0.49 * torch.rand(R, generator=gen)).tolist()
    ms = (3 * torch.rand(R, generator=gen)).tolist()
    ms[::4] = [0.0] * len(ms[::4])
    fls = torch.randint(0, 9, (R,), generator=gen).tolist()
    tau32, bud, fl, *_ = row_params(R, taus, ms, fls)
    for strategy, sid in STRATEGY_IDS.items():
        commit, num, risk = emu_select(emu, conf, masked, tau32, bud, fl, sid)
        for r in range(R):
            c_ref, k_ref, risk_ref = ref.select_row_ref(conf[r], masked[r], taus[r], ms[r], fls[r], strategy)
            assert torch.equal(commit[r], c_ref) and int(num[r]) == k_ref and float(risk[r]) == risk_ref, (
                f"{strategy} row {r}"
            )


@pytest.mark.parametrize("slots,vocab", [(4096, 151936), (1100, 151936), (64, 151936), (1, 262144), (16, 4096),
                                         (131072, 8), (300, 1151)])
def test_choose_splits(slots, vocab):
    from slim_ops.ops.tau_budget.cuda import _MAX_SPLITS, _MIN_SPLIT, choose_splits

    resident = 132 * 8
    s = choose_splits(slots, vocab, resident)
    assert 1 <= s <= _MAX_SPLITS and (s == 1 or vocab // s >= _MIN_SPLIT)
    fill = lambda k: slots * k / resident / math.ceil(slots * k / resident)  # noqa: E731
    limit = max(1, min(vocab // _MIN_SPLIT, _MAX_SPLITS))
    assert fill(s) >= 0.9 or all(fill(k) <= fill(s) for k in range(1, limit + 1))
    assert all(fill(k) < 0.9 for k in range(1, s)), "not the fewest splits that fill the last wave"


# ------------------------------------------------------------------------------------------------------------
# GPU: the real kernels (benchmarks/gpu_check.sh)
# ------------------------------------------------------------------------------------------------------------


def cuda_step(*args, **kw):
    from slim_ops.ops.tau_budget.cuda import tau_budget_step_cuda

    return tau_budget_step_cuda(*args, **kw)


def gpu_case(R, K, V, dtype, *, mask_id=151669, p_masked=0.7, scale=4.0, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(R, K, V, device="cuda", generator=gen) * scale).to(dtype)
    peak = torch.randint(0, V, (R, K), device="cuda", generator=gen)
    sharp = torch.rand(R, K, device="cuda", generator=gen) < 0.6
    logits.view(R * K, V)[sharp.flatten().nonzero().flatten(), peak.flatten()[sharp.flatten()]] = 30.0
    block = make_block(R, K, mask_id, p_masked).cuda()
    return logits, block


@pytest.mark.gpu
@pytest.mark.parametrize(
    "R,K,dtype",
    [(256, 16, torch.bfloat16), (64, 1, torch.bfloat16), (33, 7, torch.float16), (16, 64, torch.float32)],
)
def test_gpu_greedy_real_vocab(R, K, dtype):
    V, mask_id = 151936, 151669
    logits, block = gpu_case(R, K, V, dtype)
    tau32, bud, fl, taus, ms, fls = row_params(R, 0.9, 1.0, 1, device="cuda")
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = cuda_step(logits, block, mask_id, tau32, bud, fl, seed, 0.0, 0)
    tok, conf, _ = greedy_expected(logits, mask_id)
    assert torch.equal(out[2], tok), "greedy tokens differ from argmax (lowest index among equal maxima)"
    assert_close(out[3], conf, name="confidence")
    check_selection(out, block, mask_id, taus, ms, fls, "tau_budget")
    e2e = ref_step(
        logits[:2].cpu(), block[:2].cpu(), mask_id, taus[:2], ms[:2], fls[:2], 0.0, None, "tau_budget"
    )
    assert torch.equal(out[2][:2].cpu(), e2e[2])
    assert_close(out[3][:2], e2e[3], name="confidence vs tau_budget_step_ref")


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["threshold", "topk"])
def test_gpu_other_strategies_per_row_params(strategy):
    R, K, V, mask_id = 64, 16, 151936, 151669
    logits, block = gpu_case(R, K, V, torch.bfloat16, seed=1)
    taus = [0.5 + 0.45 * (r % 10) / 10 for r in range(R)]
    ms = [float(r % 3) for r in range(R)]
    fls = [r % 5 for r in range(R)]
    tau32, bud, fl, *_ = row_params(R, taus, ms, fls, device="cuda")
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = cuda_step(logits, block, mask_id, tau32, bud, fl, seed, 0.0, STRATEGY_IDS[strategy])
    check_selection(out, block, mask_id, taus, ms, fls, strategy)


@pytest.mark.gpu
def test_gpu_non_contiguous_and_misaligned_rows():
    R, K, V, mask_id = 16, 16, 151936, 151669
    big, block = gpu_case(R, K + 2, V + 5, torch.bfloat16, seed=2)
    block = block[:, :K].contiguous()
    slot_major, _ = gpu_case(K, R, V, torch.bfloat16, seed=9)
    views = [
        big[:, 1 : K + 1, 3 : V + 3],  # misaligned start, odd strides: scalar head, vector body, scalar tail
        big[:, :K, :V],  # row stride V + 5
        slot_major.transpose(0, 1),  # [R, K, V] view of a [K, R, V] tensor
    ]
    tau32, bud, fl, taus, ms, fls = row_params(R, 0.9, 1.0, 1, device="cuda")
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    for logits in views:
        out = cuda_step(logits, block, mask_id, tau32, bud, fl, seed, 0.0, 0)
        tok, conf, _ = greedy_expected(logits, mask_id)
        assert torch.equal(out[2], tok)
        assert_close(out[3], conf, name="confidence")
        check_selection(out, block, mask_id, taus, ms, fls, "tau_budget")


@pytest.mark.gpu
def test_gpu_invalid_slots():
    R, K, V, mask_id = 4, 8, 151936, 151669
    logits, _ = gpu_case(R, K, V, torch.bfloat16, seed=3)
    logits[0, 0, 1234] = math.nan
    logits[0, 1, V - 1] = math.inf
    logits[0, 2] = -math.inf
    logits[1, 3] = -math.inf
    logits[1, 3, 77] = 0.0
    logits[2, 4, 9:] = -math.inf
    block = torch.full((R, K), mask_id, device="cuda")
    tau32, bud, fl, taus, ms, fls = row_params(R, 0.9, 1.0, 8, device="cuda")
    for temperature in (0.0, 1.0):
        seed = torch.tensor([7], dtype=torch.int64, device="cuda")
        out = cuda_step(logits, block, mask_id, tau32, bud, fl, seed, temperature, 0)
        tok, conf = out[2].cpu(), out[3].cpu()
        for j in range(3):
            assert int(tok[0, j]) == mask_id and math.isnan(conf[0, j]) and not bool(out[1][0, j])
        assert int(tok[1, 3]) == 77 and float(conf[1, 3]) == 1.0
        assert int(tok[2, 4]) < 9
        assert int(out[4][0]) == K - 3
        check_selection(out, block, mask_id, taus, ms, fls, "tau_budget")


@pytest.mark.gpu
def test_gpu_splits_and_small_grid():
    from slim_ops.ops.tau_budget.cuda import num_splits

    R, K, V, mask_id = 1, 1, 262144, 0
    logits, _ = gpu_case(R, K, V, torch.bfloat16, seed=4, mask_id=mask_id)
    block = torch.zeros(R, K, dtype=torch.int64, device="cuda")
    assert num_splits(R * K, V, logits.device) > 1
    tau32, bud, fl, *_ = row_params(R, 0.9, 1.0, 1, device="cuda")
    for temperature in (0.0, 0.7):
        seed = torch.tensor([11], dtype=torch.int64, device="cuda")
        if temperature == 0.0:
            tok, conf, _ = greedy_expected(logits, mask_id)
        else:
            tok, conf, gap = sample_expected(logits, seed, temperature)
        for splits in (None, 1):  # the V-split combine and one block per slot, each against the reference
            kw = {} if splits is None else {"splits": splits}
            out = cuda_step(logits, block, mask_id, tau32, bud, fl, seed, temperature, 0, **kw)
            if temperature == 0.0:
                assert torch.equal(out[2], tok), f"splits={splits}: greedy token differs from the fp32 argmax"
            else:
                check_sampled_tokens(out[2], tok, gap)
            same = out[2] == tok
            assert_close(out[3][same], conf[same], name=f"confidence (splits={splits}) vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gpu_sampling_matches_reference(temperature):
    R, K, V, mask_id = 64, 16, 151936, 151669
    logits, block = gpu_case(R, K, V, torch.bfloat16, seed=5, scale=2.0)
    tau32, bud, fl, taus, ms, fls = row_params(R, 0.9, 1.0, 1, device="cuda")
    seed = torch.tensor([0x0123_4567_89AB_CDEF], dtype=torch.int64, device="cuda")
    out = cuda_step(logits, block, mask_id, tau32, bud, fl, seed, temperature, 0)
    tok, conf, gap = sample_expected(logits, seed, temperature)
    check_sampled_tokens(out[2], tok, gap)
    same = out[2] == tok
    assert_close(out[3][same], conf[same], name="sampled confidence")
    check_selection(out, block, mask_id, taus, ms, fls, "tau_budget")


@pytest.mark.gpu
def test_gpu_sampling_unit_uniform():
    logits, block, seed, exp = unit_uniform_case("cuda")
    tau32, bud, fl, *_ = row_params(1, 0.9, 1.0, 1, device="cuda")
    out = cuda_step(logits, block, 0, tau32, bud, fl, seed, 1.0, 0)
    assert int(out[2][0, 0]) == int(exp[2][0, 0]) == 124
    assert_close(out[3], exp[3], name="confidence")


@pytest.mark.gpu
def test_gpu_sampling_public_api_follows_reference_stream():
    """slim_ops.tau_budget_step(backend="cuda") draws one int64 seed from the generator; its tokens follow the
    reference's counter-based stream for that seed (exact away from near-ties)."""
    import slim_ops

    R, K, V, mask_id = 16, 16, 151936, 151669
    logits, block = gpu_case(R, K, V, torch.bfloat16, seed=6, scale=2.0)
    gen = torch.Generator(device="cuda").manual_seed(2024)
    out = slim_ops.tau_budget_step(logits, block, mask_id, temperature=1.0, generator=gen, backend="cuda")
    seed = torch.randint(
        -(2**63),
        2**63 - 1,
        (1,),
        generator=torch.Generator(device="cuda").manual_seed(2024),
        device="cuda",
        dtype=torch.int64,
    )
    tok, conf, gap = sample_expected(logits, seed, 1.0)
    check_sampled_tokens(out.tokens, tok, gap)
    same = out.tokens == tok
    assert_close(out.confidence[same], conf[same], name="confidence vs reference")


@pytest.mark.gpu
def test_gpu_sampling_distribution():
    V = 8
    z = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 1.5], device="cuda")
    R, K, T = 2048, 64, 0.8
    logits = z.view(1, 1, V).expand(R, K, V)
    block = torch.zeros(R, K, dtype=torch.int64, device="cuda")
    tau32, bud, fl, *_ = row_params(R, 0.9, 1.0, 1, device="cuda")
    seed = torch.tensor([31337], dtype=torch.int64, device="cuda")
    out = cuda_step(logits, block, 7, tau32, bud, fl, seed, T, 0)
    counts = torch.bincount(out[2].flatten(), minlength=V).double().cpu()
    probs = torch.softmax(z.double().cpu() / T, 0)
    assert chi2_uniformity(counts, probs) < 29.0  # χ²(7) p ≈ 1.4e-4, fixed seed


@pytest.mark.gpu
def test_gpu_int64_offsets():
    R, K, V, mask_id = 1024, 16, 151936, 151669  # R·K·V = 2.49e9 elements > 2^31
    logits = torch.empty(R, K, V, dtype=torch.bfloat16, device="cuda")
    logits.normal_(0, 4, generator=torch.Generator(device="cuda").manual_seed(8))
    logits[-1, :, 4242] = 40.0
    block = torch.full((R, K), mask_id, device="cuda")
    tau32, bud, fl, taus, ms, fls = row_params(R, 0.9, 1.0, 1, device="cuda")
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = cuda_step(logits, block, mask_id, tau32, bud, fl, seed, 0.0, 0)
    tail = slice(R - 4, R)
    tok, conf, _ = greedy_expected(logits[tail], mask_id)
    assert torch.equal(out[2][tail], tok)
    assert torch.all(out[2][-1] == 4242)
    assert_close(out[3][tail], conf, name="confidence (last rows)")
    del logits


@pytest.mark.gpu
@pytest.mark.parametrize("c,masked,tau,m,f,strategy,expect", list(_spec_cases()))
def test_gpu_select_spec_examples(c, masked, tau, m, f, strategy, expect):
    from slim_ops.ops.tau_budget.cuda import tau_budget_select_cuda

    conf = torch.tensor([c], dtype=torch.float32, device="cuda")
    if masked is None:
        msk = torch.ones_like(conf, dtype=torch.bool)
    else:
        msk = torch.tensor([masked], dtype=torch.bool, device="cuda")
    tau32, bud, fl, *_ = row_params(1, tau, m, f, device="cuda")
    commit, num, risk = tau_budget_select_cuda(conf, msk, tau32, bud, fl, STRATEGY_IDS[strategy])
    assert set(commit[0].nonzero().flatten().tolist()) == expect
    _, k_ref, risk_ref = ref.select_row_ref(conf[0].cpu(), msk[0].cpu(), tau, m, f, strategy)
    assert int(num[0]) == k_ref and float(risk[0]) == risk_ref
