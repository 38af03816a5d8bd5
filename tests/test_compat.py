"""slim_ops.compat returns exactly what the helpers it replaces return on the same inputs.

The references below restate the published semantics (per-row loops, fp64 softmax confidences, torch.topk,
the global RNG draws) in plain PyTorch; the compat functions must match them bit for bit: same x0, same
transfer mask, same dtypes. Inputs include near-ties (1-ulp logit changes, duplicated rows), thresholds equal
to a slot's fp64 confidence (>= vs >), counts above the masked count, rows with nothing masked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slim_ops import compat

NINF = float("-inf")


# ---------------------------------------------------------------------------------------------------------------
# references (published semantics)
# ---------------------------------------------------------------------------------------------------------------

def _noised(logits, temperature):
    if temperature == 0:
        return logits
    z = logits.to(torch.float64)
    u = torch.rand_like(z, dtype=torch.float64)
    return z.exp() / (-torch.log(u)) ** temperature


def ref_num_transfer(mask_index, steps):
    n = mask_index.sum(dim=1, keepdim=True)
    out = torch.zeros(n.size(0), steps, dtype=torch.int64) + n // steps
    for i in range(n.size(0)):
        out[i, : int(n[i] % steps)] += 1
    return out


def ref_fast_dllm(logits, temperature, remasking, mask_index, x, ntt, threshold=None):
    x0 = torch.argmax(_noised(logits, temperature), dim=-1)
    if remasking == "low_confidence":
        score = F.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None])[..., 0]
    else:
        score = torch.rand(x0.shape)
    x0 = torch.where(mask_index, x0, x)
    conf = torch.where(mask_index, score, NINF)
    out = torch.zeros_like(x0, dtype=torch.bool)
    ks = mask_index.sum(dim=1) if threshold is not None else ntt
    for j in range(conf.shape[0]):
        idx = torch.topk(conf[j], k=int(ks[j])).indices
        out[j, idx] = True
        if threshold is not None:
            for r in range(1, len(idx)):
                if conf[j, idx[r]] < threshold:
                    out[j, idx[r]] = False
    return x0, out


def ref_slim_rl(logits, temperature, target, mask_index, x, ntt, threshold=None, remasking_strategy=None,
                tau_budget_m=1.0):
    x0 = torch.argmax(_noised(logits, temperature), dim=-1)
    if target == "random":
        score = torch.rand(x0.shape)
    else:
        p = F.softmax(logits.to(torch.float64), dim=-1)
        if target == "confidence":
            score = p.gather(-1, x0[..., None])[..., 0]
        elif target == "margin_confidence":
            t2 = torch.topk(p, 2, dim=-1).values
            score = t2[..., 0] - t2[..., 1]
        else:
            score = -torch.sum(p * torch.log(p + 1e-10), dim=-1)
    x0 = torch.where(mask_index, x0, x)
    conf = score.masked_fill(~mask_index, NINF)
    out = torch.zeros_like(x0, dtype=torch.bool)
    if remasking_strategy == "tau_budget_dynamic" and threshold is not None:
        for j in range(conf.shape[0]):
            n = int(mask_index[j].sum())
            if n == 0:
                continue
            base = int(ntt[j])
            budget = (tau_budget_m if tau_budget_m > 0 else base) * (1.0 - threshold)
            above = torch.sort(conf[j][conf[j] > threshold], descending=True).values
            kb = int((torch.cumsum(1.0 - above, 0) <= budget).sum()) if above.numel() else 0
            k = min(max(kb, base), n)
            if k > 0:
                out[j, torch.topk(conf[j], k).indices] = True
        return x0, out
    if threshold is not None:
        sel = mask_index & (score >= threshold)
        for j in range(conf.shape[0]):
            if mask_index[j].any() and not sel[j].any():
                sel[j, int(conf[j].argmax())] = True
        return x0, sel
    for j in range(conf.shape[0]):
        k = int(ntt[j])
        if k > 0:
            out[j, torch.topk(conf[j], k).indices] = True
    return x0, out


def ref_sdar_step(logits, cur_x, mask_id, ntt, step, temperature, top_k, top_p, strategy, thr):
    mask_index = cur_x == mask_id
    B, K, V = logits.shape
    z = logits.reshape(-1, V)
    if temperature != 1.0:
        z = z / temperature
    if top_k > 0:
        z = torch.where(z < torch.topk(z, top_k).values[..., -1, None], NINF, z)
    if top_p < 1.0:
        srt, idx = torch.sort(z, descending=True)
        m = torch.cumsum(F.softmax(srt, dim=-1), dim=-1) > top_p
        m[..., 1:] = m[..., :-1].clone()
        m[..., 0] = False
        z = z.masked_fill(torch.scatter(torch.zeros_like(m), -1, idx, m), NINF)
    probs = F.softmax(z, dim=-1)
    tok = torch.multinomial(probs, 1)
    x0, x0_p = tok.view(B, K), probs.gather(-1, tok).view(B, K)
    n = int(ntt[step])
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    conf = torch.where(mask_index, x0_p, NINF)
    for j in range(B):
        if strategy == "sequential":
            f = int(mask_index[j].nonzero()[0, 0])
            transfer[j, f:f + n] = True
        elif strategy == "low_confidence_static" or (conf[j] > thr).sum() < n:
            transfer[j, torch.topk(conf[j], n).indices] = True
        else:
            transfer[j] = conf[j] > thr
    cur_x = cur_x.clone()
    cur_x[transfer] = x0[transfer]
    return cur_x


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------

def _inputs(seed, B=5, L=20, V=1151, dtype=torch.float32, mask_id=1150):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g) * 3).to(dtype)
    # near-ties: slot 1 = slot 0 with one non-maximal logit moved by one ulp; slot 2 = slot 3 exactly
    logits[:, 1] = logits[:, 0]
    j = int(torch.argmin(logits[0, 0].float()))
    logits[:, 1, j] = torch.nextafter(logits[:, 1, j].float(), torch.tensor(0.0)).to(dtype)
    logits[:, 2] = logits[:, 3]
    mask = torch.rand(B, L, generator=g) < 0.7
    mask[0] = True      # fully masked row
    mask[1] = False     # nothing masked
    mask[2, :3] = True  # the near-tie slots are masked
    x = torch.randint(0, V, (B, L), generator=g)
    x = torch.where(mask, mask_id, x)
    ntt = torch.randint(0, 5, (B,), generator=g)
    ntt[min(3, B - 1)] = L  # more than the masked count: the originals then pick -inf (unmasked) slots too
    return logits, mask, x, ntt


def _fp64_conf(logits):
    return F.softmax(logits.double(), -1).max(-1).values


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), (g ^ w).nonzero() if g.dtype == torch.bool else (g != w).nonzero()


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 3, 8])
def test_get_num_transfer_tokens(steps):
    g = torch.Generator().manual_seed(steps)
    mask = torch.rand(6, 19, generator=g) < 0.6
    mask[0] = False
    _same([compat.get_num_transfer_tokens(mask, steps)], [ref_num_transfer(mask, steps)])
    for K in (4, 16, 7):
        want = torch.zeros(steps, dtype=torch.int64) + K // steps
        want[: K % steps] += 1
        _same([compat.sdar_get_num_transfer_tokens(K, steps)], [want])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("use_threshold", [False, True])
def test_fast_dllm_get_transfer_index(dtype, remasking, temperature, use_threshold):
    logits, mask, x, ntt = _inputs(11, dtype=dtype)
    thr = None
    if use_threshold:  # a threshold equal to a masked slot's fp64 confidence: ">=" keeps it
        thr = float(_fp64_conf(logits)[0, 5])
    torch.manual_seed(5)
    want = ref_fast_dllm(logits, temperature, remasking, mask, x, ntt, thr)
    torch.manual_seed(5)
    got = compat.fast_dllm_get_transfer_index(logits, temperature, remasking, mask, x, ntt, thr)
    _same(got, want)


def test_fast_dllm_long_canvas_and_tied_best():
    """A whole-canvas call (L > 64 slots) and rows whose best masked slots tie below the threshold."""
    logits, mask, x, ntt = _inputs(3, B=3, L=150, V=333, mask_id=332)
    logits[:, 10] = logits[:, 40] = logits[:, 0] + 5.0  # identical best rows
    mask[:, [10, 40]] = True
    thr = float(_fp64_conf(logits)[0, 10]) + 1e-3
    _same(compat.fast_dllm_get_transfer_index(logits, 0.0, "low_confidence", mask, x, None, thr),
          ref_fast_dllm(logits, 0.0, "low_confidence", mask, x, None, thr))
    k = torch.tensor([3, 0, 120])
    _same(compat.fast_dllm_get_transfer_index(logits, 0.0, "low_confidence", mask, x, k),
          ref_fast_dllm(logits, 0.0, "low_confidence", mask, x, k))
    with pytest.raises(RuntimeError, match="selected index k out of range"):
        compat.fast_dllm_get_transfer_index(logits, 0.0, "low_confidence", mask, x, torch.tensor([3, 0, 151]))


@pytest.mark.parametrize("target", ["confidence", "margin_confidence", "neg_entropy", "random"])
@pytest.mark.parametrize("mode", ["topk", "threshold", "tau_budget", "tau_budget_m0"])
def test_slim_rl_get_transfer_index(target, mode):
    logits, mask, x, ntt = _inputs(17)
    thr, strategy, m = None, None, 1.0
    if mode != "topk":
        thr = float(_fp64_conf(logits)[2, 4]) if target == "confidence" else 0.3
    if mode.startswith("tau_budget"):
        strategy = "tau_budget_dynamic"
        m = 0.0 if mode == "tau_budget_m0" else 2.5
        if target in ("confidence", "margin_confidence"):
            thr = 0.05
            logits[:, :8] *= 4  # peaky slots: several above τ, so the budget decides
    for temperature in (0.0, 1.0):
        torch.manual_seed(9)
        want = ref_slim_rl(logits, temperature, target, mask, x, ntt, thr, strategy, m)
        torch.manual_seed(9)
        got = compat.slim_rl_get_transfer_index(logits, temperature, target, mask, x, ntt, thr,
                                                remasking_strategy=strategy, tau_budget_m=m)
        _same(got, want)


def test_slim_rl_tau_budget_on_the_budget_edge():
    """Budgets equal to a running sum Σ(1 − c) in fp64: the comparison is decided as the original decides it."""
    logits, mask, x, ntt = _inputs(23, B=4, L=16)
    logits[:, :6] *= 5
    tau = 0.02
    c = torch.where(mask, _fp64_conf(logits), NINF)
    for row in (0, 2, 3):
        above = torch.sort(c[row][c[row] > tau], descending=True).values
        if above.numel() >= 2:
            cs = torch.cumsum(1.0 - above, 0)
            m = float(cs[1]) / (1.0 - tau)
            _same(compat.slim_rl_get_transfer_index(logits, 0.0, "confidence", mask, x, ntt, tau,
                                                    remasking_strategy="tau_budget_dynamic", tau_budget_m=m),
                  ref_slim_rl(logits, 0.0, "confidence", mask, x, ntt, tau, "tau_budget_dynamic", m))


@pytest.mark.parametrize("strategy", ["sequential", "low_confidence_static", "low_confidence_dynamic"])
@pytest.mark.parametrize("sampling", [(1.0, 0, 1.0), (0.8, 50, 0.9)])
def test_sdar_block_step(strategy, sampling):
    T, top_k, top_p = sampling
    g = torch.Generator().manual_seed(31)
    B, K, V, mask_id = 4, 16, 1151, 1150
    logits = torch.randn(B, K, V, generator=g) * 4
    cur = torch.randint(0, 1000, (B, K), generator=g)
    cur[:, 5:] = mask_id
    cur[0] = mask_id
    ntt = compat.sdar_get_num_transfer_tokens(K, 5)
    for step in (0, 2):
        torch.manual_seed(step)
        want = ref_sdar_step(logits, cur, mask_id, ntt, step, T, top_k, top_p, strategy, 0.3)
        torch.manual_seed(step)
        got = compat.sdar_block_step(logits, cur.clone(), mask_id, ntt, step, temperature=T, top_k=top_k,
                                     top_p=top_p, remasking_strategy=strategy, confidence_threshold=0.3)
        _same([got], [want])


def test_sdar_greedy_extension_commits_most_confident():
    """temperature=0 (which SDAR's sampler cannot run) is greedy through the fused pass."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 8, 97, generator=g) * 3
    cur = torch.full((3, 8), 96)
    out = compat.sdar_block_step(logits, cur.clone(), 96, torch.tensor([2, 2, 2, 2]), 0, temperature=0.0,
                                 remasking_strategy="low_confidence_static")
    conf = F.softmax(logits.double(), -1).max(-1)
    want = torch.full((3, 8), 96)
    top = torch.topk(conf.values, 2, dim=1).indices
    want.scatter_(1, top, conf.indices.gather(1, top))
    assert torch.equal(out, want)


def test_errors_name_the_argument():
    logits, mask, x, ntt = _inputs(1)
    with pytest.raises(ValueError, match="mask_index must be a bool"):
        compat.fast_dllm_get_transfer_index(logits, 0.0, "low_confidence", mask.long(), x, ntt)
    with pytest.raises(ValueError, match=r"logits must be a floating \[B, L, V\]"):
        compat.slim_rl_get_transfer_index(logits[0], 0.0, "confidence", mask, x, ntt)
    with pytest.raises(NotImplementedError):
        compat.fast_dllm_get_transfer_index(logits, 0.0, "top_p", mask, x, ntt)
    with pytest.raises(ValueError, match="num_transfer_tokens must hold one count per row"):
        compat.slim_rl_get_transfer_index(logits, 0.0, "confidence", mask, x, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="entropy_bounded"):
        compat.sdar_block_step(logits, x, 1150, torch.ones(4, dtype=torch.long), 0,
                               remasking_strategy="entropy_bounded")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        compat.get_num_transfer_tokens(mask, 0)
