"""BlockLayout (docs/attention.md): dense masks equal the reference trainer's construction element for element,
position ids, block ids, the flex mask_mod, per-row intervals and input validation."""

from __future__ import annotations

import pytest
import torch

from slim_ops.layout import BlockLayout

# ---------------------------------------------------------------- independent references (Python loops)


def trainer_mask(L0: int, L1: int, K: int, pad: torch.Tensor | None, num_noisy: int = 1) -> torch.Tensor:
    """The mask the way the reference trainer builds it: fill allowed rectangles block by block, hide
    prompt pad keys, then give every empty prompt row its diagonal. bool [B, N, N]."""
    N = L0 + (1 + num_noisy) * L1
    B = 1 if pad is None else pad.shape[0]
    m = torch.zeros(B, N, N, dtype=torch.bool)
    nb = (L1 + K - 1) // K
    for bi in range(nb):
        i0, i1 = bi * K, min((bi + 1) * K, L1)
        # clean rows of block bi: all of P and clean blocks <= bi
        m[:, L0 + i0:L0 + i1, 0:L0 + i1] = True
        for s in range(num_noisy):
            x0 = L0 + L1 + s * L1
            # noisy rows of block bi: P and clean blocks < bi, plus their own noisy block
            m[:, x0 + i0:x0 + i1, 0:L0 + i0] = True
            m[:, x0 + i0:x0 + i1, x0 + i0:x0 + i1] = True
    for bi in range((L0 + K - 1) // K):  # prompt blocks, right-aligned to L0
        r1, r0 = L0 - bi * K, max(L0 - (bi + 1) * K, 0)
        m[:, r0:r1, 0:r1] = True
    if pad is not None:
        for b in range(B):
            for k in range(L0):
                if pad[b, k]:
                    m[b, :, k] = False
        for b in range(B):
            for q in range(L0):
                if not m[b, q].any():
                    m[b, q, q] = True
    return m


def spec_predicate_mask(L0: int, L1: int, K: int, pad: torch.Tensor | None) -> torch.Tensor:
    """docs/attention.md, 'The training layout' written out pair by pair with block ids. bool [B, N, N]."""
    N = L0 + 2 * L1
    B = 1 if pad is None else pad.shape[0]

    def blk(j):
        if j < L0:
            return -1 - (L0 - 1 - j) // K
        if j < L0 + L1:
            return (j - L0) // K
        return (j - L0 - L1) // K

    out = torch.zeros(B, N, N, dtype=torch.bool)
    for b in range(B):
        for q in range(N):
            for k in range(N):
                padkey = k < L0 and pad is not None and bool(pad[b, k])
                kc = k < L0 + L1
                if q < L0 + L1:
                    a = kc and blk(k) <= blk(q) and not padkey
                else:
                    a = (kc and blk(k) < blk(q) and not padkey) or (not kc and blk(k) == blk(q))
                out[b, q, k] = a
            if q < L0 and not out[b, q].any():
                out[b, q, q] = True
    return out


def left_pad(B: int, L0: int, gen: torch.Generator) -> torch.Tensor:
    n_pad = torch.randint(0, L0 + 1, (B,), generator=gen)
    return torch.arange(L0)[None, :] < n_pad[:, None]


# ---------------------------------------------------------------- the training-layout example

ASCII = """
          P0  p1  p2  c0  c1  c2  c3  c4  n0  n1  n2  n3  n4
P0(pad)    1   .   .   .   .   .   .   .   .   .   .   .   .
     p1    .   1   1   .   .   .   .   .   .   .   .   .   .
     p2    .   1   1   .   .   .   .   .   .   .   .   .   .
     c0    .   1   1   1   1   .   .   .   .   .   .   .   .
     c1    .   1   1   1   1   .   .   .   .   .   .   .   .
     c2    .   1   1   1   1   1   1   .   .   .   .   .   .
     c3    .   1   1   1   1   1   1   .   .   .   .   .   .
     c4    .   1   1   1   1   1   1   1   .   .   .   .   .
     n0    .   1   1   .   .   .   .   .   1   1   .   .   .
     n1    .   1   1   .   .   .   .   .   1   1   .   .   .
     n2    .   1   1   1   1   .   .   .   .   .   1   1   .
     n3    .   1   1   1   1   .   .   .   .   .   1   1   .
     n4    .   1   1   1   1   1   1   .   .   .   .   .   1
"""


def test_spec_ascii_example():
    rows = [ln.split()[-13:] for ln in ASCII.strip().splitlines()[1:]]
    expected = torch.tensor([[c == "1" for c in r] for r in rows])
    pad = torch.tensor([[True, False, False]])
    lay = BlockLayout.train(3, 5, 2, prompt_pad=pad)
    got = lay.dense_mask()
    assert got.shape == (1, 13, 13)
    assert torch.equal(got[0], expected), f"\n{got[0].int()}\n!=\n{expected.int()}"
    assert torch.equal(lay.block_ids(), torch.tensor([-2, -1, -1, 0, 0, 1, 1, 2, 0, 0, 1, 1, 2]))
    assert torch.equal(lay.position_ids(), torch.tensor([[-1, 0, 1, 2, 3, 4, 5, 6, 2, 3, 4, 5, 6]]))
    assert torch.equal(lay.self_only_rows()[0, :3], torch.tensor([True, False, False]))


# ---------------------------------------------------------------- train layout vs the trainer's construction

CASES = [  # (L0, L1, K)
    (0, 7, 3), (0, 5, 1), (5, 9, 4), (7, 10, 16), (6, 6, 1), (9, 13, 5), (16, 32, 16), (1, 1, 1), (3, 8, 8),
]


@pytest.mark.parametrize("L0,L1,K", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_train_dense_mask_equals_trainer(L0, L1, K, padded):
    gen = torch.Generator().manual_seed(L0 * 100 + L1 * 10 + K)
    pad = left_pad(4, L0, gen) if padded else None
    if pad is not None and L0 >= 2:
        pad[0] = True  # an all-pad prompt
        pad[1] = False
    lay = BlockLayout.train(L0, L1, K, prompt_pad=pad)
    got = lay.dense_mask()
    exp = trainer_mask(L0, L1, K, pad)
    assert got.shape == (1 if pad is None else 4, L0 + 2 * L1, L0 + 2 * L1)
    assert torch.equal(got, exp), (got ^ exp).nonzero()[:5]
    if L0 + 2 * L1 <= 40:
        assert torch.equal(got, spec_predicate_mask(L0, L1, K, pad))


def test_arbitrary_pad_bitmap_matches_spec_predicate():
    gen = torch.Generator().manual_seed(7)
    L0, L1, K = 9, 5, 3
    pad = torch.rand(5, L0, generator=gen) < 0.5  # not only left padding
    pad[0, :6] = True  # first two blocks all pads → those rows self-only
    lay = BlockLayout.train(L0, L1, K, prompt_pad=pad)
    assert torch.equal(lay.dense_mask(), spec_predicate_mask(L0, L1, K, pad))
    assert torch.equal(lay.dense_mask(), trainer_mask(L0, L1, K, pad))


def test_every_row_has_an_allowed_key_and_self_only_rule():
    gen = torch.Generator().manual_seed(3)
    pad = left_pad(6, 11, gen)
    pad[0] = True
    lay = BlockLayout.train(11, 6, 4, prompt_pad=pad)
    m = lay.dense_mask()
    assert bool(m.any(-1).all())
    empty_rule = torch.zeros_like(lay.self_only_rows())
    for b in range(6):
        for q in range(11):
            row = m[b, q]
            if row.sum() == 1 and row[q] and pad[b, q]:
                empty_rule[b, q] = True
    assert torch.equal(lay.self_only_rows(), empty_rule)
    assert bool(lay.self_only_rows()[0, :11].all())  # all-pad prompt: every prompt row self-only


def test_dense_mask_row_chunks():
    pad = left_pad(3, 7, torch.Generator().manual_seed(1))
    lay = BlockLayout.train(7, 9, 4, prompt_pad=pad)
    full = lay.dense_mask()
    parts = [lay.dense_mask(rows=(r, min(r + 5, lay.num_queries))) for r in range(0, lay.num_queries, 5)]
    assert torch.equal(torch.cat(parts, dim=1), full)
    with pytest.raises(ValueError, match="rows"):
        lay.dense_mask(rows=(3, 100))


def test_position_ids_left_padding():
    pad = torch.tensor([[True, True, False, False], [False, False, False, False]])
    lay = BlockLayout.train(4, 3, 2, prompt_pad=pad)
    pos = lay.position_ids()
    assert torch.equal(pos, torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 2, 3, 4],
                                          [0, 1, 2, 3, 4, 5, 6, 4, 5, 6]]))
    assert torch.equal(lay.query_position_ids(), pos)
    assert torch.equal(BlockLayout.train(0, 3, 2).position_ids(), torch.tensor([[0, 1, 2, 0, 1, 2]]))


