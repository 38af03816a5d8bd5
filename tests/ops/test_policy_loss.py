"""slim_policy_loss (docs/objective.md, 'The SLIM loss'): the 'Test vector' on every backend, an independent fp64
implementation for every level and KL estimator (clamp boundaries, both clip sides, empty rows),
opcheck, torch.compile(fullgraph=True), gradients to logp only, input validation."""

from __future__ import annotations

import math

import pytest
import torch

import slim_ops
from slim_ops.ops.policy_loss.reference import slim_policy_loss_ref
from slim_ops.testing import assert_close

BACKENDS = ["torch", "triton"]


# --------------------------------------------------------------------------------------------------
# independent implementation: per row / block / token in Python, fp64, explicit piecewise gradients
# --------------------------------------------------------------------------------------------------
def _clamped(x: torch.Tensor) -> torch.Tensor:
    """clamp(x, -10, 10) whose gradient is 1 on the closed interval and 0 outside."""
    v = float(x.detach())
    if abs(v) <= 10.0:
        return x
    return torch.tensor(math.copysign(10.0, v), dtype=x.dtype)


def _unit_objective(ratio: torch.Tensor, a: float, lo: float, hi: float, cap: float | None = None):
    """min(min(ratio, δ)*A, clip(ratio)*A) as a piecewise function: ratio*A where neither the clip nor the
    cap δ is active; returns (objective, TRL clip flag, δ flag)."""
    r = float(ratio.detach())
    c = math.inf if cap is None else cap
    clipped = (a > 0 and r > hi) or (a < 0 and r < lo)
    capped = a < 0 and r > c
    if ((a >= 0 and r <= hi) or (a < 0 and r >= lo)) and r <= c:
        return ratio * a, clipped, capped
    return torch.tensor(min(min(r, c) * a, min(max(r, lo), hi) * a), dtype=ratio.dtype), clipped, capped


def _aggregate(mode, sums, counts, w, L1):
    """One of the four reductions of per-row token sums, written out row by row."""
    B = len(sums)
    if mode == "token-mean":
        return sum(w[b] * sums[b] for b in range(B)) / max(sum(counts), 1)
    if mode == "seq-mean-token-mean":
        return sum(w[b] * sums[b] / max(counts[b], 1) for b in range(B)) / B
    if mode == "seq-mean-token-sum":
        return sum(w[b] * sums[b] for b in range(B)) / B
    assert mode == "seq-mean-token-sum-norm"
    return sum(w[b] * sums[b] / L1 for b in range(B)) / B


def independent_loss(logp, logp_old, mask, adv, w, *, level="sequence", clip_low=0.1, clip_high=0.1,
                     clip_token=0.2, kl_coef=0.01, kl_estimator="k3", response_len=None, block_size=None,
                     clip_delta=None, loss_agg=None, kl_reference=None):
    B, L = logp.shape
    L1 = response_len or L
    lo32 = float(torch.tensor(1.0 - clip_low, dtype=torch.float32))  # bounds as fp32 values, like the op
    hi32 = float(torch.tensor(1.0 + clip_high, dtype=torch.float32))
    tlo32 = float(torch.tensor(1.0 - clip_token, dtype=torch.float32))
    thi32 = float(torch.tensor(1.0 + clip_token, dtype=torch.float32))
    ref = logp_old if kl_reference is None else kl_reference
    units = clipped = capped = 0
    ratio_sum = 0.0
    pol_sums, kl_sums, counts = [], [], []
    for b in range(B):
        a = float(adv[b])
        idx = [i for i in range(L) if bool(mask[b, i])]
        deltas = {i: logp[b, i] - float(logp_old[b, i]) for i in idx}
        S = torch.zeros((), dtype=torch.float64)  # Σ over M of the per-position objective
        unit_list = []
        if level == "sequence" and idx:
            unit_list = [(idx, lo32, hi32)]
        elif level == "block":
            for start in range(0, L, block_size):
                blk = [i for i in idx if start <= i < start + block_size]
                if blk:
                    unit_list.append((blk, lo32, hi32))
        elif level == "token":
            unit_list = [([i], tlo32, thi32) for i in idx]
        for members, lo_, hi_ in unit_list:
            s = torch.exp(_clamped(sum(deltas[i] for i in members) / len(members)))
            obj, c, x = _unit_objective(s, a, lo_, hi_, clip_delta)
            S = S + len(members) * obj
            units, clipped, capped, ratio_sum = units + 1, clipped + c, capped + x, ratio_sum + float(s.detach())
        kl_row = torch.zeros((), dtype=torch.float64)
        for i in idx:
            d = logp[b, i] - float(ref[b, i])
            if kl_estimator == "k3":
                kl_row = kl_row + torch.exp(_clamped(-d)) - 1 + d
            elif kl_estimator == "k2":
                kl_row = kl_row + 0.5 * d * d
            else:
                kl_row = kl_row + d
        pol_sums.append(S)
        kl_sums.append(kl_row)
        counts.append(len(idx))
    wl = [float(x) for x in w]
    if loss_agg is None:  # docs/objective.md, 'The SLIM loss'
        pol_mode = "seq-mean-token-mean" if level == "sequence" else "seq-mean-token-sum-norm"
        kl_mode = "seq-mean-token-sum-norm"
    else:
        pol_mode = kl_mode = loss_agg
    pol = -_aggregate(pol_mode, pol_sums, counts, wl, L1)
    kl_total = _aggregate(kl_mode, kl_sums, counts, wl, L1)
    loss = pol + kl_coef * kl_total
    metrics = {"policy_loss": pol, "kl_loss": kl_coef * kl_total, "kl": kl_total,
               "clip_frac": torch.tensor(clipped / max(units, 1)),
               "ratio_mean": torch.tensor(ratio_sum / max(units, 1)),
               "masked_count": mask.sum().double(),
               "clip_frac_delta": torch.tensor(capped / max(units, 1))}
    return loss, metrics


