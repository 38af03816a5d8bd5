"""Plain PyTorch reference of the decode step (SPEC.md §2): per row, per slot, readable, fp32.

This file *defines* the op; every backend is tested against it.

Counter-based RNG (shared bit-for-bit by every backend, so a seed reproduces the same tokens anywhere):
    mix32(x)    = lowbias32 finaliser: x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16 (mod 2^32)
    seed        = one int64 drawn from the caller's torch.Generator per call; lo/hi = its two 32-bit halves
    key(slot)   = mix32(hi ^ mix32(lo + slot))            slot = r*K + j
    bits(slot,v)= mix32(key(slot) + v * 0x9E3779B9)         (mod 2^32)
    u           = ((bits >> 9) + 0.5) * 2^-23                in [2^-24, 1 - 2^-24], exact in fp32
    g           = -log(-log(u))                              standard Gumbel, |g| < 17
    x0          = argmax_v (z_v / T + g_v)                   lowest index among equal scores
This is Gumbel-max sampling: x0 ~ Categorical(softmax(z / T)).

Invalid slots: a slot whose logits contain NaN or +inf, or are all -inf, has no distribution. It gets
token = mask_id and confidence = NaN and is never committed (it is excluded from M by every rule).
"""

from __future__ import annotations

import math

import torch

