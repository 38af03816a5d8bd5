"""The peers' selection rules of the decode step: entropy_bounded (EB-sampler), factor (Fast-dLLM), random (LLaDA)
and defer_ids (LLaDA's confidence_eos_eot_inf), every backend against reference.py."""

from __future__ import annotations

import pytest
import torch

import slim_ops
from slim_ops.ops.tau_budget.reference import (
    gumbel_noise,
    random_rank,
    select_row_ref,
    slot_entropy_ref,
    slot_ref,
    tau_budget_step_ref,
)
from slim_ops.ops.tau_budget.torch_impl import slot_pass_torch
from slim_ops.testing import assert_close, poison_like

# triton runs through the interpreter on the CPU (tests/conftest.py); cpp where the C++ extension is built
BACKENDS = ["torch", "triton"] + [b for b in ("cpp", "cuda") if b in slim_ops.available_backends(
    "cuda" if torch.cuda.is_available() else "cpu")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
NEW = ["entropy_bounded", "factor", "random"]


def _sel(c, masked=None, entropy=None, backend="torch", **kw):
    c = torch.tensor([c], dtype=torch.float32, device=DEV)
    masked = torch.ones_like(c, dtype=torch.bool) if masked is None else torch.tensor([masked], device=DEV)
    if entropy is not None:
        entropy = torch.tensor([entropy], dtype=torch.float32, device=DEV)
    commit, num, risk = slim_ops.tau_budget_select(c, masked, entropy=entropy, backend=backend, **kw)
    return [j for j in range(c.shape[1]) if commit[0, j]], int(num[0]), float(risk[0])


# ---------------------------------------------------------------------------------------------------------------
# worked examples
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_bounded_examples(backend):
    c = [0.9, 0.8, 0.95, 0.3, 0.85]
    h = [0.05, 0.3, 0.01, 1.0, 0.2]  # ascending: 2, 0, 4, 1, 3; Σ before each: 0, 0.01, 0.06, 0.26, 0.56
    kw = dict(strategy="entropy_bounded", floor=0, backend=backend)
    assert _sel(c, entropy=h, gamma=0.1, **kw)[:2] == ([0, 2, 4], 3)
    assert _sel(c, entropy=h, gamma=0.0, **kw)[:2] == ([2], 1)  # at least one: Σ − max = 0 for the first
    assert _sel(c, entropy=h, gamma=10.0, **kw)[:2] == ([0, 1, 2, 3, 4], 5)
    # ties by lower slot index; the floor tops up in entropy order; masked-out and NaN slots never count
    assert _sel(c, entropy=[0.5, 0.5, 0.5, 0.5, 0.5], gamma=0.6, **kw)[0] == [0, 1]
    assert _sel(c, [False, True, True, True, True], entropy=h, gamma=0.0, strategy="entropy_bounded", floor=3,
                backend=backend)[0] == [1, 2, 4]
    assert _sel(c, entropy=[float("nan"), 0.3, 0.01, 1.0, 0.2], gamma=0.25, **kw)[0] == [1, 2, 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_factor_examples(backend):
    kw = dict(strategy="factor", floor=0, backend=backend)
    # sorted 0.99, 0.97, 0.9, 0.6, 0.5: (n+1)(1-c) = 0.02, 0.09, 0.4, 2.0, 3.0 -> 3 below f = 1
    assert _sel([0.99, 0.6, 0.97, 0.9, 0.5], factor=1.0, **kw)[:2] == ([0, 2, 3], 3)
    assert _sel([0.3, 0.2], factor=1.0, **kw)[0] == [0]  # always one
    assert _sel([1.0, 0.75], factor=0.75, **kw)[0] == [0]  # 3 * 0.25 = 0.75 is not < 0.75 (strict)
    assert _sel([1.0, 0.75], factor=0.7500001, **kw)[0] == [0, 1]
    # the peer commits every slot when only the last one fails; this rule does not
    assert _sel([0.99, 0.2], factor=1.0, **kw)[0] == [0]
    assert _sel([0.99, 0.2, 0.3], factor=1.0, strategy="factor", floor=2, backend=backend)[0] == [0, 2]
    assert _sel([0.9, 0.9, 0.9], factor=1.0, **kw)[0] == [0, 1, 2]  # ties: 0.2, 0.3, 0.4 < 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", NEW)
def test_floor_above_masked_and_nothing_masked(backend, strategy):
    c = [0.99, 0.5, 0.2, 0.7, 0.9, 0.1]
    masked = [False, True, False, True, False, False]
    ent = [0.1, 2.0, 0.3, 1.0, 0.2, 0.4]
    C, k, risk = _sel(c, masked, entropy=ent, strategy=strategy, floor=5, gamma=0.0, factor=0.5,
                      generator=torch.Generator(DEV).manual_seed(0), backend=backend)
    assert C == [1, 3] and k == 2 and risk == pytest.approx(0.8, abs=1e-6)  # clamped to |M|, never unmasked slots
    C, k, risk = _sel(c, [False] * 6, entropy=ent, strategy=strategy, floor=5, backend=backend)
    assert C == [] and k == 0 and risk == 0.0


# ---------------------------------------------------------------------------------------------------------------
# selection against the reference on random rows, many seeds
# ---------------------------------------------------------------------------------------------------------------

def _random_rows(seed):
    g = torch.Generator().manual_seed(seed)
    R = int(torch.randint(1, 5, (1,), generator=g))
    K = [1, 2, 3, 7, 16, 33, 64][int(torch.randint(0, 7, (1,), generator=g))]
    c = torch.rand(R, K, generator=g)
    c[torch.rand(R, K, generator=g) < 0.25] = 0.95  # ties
    c[torch.rand(R, K, generator=g) < 0.05] = 1.0
    c[torch.rand(R, K, generator=g) < 0.05] = float("nan")
    h = torch.rand(R, K, generator=g) * [0.1, 1.0, 4.0][seed % 3]
    h[torch.rand(R, K, generator=g) < 0.25] = 0.05  # ties
    h[torch.rand(R, K, generator=g) < 0.05] = float("inf")  # deferred slots
    h[torch.rand(R, K, generator=g) < 0.05] = float("nan")
    masked = torch.rand(R, K, generator=g) < [0.3, 0.7, 1.0][seed % 3]
    floor = torch.randint(0, K + 3, (R,), generator=g)
    gamma = torch.tensor([0.0, 0.05, 0.3, 1.0, 5.0], dtype=torch.float64)[torch.randint(0, 5, (R,), generator=g)]
    factor = torch.tensor([0.25, 0.5, 1.0, 2.0, 8.0], dtype=torch.float64)[torch.randint(0, 5, (R,), generator=g)]
    return c, h, masked, floor, gamma, factor


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", NEW)
def test_select_matches_reference_many_seeds(backend, strategy):
    for seed in range(60 if backend == "torch" else 15):
        c, h, masked, floor, gamma, factor = _random_rows(seed)
        R, K = c.shape
        per_row = seed % 2 == 0
        kw = dict(floor=floor.to(DEV), gamma=gamma.to(DEV), factor=factor.to(DEV)) if per_row else dict(
            floor=int(floor[0]), gamma=float(gamma[0]), factor=float(factor[0]))
        gen = torch.Generator(DEV).manual_seed(seed)
        commit, num, risk = slim_ops.tau_budget_select(c.to(DEV), masked.to(DEV), strategy=strategy,
                                                       entropy=h.to(DEV), generator=gen, backend=backend, **kw)
        seed_t = torch.randint(-(2**63), 2**63 - 1, (1,), generator=torch.Generator(DEV).manual_seed(seed),
                               device=DEV, dtype=torch.int64).cpu()
        rank = random_rank(seed_t, torch.arange(R * K)).view(R, K)
        for r in range(R):
            i = r if per_row else 0
            ec, ek, erisk = select_row_ref(c[r], masked[r], 0.9, 1.0, int(floor[i]), strategy, entropy=h[r],
                                           gamma=float(gamma[i]), factor=float(factor[i]), rank=rank[r])
            assert torch.equal(commit[r].cpu(), ec), (seed, r, strategy)
            assert int(num[r]) == ek and float(risk[r]) == erisk
            elig = masked[r] & ~torch.isnan(c[r])
            if strategy == "entropy_bounded":
                elig &= ~torch.isnan(h[r])
            assert not (ec & ~elig).any()
            assert ek == min(int(elig.sum()), max(ek, int(floor[i])))  # the floor binds, clamped to |M|
            if strategy == "factor" and elig.any() or strategy == "entropy_bounded" and (elig & ~h[r].isinf()).any():
                assert ek >= 1  # at least one (deferred slots, entropy +inf, only through the floor)


def test_random_is_uniform_over_masked_slots():
    K, n = 8, 4000
    masked = torch.ones(n, K, dtype=torch.bool)
    masked[:, 5] = False
    commit, num, _ = slim_ops.tau_budget_select(torch.rand(n, K), masked, strategy="random", floor=2,
                                                generator=torch.Generator().manual_seed(7), backend="torch")
    assert (num == 2).all() and not commit[:, 5].any()
    counts = commit.sum(0).double().numpy()
    exp = 2 * n / 7
    stat = float((((counts[masked[0].numpy()] - exp) ** 2) / exp).sum())
    assert stat < 25.0, f"random remasking picks slots non-uniformly: chi-square {stat:.1f}, counts {counts}"
    again = slim_ops.tau_budget_select(torch.rand(n, K), masked, strategy="random", floor=2,
                                       generator=torch.Generator().manual_seed(7), backend="torch")[0]
    assert torch.equal(again, commit)  # the ranks depend on the seed only, not on the confidences


# ---------------------------------------------------------------------------------------------------------------
# the step: every backend against tau_budget_step_ref
# ---------------------------------------------------------------------------------------------------------------

def _inputs(R, K, V, seed, frac_masked=0.7, sharp=4.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(R, K, V, generator=g) * sharp).to(dtype)
    block = torch.randint(0, V - 1, (R, K), generator=g)
    block[torch.rand(R, K, generator=g) < frac_masked] = V - 1
    return logits, block


def _check(out, ref):
    nb, commit, tokens, conf, num, risk = ref
    assert torch.equal(out.tokens.cpu(), tokens)
    assert torch.equal(out.commit.cpu(), commit)
    assert torch.equal(out.block.cpu(), nb)
    assert torch.equal(out.num_committed.cpu(), num)
    assert_close(out.confidence, conf, name="confidence", atol=2e-6, rtol=2e-5)
    assert_close(out.risk, risk, name="risk", atol=1e-5, rtol=1e-5)


def _run(backend, strategy, logits, block, *, temperature=0.0, seed=0, **kw):
    mask_id = logits.shape[-1] - 1
    gen = torch.Generator(DEV).manual_seed(seed)
    out = slim_ops.tau_budget_step(logits.to(DEV), block.to(DEV), mask_id, strategy=strategy,
                                   temperature=temperature, generator=gen, backend=backend, **kw)
    s = None
    if temperature > 0 or strategy == "random":
        s = torch.randint(-(2**63), 2**63 - 1, (1,), generator=torch.Generator(DEV).manual_seed(seed), device=DEV,
                          dtype=torch.int64).cpu()
    ref = tau_budget_step_ref(logits.float(), block, mask_id, temperature=temperature, seed=s, strategy=strategy,
                              **kw)
    return out, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", NEW)
@pytest.mark.parametrize("R,K,V", [(3, 7, 1151), (2, 16, 300), (1, 1, 5), (1, 64, 40)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_step_matches_reference(backend, strategy, R, K, V, temperature):
    seeds = range(4) if backend == "torch" else range(1)
    for seed in seeds:
        logits, block = _inputs(R, K, V, seed * 100 + R + K + V, sharp=[1.0, 4.0, 8.0][seed % 3])
        fl = seed % 3
        out, ref = _run(backend, strategy, logits, block, temperature=temperature, seed=seed, floor=fl,
                        gamma=[0.05, 0.5, 2.0, 0.0][seed], factor=[1.0, 0.5, 2.0, 4.0][seed])
        _check(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", NEW + ["tau_budget", "threshold", "topk"])
def test_step_edge_cases(backend, strategy):
    V = 64
    logits, block = _inputs(4, 8, V, 5, sharp=5.0)
    logits[0, 1] = logits[0, 2]  # tied slots: equal tokens, confidences and entropies
    logits[0, 4] = logits[0, 2]
    logits[1, 0, 3] = float("nan")  # invalid slots
    logits[1, 2, :] = float("-inf")
    logits[1, 5, 7] = float("inf")
    block[0] = V - 1  # all masked
    block[1] = V - 1
    block[2] = 0
    block[2, 6] = V - 1  # one masked
    block[3] = 1  # nothing masked
    for fl in (0, 1, 3, 9):  # 9 > |M| everywhere
        out, ref = _run(backend, strategy, logits, block, floor=fl, gamma=0.3, factor=1.0, seed=fl)
        _check(out, ref)
        if fl >= 1:
            assert out.num_committed[2].item() == 1  # the one masked slot
        assert out.num_committed[3].item() == 0
        assert not out.commit[1, [0, 2, 5]].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["tau_budget", "topk", "entropy_bounded", "factor"])
def test_defer_ids(backend, strategy):
    V = 50
    logits, block = _inputs(3, 8, V, 11, frac_masked=1.0, sharp=6.0)
    defer = [int(logits[0, 0].argmax()), int(logits[1, 3].argmax()), 7]
    out, ref = _run(backend, strategy, logits, block, floor=2, tau=0.5, defer_ids=defer)
    _check(out, ref)
    hit = torch.isin(out.tokens.cpu(), torch.tensor(defer))
    assert hit.any() and (out.confidence.cpu()[hit] == 0).all()
    # a deferred slot is committed only when the floor needs it: then every undeferred masked slot is committed
    for r in range(3):
        if (out.commit.cpu()[r] & hit[r]).any():
            assert out.commit.cpu()[r][~hit[r]].all()


def test_entropy_matches_categorical():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 4099, generator=g) * 3
    logits[0, 1, 100:] = float("-inf")  # partially -inf: still a distribution
    for T in (0.0, 0.6):
        _, _, h = slot_pass_torch(logits, 4098, torch.tensor([9]), T, return_entropy=True)
        want = torch.distributions.Categorical(logits=logits / (T or 1.0)).entropy()
        assert_close(h, want, name=f"entropy T={T}", atol=1e-5, rtol=1e-5)
        for r, j in ((0, 1), (2, 4)):
            assert h[r, j].item() == pytest.approx(slot_entropy_ref(logits[r, j], T), abs=1e-5)
    h = slot_pass_torch(torch.tensor([[[0.0, 0.0, float("nan")], [5.0, float("-inf"), float("-inf")]]]), 0,
                        torch.tensor([0]), 0.0, return_entropy=True)[2]
    assert torch.isnan(h[0, 0]) and h[0, 1].item() == 0.0


def test_input_errors():
    logits, block = torch.randn(2, 4, 10), torch.full((2, 4), 9)
    for kw, msg in [(dict(strategy="entropy_bounded", gamma=-0.1), "gamma must lie in"),
                    (dict(strategy="factor", factor=0.0), "factor must lie in"),
                    (dict(defer_ids=[3, 10]), "defer_ids must lie in"),
                    (dict(defer_ids=[[1]]), "defer_ids must be a 1-D")]:
        with pytest.raises(ValueError, match=msg):
            slim_ops.tau_budget_step(logits, block, 9, **kw)
    with pytest.raises(ValueError, match="needs entropy"):
        slim_ops.tau_budget_select(torch.rand(2, 4), torch.ones(2, 4, dtype=torch.bool), strategy="entropy_bounded")


def test_opcheck_new_arguments():
    from slim_ops.ops.tau_budget.op import _params

    logits, block = _inputs(2, 8, 50, 1)
    tau32, bud, fl = _params("t", 2, torch.device("cpu"), 0.9, 1.0, 1)
    sp = torch.full((2,), 0.5, dtype=torch.float64)
    for sid in (3, 4, 5):
        torch.library.opcheck(torch.ops.slim_ops.tau_budget_step.default,
                              (logits, block, 49, tau32, bud, fl, torch.tensor([7]), 0.0, sid, 0, 1.0, "torch", sp,
                               torch.tensor([3, 4])))
    torch.library.opcheck(torch.ops.slim_ops.tau_budget_select.default,
                          (torch.rand(2, 8), block == 49, tau32, bud, fl, 3, "torch", sp, torch.rand(2, 8), None))


# ---------------------------------------------------------------------------------------------------------------
# GPU: real vocabularies; the selection checked exactly against the reference on the kernel's own slot outputs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("strategy", NEW)
@pytest.mark.parametrize("R,K,V,dtype", [(64, 16, 151936, torch.bfloat16), (8, 64, 126464, torch.float16)])
def test_gpu_real_vocab_selection_exact(backend, strategy, R, K, V, dtype):
    if backend not in slim_ops.available_backends("cuda"):
        pytest.fail(f"{backend} backend unavailable on this GPU machine")
    g = torch.Generator(device="cuda").manual_seed(R + K)
    logits = (torch.randn(R, K, V, device="cuda", generator=g) * 3).to(dtype)
    logits[..., :4] += 14 * torch.rand(R, K, 1, device="cuda", generator=g).to(dtype)
    block = torch.where(torch.rand(R, K, device="cuda", generator=g) < 0.7, 5, 3).to(torch.int64)
    kw = dict(floor=1, gamma=0.5, factor=1.0)
    gen = torch.Generator("cuda").manual_seed(1)
    out = slim_ops.tau_budget_step(logits, block, 5, strategy=strategy, generator=gen, backend=backend, **kw)
    assert torch.equal(out.tokens, logits.float().argmax(-1))
    if backend == "triton":  # entropy_bounded ranks the entropies of the fused pass (ENTROPY)
        from slim_ops.ops.tau_budget.triton import slot_pass_triton

        _, _, ent = slot_pass_triton(logits, 5, torch.zeros(1, dtype=torch.int64, device="cuda"), 0.0, entropy=True)
    else:
        _, _, ent = slot_pass_torch(logits, 5, torch.zeros(1, dtype=torch.int64, device="cuda"), 0.0,
                                    return_entropy=True)
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), generator=torch.Generator("cuda").manual_seed(1), device="cuda",
                         dtype=torch.int64).cpu()
    rank = random_rank(seed, torch.arange(R * K)).view(R, K)
    conf, masked, ent = out.confidence.cpu(), (block == 5).cpu(), ent.cpu()
    for r in range(R):
        ec, ek, erisk = select_row_ref(conf[r], masked[r], 0.9, 1.0, 1, strategy, entropy=ent[r], gamma=0.5,
                                       factor=1.0, rank=rank[r])
        assert torch.equal(out.commit[r].cpu(), ec) and int(out.num_committed[r]) == ek
        assert float(out.risk[r]) == erisk


@pytest.mark.parametrize("strategy", ["entropy_bounded", "factor"])
def test_compile_fullgraph(strategy):
    logits, block = _inputs(2, 8, 50, 2)

    def step(lg, bl):
        out = slim_ops.tau_budget_step(lg, bl, 49, strategy=strategy, gamma=0.3, factor=1.5, backend="torch")
        return out.block, out.risk

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    a, b = compiled(logits, block), step(logits, block)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------------------------
# triton: the entropy from the fused pass over V (ENTROPY), against slot_entropy_ref
# ---------------------------------------------------------------------------------------------------------------

def _slot_refs(logits, temperature, seed):
    """(tokens, confidence, entropy) [R, K] of reference.py slot by slot (mask_id V-1, NaN for invalid slots)."""
    R, K, V = logits.shape
    tok = torch.empty(R, K, dtype=torch.int64)
    conf = torch.empty(R, K)
    ent = torch.full((R, K), float("nan"))
    for r in range(R):
        for j in range(K):
            z = logits[r, j].float()
            noise = gumbel_noise(seed, torch.tensor([r * K + j]), V)[0] if temperature > 0 else None
            x0, c = slot_ref(z, temperature, noise)
            tok[r, j], conf[r, j] = (V - 1 if x0 is None else x0), c
            if x0 is not None:
                ent[r, j] = slot_entropy_ref(z, temperature)
    return tok, conf, ent


def _triton_slots(logits, temperature, seed):
    from slim_ops.ops.tau_budget.triton import slot_pass_triton

    R, K, V = logits.shape
    out = (poison_like(torch.empty(R, K, dtype=torch.int64, device=DEV)),
           poison_like(torch.empty(R, K, dtype=torch.float32, device=DEV)),
           poison_like(torch.empty(R, K, dtype=torch.float32, device=DEV)))
    got = slot_pass_triton(logits.to(DEV), V - 1, seed.to(DEV), temperature, entropy=True, out=out)
    assert all(a is b for a, b in zip(got, out, strict=True))
    return tuple(t.cpu() for t in out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_triton_entropy_slot_pass_matches_reference(dtype, temperature):
    """Entropy (and tokens / confidence) of the ENTROPY slot pass against reference.py on many seeds and shapes:
    one tile and several (the last one partial), flat and very peaked logits, ties, partly -inf, invalid slots."""
    shapes = [(1, 1, 1), (2, 3, 5), (3, 4, 300), (2, 3, 1151), (1, 3, 3000)]
    for seed in range(10):
        R, K, V = shapes[seed % len(shapes)]
        g = torch.Generator().manual_seed(1000 + seed)
        sharp = [0.01, 1.0, 4.0, 30.0, 200.0][seed % 5]
        logits = torch.randn(R, K, V, generator=g) * sharp + 5.0 * (seed % 2)
        if V >= 5:
            logits[0, 0, : V // 2] = float("-inf")  # partly -inf: still a distribution
            logits[0, 0, V - 2] = logits[0, 0].max()  # tied maxima
        if K >= 3:
            logits[0, 2] = logits[0, 0]  # tied slots
            bad = [float("nan"), float("inf"), float("-inf")][seed % 3]
            logits[-1, 1, :] = bad if seed % 3 == 2 else logits[-1, 1, :]
            logits[-1, 1, V // 3] = bad
        logits = logits.to(dtype)
        s = torch.randint(-(2**63), 2**63 - 1, (1,), generator=g, dtype=torch.int64)
        tok, conf, ent = _triton_slots(logits, temperature, s)
        rtok, rconf, rent = _slot_refs(logits, temperature, s)
        assert torch.equal(tok, rtok), (seed, tok, rtok)
        assert_close(conf, rconf, name=f"confidence seed={seed}", atol=2e-6, rtol=2e-5)
        assert_close(ent, rent, name=f"entropy seed={seed}")  # the fp32 row of the tolerance table
        assert (ent[~torch.isnan(ent)] >= 0).all()
        if K >= 3:
            assert torch.equal(ent[0, 0], ent[0, 2])  # tied slots: bit-equal entropies (their order by index)
            assert torch.isnan(ent[-1, 1]) and torch.isnan(conf[-1, 1]) and tok[-1, 1] == V - 1


def test_triton_entropy_counts_tiles_whose_noise_is_skipped():
    """Sampling: tiles that cannot beat the running best Gumbel score skip the noise, never the entropy. Tile 0
    holds a dominant logit; every later tile (7 of 8) sits 17 to 21 below the best score, so all of them are
    skipped, yet they carry almost all of the entropy (H ~ 0.027 here, ~3e-9 without them; an accumulation
    that skipped them with the noise is off by ~1e-3, ten times the tolerance)."""
    V = 8192
    s = torch.tensor([20261130], dtype=torch.int64)
    g0 = float(gumbel_noise(s, torch.tensor([0]), V)[0, 0])
    logits = torch.zeros(1, 1, V)
    logits[0, 0, 0] = 30.0
    spread = torch.rand(V - 1024, generator=torch.Generator().manual_seed(5)) * 4.0  # varied within every lane
    logits[0, 0, 1024:] = 30.0 + g0 - 17.0 - spread  # max z + 16.75 < best = 30 + g0: never worth the noise
    assert 30.0 + g0 > 17.0  # tile 0's best is its dominant logit (the other noise is < 17)
    tok, conf, ent = _triton_slots(logits, 1.0, s)
    rtok, rconf, rent = _slot_refs(logits, 1.0, s)
    assert int(tok[0, 0]) == int(rtok[0, 0]) == 0
    assert rent[0, 0] > 1e-3
    assert_close(ent, rent, name="entropy with skipped tiles")


def test_triton_entropy_bounded_uses_the_fused_pass(monkeypatch):
    """backend="triton" takes entropy_bounded's entropy from the kernel: the torch slot pass is never called."""
    import slim_ops.ops.tau_budget.torch_impl as torch_impl

    def fail(*a, **k):
        raise AssertionError("torch slot pass called for the triton backend")

    monkeypatch.setattr(torch_impl, "slot_pass_torch", fail)
    monkeypatch.setattr(torch_impl, "tau_budget_step_torch", fail)
    logits, block = _inputs(2, 8, 300, 3)
    for T in (0.0, 0.9):
        out, ref = _run("triton", "entropy_bounded", logits, block, temperature=T, seed=4, floor=1, gamma=0.4,
                        defer_ids=[int(logits[0, 0].argmax())])
        _check(out, ref)


def test_triton_entropy_bounded_step_many_seeds():
    """The triton step with entropy_bounded equals tau_budget_step_ref exactly (commits, tokens, counts) on random
    shapes, dtypes, temperatures, per-row γ / floors, deferred ids and masked fractions."""
    for seed in range(12):
        g = torch.Generator().manual_seed(7000 + seed)
        R = int(torch.randint(1, 4, (1,), generator=g))
        K = [1, 3, 8, 16, 33][seed % 5]
        V = [7, 130, 1100][seed % 3]
        dtype = [torch.float32, torch.bfloat16, torch.float16][seed % 3]
        logits, block = _inputs(R, K, V, 7000 + seed, frac_masked=[0.3, 0.8, 1.0][seed % 3],
                                sharp=[0.5, 3.0, 10.0][seed % 3], dtype=dtype)
        if seed % 4 == 1:
            logits[0, 0, 2] = float("nan")
        per_row = seed % 2 == 0
        gamma = torch.tensor([0.0, 0.1, 0.7, 3.0], dtype=torch.float64)[torch.randint(0, 4, (R,), generator=g)]
        floor = torch.randint(0, K + 2, (R,), generator=g)
        kw = dict(gamma=gamma, floor=floor) if per_row else dict(gamma=float(gamma[0]), floor=int(floor[0]))
        if seed % 3 == 1:
            kw["defer_ids"] = [int(logits[0, -1].float().argmax()), 3]
        out, ref = _run("triton", "entropy_bounded", logits, block, temperature=[0.0, 1.0, 0.5][seed % 3],
                        seed=seed, tau=0.9, **kw)
        _check(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("V,dtype", [(151936, torch.bfloat16), (126464, torch.float16), (32000, torch.float32)])
def test_gpu_triton_entropy_real_vocab(V, dtype, temperature):
    """The compiled ENTROPY pass (fast log2 Gumbel, cp.async pipeline) on real vocabularies: tokens exact and the
    entropy within the fp32 tolerance of reference.py, flat to very peaked slots, poisoned outputs."""
    g = torch.Generator().manual_seed(V)
    R, K = 2, 8
    logits = torch.randn(R, K, V, generator=g) * torch.tensor([0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 3.0, 3.0])[:, None]
    logits[0, 6, V // 2:] = float("-inf")
    logits[1, 7, 17] = float("nan")
    logits = logits.to(dtype)
    s = torch.randint(-(2**63), 2**63 - 1, (1,), generator=g, dtype=torch.int64)
    tok, conf, ent = _triton_slots(logits, temperature, s)
    rtok, rconf, rent = _slot_refs(logits, temperature, s)
    assert torch.equal(tok, rtok)
    assert_close(conf, rconf, name="confidence", atol=2e-6, rtol=2e-5)
    assert_close(ent, rent, name="entropy")
