"""C++ CPU backend (``cpp``) of the decode step (csrc/tau_budget/tau_budget_cpu.cpp) against reference.py.

Every instruction-set variant this CPU runs (baseline / AVX2 / AVX-512) is exercised through the extension with
poisoned output buffers. Greedy tokens, commits, num_committed, risk and the new block must equal the reference
exactly; confidences match within the fp32 tolerance. Sampling tokens must equal the reference's Gumbel-max
argmax (same counter-based RNG bits) wherever the reference's best two scores are more than 1e-5 apart (closer
ones depend on the last bit of libm's log); selection must equal select_row_ref on the kernel's confidences.
"""

from __future__ import annotations

import math

import pytest
import torch

import slim_ops
from slim_ops import _backend, _ext
from slim_ops.ops.tau_budget import reference as ref
from slim_ops.ops.tau_budget.cpu import supported_isas, tau_budget_select_cpu, tau_budget_step_cpu
from slim_ops.ops.tau_budget.op import _params
from slim_ops.testing import assert_close, poison_like

pytestmark = pytest.mark.skipif(_ext.extension() is None or not hasattr(_ext.extension(), "tau_budget_step_cpu"),
                                reason="slim_ops._C (CPU kernels) is not built")

STRATEGIES = {"tau_budget": 0, "threshold": 1, "topk": 2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ISAS = supported_isas()


def run_ext(logits, block, mask_id, tau32, bud, floor, seed, temperature, strategy, *, threads=2, isa="auto"):
    """The extension called directly with poisoned outputs (so an unwritten element fails the comparison)."""
    R, K, V = logits.shape
    outs = (poison_like(torch.empty(R, K, dtype=torch.int64)), poison_like(torch.empty(R, K, dtype=torch.bool)),
            poison_like(torch.empty(R, K, dtype=torch.int64)), poison_like(torch.empty(R, K)),
            poison_like(torch.empty(R, dtype=torch.int32)), poison_like(torch.empty(R)))
    from slim_ops.ops.tau_budget.cpu import ISAS as codes

    rc = _ext.extension().tau_budget_step_cpu(
        logits.data_ptr(), _ext.DTYPE_CODES[logits.dtype], R, K, V, logits.stride(0), logits.stride(1),
        block.contiguous().data_ptr(), mask_id, tau32.data_ptr(), bud.data_ptr(), floor.data_ptr(), seed.data_ptr(),
        temperature, STRATEGIES[strategy], threads, codes[isa], *(o.data_ptr() for o in outs))
    assert rc == 0, _ext.extension().cpu_error_string(rc)
    return outs


def row_params(R, gen):
    """Per-row tau / m / floor (tensors, as a caller passes them) and what the op hands the backends."""
    tau = torch.rand(R, generator=gen, dtype=torch.float64) * 0.5 + 0.45
    m = torch.where(torch.rand(R, generator=gen) < 0.3, 0.0, torch.rand(R, generator=gen, dtype=torch.float64) * 3)
    floor = torch.randint(0, 4, (R,), generator=gen)
    tau32, bud, fl = _params("test", R, torch.device("cpu"), tau, m, floor)
    return tau, m, floor, tau32, bud, fl


def tied_logits(R, K, V, dtype, gen):
    """Random logits on a coarse grid (exact ties in every dtype) with a few confident slots."""
    z = torch.randint(-40, 12, (R, K, V), generator=gen).to(torch.float32) / 4
    sharp = torch.rand(R, K, generator=gen) < 0.5
    peak = torch.randint(0, V, (R, K), generator=gen)
    z[sharp, peak[sharp]] = 14.0
    return z.to(dtype)


def make_block(R, K, mask_id, gen, p_masked=0.7):
    keep = torch.rand(R, K, generator=gen) >= p_masked
    return torch.where(keep, torch.randint(0, 50, (R, K), generator=gen), torch.full((R, K), mask_id))


def check_step_vs_reference(out, logits, block, mask_id, tau, m, floor, strategy, temperature=0.0, seed=None):
    exp = ref.tau_budget_step_ref(logits, block, mask_id, tau=tau, m=m, floor=floor, temperature=temperature,
                                  seed=seed, strategy=strategy)
    names = ("block", "commit", "tokens", "confidence", "num_committed", "risk")
    for name, got, want in zip(names, out, exp):
        if name == "confidence":
            assert_close(got, want, name=name)
        elif name == "risk":
            assert_close(got, want, name=name, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(got, want.to(got.dtype)), f"{name}: {got.tolist()} != reference {want.tolist()}"
    check_selection_exact(out, block, mask_id, tau, m, floor, strategy)


def check_selection_exact(out, block, mask_id, tau, m, floor, strategy):
    """commit / num / risk / block equal select_row_ref on the kernel's own confidences, bit for bit."""
    block_out, commit, tokens, conf, num, risk = out
    for r in range(block.shape[0]):
        c_ref, k_ref, risk_ref = ref.select_row_ref(conf[r], block[r] == mask_id, float(tau[r]), float(m[r]),
                                                    int(floor[r]), strategy)
        assert torch.equal(commit[r], c_ref), f"row {r}: commit {commit[r].tolist()} != {c_ref.tolist()}"
        assert int(num[r]) == k_ref and float(risk[r]) == risk_ref, f"row {r}: ({int(num[r])}, {float(risk[r])})"
        assert torch.equal(block_out[r], torch.where(c_ref, tokens[r], block[r]))
    invalid = torch.isnan(conf)
    assert torch.all(tokens[invalid] == mask_id) and not torch.any(commit & invalid)


def sample_expected(logits, seed, temperature):
    """fp32 Gumbel-max per reference.py, vectorised over slots: (tokens, confidence, best − second best score)."""
    R, K, V = logits.shape
    z = logits.float().reshape(R * K, V) / temperature
    score = z + ref.gumbel_noise(seed, torch.arange(R * K), V)
    top = score.topk(2, dim=-1).values
    tok = score.argmax(dim=-1)
    conf = torch.softmax(z, dim=-1).gather(1, tok[:, None])[:, 0]
    return tok.reshape(R, K), conf.reshape(R, K), (top[:, 0] - top[:, 1]).reshape(R, K)


# ------------------------------------------------------------------------------------------------------------
# greedy: exact against the reference, every dtype, strategy and instruction-set variant
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_greedy_matches_reference(isa, dtype, strategy):
    gen = torch.Generator().manual_seed(11)
    R, K, V, mask_id = 4, 7, 1151, 1150
    base = tied_logits(R, K + 1, V + 3, dtype, gen)
    logits = base[:, 1:, 1:V + 1]  # odd strides, rows off 16-byte alignment: vector body + scalar tail
    block = make_block(R, K, mask_id, gen)
    tau, m, floor, tau32, bud, fl = row_params(R, gen)
    out = run_ext(logits, block, mask_id, tau32, bud, fl, torch.zeros(1, dtype=torch.int64), 0.0, strategy,
                  isa=isa, threads=3)
    check_step_vs_reference(out, logits, block, mask_id, tau, m, floor, strategy)
    assert out[1].any(), "nothing committed: the test data lost its purpose"


@pytest.mark.parametrize("isa", ISAS)
def test_greedy_random_logits_many_shapes(isa):
    gen = torch.Generator().manual_seed(12)
    for R, K, V in [(1, 1, 1), (2, 3, 15), (2, 5, 16), (3, 4, 17), (2, 16, 2047), (1, 64, 2049), (2, 2, 5000)]:
        for dtype in DTYPES:
            logits = (torch.randn(R, K, V, generator=gen) * 4).to(dtype)
            mask_id = V - 1
            block = make_block(R, K, mask_id, gen, p_masked=0.8)
            tau, m, floor, tau32, bud, fl = row_params(R, gen)
            out = run_ext(logits, block, mask_id, tau32, bud, fl, torch.zeros(1, dtype=torch.int64), 0.0,
                          "tau_budget", isa=isa)
            check_step_vs_reference(out, logits, block, mask_id, tau, m, floor, "tau_budget")


def test_greedy_public_api_auto_selects_cpp():
    assert _backend.pick("tau_budget_step", torch.device("cpu")) == "cpp"
    assert _backend.pick("tau_budget_select", torch.device("cpu")) == "cpp"
    assert "cpp" in slim_ops.available_backends("cpu")
    gen = torch.Generator().manual_seed(13)
    R, K, V, mask_id = 5, 7, 1151, 0
    logits = tied_logits(R, K, V, torch.bfloat16, gen)
    block = make_block(R, K, mask_id, gen)
    tau, m, floor, *_ = row_params(R, gen)
    out = slim_ops.tau_budget_step(logits, block, mask_id, tau=tau, m=m, floor=floor)
    check_step_vs_reference(tuple(out), logits, block, mask_id, tau, m, floor, "tau_budget")


# ------------------------------------------------------------------------------------------------------------
# sampling: the counter-based RNG of reference.py, many seeds
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
def test_sampling_matches_reference_many_seeds(isa):
    gen = torch.Generator().manual_seed(21)
    R, K, V, mask_id = 3, 7, 1151, 1150
    near = total = 0
    for i, (temperature, dtype) in enumerate([(1.0, torch.float32), (0.7, torch.bfloat16), (1.3, torch.float16),
                                              (0.25, torch.float32), (2.0, torch.bfloat16), (1.0, torch.float16)]):
        for _ in range(4):
            logits = (torch.randn(R, K, V, generator=gen) * (1 + i)).to(dtype)
            seed = torch.randint(-(2**63), 2**63 - 1, (1,), generator=gen, dtype=torch.int64)
            block = make_block(R, K, mask_id, gen)
            tau, m, floor, tau32, bud, fl = row_params(R, gen)
            out = run_ext(logits, block, mask_id, tau32, bud, fl, seed, temperature, "tau_budget", isa=isa)
            tok, conf, gap = sample_expected(logits, seed, temperature)
            differ = out[2] != tok
            assert not (differ & (gap > 1e-5)).any(), f"T={temperature} {dtype}: tokens differ away from ties"
            near += int(differ.sum())
            total += tok.numel()
            same = ~differ
            assert_close(out[3][same], conf[same], name="sampled confidence")
            check_selection_exact(out, block, mask_id, tau, m, floor, "tau_budget")
    assert near <= 2, f"{near}/{total} sampled tokens differ at near-ties: too many for rounding"


def test_sampling_end_to_end_equals_reference():
    """Sampled tokens, commits and blocks of the public op equal tau_budget_step_ref with the same seed."""
    gen = torch.Generator().manual_seed(22)
    R, K, V, mask_id = 2, 7, 1151, 3
    logits = (torch.randn(R, K, V, generator=gen) * 3).to(torch.bfloat16)
    logits[:, :, 5] += 9.0
    block = make_block(R, K, mask_id, gen)
    tau, m, floor, *_ = row_params(R, gen)
    out = slim_ops.tau_budget_step(logits, block, mask_id, tau=tau, m=m, floor=floor, temperature=0.8,
                                   generator=torch.Generator().manual_seed(5), backend="cpp")
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), generator=torch.Generator().manual_seed(5), dtype=torch.int64)
    check_step_vs_reference(tuple(out), logits, block, mask_id, tau, m, floor, "tau_budget", 0.8, seed)