def _random_case(B=6, L=11, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g) * 5
    logp = old + scale * torch.randn(B, L, generator=g)
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[0] = False  # an empty row contributes nothing
    mask[1] = True
    logp[2, mask[2]] = old[2, mask[2]] + 12.0  # sequence log-ratio above the +10 clamp
    logp[3, 5] = old[3, 5] - 11.0  # one token below the -10 clamp
    mask[3, 5] = True
    adv = torch.randn(B, generator=g)
    adv[4] = 0.0
    w = torch.rand(B, generator=g) + 0.1
    return logp, old, mask, adv, w


def _check_against_independent(backend, logp, old, mask, adv, w, upstream=1.0, **kw):
    lp = logp.clone().requires_grad_()
    loss, metrics = slim_ops.slim_policy_loss(lp, old, mask, adv, w, backend=backend, **kw)
    (upstream * loss).backward()
    lp64 = logp.double().requires_grad_()
    kw64 = dict(kw)
    if kw.get("kl_reference") is not None:
        kw64["kl_reference"] = kw["kl_reference"].double()
    exp_loss, exp_metrics = independent_loss(lp64, old.double(), mask, adv.double(), w.double(), **kw64)
    (upstream * exp_loss).backward()
    name = {k: v for k, v in kw.items() if k != "kl_reference"}
    assert_close(loss, exp_loss, name=f"{backend} loss {name}")
    assert_close(lp.grad, lp64.grad, name=f"{backend} dL/dlogp {name}")
    for k, v in exp_metrics.items():
        assert_close(metrics[k], v, name=f"{backend} metric {k} {name}")
    # the fp32 reference (autograd through torch.minimum / clamp) agrees too
    lpr = logp.clone().requires_grad_()
    ref_loss, ref_metrics = slim_policy_loss_ref(lpr, old, mask, adv, w, **kw)
    (upstream * ref_loss).backward()
    assert_close(ref_loss, exp_loss, name=f"reference loss {name}")
    assert_close(lpr.grad, lp64.grad, name=f"reference dL/dlogp {name}")
    for k, v in exp_metrics.items():
        assert_close(ref_metrics[k], v, name=f"reference metric {k} {name}")