def test_block_ids_partial_last_block():
    lay = BlockLayout.train(5, 7, 3)
    assert torch.equal(lay.block_ids(), torch.tensor([-2, -2, -1, -1, -1, 0, 0, 0, 1, 1, 1, 2,
                                                      0, 0, 0, 1, 1, 1, 2]))
    assert torch.equal(lay.stream_ids(), torch.tensor([-1] * 12 + [0] * 7))


# ---------------------------------------------------------------- staircase, decode, packed


@pytest.mark.parametrize("L,K", [(1, 1), (10, 3), (16, 4), (9, 16)])
def test_staircase(L, K):
    q = torch.arange(L)[:, None]
    k = torch.arange(L)[None, :]
    exp = (k // K) <= (q // K)
    lay = BlockLayout.staircase(L, K)
    assert torch.equal(lay.dense_mask()[0], exp)
    assert torch.equal(lay.position_ids()[0], torch.arange(L))
    assert (lay.num_queries, lay.num_keys) == (L, L)


@pytest.mark.parametrize("ell,K", [(0, 4), (13, 4), (32, 16), (5, 1)])
def test_decode(ell, K):
    lay = BlockLayout.decode(ell, K)
    assert (lay.num_queries, lay.num_keys) == (K, ell + K)
    assert bool(lay.dense_mask().all())
    assert torch.equal(lay.query_position_ids()[0], torch.arange(ell, ell + K))
    if ell:
        pad = torch.zeros(2, ell, dtype=torch.bool)
        pad[1, : ell // 2 + 1] = True
        lp = BlockLayout.decode(ell, K, cache_pad=pad)
        m = lp.dense_mask()
        assert torch.equal(m[0], torch.ones(K, ell + K, dtype=torch.bool))
        assert torch.equal(m[1], ~torch.cat([pad[1], torch.zeros(K, dtype=torch.bool)])[None].expand(K, -1))
        n_valid = ell - (ell // 2 + 1)
        assert torch.equal(lp.query_position_ids()[1], torch.arange(n_valid, n_valid + K))
        assert lp.pad_keys_only and torch.equal(m, (~lp.key_padding())[:, None, :].expand_as(m))


def test_pad_keys_only_exactly_when_the_mask_is_the_key_bitmap():
    pad = torch.tensor([[True, True, False, False, False, False], [False] * 6])
    layouts = [BlockLayout.decode(6, 4, cache_pad=pad), BlockLayout.decode(0, 3), BlockLayout.staircase(4, 4),
               BlockLayout.staircase(5, 4), BlockLayout.train(6, 4, 4, prompt_pad=pad),
               BlockLayout.packed(6, 3, 4, 0, prompt_pad=pad), BlockLayout(6, 3, 4, 0, 6, pad, "decode"),
               BlockLayout(6, 5, 4, 0, 6, pad, "decode"), BlockLayout(6, 3, 4, 0, 5, pad, "decode")]
    for lay in layouts:
        m = lay.dense_mask()
        keys = (~lay.key_padding())[:, None, :].expand_as(m)
        assert lay.pad_keys_only == torch.equal(m, keys), lay
    assert [lay.pad_keys_only for lay in layouts] == [True, True, True, False, False, False, True, False, False]


@pytest.mark.parametrize("L0,L1,K,n", [(5, 9, 4, 3), (0, 6, 2, 2), (3, 5, 2, 1), (4, 7, 3, 0)])
def test_packed_shared_clean(L0, L1, K, n):
    pad = left_pad(2, L0, torch.Generator().manual_seed(5))
    lay = BlockLayout.packed(L0, L1, K, n, prompt_pad=pad)
    assert lay.seq_len == L0 + (1 + n) * L1
    got = lay.dense_mask()
    assert torch.equal(got, trainer_mask(L0, L1, K, pad, num_noisy=n))
    # every noisy stream sees exactly what the single-stream training layout gives it
    one = BlockLayout.train(L0, L1, K, prompt_pad=pad).dense_mask()
    Lc = L0 + L1
    for s in range(n):
        x = slice(Lc + s * L1, Lc + (s + 1) * L1)
        assert torch.equal(got[:, x, :Lc], one[:, Lc:, :Lc])
        assert torch.equal(got[:, x, x], one[:, Lc:, Lc:])
        others = torch.ones(lay.seq_len, dtype=torch.bool)
        others[:Lc] = False
        others[x] = False
        assert not got[:, x][:, :, others].any()
    pos = lay.position_ids()
    for s in range(n):
        assert torch.equal(pos[:, Lc + s * L1:Lc + (s + 1) * L1], pos[:, L0:Lc])
    if n == 1:
        assert torch.equal(got, BlockLayout.train(L0, L1, K, prompt_pad=pad).dense_mask())


# ---------------------------------------------------------------- mask_mod, intervals, pair counts


def _layouts():
    pad = left_pad(3, 6, torch.Generator().manual_seed(11))
    pad[0] = True
    return [BlockLayout.train(6, 9, 4, prompt_pad=pad), BlockLayout.train(0, 7, 3),
            BlockLayout.packed(6, 5, 2, 3, prompt_pad=pad), BlockLayout.staircase(11, 4),
            BlockLayout.decode(9, 4), BlockLayout.decode(6, 4, cache_pad=pad)]


@pytest.mark.parametrize("lay", _layouts(), ids=repr)
def test_mask_mod_matches_dense(lay):
    B = lay.batch_size
    b = torch.arange(B)[:, None, None]
    q = torch.arange(lay.num_queries)[None, :, None]
    k = torch.arange(lay.num_keys)[None, None, :]
    got = torch.vmap(torch.vmap(torch.vmap(lay.mask_mod, in_dims=(None, None, None, 0)),
                                in_dims=(None, None, 0, None)), in_dims=(0, None, None, None))(
        b[:, 0, 0], torch.tensor(0), q[0, :, 0], k[0, 0, :])
    assert torch.equal(got, lay.dense_mask())


@pytest.mark.parametrize("lay", _layouts(), ids=repr)
def test_row_intervals_and_pair_count(lay):
    a_lo, a_hi, b_lo, b_hi, self_only = lay.row_intervals()
    k = torch.arange(lay.num_keys)[None, None, :]
    in_a = (k >= a_lo[..., None]) & (k < a_hi[..., None])
    in_b = (k >= b_lo[..., None]) & (k < b_hi[..., None])
    pad_ok = ~lay.key_padding()[:, None, :] | self_only[..., None]
    m = (in_a & pad_ok) | in_b
    dense = lay.dense_mask()
    assert torch.equal(m.expand_as(dense), dense)
    assert torch.equal(lay.allowed_pairs(), dense.sum((-1, -2)))


def test_allowed_pairs_spec_number():
    # docs/attention.md, 'The training layout': L0=300, L1=256, K=16 → 270,608 allowed pairs of N² = 659,344
    lay = BlockLayout.train(300, 256, 16)
    assert int(lay.allowed_pairs()[0]) == 270_608
    assert lay.seq_len ** 2 == 659_344


def test_flex_block_mask_builds():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    lay = BlockLayout.train(6, 9, 4)
    bm = lay.flex_block_mask(device="cpu")
    assert isinstance(bm, flex.BlockMask)


# ---------------------------------------------------------------- validation


def test_validation_messages():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockLayout.train(3, 4, 0)
    with pytest.raises(ValueError, match="response_len must be >= 1"):
        BlockLayout.train(3, 0, 2)
    with pytest.raises(TypeError, match="prompt_len must be an int"):
        BlockLayout.train(3.5, 4, 2)
    with pytest.raises(TypeError, match="torch.bool"):
        BlockLayout.train(3, 4, 2, prompt_pad=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"shape \[B, 3\]"):
        BlockLayout.train(3, 4, 2, prompt_pad=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        BlockLayout.staircase(0, 4)
    with pytest.raises(ValueError, match="num_noisy must be >= 0"):
        BlockLayout.packed(3, 4, 2, -1)