def test_sampling_unit_uniform_seed():
    """The largest noise the RNG can give (u = 1 − 2^-24 at slot 0, v = 127) must stay finite: logit 40 wins."""
    V = 512
    logits = torch.zeros(1, 1, V)
    logits[0, 0, 124] = 40.0
    seed = torch.tensor([16053], dtype=torch.int64)
    assert float(ref.gumbel_noise(seed, torch.tensor([0]), V)[0, 127]) > 15.0
    tau32, bud, fl = _params("t", 1, torch.device("cpu"), 0.9, 1.0, 1)
    for isa in ISAS:
        out = run_ext(logits, torch.zeros(1, 1, dtype=torch.int64), 0, tau32, bud, fl, seed, 1.0, "tau_budget",
                      isa=isa)
        assert int(out[2][0, 0]) == 124


def test_sampling_distribution():
    z = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 1.5])
    R, K, T = 128, 64, 1.3
    logits = z.view(1, 1, 8).expand(R, K, 8)  # stride-0 rows
    tau32, bud, fl = _params("t", R, torch.device("cpu"), 0.9, 1.0, 1)
    out = run_ext(logits, torch.zeros(R, K, dtype=torch.int64), 7, tau32, bud, fl,
                  torch.tensor([123456789], dtype=torch.int64), T, "tau_budget")
    counts = torch.bincount(out[2].flatten(), minlength=8).double()
    probs = torch.softmax(z.double() / T, 0)
    expected = counts.sum() * probs
    assert float(((counts - expected) ** 2 / expected).sum()) < 29.0  # χ²(7), p ≈ 1.4e-4
    assert_close(out[3], probs[out[2]].float(), name="sampled confidence")


