"""Decode step on the GPU (`gpu` marker; benchmarks/gpu_check.sh runs it): the public ``tau_budget_step`` with
the triton and cuda backends at real vocabularies, against ops/tau_budget/reference.py on fp32-upcast logits.
No backend is compared with another.

Greedy: tokens equal the fp32 argmax (lowest index among equal maxima); confidences are within the fp32
tolerance (the op reads the upcast logits and computes in fp32); commit / num_committed / risk equal
``select_row_ref`` on the kernel's own confidences bit for bit; the first rows equal ``tau_budget_step_ref``.
Sampling: reference.py's counter-based stream defines the tokens exactly. They must equal the fp32
Gumbel-max argmax except where the reference's best two scores are within NEAR_TIE (the kernels' exp / log
may round differently there); the mismatch rate is reported and near-ties are bounded.
"""

from __future__ import annotations

import pytest
import torch

import slim_ops
from slim_ops.ops.tau_budget import reference as ref
from slim_ops.testing import assert_close

pytestmark = pytest.mark.gpu
NEAR_TIE = 1e-4
MASK_ID = 151669


def _poison_allocator(nbytes: int) -> None:
    """Refill the CUDA caching allocator with 0xFF bytes: outputs the kernel does not write stay NaN / -1."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    big = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(255)
    small = [torch.empty(1 << 19, dtype=torch.uint8, device="cuda").fill_(255) for _ in range(32)]
    del big, small


def _case(R, K, V, dtype, seed, scale=3.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(R, K, V, device="cuda", generator=g) * scale).to(dtype)
    sharp = (torch.rand(R, K, device="cuda", generator=g) < 0.6).flatten().nonzero().flatten()
    peak = torch.randint(0, V, (R * K,), device="cuda", generator=g)
    logits.view(R * K, V)[sharp, peak[sharp]] = 25.0  # confident slots, so that τ-commits happen
    logits[0, 0, V // 2] = float("nan")  # invalid slots: token = mask_id, confidence NaN, never committed
    logits[R - 1, K - 1] = float("-inf")
    mask_id = MASK_ID % V
    masked = torch.rand(R, K, device="cuda", generator=g) < 0.7
    block = torch.where(masked, mask_id, torch.randint(0, V, (R, K), device="cuda", generator=g))
    return logits, block, mask_id


def _op_seed(gen_seed: int) -> torch.Tensor:
    """The one int64 that tau_budget_step draws from a generator seeded with gen_seed (reference.py)."""
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    return torch.randint(-(2**63), 2**63 - 1, (1,), generator=g, device="cuda", dtype=torch.int64)


def _check_selection(out, block, mask_id, tau, m, floor):
    conf, blk, com, num, risk, tok = (t.cpu() for t in (out.confidence, block, out.commit, out.num_committed,
                                                        out.risk, out.tokens))
    for r in range(blk.shape[0]):
        c_ref, k_ref, risk_ref = ref.select_row_ref(conf[r], blk[r] == mask_id, tau, m, floor, "tau_budget")
        assert torch.equal(com[r], c_ref), f"row {r}: commit {com[r].tolist()} != {c_ref.tolist()}"
        assert int(num[r]) == k_ref and float(risk[r]) == risk_ref, f"row {r}: ({int(num[r])}, {float(risk[r])!r})"
    assert torch.equal(out.block.cpu(), torch.where(com, tok, blk))
    assert not (com & torch.isnan(conf)).any(), "an invalid slot was committed"


def _need(backend: str) -> None:
    if backend not in slim_ops.available_backends("cuda"):
        pytest.fail(f"{backend} backend unavailable on this GPU machine")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("R,K,V,dtype", [(256, 16, 151936, torch.bfloat16), (64, 64, 126464, torch.float16),
                                         (33, 1, 152064, torch.float32), (7, 7, 262144, torch.bfloat16)])
def test_gpu_greedy_real_sizes_match_reference(backend, R, K, V, dtype):
    _need(backend)
    logits, block, mask_id = _case(R, K, V, dtype, seed=R + K)
    _poison_allocator(1 << 26)
    out = slim_ops.tau_budget_step(logits, block, mask_id, tau=0.9, m=1.0, floor=1, backend=backend)
    tok, conf, _ = ref.slot_candidates_ref(logits, None, 0.0, mask_id)
    bad = out.tokens != tok
    assert not bad.any(), f"{int(bad.sum())} greedy tokens differ from the fp32 argmax, first at {bad.nonzero()[0]}"
    assert_close(out.confidence, conf, name="confidence")
    _check_selection(out, block, mask_id, 0.9, 1.0, 1)
    n = min(R, 2)
    e2e = ref.tau_budget_step_ref(logits[:n].cpu(), block[:n].cpu(), mask_id, tau=0.9, m=1.0, floor=1)
    assert torch.equal(out.tokens[:n].cpu(), e2e[2])
    assert_close(out.confidence[:n], e2e[3], name="confidence vs tau_budget_step_ref")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_gpu_sampling_real_vocab_reference_stream(backend, T, report):
    _need(backend)
    R, K, V = 64, 16, 151936
    logits, block, mask_id = _case(R, K, V, torch.bfloat16, seed=9, scale=2.0)
    _poison_allocator(1 << 26)
    out = slim_ops.tau_budget_step(logits, block, mask_id, temperature=T, backend=backend,
                                   generator=torch.Generator(device="cuda").manual_seed(9))
    seed = _op_seed(9)
    tok, conf, gap = ref.slot_candidates_ref(logits, seed, T, mask_id)
    differ = out.tokens != tok
    near = gap <= NEAR_TIE
    report(f"  tau_budget {backend} T={T}: sampled-token mismatch rate vs reference stream "
           f"{differ.float().mean().item():.2e} ({int(near.sum())} near-ties of {R * K} slots)")
    bad = differ & ~near
    assert not bad.any(), f"{int(bad.sum())} sampled tokens differ away from near-ties, first at {bad.nonzero()[0]}"
    assert int(near.sum()) <= max(2, R * K // 100), "too many near-ties for a meaningful check"
    same = ~differ
    assert_close(out.confidence[same], conf[same], name="sampled confidence")
    _check_selection(out, block, mask_id, 0.9, 1.0, 1)
    e2e = ref.tau_budget_step_ref(logits[:1].cpu(), block[:1].cpu(), mask_id, temperature=T, seed=seed.cpu())
    ok = (e2e[2] == out.tokens[:1].cpu()) | near[:1].cpu()
    assert ok.all(), "sampled tokens differ from tau_budget_step_ref"
