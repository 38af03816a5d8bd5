"""Block-diffusion attention layouts (docs/attention.md): which query may attend to which key.

A :class:`BlockLayout` describes one token stream by a handful of integers plus an optional prompt
padding bitmap; no N×N tensor is stored. The stream is

```
[ prompt P (L0, left-padded) | clean response C (L1) | noisy stream X_0 (L1) | ... | X_{n-1} (L1) ]
```

and the queries are the positions ``[q_start, seq_len)`` of that stream (keys are all of it).
Every token has a *block id* and a *stream id*:

```
prompt j ∈ [0, L0)           blk = −1 − ⌊(L0−1−j)/K⌋   stream = −1   (prompt blocks right-aligned to L0)
clean  j = L0 + i            blk = ⌊i/K⌋               stream = −1
noisy  j = L0 + L1 + s·L1 + i  blk = ⌊i/K⌋             stream = s
```

and the predicate ``allowed(q, k)`` is (``padkey(k)`` = k is a prompt pad; P∪C = stream −1)::

    q ∈ P∪C : k ∈ P∪C ∧ blk(k) ≤ blk(q) ∧ ¬padkey(k)
    q ∈ X_s : (k ∈ P∪C ∧ blk(k) < blk(q) ∧ ¬padkey(k)) ∨ (k ∈ X_s ∧ blk(k) = blk(q))
    a prompt row with no allowed key attends to itself only

The constructors (docs/attention.md, 'The four layouts') map onto this one description:

=====================================================  ====  =====  ===  =========
constructor                                            L0    L1     n    q_start
=====================================================  ====  =====  ===  =========
``train(L0, L1, K, prompt_pad)``      (training)       L0    L1     1    0
``packed(L0, L1, K, n, prompt_pad)``  (shared C)       L0    L1     n    0
``staircase(L, K)``                   (prefill, SFT)   0     L      0    0
``decode(ℓ, K, cache_pad)``           (decode step)    ℓ     K      0    ℓ
=====================================================  ====  =====  ===  =========

(The staircase is a clean stream without prompt: ⌊k/K⌋ ≤ ⌊q/K⌋. Decode is a "prompt" = the cache,
every block of which precedes the current block, plus the K new slots: every pair is allowed,
except cache pads when ``cache_pad`` is given.)

Position ids (docs/attention.md, 'The training layout'): ``valid_j = (j ≥ L0) ∨ ¬pad_j``,
``pos = cumsum(valid) − 1`` over P∪C with nothing overwritten (left pads get −1; pads are hidden keys, so
their positions change no non-pad output), and every noisy stream reuses C's positions.

Typical use::

    layout = BlockLayout.train(L0, L1, 16, prompt_pad=prompt_ids == pad_id)   # [B, L0] bool
    mask = layout.dense_mask()            # bool [B, N, N], the reference predicate (small N only)
    pos = layout.position_ids()           # int64 [B, N] (RoPE positions)
    o = slim_ops.block_diffusion_attention(q, k, v, layout)   # no N×N tensor on the kernel path
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

__all__ = ["BlockLayout"]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import operator

            value = operator.index(value)  # numpy / 0-d tensor ints
        except TypeError:
            raise TypeError(f"BlockLayout: {name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"BlockLayout: {name} must be >= {minimum}, got {value}")
    return int(value)


def _check_pad(name: str, pad: torch.Tensor | None, length: int) -> torch.Tensor | None:
    if pad is None:
        return None
    if not isinstance(pad, torch.Tensor):
        raise TypeError(f"BlockLayout: {name} must be a bool tensor [B, {length}] or None, got {type(pad)}")
    if pad.dtype != torch.bool:
        raise TypeError(f"BlockLayout: {name} must have dtype torch.bool (True = pad), got {pad.dtype}")
    if pad.dim() != 2 or pad.shape[1] != length:
        raise ValueError(f"BlockLayout: {name} must have shape [B, {length}] (one row per sequence, one "
                         f"column per prompt/cache position), got {tuple(pad.shape)}")
    if pad.shape[0] < 1:
        raise ValueError(f"BlockLayout: {name} must have at least one row, got {tuple(pad.shape)}")
    return pad


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """A block-diffusion attention layout (see the module docstring for the predicate).

    Attributes:
        prompt_len: L0, the (left-padded) prompt length; for ``decode`` the cache length ℓ.
        response_len: L1, the clean response length (= each noisy stream's length); ``K`` for decode.
        block_size: K ≥ 1.
        num_noisy: number of noisy streams n (1 = the training layout, 0 = no noisy part).
        q_start: first query position in the stream (queries are ``[q_start, seq_len)``).
        prompt_pad: optional bool [B, L0], True where the prompt (cache) token is a pad.
        kind: "train", "packed", "staircase" or "decode" (informative).
    """

    prompt_len: int
    response_len: int
    block_size: int
    num_noisy: int = 1
    q_start: int = 0
    prompt_pad: torch.Tensor | None = None
    kind: str = "train"

    # ------------------------------------------------------------------ constructors
    @classmethod
    def train(cls, prompt_len: int, response_len: int, block_size: int,
              prompt_pad: torch.Tensor | None = None) -> BlockLayout:
        """[prompt ‖ clean response ‖ noisy response], N = L0 + 2·L1 (docs/attention.md, 'The training layout').

        Args:
            prompt_len: L0 ≥ 0 (left-padded prompt). response_len: L1 ≥ 1. block_size: K ≥ 1.
            prompt_pad: None (no pads) or bool [B, L0], True at prompt pad tokens (``ids == pad_id``).
        """
        L0 = _check_int("prompt_len", prompt_len, 0)
        L1 = _check_int("response_len", response_len, 1)
        K = _check_int("block_size", block_size, 1)
        return cls(L0, L1, K, 1, 0, _check_pad("prompt_pad", prompt_pad, L0), "train")

    @classmethod
    def packed(cls, prompt_len: int, response_len: int, block_size: int, num_noisy: int,
               prompt_pad: torch.Tensor | None = None) -> BlockLayout:
        """Shared clean stream (docs/attention.md, 'Shared clean stream'): one P∪C stream followed by ``num_noisy``
        noisy streams.

        N = L0 + (1 + n)·L1. Noisy stream s occupies ``[L0 + L1 + s·L1, L0 + L1 + (s+1)·L1)``; X↔X
        attention is allowed only inside one stream. ``packed(L0, L1, K, 1)`` equals ``train(L0, L1, K)``.
        """
        L0 = _check_int("prompt_len", prompt_len, 0)
        L1 = _check_int("response_len", response_len, 1)
        K = _check_int("block_size", block_size, 1)
        n = _check_int("num_noisy", num_noisy, 0)
        return cls(L0, L1, K, n, 0, _check_pad("prompt_pad", prompt_pad, L0), "packed")

    @classmethod
    def staircase(cls, seq_len: int, block_size: int) -> BlockLayout:
        """Prefill / SFT (docs/attention.md, 'The four layouts'): allowed ⇔ ⌊k/K⌋ ≤ ⌊q/K⌋, Lq = Lk = seq_len."""
        L = _check_int("seq_len", seq_len, 1)
        K = _check_int("block_size", block_size, 1)
        return cls(0, L, K, 0, 0, None, "staircase")

    @classmethod
    def decode(cls, cache_len: int, block_size: int, cache_pad: torch.Tensor | None = None) -> BlockLayout:
        """One decode step (docs/attention.md, 'The four layouts'): K queries at [ℓ, ℓ+K), keys = cache [0, ℓ) + the K
        new keys.

        Every pair is allowed; with ``cache_pad`` (bool [B, ℓ], True at left-pad tokens of the cached
        prompt) the pad keys are hidden. Lq = K, Lk = ℓ + K.
        """
        ell = _check_int("cache_len", cache_len, 0)
        K = _check_int("block_size", block_size, 1)
        return cls(ell, K, K, 0, ell, _check_pad("cache_pad", cache_pad, ell), "decode")

    # ------------------------------------------------------------------ sizes
    @property
    def seq_len(self) -> int:
        """Lk = L0 + (1 + n)·L1: the number of keys (= tokens in the stream)."""
        return self.prompt_len + (1 + self.num_noisy) * self.response_len

    @property
    def num_keys(self) -> int:
        return self.seq_len

    @property
    def num_queries(self) -> int:
        """Lq = seq_len − q_start."""
        return self.seq_len - self.q_start

    @property
    def context_len(self) -> int:
        """L0 + L1: end of the P∪C (clean) part."""
        return self.prompt_len + self.response_len

    @property
    def pad_keys_only(self) -> bool:
        """True when every (query, key) pair is allowed except pad keys (decode steps, see docs/attention.md):
        no noisy stream, no prompt row among the queries and one clean block, so ``dense_mask() == ~key_padding()``
        broadcast over the rows. The torch backend then masks with the [B, 1, 1, Lk] key bitmap only."""
        return self.num_noisy == 0 and self.q_start >= self.prompt_len and self.response_len <= self.block_size

    @property
    def batch_size(self) -> int:
        """Rows of the pad bitmap, 1 when there is none (then everything broadcasts over the batch)."""
        return 1 if self.prompt_pad is None else int(self.prompt_pad.shape[0])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.prompt_pad is None else self.prompt_pad.device

    def to(self, device: torch.device | str) -> BlockLayout:
        """The same layout with its pad bitmap on `device`."""
        if self.prompt_pad is None or self.prompt_pad.device == torch.device(device):
            return self
        return dataclasses.replace(self, prompt_pad=self.prompt_pad.to(device))

    def __repr__(self) -> str:
        pad = "None" if self.prompt_pad is None else f"bool{list(self.prompt_pad.shape)}"
        return (f"BlockLayout.{self.kind}(L0={self.prompt_len}, L1={self.response_len}, K={self.block_size}, "
                f"num_noisy={self.num_noisy}, q_start={self.q_start}, prompt_pad={pad}; "
                f"Lq={self.num_queries}, Lk={self.seq_len})")

    # ------------------------------------------------------------------ per-token metadata
    def block_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 [Lk]: block id of every stream position (queries use ``[q_start:]``)."""
        device = self.device if device is None else device
        L0, L1, K = self.prompt_len, self.response_len, self.block_size
        j = torch.arange(self.seq_len, device=device)
        prompt = -1 - torch.div(L0 - 1 - j, K, rounding_mode="floor")
        i = torch.where(j >= L0, (j - L0) % L1, 0)
        return torch.where(j < L0, prompt, torch.div(i, K, rounding_mode="floor"))

    def stream_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 [Lk]: −1 on P∪C, s on noisy stream s."""
        device = self.device if device is None else device
        j = torch.arange(self.seq_len, device=device)
        s = torch.div(j - self.context_len, self.response_len, rounding_mode="floor")
        return torch.where(j < self.context_len, -1, s)

    def key_padding(self, device: torch.device | str | None = None) -> torch.Tensor:
        """bool [B or 1, Lk]: True at keys hidden as pads (prompt pads only)."""
        device = self.device if device is None else device
        out = torch.zeros(self.batch_size, self.seq_len, dtype=torch.bool, device=device)
        if self.prompt_pad is not None:
            out[:, : self.prompt_len] = self.prompt_pad.to(device)
        return out

    def first_valid(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int32 [B or 1]: index of the first non-pad prompt token (L0 when the prompt is all pads)."""
        device = self.device if device is None else device
        L0 = self.prompt_len
        if self.prompt_pad is None or L0 == 0:
            return torch.zeros(self.batch_size, dtype=torch.int32, device=device)
        pad = self.prompt_pad.to(device)
        j = torch.arange(L0, device=device)
        return torch.where(pad, L0, j).amin(dim=1).to(torch.int32)

    def self_only_rows(self, device: torch.device | str | None = None) -> torch.Tensor:
        """bool [B or 1, Lq]: query rows with no allowed key, which attend to themselves only.

        Only prompt rows can be empty: row q < L0 is empty iff every prompt token of the blocks up to
        and including q's block is a pad, i.e. iff the end of q's block ≤ the first non-pad index.
        """
        device = self.device if device is None else device
        L0, K = self.prompt_len, self.block_size
        q = torch.arange(self.q_start, self.seq_len, device=device)
        block_end = L0 - torch.div(L0 - 1 - q, K, rounding_mode="floor") * K
        fv = self.first_valid(device).to(torch.int64)
        return (q < L0)[None, :] & (block_end[None, :] <= fv[:, None])

    def position_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 [B or 1, Lk]: RoPE positions of the whole stream (queries: ``[:, q_start:]``).

        ``valid = (j ≥ L0) ∨ ¬pad``; ``pos = cumsum(valid) − 1`` over P∪C (docs/attention.md, 'The training layout', so
        left pads get −1: they are hidden keys and their own rows attend only to themselves, so their value changes no
        valid output);
        noisy streams reuse the clean positions.
        """
        device = self.device if device is None else device
        Lc = self.context_len
        valid = ~self.key_padding(device)[:, :Lc]
        pos = valid.long().cumsum(-1) - 1
        clean = pos[:, self.prompt_len:]
        return torch.cat([pos] + [clean] * self.num_noisy, dim=1)

    def query_position_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 [B or 1, Lq]: ``position_ids()[:, q_start:]``."""
        return self.position_ids(device)[:, self.q_start:]

    # ------------------------------------------------------------------ the predicate
    def dense_mask(self, device: torch.device | str | None = None, rows: tuple[int, int] | None = None
                   ) -> torch.Tensor:
        """bool [B or 1, Lq, Lk] (or the query rows ``[r0, r1)`` only): the reference predicate.

        Built from block ids and stream ids exactly as docs/attention.md, 'The training layout' states it (O(Lq·Lk)
        memory: for tests, the torch backend's query chunks and the dense-mask baselines, never for the kernel path).
        """
        device = self.device if device is None else device
        r0, r1 = (0, self.num_queries) if rows is None else rows
        if not 0 <= r0 <= r1 <= self.num_queries:
            raise ValueError(f"BlockLayout.dense_mask: rows must satisfy 0 <= r0 <= r1 <= Lq="
                             f"{self.num_queries}, got {rows}")
        blk = self.block_ids(device)
        stream = self.stream_ids(device)
        qi = torch.arange(self.q_start + r0, self.q_start + r1, device=device)
        bq, sq = blk[qi][:, None], stream[qi][:, None]  # [r, 1]
        bk, sk = blk[None, :], stream[None, :]  # [1, Lk]
        key_ok = ~self.key_padding(device)[:, None, :]  # [B, 1, Lk]
        ctx_k = sk == -1
        from_ctx = (sq == -1) & ctx_k & (bk <= bq)
        from_noisy = (sq >= 0) & ((ctx_k & (bk < bq)) | ((sk == sq) & (bk == bq)))
        mask = ((from_ctx | (from_noisy & ctx_k))[None] & key_ok) | (from_noisy & ~ctx_k)[None]
        empty = ~mask.any(dim=-1) & (qi < self.prompt_len)[None, :]  # [B, r]
        diag = qi[:, None] == torch.arange(self.seq_len, device=device)[None, :]
        return mask | (empty[:, :, None] & diag[None])

    @property
    def mask_mod(self) -> Callable:
        """``mask_mod(b, h, q_idx, kv_idx) -> bool`` for ``torch.nn.attention.flex_attention``.

        Query indices are relative to ``q_start`` (as flex_attention numbers them). The per-token
        tables it reads live on the pad bitmap's device; call ``layout.to(device)`` first.
        """
        dev = self.device
        blk = self.block_ids(dev)
        stream = self.stream_ids(dev)
        key_ok = ~self.key_padding(dev)  # [B or 1, Lk]
        self_only = self.self_only_rows(dev)  # [B or 1, Lq]
        q0 = self.q_start
        batched = self.prompt_pad is not None

        def mask_mod(b, h, q_idx, kv_idx):
            qa = q_idx + q0
            bq, sq, bk, sk = blk[qa], stream[qa], blk[kv_idx], stream[kv_idx]
            bb = b if batched else 0
            ctx_k = sk == -1
            ok = key_ok[bb, kv_idx]
            from_ctx = (sq == -1) & ctx_k & (bk <= bq) & ok
            from_noisy = (sq >= 0) & ((ctx_k & (bk < bq) & ok) | ((sk == sq) & (bk == bq)))
            return from_ctx | from_noisy | (self_only[bb, q_idx] & (kv_idx == qa))

        return mask_mod

    def flex_block_mask(self, batch_size: int | None = None, num_heads: int | None = None,
                        device: torch.device | str | None = None, block_size: int = 128):
        """A ``torch.nn.attention.flex_attention.BlockMask`` for this layout (built once, reuse it)."""
        from torch.nn.attention.flex_attention import create_block_mask

        lay = self if device is None else self.to(device)
        B = None if self.prompt_pad is None else (batch_size or self.batch_size)
        return create_block_mask(lay.mask_mod, B, num_heads, self.num_queries, self.seq_len,
                                 device=str(lay.device if device is None else device), BLOCK_SIZE=block_size)

    def allowed_pairs(self) -> torch.Tensor:
        """int64 [B or 1]: number of allowed (q, k) pairs per sequence (the FLOP count's basis).

        Computed in O(Lq) from per-row key intervals, without building the mask.
        """
        a_lo, a_hi, b_lo, b_hi, self_only = self.row_intervals()
        n_a = (a_hi - a_lo).clamp(min=0)
        if self.prompt_pad is not None and self.prompt_len > 0:
            # pads inside [0, a_hi) are hidden unless the row is self-only
            pad_cum = torch.cat([torch.zeros(self.batch_size, 1, dtype=torch.int64, device=self.device),
                                 self.prompt_pad.long().cumsum(-1)], dim=1)  # [B, L0+1]
            hi = a_hi.clamp(max=self.prompt_len)
            n_pad = pad_cum.gather(1, hi.expand(self.batch_size, -1).contiguous())
            n_a = torch.where(self_only, n_a, n_a - n_pad)
        n = n_a + (b_hi - b_lo).clamp(min=0)
        return n.sum(dim=-1)

    def row_intervals(self) -> tuple[torch.Tensor, ...]:
        """Per query row the allowed keys as intervals (what the Triton kernel computes in registers).

        Returns (a_lo, a_hi, b_lo, b_hi, self_only), int64 [B or 1, Lq] (self_only bool): row q may
        attend to keys in ``[a_lo, a_hi)`` that are not pads (pads allowed when self_only) and to all of
        ``[b_lo, b_hi)`` (its own noisy block).
        """
        dev = self.device
        L0, L1, K, Lc = self.prompt_len, self.response_len, self.block_size, self.context_len
        q = torch.arange(self.q_start, self.seq_len, device=dev)
        r = torch.div(L0 - 1 - q, K, rounding_mode="floor")
        i_c = (q - L0).clamp(min=0)
        ctx_hi = torch.where(q < L0, L0 - r * K,
                             L0 + torch.minimum((torch.div(i_c, K, rounding_mode="floor") + 1) * K,
                                                torch.tensor(L1, device=dev)))
        t = (q - Lc).clamp(min=0)
        s = torch.div(t, L1, rounding_mode="floor")
        bq = torch.div(t % L1, K, rounding_mode="floor")
        noisy = q >= Lc
        a_hi = torch.where(noisy, L0 + bq * K, ctx_hi)
        b_lo = torch.where(noisy, Lc + s * L1 + bq * K, 0)
        b_hi = torch.where(noisy, Lc + s * L1 + torch.minimum((bq + 1) * K, torch.tensor(L1, device=dev)), 0)
        self_only = self.self_only_rows(dev)
        B = self_only.shape[0]
        a_lo = torch.where(self_only, q[None], 0)
        a_hi = torch.where(self_only, q[None] + 1, a_hi[None])
        return a_lo, a_hi, b_lo[None].expand(B, -1), b_hi[None].expand(B, -1), self_only