# ------------------------------------------------------------------------------------------------------------
# edge cases: invalid slots, all / none masked, ties, threads, empty
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_invalid_slots_and_masks(isa, temperature):
    gen = torch.Generator().manual_seed(31)
    R, K, V, mask_id = 4, 7, 1151, 1150
    logits = torch.randn(R, K, V, generator=gen) * 2
    logits[0, 0, 17] = math.nan
    logits[0, 1, V - 1] = math.inf
    logits[0, 2] = -math.inf
    logits[0, 3] = -math.inf
    logits[0, 3, 1000] = 2.0  # one finite value: valid, certain
    logits[0, 4, 100:] = -math.inf  # partly -inf: valid
    logits[0, 5, 1] = math.nan
    logits[0, 5, 2] = math.inf
    logits[1] = math.nan  # a whole NaN row
    block = torch.full((R, K), mask_id)
    block[2] = 9  # nothing masked
    block[3, ::2] = 9
    seed = torch.tensor([99], dtype=torch.int64)
    tau = torch.tensor([0.9, 0.9, 0.5, 0.6], dtype=torch.float64)
    m = torch.tensor([1.0, 1.0, 0.0, 2.0], dtype=torch.float64)
    floor = torch.tensor([6, 1, 3, 7])
    tau32, bud, fl = _params("t", R, torch.device("cpu"), tau, m, floor)
    for dtype in DTYPES:
        z = logits.to(dtype)
        out = run_ext(z, block, mask_id, tau32, bud, fl, seed, temperature, "tau_budget", isa=isa)
        for j in (0, 1, 2, 5):
            assert int(out[2][0, j]) == mask_id and math.isnan(out[3][0, j]) and not out[1][0, j]
        assert int(out[2][0, 3]) == 1000 and float(out[3][0, 3]) == 1.0
        assert int(out[2][0, 4]) < 100
        assert torch.all(out[2][1] == mask_id) and int(out[4][1]) == 0 and float(out[5][1]) == 0.0
        assert int(out[4][2]) == 0 and not out[1][2].any(), "no masked slot: nothing committed"
        assert int(out[4][0]) == 3, "floor 6 is clamped to the 3 valid masked slots"
        assert int(out[4][3]) == 3, "floor 7 is clamped to the 3 masked slots (1, 3, 5)"
        if temperature == 0.0:
            check_step_vs_reference(out, z, block, mask_id, tau, m, floor, "tau_budget")
        else:
            check_selection_exact(out, block, mask_id, tau, m, floor, "tau_budget")


