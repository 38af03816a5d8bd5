"""slim_ops.objective: quadrature, block schedules, SLIM rows (docs/objective.md, 'SLIM rows') and TraceRL rows
(docs/objective.md, 'TraceRL rows')."""

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
    """Empirical per-block mask rate of every node over many rows equals p_j (docs/objective.md, 'SLIM rows')."""
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


def _trace_rows_loop(ids, sm, valid, K, s, post=0):
    """Straight per-block loop of docs/objective.md, 'TraceRL rows' (independent of the vectorised builder), pads
    included: the response ends after its last valid position; ``post`` positions after it get σ = max+1 and count as
    valid; the slots after the (extended) response inside its last block are noised in every round."""
    out = []
    for b in range(ids.shape[0]):
        L1 = ids.shape[1]
        v = [bool(valid[b, i]) for i in range(L1)]
        step = [int(sm[b, i]) for i in range(L1)]
        end = max([i + 1 for i in range(L1) if v[i]], default=0)
        top = max([step[i] for i in range(L1) if v[i]], default=-1) + 1
        for i in range(end, min(end + post, L1)):
            v[i], step[i] = True, top
        end = min(end + post, L1)
        tail = [end > 0 and i >= end and i // K == (end - 1) // K for i in range(L1)]
        groups = [None] * L1
        for start in range(0, L1, K):
            idx = [i for i in range(start, min(start + K, L1)) if v[i]]
            vals = sorted({step[i] for i in idx})
            shr = {v_: vals[min((k // s) * s + s - 1, len(vals) - 1)] for k, v_ in enumerate(vals)}
            for i in idx:
                groups[i] = shr[step[i]]
        blocks = [[i for i in range(st, min(st + K, L1)) if groups[i] is not None] for st in range(0, L1, K)]
        remaining = [sorted({groups[i] for i in bl}) for bl in blocks]
        while any(remaining):
            loss = torch.zeros(L1, dtype=torch.bool)
            noise = torch.tensor(tail, dtype=torch.bool)
            for bl, rem in zip(blocks, remaining):
                if not rem:
                    continue
                m = rem.pop(0)
                for i in bl:
                    loss[i] |= groups[i] == m
                    noise[i] |= groups[i] >= m
            out.append((b, loss, noise))
    return out


def _check_trace_rows(r, exp, ids, mask_id):
    assert len(exp) == r.loss_mask.shape[0]
    for row, (b, loss, noise) in enumerate(exp):
        assert int(r.response_index[row]) == b
        assert torch.equal(r.loss_mask[row], loss), row
        assert torch.equal((r.noisy_ids[row] == mask_id), noise), row
        assert torch.equal(r.noisy_ids[row][~noise], ids[b][~noise]), row
    assert bool(r.loss_mask.any(dim=1).all())


@pytest.mark.parametrize("K,s", [(4, 1), (4, 2), (3, 3), (8, 2)])
@pytest.mark.parametrize("post", [0, 2])
def test_trace_rows_match_loop(K, s, post):
    g = torch.Generator().manual_seed(K * 10 + s + 100 * post)
    B, L1, PAD = 6, 11, 99
    lens = torch.tensor([11, 7, 1, 0, 9, 8])
    ids = torch.randint(0, 50, (B, L1), generator=g)
    ids = torch.where(torch.arange(L1)[None] < lens[:, None], ids, PAD)
    sm = torch.randint(0, 6, (B, L1), generator=g)
    r = slim_ops.build_trace_rows(ids, sm, block_size=K, shrink=s, mask_id=98, pad_id=PAD, post_tokens=post)
    _check_trace_rows(r, _trace_rows_loop(ids, sm, ids != PAD, K, s, post), ids, 98)
    # explicit lengths give the same rows
    r2 = slim_ops.build_trace_rows(ids, sm, block_size=K, shrink=s, mask_id=98, pad_id=PAD, response_len=lens,
                                   post_tokens=post)
    assert torch.equal(r.noisy_ids, r2.noisy_ids) and torch.equal(r.loss_mask, r2.loss_mask)


def test_trace_rows_pad_slots_minimal_case():
    # K=2, L1=2, one valid token with σ=2: X = [μ, μ], M = {0} (docs/objective.md, 'TraceRL rows': pads)
    MU, PAD = 9, 0
    ids = torch.tensor([[5, PAD]])
    for sm, lens in ((torch.tensor([[2, 0]]), torch.tensor([1])), (torch.tensor([[2, -1]]), None)):
        r = slim_ops.build_trace_rows(ids, sm, block_size=2, shrink=1, mask_id=MU, pad_id=PAD, response_len=lens)
        assert r.noisy_ids.tolist() == [[MU, MU]] and r.loss_mask.tolist() == [[True, False]]
    # post_tokens=1 trains the pad slot once, in the last round of the block
    ids = torch.tensor([[5, 6, 7, PAD, PAD, PAD, PAD, PAD]])
    sm = torch.tensor([[1, 0, 2, 0, 0, 0, 0, 0]])
    r = slim_ops.build_trace_rows(ids, sm, block_size=4, shrink=1, mask_id=MU, pad_id=PAD,
                                  response_len=torch.tensor([3]), post_tokens=1)
    assert r.loss_mask.int().tolist() == [[0, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0],
                                          [0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]]
    assert (r.noisy_ids[:, 4:] == PAD).all()  # the block wholly beyond the response stays pads
    # post_tokens reaching into the next block: that block's post positions are round-0 targets and
    # its remaining slots are masked in every round
    r = slim_ops.build_trace_rows(ids, sm, block_size=4, shrink=1, mask_id=MU, pad_id=PAD,
                                  response_len=torch.tensor([3]), post_tokens=3)
    assert r.loss_mask[0].int().tolist() == [0, 1, 0, 0, 1, 1, 0, 0]
    assert bool((r.noisy_ids[:, 6:] == MU).all()) and int(r.loss_mask.sum()) == 6


def test_trace_rows_without_pads_unchanged():
    # responses ending on a block boundary have no pad slot to mask: only the trajectory is noised
    g = torch.Generator().manual_seed(4)
    K, L1, PAD = 4, 12, 99
    lens = torch.tensor([12, 8, 4])
    ids = torch.where(torch.arange(L1)[None] < lens[:, None], torch.randint(0, 50, (3, L1), generator=g), PAD)
    sm = torch.randint(0, 9, (3, L1), generator=g)
    r = slim_ops.build_trace_rows(ids, sm, block_size=K, shrink=1, mask_id=98, pad_id=PAD, response_len=lens)
    valid = torch.arange(L1)[None] < lens[r.response_index][:, None]
    assert not bool(((r.noisy_ids == 98) & ~valid).any())
    assert torch.equal(r.noisy_ids[~valid], torch.full((int((~valid).sum()),), PAD))
    _check_trace_rows(r, _trace_rows_loop(ids, sm, ids != PAD, K, 1), ids, 98)


def test_trace_rows_validation():
    ids = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="step_map"):
        slim_ops.build_trace_rows(ids, torch.zeros(1, 3, dtype=torch.int64), block_size=2, shrink=1,
                                  mask_id=1, pad_id=0)
    with pytest.raises(ValueError, match="shrink"):
        slim_ops.build_trace_rows(ids, torch.zeros(1, 4, dtype=torch.int64), block_size=2, shrink=0,
                                  mask_id=1, pad_id=0)
    with pytest.raises(ValueError, match="post_tokens"):
        slim_ops.build_trace_rows(ids, torch.zeros(1, 4, dtype=torch.int64), block_size=2, shrink=1,
                                  mask_id=1, pad_id=0, post_tokens=-1)


def test_slim_rows_post_tokens():
    K, L1, B, MASK, PAD = 4, 12, 300, 50, 51
    g = torch.Generator().manual_seed(9)
    lens = torch.randint(0, L1 + 1, (B,), generator=g)
    ids = torch.where(torch.arange(L1)[None] < lens[:, None], torch.randint(0, 49, (B, L1), generator=g), PAD)
    base = slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=MASK, pad_id=PAD,
                                    generator=torch.Generator().manual_seed(2))
    zero = slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=MASK, pad_id=PAD, post_tokens=0,
                                    generator=torch.Generator().manual_seed(2))
    assert torch.equal(base.noisy_ids, zero.noisy_ids) and torch.equal(base.loss_mask, zero.loss_mask)
    r = slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=MASK, pad_id=PAD, post_tokens=2,
                                 generator=torch.Generator().manual_seed(2))
    # identical to the rows of responses two tokens longer
    ext = slim_ops.build_slim_rows(ids, torch.clamp(lens + 2, max=L1), block_size=K, mask_id=MASK, pad_id=PAD,
                                   generator=torch.Generator().manual_seed(2))
    assert torch.equal(r.noisy_ids, ext.noisy_ids) and torch.equal(r.loss_mask, ext.loss_mask)
    n = lens[r.response_index]
    pos = torch.arange(L1)[None]
    post = (pos >= n[:, None]) & (pos < n[:, None] + 2)
    assert not bool((r.loss_mask & (pos >= n[:, None] + 2)).any())
    assert bool((r.loss_mask & post).any())
    assert bool((ids[r.response_index][r.loss_mask & post] == PAD).all())  # post positions are pads here
    with pytest.raises(ValueError, match="post_tokens"):
        slim_ops.build_slim_rows(ids, lens, block_size=K, mask_id=MASK, pad_id=PAD, post_tokens=1.5)


# --------------------------------------------------------------------------------------------------
# random-masking / coupled baselines
# --------------------------------------------------------------------------------------------------
def _random_case(B=40, L1=13, seed=0, PAD=51):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, L1 + 1, (B,), generator=g)
    lens[0], lens[1], lens[2] = 0, 1, L1
    ids = torch.where(torch.arange(L1)[None] < lens[:, None], torch.randint(0, 49, (B, L1), generator=g), PAD)
    return ids, lens