# --------------------------------------------------------------------------------------------------
# Test vector of docs/objective.md
# --------------------------------------------------------------------------------------------------
def _spec_vector():
    rows = {0: {2: 0.2}, 1: {0: 0.05, 3: -0.02, 5: 0.01, 6: 0.0},
            2: {0: -0.3, 1: -0.1, 2: 0.2, 3: 0.05, 4: -0.05, 5: 0.0, 7: -0.2}}
    mask = torch.zeros(3, 8, dtype=torch.bool)
    delta = torch.zeros(3, 8)
    for r, d in rows.items():
        for i, v in d.items():
            mask[r, i] = True
            delta[r, i] = v
    old = -torch.rand(3, 8, generator=torch.Generator().manual_seed(3)) * 4
    return old + delta, old, mask, torch.tensor([5 / 18, 8 / 18, 5 / 18])


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_spec_test_vector(backend):
    logp, old, mask, w = _spec_vector()
    expect = {0.5: (-0.16946942, -0.16945567, {(0, 2): 2.098e-5, (1, 0): -0.0186956, (2, 0): -0.00628692}),
              -0.5: (0.17508991, 0.17510366, {(0, 2): 0.0565674})}
    kl_rows = torch.tensor([0.00234134, 0.00018507, 0.01220797], dtype=torch.float64)
    for a, (l_pol, l_tot, grads) in expect.items():
        lp = logp.clone().requires_grad_()
        adv = torch.full((3,), a)
        kw = dict(level="sequence", clip_low=0.1, clip_high=0.1, kl_coef=0.01, kl_estimator="k3",
                  response_len=8, block_size=8)
        if backend == "reference":
            loss, m = slim_policy_loss_ref(lp, old, mask, adv, w, **kw)
        else:
            loss, m = slim_ops.slim_policy_loss(lp, old, mask, adv, w, backend=backend, **kw)
        loss.backward()
        assert abs(m["policy_loss"].item() - l_pol) < 5e-8, (m["policy_loss"].item(), l_pol)
        assert abs(loss.item() - l_tot) < 5e-8, (loss.item(), l_tot)
        assert abs(m["kl"].item() - float((w.double() * kl_rows).sum() / 3)) < 5e-9
        for (r, i), g in grads.items():
            got = lp.grad[r, i].item()
            assert abs(got - g) <= 5e-4 * abs(g) + 1e-9, f"A={a} dL/dl[{r},{i}] = {got}, the test vector says {g}"
        # only M receives a gradient
        assert torch.all(lp.grad[~mask] == 0)
        assert m["masked_count"].item() == 12


def test_spec_ratios_and_kl_rows():
    logp, old, mask, w = _spec_vector()
    delta = torch.where(mask, logp - old, 0.0)
    s = torch.exp(delta.sum(1) / mask.sum(1))
    assert_close(s, torch.tensor([1.221403, 1.010050, 0.944459]), atol=2e-6, rtol=0)
    k3 = torch.where(mask, torch.exp(-delta) - 1 + delta, 0.0).sum(1) / 8
    assert_close(k3, torch.tensor([0.00234134, 0.00018507, 0.01220797]), atol=2e-8, rtol=0)


# --------------------------------------------------------------------------------------------------
# independent implementation, every level and estimator
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence", "block", "token"])
@pytest.mark.parametrize("kl_estimator", ["k3", "k2", "k1"])
def test_matches_independent(backend, level, kl_estimator):
    seed = 10 * ["sequence", "block", "token"].index(level) + ["k3", "k2", "k1"].index(kl_estimator)
    logp, old, mask, adv, w = _random_case(seed=seed)
    _check_against_independent(backend, logp, old, mask, adv, w, level=level, kl_estimator=kl_estimator,
                               clip_low=0.1, clip_high=0.15, clip_token=0.2, kl_coef=0.05, response_len=13,
                               block_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence", "block", "token"])
def test_both_clip_sides_and_large_ratios(backend, level):
    # larger log-ratios: many units clipped on both sides, for positive and negative advantages
    logp, old, mask, adv, w = _random_case(B=8, L=20, seed=7, scale=1.5)
    adv = torch.tensor([1.0, -1.0, 0.7, -0.3, 0.0, 2.0, -2.0, 0.5])
    _check_against_independent(backend, logp, old, mask, adv, w, level=level, block_size=3)
    _, m = slim_ops.slim_policy_loss(logp, old, mask, adv, w, level=level, block_size=3, backend=backend)
    assert 0 < m["clip_frac"].item() < 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_ratio_clamp_boundary_is_inclusive(backend):
    # |mean δ| exactly 10 keeps the gradient (closed interval); just above 10 cuts it
    old = torch.zeros(4, 2)
    logp = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [10.5, 0.0], [-10.5, 0.0]])
    mask = torch.tensor([[True, False]] * 4)
    adv = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # clip inactive: A<0 with s>=lo, A>0 with s<=hi
    lp = logp.clone().requires_grad_()
    loss, _ = slim_ops.slim_policy_loss(lp, old, mask, adv, kl_coef=0.0, backend=backend)
    loss.backward()
    s = torch.exp(torch.tensor([10.0, -10.0]))
    assert_close(lp.grad[:2, 0], -adv[:2] * s / 4, name="gradient at |λ|=10")
    assert torch.all(lp.grad[2:] == 0), lp.grad
    lp64 = logp.double().requires_grad_()
    exp_loss, _ = independent_loss(lp64, old.double(), mask, adv.double(), torch.ones(4, dtype=torch.float64),
                                   kl_coef=0.0)
    assert_close(loss, exp_loss)


