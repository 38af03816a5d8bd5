"""slim_ops.objective: quadrature, block schedules, SLIM rows (SPEC §4.2) and TraceRL rows (SPEC §5)."""

from __future__ import annotations

import math

import pytest
import torch

import slim_ops
from slim_ops.testing import assert_close


def _gl_independent(n: int) -> tuple[list[float], list[float]]:
    """Gauss–Legendre on [0,1] from Newton iterations on P_n (independent of numpy's leggauss)."""
    xs, ws = [], []
    for i in range(n):
        x = math.cos(math.pi * (i + 0.75) / (n + 0.5))
        for _ in range(100):
            p0, p1 = 1.0, x
            for k in range(2, n + 1):
                p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
            dp = n * (x * p1 - p0) / (x * x - 1) if n > 1 else 1.0
            if n == 1:
                p1, dp = x, 1.0
            x -= p1 / dp
        xs.append((x + 1) / 2)
        ws.append(1.0 / ((1 - x * x) * dp * dp))
    order = sorted(range(n), key=lambda i: xs[i])
    return [xs[i] for i in order], [ws[i] for i in order]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_quadrature_matches_independent_rule(n):
    t, w = slim_ops.quadrature(n, dtype=torch.float64)
    et, ew = _gl_independent(n)
    assert_close(t, torch.tensor(et, dtype=torch.float64), dtype=torch.float64, name="nodes")
    assert_close(w, torch.tensor(ew, dtype=torch.float64), dtype=torch.float64, name="weights")
    assert abs(float(w.sum()) - 1.0) < 1e-12
    # exact for polynomials of degree 2n-1 on [0,1]
    for d in range(2 * n):
        assert abs(float((w * t**d).sum()) - 1.0 / (d + 1)) < 1e-12


def test_quadrature_spec_values():
    t, w = slim_ops.quadrature(3, dtype=torch.float64)
    assert_close(t, torch.tensor([0.1127017, 0.5, 0.8872983], dtype=torch.float64), atol=1e-7, rtol=0)
    assert_close(w, torch.tensor([5 / 18, 8 / 18, 5 / 18], dtype=torch.float64), dtype=torch.float64)
    t2, w2 = slim_ops.quadrature(2, dtype=torch.float64)
    assert_close(t2, torch.tensor([0.2113249, 0.7886751], dtype=torch.float64), atol=1e-7, rtol=0)
    assert_close(w2, torch.tensor([0.5, 0.5], dtype=torch.float64), dtype=torch.float64)
    with pytest.raises(ValueError, match="positive int"):
        slim_ops.quadrature(0)


def _probs_formula(t, nb, sigma=0.2, shape="cosine", decreasing=True):
    s = max(0.0, min(sigma, 2 * min(t, 1 - t) - 1e-6))
    if nb == 1:
        return [t]
    out = []
    for j in range(nb):
        f = j / (nb - 1)
        if not decreasing:
            f = 1 - f
        out.append(t + s / 2 * math.cos(math.pi * f) if shape == "cosine" else t + s / 2 - s * f)
    return out


def test_block_mask_probs_spec_examples():
    exp4 = torch.tensor([0.60, 0.55, 0.45, 0.40], dtype=torch.float64)
    assert_close(slim_ops.block_mask_probs(0.5, 4, dtype=torch.float64), exp4, dtype=torch.float64)
    p16 = slim_ops.block_mask_probs(0.5, 16, dtype=torch.float64)
    assert abs(float(p16[0]) - 0.6) < 1e-12 and abs(float(p16[-1]) - 0.4) < 1e-12
    assert abs(float(p16[1]) - 0.5978) < 1e-4 and abs(float(p16[-2]) - 0.4022) < 1e-4
    assert float(slim_ops.block_mask_probs(0.3, 1)[0]) == pytest.approx(0.3)


@pytest.mark.parametrize("t", [0.02, 0.1127017, 0.5, 0.8872983, 0.97])
@pytest.mark.parametrize("nb", [1, 2, 5, 16])
@pytest.mark.parametrize("shape", ["cosine", "linear"])
@pytest.mark.parametrize("decreasing", [True, False])
def test_block_mask_probs_formula_and_mean(t, nb, shape, decreasing):
    p = slim_ops.block_mask_probs(t, nb, spread=0.2, shape=shape, decreasing=decreasing, dtype=torch.float64)
    assert_close(p, torch.tensor(_probs_formula(t, nb, 0.2, shape, decreasing), dtype=torch.float64),
                 dtype=torch.float64)
    assert abs(float(p.mean()) - t) < 1e-12
    assert bool(((p >= 0) & (p <= 1)).all())


def test_block_mask_probs_validation():
    with pytest.raises(ValueError, match="num_blocks"):
        slim_ops.block_mask_probs(0.5, 0)
    with pytest.raises(ValueError, match="shape"):
        slim_ops.block_mask_probs(0.5, 3, shape="square")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        slim_ops.block_mask_probs(1.5, 3)