def test_ties_take_the_lowest_index():
    V = 4099
    logits = torch.zeros(2, 3, V)
    logits[0, 0, [5, 2100, 4000]] = 3.0  # max in three blocks: first wins
    logits[0, 1, [4098, 17]] = 1.0
    logits[0, 2, :] = 0.5  # all equal: index 0, c = 1/V
    logits[1, 0, [2047, 2048]] = 7.0  # block boundary
    logits[1, 1, [15, 16]] = 7.0  # vector boundary
    logits[1, 2, [4097, 4098]] = 7.0  # scalar tail
    tau32, bud, fl = _params("t", 2, torch.device("cpu"), 0.9, 1.0, 1)
    for isa in ISAS:
        for dtype in DTYPES:
            out = run_ext(logits.to(dtype), torch.zeros(2, 3, dtype=torch.int64), 0, tau32, bud, fl,
                          torch.zeros(1, dtype=torch.int64), 0.0, "tau_budget", isa=isa)
            assert out[2].tolist() == [[5, 17, 0], [2047, 15, 4097]]
            assert_close(out[3][0, 2], torch.tensor(1.0 / V), name="uniform confidence")


def test_threads_and_empty():
    gen = torch.Generator().manual_seed(41)
    R, K, V, mask_id = 5, 9, 6007, 0  # > 2^18 logits: the kernel starts its worker threads
    logits = torch.randn(R, K, V, generator=gen)
    block = make_block(R, K, mask_id, gen)
    tau, m, floor, tau32, bud, fl = row_params(R, gen)
    seed = torch.tensor([7], dtype=torch.int64)
    for threads in (1, 2, 7, 64):
        out = run_ext(logits, block, mask_id, tau32, bud, fl, seed, 0.0, "threshold", threads=threads)
        check_step_vs_reference(out, logits, block, mask_id, tau, m, floor, "threshold")
    empty = tau_budget_step_cpu(torch.empty(0, 4, 10), torch.empty(0, 4, dtype=torch.int64), 0,
                                *_params("t", 0, torch.device("cpu"), 0.9, 1.0, 1), seed, 0.0, 0)
    assert [tuple(t.shape) for t in empty] == [(0, 4), (0, 4), (0, 4), (0, 4), (0,), (0,)]