STRATEGIES = ("tau_budget", "threshold", "topk")
_M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer finaliser on int64 tensors holding uint32 values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, slots: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise [len(slots), vocab] fp32 for global slot ids `slots` (int64) under `seed` ([1] int64)."""
    s = seed.reshape(()).to(torch.int64)
    lo, hi = s & _M32, (s >> 32) & _M32
    key = mix32(hi ^ mix32(lo + slots.to(torch.int64)))  # [n]
    v = torch.arange(vocab, dtype=torch.int64, device=slots.device)
    bits = mix32(key[:, None] + ((v * 0x9E3779B9) & _M32)[None, :])
    u = ((bits >> 9).to(torch.float32) + 0.5) * (2.0**-23)
    return -torch.log(-torch.log(u))


def static_floor(block_size: int, steps: int, step: int) -> int:
    """f_j = ⌊K/S⌋ + [j < K mod S]: the least number of commits at step j of a block (SPEC §2.1)."""
    return block_size // steps + (1 if step < block_size % steps else 0)


def budget(tau: float, m: float, floor: int) -> float:
    """b = fp32(m_eff·(1−τ)), the product in fp64, m_eff = m if m > 0 else floor."""
    m_eff = m if m > 0 else float(floor)
    return float(torch.tensor(m_eff * (1.0 - tau), dtype=torch.float64).to(torch.float32))


def select_row_ref(c: torch.Tensor, masked: torch.Tensor, tau: float, m: float, floor: int,
                   strategy: str = "tau_budget") -> tuple[torch.Tensor, int, float]:
    """One row of SPEC §2.3/§2.4. c [K] fp32, masked [K] bool -> (commit [K] bool, k, risk)."""
    K = c.shape[0]
    c = c.to(torch.float32)
    tau32 = torch.tensor(tau, dtype=torch.float32)
    eligible = [j for j in range(K) if bool(masked[j]) and not math.isnan(float(c[j]))]
    order = sorted(eligible, key=lambda j: (-float(c[j]), j))  # ĉ desc, slot index asc
    above = [j for j in order if c[j] > tau32]  # A, a prefix of `order`
    if strategy == "tau_budget":
        b = torch.tensor(budget(tau, m, floor), dtype=torch.float32)
        u = torch.zeros((), dtype=torch.float32)
        k_b = 0
        for j in above:
            u = u + (1.0 - c[j])  # fp32(1 - c) then fp32 accumulation, in sorted order
            if u <= b:
                k_b += 1
        k = min(max(k_b, floor), len(order))
    elif strategy == "threshold":
        k = min(max(len(above), floor), len(order))
    elif strategy == "topk":
        k = min(floor, len(order))
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    commit = torch.zeros(K, dtype=torch.bool)
    risk = torch.zeros((), dtype=torch.float32)
    for j in order[:k]:
        commit[j] = True
        risk = risk + (1.0 - c[j])
    return commit, k, float(risk)


def slot_ref(z: torch.Tensor, temperature: float, noise: torch.Tensor | None) -> tuple[int | None, float]:
    """One slot of SPEC §2.2 without top-k/top-p. z [V] any float -> (x0 or None if invalid, c)."""
    z = z.to(torch.float32)
    if torch.isnan(z).any() or torch.isposinf(z).any() or torch.isneginf(z).all():
        return None, float("nan")
    if temperature == 0.0:
        x0 = int(torch.argmax(z))  # first index among equal maxima
        return x0, float(1.0 / torch.exp(z - z.max()).sum())
    zt = z / temperature
    x0 = int(torch.argmax(zt + noise))
    p = torch.softmax(zt, dim=0)
    return x0, float(p[x0])


def tau_budget_step_ref(logits: torch.Tensor, block: torch.Tensor, mask_id: int, *, tau=0.9, m=1.0, floor=1,
                        temperature: float = 0.0, seed: torch.Tensor | None = None,
                        strategy: str = "tau_budget"):
    """Per-row loop over SPEC §2 (no top-k/top-p). Returns the same fields as slim_ops.StepOutput."""
    R, K, V = logits.shape
    per_row = lambda x, i: float(x[i]) if isinstance(x, torch.Tensor) else x  # noqa: E731
    tokens = torch.empty(R, K, dtype=torch.int64)
    conf = torch.empty(R, K, dtype=torch.float32)
    commit = torch.zeros(R, K, dtype=torch.bool)
    num = torch.zeros(R, dtype=torch.int32)
    risk = torch.zeros(R, dtype=torch.float32)
    new_block = block.clone().cpu()
    for r in range(R):
        for j in range(K):
            noise = None
            if temperature > 0:
                noise = gumbel_noise(seed.cpu(), torch.tensor([r * K + j]), V)[0]
            x0, c = slot_ref(logits[r, j].cpu(), temperature, noise)
            tokens[r, j] = mask_id if x0 is None else x0
            conf[r, j] = c
        masked = new_block[r] == mask_id
        fl = int(per_row(floor, r))
        commit[r], num[r], risk[r] = select_row_ref(conf[r], masked, per_row(tau, r), per_row(m, r), fl, strategy)
        new_block[r] = torch.where(commit[r], tokens[r], new_block[r])
    return new_block, commit, tokens, conf, num, risk


def per_row_loop(logits: torch.Tensor, block: torch.Tensor, mask_id: int, tau: float = 0.9, m: float = 1.0,
                 floor: int = 1) -> torch.Tensor:
    """Baseline shaped like the upstream engines (SPEC §7), for benchmarks: one row at a time, fp64
    probabilities over the whole vocabulary, sort + cumsum, `.item()` host syncs. Greedy, tau_budget only."""
    out = block.clone()
    for r in range(logits.shape[0]):
        probs = torch.softmax(logits[r].double(), dim=-1)  # [K, V] fp64
        conf, x0 = probs.max(dim=-1)
        masked = block[r] == mask_id
        n_masked = int(masked.sum().item())
        if n_masked == 0:
            continue
        conf = torch.where(masked, conf, torch.tensor(-1.0, dtype=conf.dtype, device=conf.device))
        vals, order = torch.sort(conf, descending=True)
        above = vals > tau
        risk = torch.cumsum(torch.where(above, 1.0 - vals, 0.0), dim=0)
        k_b = int(((risk <= m * (1 - tau)) & above).sum().item())
        k = min(max(k_b, floor), n_masked)
        sel = order[:k]
        out[r, sel] = x0[sel]
    return out