@pytest.mark.parametrize("rate_level", ["block", "row", "position"])
@pytest.mark.parametrize("post", [0, 3])
def test_random_rows_invariants(rate_level, post):
    K, MASK, PAD, Q = 4, 50, 51, 3
    ids, lens = _random_case()
    B, L1 = ids.shape
    r = slim_ops.build_random_rows(ids, lens, block_size=K, mask_id=MASK, pad_id=PAD, num_rows=Q,
                                   rate_level=rate_level, post_tokens=post,
                                   generator=torch.Generator().manual_seed(5))
    n = torch.clamp(lens + post, max=L1)[r.response_index]
    pos = torch.arange(L1)[None]
    inside = pos < n[:, None]
    tail = (pos >= n[:, None]) & (pos // K == (n[:, None] - 1) // K) & (n[:, None] > 0)
    assert bool(r.loss_mask.any(dim=1).all())                       # empty rows dropped
    assert not bool((r.loss_mask & ~inside).any())                  # M within the (extended) response
    assert torch.equal(r.noisy_ids == MASK, r.loss_mask | tail)     # X = μ on M and on the tail pad slots
    clean = ids[r.response_index]
    assert torch.equal(r.noisy_ids[r.noisy_ids != MASK], clean[r.noisy_ids != MASK])
    assert not bool(r.complement.any()) and torch.equal(r.weights, torch.ones(r.weights.numel()))
    assert bool((r.response_index[1:] >= r.response_index[:-1]).all())
    assert bool((r.draw_index < Q).all())
    assert (0 in r.response_index.tolist()) == (post > 0)  # n_0 = 0: rows only from its post tokens
    again = slim_ops.build_random_rows(ids, lens, block_size=K, mask_id=MASK, pad_id=PAD, num_rows=Q,
                                       rate_level=rate_level, post_tokens=post,
                                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(r.noisy_ids, again.noisy_ids) and torch.equal(r.draw_index, again.draw_index)


@pytest.mark.parametrize("rate_level", ["block", "row", "position"])
def test_random_rows_coupled_complement_covers_once(rate_level):
    K, MASK, PAD, Q = 4, 50, 51, 4
    ids, lens = _random_case(seed=1)
    B, L1 = ids.shape
    r = slim_ops.build_random_rows(ids, lens, block_size=K, mask_id=MASK, pad_id=PAD, num_rows=Q, coupled=True,
                                   lower=0.0, upper=1.0, rate_level=rate_level,
                                   generator=torch.Generator().manual_seed(6))
    valid = torch.arange(L1)[None] < lens[:, None]
    cover = torch.zeros(B, Q, L1, dtype=torch.int64)
    cover.index_put_((r.response_index, r.draw_index), r.loss_mask.long(), accumulate=True)
    # every draw of a non-empty response: its row and its complement cover each valid position once
    assert torch.equal(cover, valid[:, None, :].long().expand(B, Q, L1))
    # a pair is (masked row, complement) in that order; at most one row per (draw, side)
    key = r.response_index * 2 * Q + r.draw_index * 2 + r.complement.long()
    assert torch.equal(key, torch.sort(key).values) and key.unique().numel() == key.numel()
    both = torch.zeros(B, Q, dtype=torch.int64).index_put_((r.response_index, r.draw_index),
                                                           torch.ones_like(r.draw_index), accumulate=True)
    assert int(both[lens > 1].eq(2).sum()) > 0


def test_random_rows_rates_within_bounds():
    # every rate is drawn in [lower, upper]: the empirical mask rate of each block / row stays inside
    K, L1, B = 4, 32, 2000
    ids = torch.randint(0, 9, (B, L1), generator=torch.Generator().manual_seed(2))
    lens = torch.full((B,), L1)
    for level in ("block", "row", "position"):
        r = slim_ops.build_random_rows(ids, lens, block_size=K, mask_id=10, pad_id=11, lower=0.3, upper=0.5,
                                       rate_level=level, generator=torch.Generator().manual_seed(3))
        assert r.loss_mask.shape[0] == B  # an empty row has probability <= 0.7^32 here
        rate = r.loss_mask.float().view(B, L1 // K, K).mean(dim=(0, 2))
        sd = math.sqrt(0.25 / (B * K))
        assert bool(((rate - 0.4).abs() <= 5 * sd).all()), (level, rate)
    # spread of the per-block rates: block-level rates vary across blocks of one row, row-level do not
    one = slim_ops.build_random_rows(ids[:1].expand(20000, L1), torch.full((20000,), L1), block_size=K,
                                     mask_id=10, pad_id=11, lower=0.3, upper=0.5, rate_level="row",
                                     generator=torch.Generator().manual_seed(4))
    blk = one.loss_mask.float().view(-1, L1 // K, K).mean(2)
    assert float(blk.min()) >= 0 and float(blk.mean()) == pytest.approx(0.4, abs=0.01)
    # degenerate bounds are exact
    none = slim_ops.build_random_rows(ids, lens, block_size=K, mask_id=10, pad_id=11, lower=0.0, upper=0.0)
    assert none.loss_mask.shape[0] == 0
    full = slim_ops.build_random_rows(ids[:5], lens[:5], block_size=K, mask_id=10, pad_id=11, lower=1.0,
                                      upper=1.0, coupled=True)
    assert bool(full.loss_mask.all()) and not bool(full.complement.any()) and full.loss_mask.shape[0] == 5


def test_random_rows_validation():
    ids = torch.zeros(2, 8, dtype=torch.int64)
    lens = torch.tensor([3, 8])
    kw = dict(block_size=4, mask_id=1, pad_id=0)
    for bad, match in ((dict(lower=0.6, upper=0.5), "lower must be <= upper"), (dict(upper=1.5), "upper"),
                       (dict(num_rows=0), "num_rows"), (dict(rate_level="token"), "rate_level"),
                       (dict(post_tokens=-2), "post_tokens"), (dict(coupled=1), "coupled")):
        with pytest.raises(ValueError, match=match):
            slim_ops.build_random_rows(ids, lens, **kw, **bad)
    with pytest.raises(ValueError, match="response_len"):
        slim_ops.build_random_rows(ids, torch.tensor([1.0, 2.0]), **kw)