def test_select_matches_reference():
    gen = torch.Generator().manual_seed(51)
    R, K = 64, 16
    conf = torch.rand(R, K, generator=gen)
    conf[conf < 0.1] = math.nan
    conf[:, 3] = conf[:, 4]  # ties
    masked = torch.rand(R, K, generator=gen) < 0.8
    masked[0] = False
    masked[1] = True
    tau, m, floor, tau32, bud, fl = row_params(R, gen)
    for name, sid in STRATEGIES.items():
        commit, num, risk = tau_budget_select_cpu(conf, masked, tau32, bud, fl, sid)
        pub = slim_ops.tau_budget_select(conf, masked, tau=tau, m=m, floor=floor, strategy=name)
        for r in range(R):
            c_ref, k_ref, risk_ref = ref.select_row_ref(conf[r], masked[r], float(tau[r]), float(m[r]),
                                                        int(floor[r]), name)
            assert torch.equal(commit[r], c_ref) and int(num[r]) == k_ref and float(risk[r]) == risk_ref
            assert torch.equal(pub[0][r], c_ref)


def test_top_k_top_p_falls_back_to_the_torch_slot_pass():
    """Top-k / top-p: the filtered distribution comes from the PyTorch path, selection from the C++ kernel."""
    gen = torch.Generator().manual_seed(61)
    R, K, V, mask_id = 3, 5, 300, 0
    logits = torch.randn(R, K, V, generator=gen) * 3
    block = torch.full((R, K), mask_id)
    out = slim_ops.tau_budget_step(logits, block, mask_id, temperature=1.0, top_k=20, top_p=0.9,
                                   generator=torch.Generator().manual_seed(1), backend="cpp")
    kth = logits.topk(20, dim=-1).values[..., -1]
    assert torch.all(logits.gather(-1, out.tokens[..., None])[..., 0] >= kth), "top-k filter not applied"
    ones = torch.ones(R, dtype=torch.float64)
    check_selection_exact(tuple(out), block, mask_id, 0.9 * ones, ones, torch.ones(R, dtype=torch.int64),
                          "tau_budget")


def test_raw_contract_is_checked():
    tau32, bud, fl = _params("t", 2, torch.device("cpu"), 0.9, 1.0, 1)
    seed = torch.zeros(1, dtype=torch.int64)
    block = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="logits must have dtype float32/float16/bfloat16"):
        tau_budget_step_cpu(torch.zeros(2, 3, 5, dtype=torch.float64), block, 0, tau32, bud, fl, seed, 0.0, 0)
    with pytest.raises(ValueError, match=r"logits must have stride\(-1\) == 1"):
        tau_budget_step_cpu(torch.zeros(2, 3, 5).transpose(1, 2)[:, :3, :], block, 0, tau32, bud, fl, seed, 0.0, 0)
    with pytest.raises(ValueError, match="block must have shape"):
        tau_budget_step_cpu(torch.zeros(2, 3, 5), block[:1], 0, tau32, bud, fl, seed, 0.0, 0)
    with pytest.raises(ValueError, match="strategy_id must be"):
        tau_budget_step_cpu(torch.zeros(2, 3, 5), block, 0, tau32, bud, fl, seed, 0.0, 5)
    with pytest.raises(ValueError, match="isa must be one of"):
        tau_budget_step_cpu(torch.zeros(2, 3, 5), block, 0, tau32, bud, fl, seed, 0.0, 0, isa="sse9")
    with pytest.raises(RuntimeError, match="cpp backend needs CPU tensors|backend 'cpp' unavailable"):
        _backend.pick("tau_budget_step", torch.device("cuda"), "cpp")


def test_dtype_codes_agree_with_the_extension():
    exported = {getattr(torch, k): v for k, v in _ext.extension().dtype_codes.items()}
    assert exported == _ext.DTYPE_CODES
    header = (_ext.__file__.rsplit("/", 2)[0] + "/csrc/dtype_codes.h")
    text = open(header).read()
    for name, dtype in (("kDTypeF32", torch.float32), ("kDTypeF16", torch.float16), ("kDTypeBF16", torch.bfloat16)):
        assert f"{name} = {_ext.DTYPE_CODES[dtype]}," in text