def test_ratio_clip_boundary_is_inclusive():
    # s exactly at 1 + ε_hi (A > 0) and 1 − ε_lo (A < 0): the unclipped branch still carries the gradient
    delta = torch.tensor([0.05, -0.05])
    s = torch.exp(delta)
    clip_high, clip_low = float(s[0]) - 1.0, 1.0 - float(s[1])
    old = torch.zeros(2, 1)
    lp = delta.reshape(2, 1).clone().requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 1, dtype=torch.bool)
    loss, m = slim_ops.slim_policy_loss(lp, old, mask, adv, clip_low=clip_low, clip_high=clip_high,
                                        kl_coef=0.0, backend="torch")
    loss.backward()
    assert_close(lp.grad[:, 0], -adv * s / 2, name="gradient at s = clip bound")
    assert m["clip_frac"].item() == 0
    lpr = delta.reshape(2, 1).clone().requires_grad_()
    ref, _ = slim_policy_loss_ref(lpr, old, mask, adv, clip_low=clip_low, clip_high=clip_high, kl_coef=0.0)
    ref.backward()
    assert_close(lpr.grad, lp.grad, name="reference gradient at the clip bound")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_empty(backend):
    logp, old, _, adv, w = _random_case()
    mask = torch.zeros_like(logp, dtype=torch.bool)
    lp = logp.clone().requires_grad_()
    loss, m = slim_ops.slim_policy_loss(lp, old, mask, adv, w, backend=backend)
    loss.backward()
    assert loss.item() == 0 and m["masked_count"].item() == 0 and m["clip_frac"].item() == 0
    assert torch.all(lp.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_logp_and_long_rows(backend):
    # bf16 logp: gradient in bf16, loss from the fp32 upcast; rows longer than one tile
    B, L = 3, 1500
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(B, L, generator=g) * 3
    logp = (old + 0.2 * torch.randn(B, L, generator=g)).bfloat16()
    mask = torch.rand(B, L, generator=g) < 0.5
    adv = torch.tensor([0.5, -0.5, 1.0])
    for level in ("sequence", "block", "token"):
        lp = logp.clone().requires_grad_()
        loss, _ = slim_ops.slim_policy_loss(lp, old, mask, adv, level=level, block_size=16, backend=backend)
        loss.backward()
        assert lp.grad.dtype == torch.bfloat16
        lr = logp.float().requires_grad_()
        ref, _ = slim_policy_loss_ref(lr, old, mask, adv, level=level, block_size=16)
        ref.backward()
        assert_close(loss, ref, name=f"{level} loss")
        assert_close(lp.grad.float(), lr.grad.bfloat16().float(), dtype=torch.bfloat16, name=f"{level} grad")


def test_gradients_flow_to_logp_only():
    logp, old, mask, adv, w = _random_case()
    lp = logp.clone().requires_grad_()
    old_ = old.clone().requires_grad_()
    adv_ = adv.clone().requires_grad_()
    w_ = w.clone().requires_grad_()
    loss, m = slim_ops.slim_policy_loss(lp, old_, mask, adv_, w_)
    loss.backward()
    assert lp.grad is not None
    assert old_.grad is None and adv_.grad is None and w_.grad is None
    assert all(not v.requires_grad for v in m.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    logp, old, mask, adv, w = _random_case(B=5, L=7)
    ref = old + 0.1
    for level, cap, pol_agg, kl_agg, has_ref in (("sequence", math.inf, "seq-mean-token-mean",
                                                  "seq-mean-token-sum-norm", False),
                                                 ("block", 3.0, "token-mean", "token-mean", True),
                                                 ("token", 1.3, "seq-mean-token-sum", "seq-mean-token-sum", True)):
        args = (logp.clone().requires_grad_(), old, mask, adv, w, ref if has_ref else old, level, 0.1, 0.2, 0.2,
                0.01, "k3", 7, 3, cap, pol_agg, kl_agg, has_ref, backend)
        torch.library.opcheck(torch.ops.slim_ops.slim_policy_loss.default, args)


def test_torch_compile_fullgraph():
    logp, old, mask, adv, w = _random_case()

    def step(lp):
        loss, m = slim_ops.slim_policy_loss(lp, old, mask, adv, w, level="block", block_size=4,
                                            backend="torch")
        return loss, m["clip_frac"]

    compiled = torch.compile(step, fullgraph=True)
    lp1 = logp.clone().requires_grad_()
    lp2 = logp.clone().requires_grad_()
    l1, c1 = step(lp1)
    l2, c2 = compiled(lp2)
    l1.backward()
    l2.backward()
    assert_close(l2, l1)
    assert_close(c2, c1)
    assert_close(lp2.grad, lp1.grad)


@pytest.mark.parametrize("bad, match", [
    (dict(level="tokens"), "level must be one of"),
    (dict(kl_estimator="k4"), "kl_estimator must be one of"),
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(clip_low=1.5), "clip_low and clip_token must be < 1"),
    (dict(clip_high=-0.1), "clip_high must be a float >= 0"),
    (dict(kl_coef=-1.0), "kl_coef must be a float >= 0"),
    (dict(response_len=0), "response_len must be a positive int"),
    (dict(clip_delta=0.9), "clip_delta must be a finite float > 1"),
    (dict(clip_delta=math.inf), "clip_delta must be a finite float > 1"),
    (dict(loss_agg="mean"), "loss_agg must be one of"),
    (dict(kl_reference=torch.zeros(6, 3)), "kl_reference must be a floating tensor of the shape of logp"),
    (dict(kl_reference=torch.zeros(6, 11, dtype=torch.int64)), "kl_reference must be a floating tensor"),
])
def test_rejects_bad_arguments(bad, match):
    logp, old, mask, adv, w = _random_case()
    with pytest.raises(ValueError, match=match):
        slim_ops.slim_policy_loss(logp, old, mask, adv, w, **bad)


def test_rejects_bad_tensors():
    logp, old, mask, adv, w = _random_case()
    with pytest.raises(ValueError, match="logp_old must have the shape of logp"):
        slim_ops.slim_policy_loss(logp, old[:, :3], mask, adv, w)
    with pytest.raises(ValueError, match="loss_mask must be a bool"):
        slim_ops.slim_policy_loss(logp, old, mask.to(torch.complex64), adv, w)
    with pytest.raises(ValueError, match=r"advantages must be a floating tensor of shape \[B\]"):
        slim_ops.slim_policy_loss(logp, old, mask, adv[:2], w)
    with pytest.raises(ValueError, match=r"logp must be a floating tensor of shape \[B, L\]"):
        slim_ops.slim_policy_loss(logp[0], old, mask, adv, w)
    with pytest.raises(RuntimeError, match="backend 'cuda' unavailable"):
        slim_ops.slim_policy_loss(logp, old, mask, adv, w, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["sequence", "block", "token"])
def test_gpu_triton_matches_reference_and_independent(level):
    logp, old, mask, adv, w = _random_case(B=6, L=256, seed=11, scale=0.5)
    dev = [t.cuda() for t in (logp, old, mask, adv, w)]
    lp = dev[0].clone().requires_grad_()
    loss, m = slim_ops.slim_policy_loss(lp, *dev[1:], level=level, block_size=16, backend="triton")
    loss.backward()
    lr = logp.double().requires_grad_()  # reference.py on fp64-upcast inputs
    ref_loss, ref_m = slim_policy_loss_ref(lr, old.double(), mask, adv.double(), w.double(), level=level,
                                           block_size=16)
    ref_loss.backward()
    assert_close(loss, ref_loss, name="loss vs reference")
    assert_close(lp.grad, lr.grad, name="dL/dlogp vs reference")
    for k, v in ref_m.items():
        assert_close(m[k], v, name=f"{k} vs reference")
    lp64 = logp.double().requires_grad_()
    exp_loss, exp_m = independent_loss(lp64, old.double(), mask, adv.double(), w.double(), level=level,
                                       block_size=16)
    exp_loss.backward()
    assert_close(loss, exp_loss, name="loss")
    assert_close(lp.grad, lp64.grad, name="dL/dlogp")
    for k, v in exp_m.items():
        assert_close(m[k], v, name=k)


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["sequence", "block", "token"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_gpu_triton_options_match_independent(level, loss_agg):
    # clip_delta, loss_agg and kl_reference in the compiled kernels, random upstream gradient
    logp, old, mask, adv, w = _random_case(B=6, L=256, seed=13, scale=0.5)
    ref = old + 0.25 * torch.randn(old.shape, generator=torch.Generator().manual_seed(14))
    _check_triton_against_reference(logp, old, mask, adv, w, level=level, block_size=16, loss_agg=loss_agg,
                                    clip_delta=1.3 if loss_agg == "token-mean" else 3.0, kl_reference=ref)


def _check_triton_against_reference(logp, old, mask, adv, w, device="cuda", **kw):
    """The triton kernels on ``device`` against reference.py on fp64-upcast inputs (loss, dL/dlogp under an
    upstream gradient of -0.7, every metric), then against the independent fp64 loss of this file as well."""
    dev = [t.to(device) for t in (logp, old, mask, adv, w)]
    lp = dev[0].clone().requires_grad_()
    kwd = dict(kw, kl_reference=kw["kl_reference"].to(device))
    loss, m = slim_ops.slim_policy_loss(lp, *dev[1:], backend="triton", **kwd)
    (-0.7 * loss).backward()
    kw64 = dict(kw, kl_reference=kw["kl_reference"].double())
    lr = logp.double().requires_grad_()
    ref_loss, ref_m = slim_policy_loss_ref(lr, old.double(), mask, adv.double(), w.double(), **kw64)
    (-0.7 * ref_loss).backward()
    assert_close(loss, ref_loss, name="loss vs reference")
    assert_close(lp.grad, lr.grad, name="dL/dlogp vs reference")
    assert set(m) == set(ref_m)
    for k, v in ref_m.items():
        assert_close(m[k], v, name=f"{k} vs reference")
    lp64 = logp.double().requires_grad_()
    exp_loss, exp_m = independent_loss(lp64, old.double(), mask, adv.double(), w.double(), **kw64)
    (-0.7 * exp_loss).backward()
    assert_close(loss, exp_loss, name="loss")
    assert_close(lp.grad, lp64.grad, name="dL/dlogp")
    for k, v in exp_m.items():
        assert_close(m[k], v, name=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    logp, old, mask, adv, w = _random_case(B=6, L=11, seed=12)
    lp_t = logp.t().contiguous().t()  # same values, column-major strides
    old_t = old.t().contiguous().t()
    mask_t = mask.t().contiguous().t()
    lp = lp_t.detach().requires_grad_()
    loss, _ = slim_ops.slim_policy_loss(lp, old_t, mask_t, adv, w, level="block", block_size=4, backend=backend)
    loss.backward()
    lr = logp.clone().requires_grad_()
    ref, _ = slim_policy_loss_ref(lr, old, mask, adv, w, level="block", block_size=4)
    ref.backward()
    assert_close(loss, ref)
    assert_close(lp.grad, lr.grad)


def test_defaults_block_size_and_numeric_masks():
    # block level defaults to K = 16; 0/1 integer and float masks mean the same set as bool
    logp, old, mask, adv, w = _random_case(B=6, L=40, seed=13)
    ref, _ = slim_ops.slim_policy_loss(logp, old, mask, adv, w, level="block", block_size=16)
    for m in (mask, mask.int(), mask.float()):
        got, _ = slim_ops.slim_policy_loss(logp, old, m, adv, w, level="block")
        assert_close(got, ref)


# --------------------------------------------------------------------------------------------------
# options beyond docs/objective.md, 'The SLIM loss': clip_delta, loss_agg, kl_reference, TRL/Liger clip_frac
# --------------------------------------------------------------------------------------------------
AGGS = [None, "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence", "block", "token"])
@pytest.mark.parametrize("loss_agg", AGGS)
def test_options_match_independent(backend, level, loss_agg):
    # every aggregation at every level; the cap δ and the reference log-probs cycle through their settings
    i = AGGS.index(loss_agg)
    seed = 100 + 10 * ["sequence", "block", "token"].index(level) + i
    logp, old, mask, adv, w = _random_case(B=8, L=13, seed=seed, scale=0.6)
    adv = torch.tensor([1.0, -1.0, 0.7, -0.3, 0.0, 2.0, -2.0, -0.5])
    g = torch.Generator().manual_seed(seed)
    ref = old + 0.3 * torch.randn(old.shape, generator=g) if i % 2 == 0 else None
    cap = (None, 1.25, 3.0)[i % 3]
    upstream = float(torch.empty(()).uniform_(0.5, 2.0, generator=g)) * (-1) ** i
    _check_against_independent(backend, logp, old, mask, adv, w, upstream=upstream, level=level, block_size=4,
                               response_len=15, clip_low=0.2, clip_high=0.15, clip_token=0.2, kl_coef=0.05,
                               clip_delta=cap, loss_agg=loss_agg, kl_reference=ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_clip_delta_caps_negative_advantages(backend, level):
    # ratios well above δ: for A < 0 the objective is δ·A with no gradient (verl dual-clip, TRL/Liger delta);
    # for A > 0 the usual upper clip already cuts them
    old = torch.zeros(4, 3)
    logp = torch.tensor([[1.5, 1.5, 1.5], [1.5, 1.5, 1.5], [0.1, 0.1, 0.1], [-0.5, -0.5, -0.5]])
    mask = torch.ones(4, 3, dtype=torch.bool)
    adv = torch.tensor([-1.0, 1.0, -1.0, -1.0])
    lp = logp.clone().requires_grad_()
    loss, m = slim_ops.slim_policy_loss(lp, old, mask, adv, level=level, clip_delta=3.0, kl_coef=0.0,
                                        clip_token=0.2, backend=backend)
    loss.backward()
    assert torch.all(lp.grad[0] == 0) and torch.all(lp.grad[1] == 0)   # capped (A<0), clipped (A>0)
    assert torch.all(lp.grad[2] != 0)                                     # inside: gradient kept
    assert torch.all(lp.grad[3] == 0)                                     # A<0 below 1-ε: clipped
    lp0 = logp.clone().requires_grad_()
    loss0, m0 = slim_ops.slim_policy_loss(lp0, old, mask, adv, level=level, kl_coef=0.0, backend=backend)
    loss0.backward()
    assert torch.all(lp0.grad[0] != 0)  # without δ the large ratio with A<0 carries the full gradient
    if level == "sequence":
        J = torch.tensor([-3.0, 1.1, -math.exp(0.1), -0.9])
        assert_close(loss, -J.mean(), name="capped loss")
        assert m["clip_frac_delta"].item() == 0.25 and m["clip_frac"].item() == 0.5
        assert m0["clip_frac_delta"].item() == 0
    else:
        assert m["clip_frac_delta"].item() == 0.25 and m["clip_frac"].item() == 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_frac_counts_active_clips_only(backend):
    # TRL / Liger: a ratio outside [1-ε, 1+ε] counts only when its advantage's sign makes the clip active
    old = torch.zeros(6, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [1.5], [0.5], [0.5], [0.5]]))
    mask = torch.ones(6, 1, dtype=torch.bool)
    adv = torch.tensor([1.0, 0.0, -1.0, -1.0, 0.0, 1.0])
    _, m = slim_ops.slim_policy_loss(logp, old, mask, adv, backend=backend)
    assert m["clip_frac"].item() == pytest.approx(2 / 6)
    _, mr = slim_policy_loss_ref(logp, old, mask, adv)
    assert mr["clip_frac"].item() == pytest.approx(2 / 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence", "block", "token"])
def test_defaults_bitwise_stable(backend, level):
    # a δ no ratio can reach and the aggregation that equals the default (docs/objective.md, 'The SLIM loss') give
    # bit-identical loss and gradient;
    # kl_reference = logp_old is the default KL
    logp, old, mask, adv, w = _random_case(B=7, L=20, seed=31, scale=0.8)
    kw = dict(level=level, block_size=4, response_len=22, backend=backend)
    outs = []
    for extra in ({}, dict(clip_delta=1e30), dict(kl_reference=old.clone()),
                  dict(loss_agg=None if level == "sequence" else "seq-mean-token-sum-norm")):
        lp = logp.clone().requires_grad_()
        loss, m = slim_ops.slim_policy_loss(lp, old, mask, adv, w, **kw, **extra)
        loss.backward()
        outs.append((loss.detach(), lp.grad, m))
    for loss, grad, m in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(grad, outs[0][1])
        assert all(torch.equal(m[k], outs[0][2][k]) for k in m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_reference_moves_only_the_kl(backend):
    logp, old, mask, adv, w = _random_case(B=6, L=11, seed=41)
    ref = old - 0.5
    _, m_old = slim_ops.slim_policy_loss(logp, old, mask, adv, w, backend=backend)
    _, m_ref = slim_ops.slim_policy_loss(logp, old, mask, adv, w, kl_reference=ref, backend=backend)
    assert torch.equal(m_old["policy_loss"], m_ref["policy_loss"])
    assert torch.equal(m_old["clip_frac"], m_ref["clip_frac"])
    assert m_ref["kl"].item() > m_old["kl"].item() + 1e-3
    # KL against ref == KL against θ_old when the caller passes ref as logp_old (policy term aside)
    _, m_swap = slim_ops.slim_policy_loss(logp, ref, mask, adv, w, backend=backend)
    assert_close(m_swap["kl"], m_ref["kl"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_options_with_empty_rows_and_nonfinite(backend):
    # all-empty batch under every aggregation: zero loss, zero gradient, no NaN
    logp, old, _, adv, w = _random_case(B=5, L=6, seed=51)
    empty = torch.zeros(5, 6, dtype=torch.bool)
    for agg in AGGS:
        lp = logp.clone().requires_grad_()
        loss, m = slim_ops.slim_policy_loss(lp, old, empty, adv, w, loss_agg=agg, clip_delta=2.0,
                                            kl_reference=old + 1, backend=backend)
        loss.backward()
        assert loss.item() == 0 and torch.all(lp.grad == 0) and m["clip_frac_delta"].item() == 0
    # NaN log-probs off the mask are never read; on the mask they propagate the same way as the reference
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(3)) < 0.5
    mask[1, 2] = True
    lpn = logp.clone()
    lpn[~mask] = float("nan")
    refn = old.clone()
    refn[~mask] = float("inf")
    for agg in AGGS:
        loss, _ = slim_ops.slim_policy_loss(lpn, old, mask, adv, w, loss_agg=agg, kl_reference=refn,
                                            backend=backend)
        exp, _ = slim_policy_loss_ref(lpn, old, mask, adv, w, loss_agg=agg, kl_reference=refn)
        assert_close(loss, exp, name=f"loss {agg}")
    lpn[1, 2] = float("nan")
    loss, _ = slim_ops.slim_policy_loss(lpn, old, mask, adv, w, loss_agg="token-mean", backend=backend)
    exp, _ = slim_policy_loss_ref(lpn, old, mask, adv, w, loss_agg="token-mean")
    assert math.isnan(loss.item()) and math.isnan(exp.item())


def test_triton_grad_poisoned_and_low_precision():
    # the Triton backward writes every position (its output starts as NaN) in logp's dtype
    logp, old, mask, adv, w = _random_case(B=5, L=37, seed=61)
    for dtype in (torch.float32, torch.bfloat16):
        lp = logp.to(dtype).clone().requires_grad_()
        loss, _ = slim_ops.slim_policy_loss(lp, old, mask, adv, w, level="token", loss_agg="token-mean",
                                            clip_delta=1.5, kl_reference=old + 0.2, backend="triton")
        loss.backward()
        assert lp.grad.dtype == dtype and not torch.isnan(lp.grad).any()
        assert torch.all(lp.grad[~mask] == 0)
        lr = logp.to(dtype).float().clone().requires_grad_()
        ref, _ = slim_policy_loss_ref(lr, old, mask, adv, w, level="token", loss_agg="token-mean", clip_delta=1.5,
                                      kl_reference=old + 0.2)
        ref.backward()
        assert_close(lp.grad.float(), lr.grad.to(dtype).float(), dtype=dtype, name=f"{dtype} grad")


def test_loss_from_hidden_packed_kl_reference():
    g = torch.Generator().manual_seed(71)
    B, L, d, V = 3, 6, 8, 17
    mask = torch.rand(B, L, generator=g) < 0.6
    n = int(mask.sum())
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(V, d, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    old = -torch.rand(n, generator=g) * 3
    ref = -torch.rand(n, generator=g) * 3
    adv = torch.tensor([0.5, -0.5, 1.0])
    kw = dict(level="token", loss_agg="seq-mean-token-mean", clip_delta=2.0)
    loss, m, logp = slim_ops.slim_loss_from_hidden(hidden, weight, labels, old, mask, adv, kl_reference=ref,
                                                   backend="torch", **kw)
    dense = lambda x: torch.zeros(B, L).masked_scatter(mask, x)
    exp, _ = slim_policy_loss_ref(dense(logp), dense(old), mask, adv, kl_reference=dense(ref), **kw)
    assert_close(loss, exp)
    with pytest.raises(ValueError, match="packed kl_reference"):
        slim_ops.slim_loss_from_hidden(hidden, weight, labels, old, mask, adv, kl_reference=ref[:-1])