def test_slim_rows_mask_rates_match_schedule():
    """Empirical per-block mask rate of every node over many rows equals p_j (SPEC §4.2)."""
    K, L1, B, Q = 4, 16, 4000, 3
    ids = torch.randint(1, 100, (B, L1))
    lens = torch.full((B,), L1)
    g = torch.Generator().manual_seed(1)
    rows = slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=0, pad_id=127, num_nodes=Q, generator=g)
    assert rows.noisy_ids.shape == (B * Q, L1)
    nodes, _ = slim_ops.quadrature(Q, dtype=torch.float64)
    for k in range(Q):
        sel = rows.node_index == k
        rate = (rows.noisy_ids == 0)[sel].float().view(-1, L1 // K, K).mean(dim=(0, 2)).double()
        p = slim_ops.block_mask_probs(float(nodes[k]), L1 // K, dtype=torch.float64)
        # the one forced position of an all-clean row is uniform over the L1 valid positions
        p_empty = torch.prod((1 - p) ** K)
        expected = p + p_empty / L1
        n = int(sel.sum()) * K
        sd = torch.sqrt(expected * (1 - expected) / n)
        assert bool(((rate - expected).abs() <= 5 * sd).all()), (k, rate, expected)
        if k == 1:  # at t = 0.5 forcing is negligible: the rate is p_j itself
            assert bool(((rate - p).abs() <= 5 * sd + 1e-4).all()), (rate, p)


def test_slim_rows_invariants_with_pads():
    K, L1, B, Q, MASK, PAD = 4, 13, 64, 3, 50, 51
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(0, L1 + 1, (B,), generator=g)
    lens[0], lens[1], lens[2] = 0, 1, L1
    ids = torch.randint(0, 49, (B, L1), generator=g)
    ids = torch.where(torch.arange(L1)[None] < lens[:, None], ids, PAD)
    rows = slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=MASK, pad_id=PAD, num_nodes=Q,
                                    generator=g)
    valid = torch.arange(L1)[None] < lens[rows.response_index][:, None]
    # no masked pads in the loss, no empty rows, loss within the noise set
    assert not bool((rows.loss_mask & ~valid).any())
    assert bool(rows.loss_mask.any(dim=1).all())
    assert bool((rows.loss_mask <= (rows.noisy_ids == MASK)).all())
    assert torch.equal(rows.loss_mask, (rows.noisy_ids == MASK) & valid)
    # X = mask id exactly on the noise set, clean elsewhere
    clean = ids[rows.response_index]
    assert torch.equal(rows.noisy_ids, torch.where((rows.noisy_ids == MASK), torch.full_like(clean, MASK), clean))
    # only zero-length responses lose rows; weights sum to one per response otherwise
    counts = torch.bincount(rows.response_index, minlength=B)
    assert torch.equal(counts, torch.where(lens > 0, Q, 0))
    wsum = torch.zeros(B).index_add_(0, rows.response_index, rows.weights)
    assert_close(wsum[lens > 0], torch.ones(int((lens > 0).sum())), name="weight sum")
    # response-major order, nodes 0..Q-1 in each response
    assert bool((rows.response_index[1:] >= rows.response_index[:-1]).all())
    # "response" schedule never noises blocks past the response's own last block
    nb = (lens[rows.response_index] + K - 1) // K
    blk = torch.arange(L1) // K
    assert not bool(((rows.noisy_ids == MASK) & (blk[None] >= nb[:, None])).any())


def test_slim_rows_padded_schedule_and_determinism():
    K, L1 = 4, 32
    ids = torch.randint(0, 9, (200, L1))
    lens = torch.full((200,), 8)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=9, pad_id=10, generator=g1)
    b = slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=9, pad_id=10, generator=g2)
    assert torch.equal(a.noisy_ids, b.noisy_ids) and torch.equal(a.loss_mask, b.loss_mask)
    # "padded" takes nb from L1 (the reference) and reaches past the response
    c = slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=9, pad_id=10, schedule_blocks="padded",
                                 generator=torch.Generator().manual_seed(7))
    assert bool((c.noisy_ids == 9)[:, 8:].any())
    # padded schedule: first two blocks of a short response use p_0, p_1 of an 8-block schedule,
    # which for the low node exceeds t (the short response is masked more than t)
    low = c.node_index == 0
    rate = c.loss_mask[low][:, :8].float().mean()
    assert float(rate) > float(slim_ops.quadrature(3)[0][0]) + 0.03


