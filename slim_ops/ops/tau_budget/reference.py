"""Plain PyTorch reference of the decode step (docs/decode.md): per row, per slot, readable, fp32.

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
Random remasking (strategy "random") ranks the eligible slots of a row by a second stream of the same seed:
    rank(slot)  = mix32(key(slot) ^ 0x5BD1E995)              uint32; larger rank first, lower slot index on ties

Entropy (strategy "entropy_bounded"): H = log S - (Σ_v e_v d_v) / S with d_v = z'_v - max z', e_v = exp(d_v),
S = Σ_v e_v, where z' = z (T = 0) or z / T (T > 0) and terms with e_v = 0 count 0; fp32, clamped at >= 0. It is the
entropy of the distribution x0 is taken from (softmax(z) for greedy, softmax(z / T) when sampling).

Invalid slots: a slot whose logits contain NaN or +inf, or are all -inf, has no distribution. It gets
token = mask_id and confidence = NaN and is never committed (it is excluded from M by every rule).
"""

from __future__ import annotations

import math

import torch

STRATEGIES = ("tau_budget", "threshold", "topk", "entropy_bounded", "factor", "random")
_RANK_SALT = 0x5BD1E995
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


def random_rank(seed: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Random-remasking priorities int64 [len(slots)] in [0, 2^32) for global slot ids `slots` under `seed` ([1])."""
    s = seed.reshape(()).to(torch.int64)
    lo, hi = s & _M32, (s >> 32) & _M32
    key = mix32(hi ^ mix32(lo + slots.to(torch.int64)))
    return mix32(key ^ _RANK_SALT)


def static_floor(block_size: int, steps: int, step: int) -> int:
    """f_j = ⌊K/S⌋ + [j < K mod S]: the least number of commits at step j of a block (docs/decode.md, 'The τ-budget
    rule')."""
    return block_size // steps + (1 if step < block_size % steps else 0)


def budget(tau: float, m: float, floor: int) -> float:
    """b = fp32(m_eff·(1−τ)), the product in fp64, m_eff = m if m > 0 else floor."""
    m_eff = m if m > 0 else float(floor)
    return float(torch.tensor(m_eff * (1.0 - tau), dtype=torch.float64).to(torch.float32))


def select_row_ref(c: torch.Tensor, masked: torch.Tensor, tau: float, m: float, floor: int,
                   strategy: str = "tau_budget", *, entropy: torch.Tensor | None = None, gamma: float = 0.0,
                   factor: float = 1.0, rank: torch.Tensor | None = None) -> tuple[torch.Tensor, int, float]:
    """One row of docs/decode.md, 'The τ-budget rule' and 'Other selection rules' and the peer rules below. c [K] fp32,
    masked [K] bool -> (commit [K] bool, k, risk).

    Eligible slots E: masked, c not NaN (and, for entropy_bounded, entropy not NaN). Every rule picks k slots and
    commits the first k of an order over E; k is always clamped to |E|, and the floor f is a lower bound on k.

    * tau_budget / threshold / topk: docs/decode.md, 'The τ-budget rule' and 'Other selection rules'; order = c
      descending, lower index first.
    * entropy_bounded (EB-sampler): order = entropy ascending, lower index first. With S_n the fp32 inclusive prefix
      sum of the ordered entropies, d_n = fp32(S_n − H_(n)) (H_(n) is the largest of the first n),
      k_γ = #{n : d_n <= fp32(γ)} (counted over all n, as the peer counts its cumsum − cummax condition; d_1 = 0,
      so k_γ >= 1 when E is not empty), k = min(max(k_γ, f), |E|).
    * factor (Fast-dLLM's factor-based parallel decoding): order = c descending, lower index first.
      u_n = fp32(1 − c_(n)); n_f = max(1, #{n : (n+1)·u_n < factor}) with the product and the comparison in fp64
      (exact); k = min(max(n_f, f), |E|). Strict "<" is "c_(n) > 1 − factor/(n+1)" (the peer keeps equality); the
      peer also commits every slot when only the last one fails, which this rule does not.
    * random (LLaDA's random remasking): order = rank descending (``random_rank``), lower index first;
      k = min(f, |E|).
    risk = Σ_{j∈C} fp32(1 − c_j) accumulated in commit order.
    """
    K = c.shape[0]
    c = c.to(torch.float32)
    tau32 = torch.tensor(tau, dtype=torch.float32)
    eligible = [j for j in range(K) if bool(masked[j]) and not math.isnan(float(c[j]))]
    if strategy == "entropy_bounded":
        if entropy is None:
            raise ValueError("strategy 'entropy_bounded' needs the per-slot entropy")
        h = entropy.to(torch.float32)
        eligible = [j for j in eligible if not math.isnan(float(h[j]))]
        order = sorted(eligible, key=lambda j: (float(h[j]), j))  # entropy asc, slot index asc
    elif strategy == "random":
        if rank is None:
            raise ValueError("strategy 'random' needs the per-slot random ranks")
        order = sorted(eligible, key=lambda j: (-int(rank[j]), j))
    else:
        order = sorted(eligible, key=lambda j: (-float(c[j]), j))  # ĉ desc, slot index asc
    above = [j for j in order if c[j] > tau32]  # A, a prefix of `order` for the confidence-ordered rules
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
    elif strategy == "entropy_bounded":
        g32 = torch.tensor(gamma, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32)
        k_g = 0
        for j in order:
            total = total + h[j]  # fp32 inclusive prefix sum in entropy order
            if total - h[j] <= g32:  # fp32(S_n − H_(n)) <= fp32(γ)
                k_g += 1
        k = min(max(k_g, floor), len(order))
    elif strategy == "factor":
        n_f = 0
        for n, j in enumerate(order, start=1):
            u = float(torch.tensor(1.0, dtype=torch.float32) - c[j])  # fp32(1 − c), exact in fp64 from here
            if (n + 1) * u < float(factor):
                n_f += 1
        k = min(max(n_f, 1, floor), len(order))
    elif strategy == "random":
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
    """One slot of docs/decode.md, 'Candidate token and confidence' without top-k/top-p. z [V] any float -> (x0 or None
    if invalid, c)."""
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


def slot_candidates_ref(logits: torch.Tensor, seed: torch.Tensor | None, temperature: float, mask_id: int,
                        chunk_elems: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``slot_ref`` for every slot of logits [R, K, V] at once, on logits' device, fp32 on the upcast logits, for
    checking kernels at real vocabularies. Rows are taken ``chunk_elems`` logits at a time, bounding the fp32 copy.

    Returns (tokens int64, confidence fp32, gap fp32), each [R, K]: gap is the best minus the second best score
    (z, or z / T + g when sampling; +inf when V = 1), which tells the caller where the fp32 argmax is a near-tie.
    Invalid slots get (mask_id, NaN, +inf). ``seed`` ([1] int64) is needed only when temperature > 0."""
    R, K, V = logits.shape
    per = max(1, chunk_elems // max(1, K * V))
    toks, confs, gaps = [], [], []
    for r0 in range(0, R, per):
        z = logits[r0:r0 + per].to(torch.float32).reshape(-1, V)
        invalid = torch.isnan(z).any(-1) | torch.isposinf(z).any(-1) | torch.isneginf(z).all(-1)
        if temperature == 0.0:
            score = z
            tok = torch.argmax(score, dim=-1)  # first index among equal maxima
            conf = 1.0 / torch.exp(z - z.max(-1, keepdim=True).values).sum(-1)
        else:
            zt = z / temperature
            slots = torch.arange(r0 * K, r0 * K + z.shape[0], device=z.device)
            score = zt + gumbel_noise(seed.to(z.device), slots, V)
            tok = torch.argmax(score, dim=-1)
            conf = torch.softmax(zt, dim=-1).gather(1, tok[:, None])[:, 0]
        top = score.topk(min(2, V), dim=-1).values
        gap = top[:, 0] - top[:, -1] if V > 1 else torch.full_like(conf, math.inf)
        toks.append(torch.where(invalid, mask_id, tok))
        confs.append(torch.where(invalid, math.nan, conf))
        gaps.append(torch.where(invalid, math.inf, gap))
    return torch.cat(toks).reshape(R, K), torch.cat(confs).reshape(R, K), torch.cat(gaps).reshape(R, K)


def slot_entropy_ref(z: torch.Tensor, temperature: float) -> float:
    """Entropy (nats, fp32) of softmax(z) (T = 0) or softmax(z / T) for one valid slot z [V] (module docstring)."""
    z = z.to(torch.float32)
    if temperature > 0:
        z = z / temperature
    d = z - z.max()
    e = torch.exp(d)
    s = e.sum()
    w = torch.where(e > 0, e * d, torch.zeros((), dtype=torch.float32)).sum()
    return max(float(torch.log(s) - w / s), 0.0)


def tau_budget_step_ref(logits: torch.Tensor, block: torch.Tensor, mask_id: int, *, tau=0.9, m=1.0, floor=1,
                        temperature: float = 0.0, seed: torch.Tensor | None = None,
                        strategy: str = "tau_budget", gamma=0.0, factor=1.0, defer_ids=None,
                        return_entropy: bool = False):
    """Per-row loop over docs/decode.md (no top-k/top-p). Returns the same fields as slim_ops.StepOutput (+ the entropy
    [R, K] fp32 when ``return_entropy``; NaN for invalid slots).

    ``defer_ids``: slots whose token x0 is one of these ids get confidence 0 (and entropy +inf) before the selection
    (LLaDA's confidence_eos_eot_inf): they are committed only when the floor needs them, and last."""
    R, K, V = logits.shape
    per_row = lambda x, i: float(x[i]) if isinstance(x, torch.Tensor) else x  # noqa: E731
    tokens = torch.empty(R, K, dtype=torch.int64)
    conf = torch.empty(R, K, dtype=torch.float32)
    ent = torch.full((R, K), float("nan"), dtype=torch.float32)
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
            if x0 is not None:
                ent[r, j] = slot_entropy_ref(logits[r, j].cpu(), temperature)
            if x0 is not None and defer_ids is not None and x0 in [int(i) for i in defer_ids]:
                conf[r, j] = 0.0
                ent[r, j] = float("inf")
        masked = new_block[r] == mask_id
        fl = int(per_row(floor, r))
        rank = random_rank(seed.cpu(), torch.arange(r * K, (r + 1) * K)) if strategy == "random" else None
        commit[r], num[r], risk[r] = select_row_ref(conf[r], masked, per_row(tau, r), per_row(m, r), fl, strategy,
                                                    entropy=ent[r], gamma=per_row(gamma, r),
                                                    factor=per_row(factor, r), rank=rank)
        new_block[r] = torch.where(commit[r], tokens[r], new_block[r])
    if return_entropy:
        return new_block, commit, tokens, conf, num, risk, ent
    return new_block, commit, tokens, conf, num, risk


def per_row_loop(logits: torch.Tensor, block: torch.Tensor, mask_id: int, tau: float = 0.9, m: float = 1.0,
                 floor: int = 1) -> torch.Tensor:
    """Baseline shaped like the upstream engines (docs/benchmarks.md), for benchmarks: one row at a time, fp64
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