def test_slim_rows_validation():
    ids = torch.zeros(2, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="response_len"):
        slim_ops.build_slim_rows(ids, torch.tensor([1]), block_size=4, mask_id=1, pad_id=0)
    with pytest.raises(ValueError, match=r"\[0, L1=8\]"):
        slim_ops.build_slim_rows(ids, torch.tensor([1, 9]), block_size=4, mask_id=1, pad_id=0)
    with pytest.raises(ValueError, match="block_size"):
        slim_ops.build_slim_rows(ids, torch.tensor([1, 2]), block_size=0, mask_id=1, pad_id=0)
    with pytest.raises(ValueError, match="schedule_blocks"):
        slim_ops.build_slim_rows(ids, torch.tensor([1, 2]), block_size=4, mask_id=1, pad_id=0,
                                 schedule_blocks="x")
    with pytest.raises(ValueError, match=r"\[B, L1\]"):
        slim_ops.build_slim_rows(ids[0], torch.tensor([1]), block_size=4, mask_id=1, pad_id=0)


def test_trace_rows_spec_example():
    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18]])
    sm = torch.tensor([[3, 1, 1, 2, 5, 4, 6, 6]])
    r = slim_ops.build_trace_rows(ids, sm, block_size=4, shrink=1, mask_id=0, pad_id=99)
    assert r.loss_mask.shape == (3, 8)

    def S(*xs):
        m = torch.zeros(8, dtype=torch.bool)
        m[list(xs)] = True
        return m

    assert torch.equal(r.loss_mask[0], S(1, 2, 5)) and torch.equal(r.noisy_ids[0] == 0, S(*range(8)))
    assert torch.equal(r.loss_mask[1], S(3, 4)) and torch.equal(r.noisy_ids[1] == 0, S(0, 3, 4, 6, 7))
    assert torch.equal(r.loss_mask[2], S(0, 6, 7)) and torch.equal(r.noisy_ids[2] == 0, S(0, 6, 7))
    assert torch.equal(r.noisy_ids[r.noisy_ids != 0], ids.expand(3, 8)[r.noisy_ids != 0])
    assert r.round_index.tolist() == [0, 1, 2] and r.response_index.tolist() == [0, 0, 0]
    assert torch.equal(r.weights, torch.ones(3))


def _trace_rows_loop(ids, sm, valid, K, s):
    """Straight per-block loop of SPEC §5 (independent of the vectorised builder)."""
    out = []
    for b in range(ids.shape[0]):
        L1 = ids.shape[1]
        groups = [None] * L1
        for start in range(0, L1, K):
            idx = [i for i in range(start, min(start + K, L1)) if valid[b, i]]
            vals = sorted({int(sm[b, i]) for i in idx})
            shr = {v: vals[min((k // s) * s + s - 1, len(vals) - 1)] for k, v in enumerate(vals)}
            for i in idx:
                groups[i] = shr[int(sm[b, i])]
        blocks = [[i for i in range(st, min(st + K, L1)) if groups[i] is not None] for st in range(0, L1, K)]
        remaining = [sorted({groups[i] for i in bl}) for bl in blocks]
        while any(remaining):
            loss, noise = torch.zeros(L1, dtype=torch.bool), torch.zeros(L1, dtype=torch.bool)
            for bl, rem in zip(blocks, remaining):
                if not rem:
                    continue
                m = rem.pop(0)
                for i in bl:
                    loss[i] |= groups[i] == m
                    noise[i] |= groups[i] >= m
            out.append((b, loss, noise))
    return out


@pytest.mark.parametrize("K,s", [(4, 1), (4, 2), (3, 3), (8, 2)])
def test_trace_rows_match_loop(K, s):
    g = torch.Generator().manual_seed(K * 10 + s)
    B, L1, PAD = 5, 11, 99
    lens = torch.tensor([11, 7, 1, 0, 9])
    ids = torch.randint(0, 50, (B, L1), generator=g)
    ids = torch.where(torch.arange(L1)[None] < lens[:, None], ids, PAD)
    sm = torch.randint(0, 6, (B, L1), generator=g)
    r = slim_ops.build_trace_rows(ids, sm, block_size=K, shrink=s, mask_id=98, pad_id=PAD)
    exp = _trace_rows_loop(ids, sm, ids != PAD, K, s)
    assert len(exp) == r.loss_mask.shape[0]
    for row, (b, loss, noise) in enumerate(exp):
        assert int(r.response_index[row]) == b
        assert torch.equal(r.loss_mask[row], loss), row
        assert torch.equal((r.noisy_ids[row] == 98), noise), row
    assert bool(r.loss_mask.any(dim=1).all())


def test_trace_rows_validation():
    ids = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="step_map"):
        slim_ops.build_trace_rows(ids, torch.zeros(1, 3, dtype=torch.int64), block_size=2, shrink=1,
                                  mask_id=1, pad_id=0)
    with pytest.raises(ValueError, match="shrink"):
        slim_ops.build_trace_rows(ids, torch.zeros(1, 4, dtype=torch.int64), block_size=2, shrink=0,
                                  mask_id=1, pad_id=0)
