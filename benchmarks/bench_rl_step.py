"""One SLIM-RL step, end to end, through slim_ops and through the path it replaces, at a real vocabulary.

One RL step = rollout (Q prompts x G samples, τ-budget decoding) -> rewards -> SLIM rows -> old log-probs
-> one AdamW update. Paths (each in a fresh process: same model weights, prompts, rewards and row seeds):

  slim        exactly as ``slim_rl`` runs it: ``Trainer.rollout`` (the batched engine, slim attention, the
              fused decode step) and ``Trainer.update`` (shared clean stream, ``masked_logprob`` on the loss
              positions only, ``slim_policy_loss``).
  reference   plain PyTorch written here, shaped like the reference implementations: rollouts one row at a
              time with the KV cache, a full-vocabulary fp64 softmax, sort and host checks every step; training
              rows [P ‖ C ‖ X] one stream per row with a dense additive 4-D mask through SDPA, logits for every
              position -> log_softmax -> gather; the loss formula of slim_ops' reference (``slim_policy_loss_ref``).
  ref+decode      the reference with ``slim_ops.tau_budget_step`` as its decode step (still one row at a time)
  ref+attention   the reference with ``slim_ops.block_diffusion_attention`` (layouts, no N x N mask) everywhere
  ref+logprob     the reference with ``slim_ops.masked_logprob`` (no [n, V] logits) in training

Before any number is reported, ``slim`` and ``reference`` must agree: greedy rollouts token for token, the old
log-probs and the loss to fp32 tolerance (5e-4 absolute / relative), the gradients the optimizer steps with to
relative L2 error <= 1e-3. Rewards are fixed per sample (samples 0 and 1 of each group get 1, the others 0),
so every group has an advantage whatever the random model writes.

Per phase: wall seconds, tokens/s (rollout: generated tokens / s, and forwards (NFE); update: trained
loss tokens / s) and the peak memory the phase adds above what was in use before it (the model built): CPU,
resident memory (VmHWM after a reset, glibc returning large blocks at once); CUDA, max allocated. The random
model's LM head is drawn with std 0.2 (CPU preset): logits spread like a trained model's (std ~4.5), so no path
pays for exp() underflow that real logits would not cause.
The update phase is the old log-probs plus the update (the rows are built in both).

Usage:  python benchmarks/bench_rl_step.py --preset cpu [--out benchmarks/results/cpu]
        python benchmarks/bench_rl_step.py --preset sdar4b --out $OUT   (GPU: SDAR-4B layer shapes, 4 layers)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

PRESETS = {
    # Qwen3/SDAR-shaped, hidden 512, 4 layers, 8 query / 2 KV heads, V = 151936, fp32
    "cpu": dict(vocab=151936, hidden=512, layers=4, heads=8, kv_heads=2, inter=1024, dtype="float32", K=16,
                prompts=8, prompt_len=64, G=4, new_tokens=64, nodes=3, micro_rows=24, ref_micro_rows=24,
                device="cpu", head_std=0.2),
    # a small shape for the test-suite: the same code paths in seconds
    "tiny": dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, dtype="float32", K=8,
                 prompts=3, prompt_len=16, G=4, new_tokens=24, nodes=3, micro_rows=12, ref_micro_rows=5,
                 device="cpu", head_std=0.3),
    # SDAR-4B layer shapes with 4 layers, bf16 compute
    "sdar4b": dict(vocab=151936, hidden=2560, layers=4, heads=32, kv_heads=8, inter=9728, dtype="bfloat16", K=16,
                   prompts=4, prompt_len=128, G=8, new_tokens=256, nodes=3, micro_rows=24, ref_micro_rows=24,
                   device="cuda", head_std=0.1),
}
from slim_rl import memory  # noqa: E402

PATHS = ("slim", "reference", "ref+decode", "ref+attention", "ref+logprob")
TAU, M = 0.9, 1.0
SEED = 0
LR = 1e-6


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        memory.reset_peak_rss()


def _peak(device: str, base: int) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated()) - base
    return memory.peak_rss_bytes() - base


_GRADS_FILE = {"path": None}
_RECORDING = {"s": 0.0}


def _record_grads(params) -> None:
    """The gradients the optimizer steps with, streamed to a file (no flat copy in memory, so the phase's peak
    is the path's own), the seconds it takes subtracted from the phase's time."""
    t0 = time.perf_counter()
    torch.save([q.grad.detach().cpu() for q in params], _GRADS_FILE["path"])
    _RECORDING["s"] += time.perf_counter() - t0


def _load_grads(path: str) -> torch.Tensor:
    return torch.cat([g.float().reshape(-1) for g in torch.load(path, weights_only=True)])


def _base(device: str) -> int:
    """Memory in use before a phase (the model built): the phase's peak is reported above it."""
    if device == "cuda":
        torch.cuda.synchronize()
        return int(torch.cuda.memory_allocated())
    return memory.rss_bytes()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _config(p: dict, out_dir: str):
    from slim_rl.config import load_config

    return load_config(None, [
        "task.name=jsonl", "task.path=unused", "task.tokenizer=unused", "model.attention=slim",
        f"model.dtype={p['dtype']}", f"rollout.block_size={p['K']}", f"rollout.max_new_tokens={p['new_tokens']}",
        "rollout.strategy=tau_budget", f"rollout.tau={TAU}", f"rollout.m={M}", "rollout.temperature=0",
        f"rollout.group_size={p['G']}", f"rollout.prompts_per_step={p['prompts']}", "objective.name=slim",
        f"objective.num_nodes={p['nodes']}", "objective.shared_clean=true", "advantage.filter_groups=false",
        "optim.epochs=1", "optim.minibatches=1", f"optim.micro_batch_rows={p['micro_rows']}", f"optim.lr={LR}",
        "train.progress=false", "train.tensorboard=false", "train.threads=0", f"train.out_dir={out_dir}",
        "train.checkpoint_every=0", "eval.every=0", f"train.seed={SEED}"])


def _model(p: dict, device: str):
    from slim_rl.models import tiny

    m = tiny("sdar", vocab_size=p["vocab"], seed=SEED, hidden_size=p["hidden"], num_layers=p["layers"],
             num_heads=p["heads"], num_kv_heads=p["kv_heads"], intermediate_size=p["inter"], head_std=p["head_std"],
             dtype=torch.float32, device=device)
    return m


def _prompts(p: dict) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, p["vocab"] - 3, (p["prompt_len"],), generator=g).tolist() for _ in range(p["prompts"])]


def _rewards(n: int, G: int) -> list[float]:
    return [1.0 if i % G < 2 else 0.0 for i in range(n)]


# ------------------------------------------------------------------------------------------ slim path
def run_slim(p: dict, device: str, tmp: str) -> dict:
    from slim_rl.tasks import Example
    from slim_rl.trainer import Trainer

    prompts = _prompts(p)

    class FixedTask:
        name = "fixed"

        def sample(self, n, rng):
            return [Example(prompt=q, answer="") for q in prompts[:n]]

        def eval_set(self):
            return []

    cfg = _config(p, tmp)
    tr = Trainer(cfg, model=_model(p, device), task=FixedTask(), device=device)
    tr._rewards = lambda out, examples: _rewards(len(out.sequences), p["G"])
    rec: dict = {}
    logp_old: dict = {}
    orig_old = tr._logp_old

    def old(rows, scorer=None):
        t0 = time.perf_counter()
        out = orig_old(rows, scorer)
        _sync(device)
        logp_old.setdefault("value", out)
        logp_old["rows"] = rows
        rec["logp_old_s"] = time.perf_counter() - t0
        return out

    tr._logp_old = old
    step = tr.optimizer.step

    def record(*a, **kw):
        _record_grads(tr.model.parameters())
        return step(*a, **kw)

    tr.optimizer.step = record
    # rollout
    base = _base(device)
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    batch = tr.rollout(1)
    _sync(device)
    rec["rollout_s"] = time.perf_counter() - t0
    rec["rollout_peak"] = _peak(device, base)
    rec["nfe"] = int(batch.stats.get("nfe", 0.0))              # denoising forwards, counted per row
    rec["model_calls"] = int(batch.stats.get("model_calls", 0.0))  # batched forward calls
    rec["generated_tokens"] = int(batch.response_len.sum())
    # update: rows + old log-probs + update
    base = _base(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    urec = tr.update(batch, 1)
    _sync(device)
    rec["update_s"] = time.perf_counter() - t0 - _RECORDING["s"]
    rec["update_peak"] = _peak(device, base)
    rows = logp_old["rows"]
    rec["trained_tokens"] = int(rows["loss_mask"].sum())
    rec["rows"] = int(rows["rows"])
    rec["loss"] = urec["loss"]
    return {"rec": rec, "tokens": batch.response_ids, "logp_old": logp_old["value"], "loss_mask": rows["loss_mask"],
            "grads": _GRADS_FILE["path"]}


# ------------------------------------------------------------------------------------- reference path
def _select_ref(logits: torch.Tensor, block: torch.Tensor, mask_id: int, floor: int) -> torch.Tensor:
    """The reference implementations' decode step for one row: fp64 softmax over the whole vocabulary, sort,
    cumulative risk, host reads (the τ-budget rule: the most confident masked slots above τ while Σ(1−p) <=
    m(1−τ), at least the floor)."""
    probs = torch.softmax(logits.double(), dim=-1)  # [K, V]
    conf, x0 = probs.max(dim=-1)
    masked = block == mask_id
    n_masked = int(masked.sum().item())
    if n_masked == 0:
        return block
    conf = torch.where(masked, conf, torch.tensor(-1.0, dtype=conf.dtype))
    vals, order = torch.sort(conf, descending=True, stable=True)
    above = vals > TAU
    risk = torch.cumsum(torch.where(above, 1.0 - vals, 0.0), dim=0)
    k_b = int(((risk <= M * (1 - TAU)) & above).sum().item())
    k = min(max(k_b, floor), n_masked)
    out = block.clone()
    out[order[:k]] = x0[order[:k]]
    return out


@torch.no_grad()
def rollout_ref(model, prompts: list[list[int]], p: dict, device: str, *, fused_step: bool, slim_attn: bool):
    """One row at a time, SDAR with its KV cache: prefill (block staircase over the prompt), then per block up
    to K steps of (forward the block against the cache -> decode step -> host check), then a save pass."""
    from transformers import DynamicCache

    import slim_ops
    from slim_ops.layout import BlockLayout

    K, S = p["K"], p["K"]
    nb = -(-p["new_tokens"] // K)
    dtype = next(model.parameters()).dtype
    mask_id = model.mask_id
    outs, nfe = [], 0
    for prompt in prompts:
        ids = torch.tensor(prompt, dtype=torch.int64, device=device)[None]
        L0 = ids.shape[1]
        cache = DynamicCache(config=model.config)
        pos0 = torch.arange(L0, device=device)[None]
        if slim_attn:
            kw = {"block_layout": BlockLayout.staircase(L0, K).to(device)}  # L0 % K == 0: blocks align
        else:
            j = torch.arange(L0, device=device)
            blk = -1 - (L0 - 1 - j) // K
            kw = {"attention_mask": torch.where(blk[None, :] <= blk[:, None], 0.0,
                                                torch.finfo(dtype).min).to(dtype)[None, None]}
        model(input_ids=ids, position_ids=pos0, cache=cache, use_cache=True, logits_to_keep=1, **kw)
        resp: list[int] = []
        for b in range(nb):
            Lc = L0 + b * K
            pos = torch.arange(Lc, Lc + K, device=device)[None]
            if slim_attn:
                dkw = {"block_layout": BlockLayout.decode(Lc, K).to(device)}
            else:
                dkw = {"attention_mask": torch.zeros(1, 1, K, Lc + K, dtype=dtype, device=device)}
            block = torch.full((1, K), mask_id, dtype=torch.int64, device=device)
            for step in range(S):
                logits = model(input_ids=block, position_ids=pos, cache=cache, use_cache=True, **dkw).logits
                cache.crop(-K)  # drop the partially masked block's K/V
                logits[..., mask_id] = float("-inf")
                nfe += 1
                floor = slim_ops.static_floor(K, S, step)
                if fused_step:
                    block = slim_ops.tau_budget_step(logits, block, mask_id, tau=TAU, m=M, floor=floor).block
                else:
                    block = _select_ref(logits[0], block[0], mask_id, floor)[None]
                if not bool((block == mask_id).any()):  # host check every step
                    break
            resp.extend(block[0].tolist())
            if model.eos_id in resp or b + 1 == nb:  # a finished row stops (as the reference engines do)
                break
            model(input_ids=block, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1, **dkw)
        resp = resp[: p["new_tokens"]]
        if model.eos_id in resp:
            resp = resp[: resp.index(model.eos_id) + 1]
        outs.append(resp)
    L1 = nb * K
    tokens = torch.full((len(outs), L1), model.pad_id, dtype=torch.int64)
    for i, r in enumerate(outs):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return tokens, torch.tensor([len(r) for r in outs], dtype=torch.int64), nfe


def _rows(p: dict, tokens: torch.Tensor, lens: torch.Tensor, pad_id: int, mask_id: int,
          prompts_flat: list[list[int]]):
    """The SLIM rows of the step, built as the trainer builds them (same seeds)."""
    import slim_ops
    from slim_rl.advantages import compute_advantages
    from slim_rl.trainer import seeded

    n = tokens.shape[0]
    rewards = torch.tensor(_rewards(n, p["G"]))
    groups = torch.arange(n) // p["G"]
    adv = compute_advantages(rewards, groups, kind="dr_grpo", filter_groups=False, low=0.2, high=0.8)
    K = p["K"]
    L1 = max(K, -(-int(lens.max()) // K) * K)
    r = slim_ops.build_slim_rows(tokens[:, :L1], lens, block_size=K, mask_id=mask_id, pad_id=pad_id,
                                 num_nodes=p["nodes"], spread=0.2, shape="cosine", decreasing=True,
                                 schedule_blocks="response", post_tokens=0, nodes="gauss_legendre",
                                 generator=seeded(SEED, 1, "rows"))
    ridx = r.response_index
    prompt = torch.tensor([prompts_flat[i] for i in ridx.tolist()], dtype=torch.int64)
    return {"prompt": prompt, "clean": tokens[ridx, :L1], "noisy": r.noisy_ids, "loss_mask": r.loss_mask,
            "weights": r.weights.float(), "advantages": adv.advantages[ridx], "L1": L1}


def _row_logp(model, rows, idx, p: dict, device: str, *, slim_attn: bool, fused_logprob: bool):
    """[R, L1] log-probs of rows ``idx`` (0 off the loss mask) through one [P ‖ C ‖ X] stream per row."""
    import slim_ops
    from slim_ops.layout import BlockLayout

    prompt, clean, noisy = (rows[k][idx].to(device) for k in ("prompt", "clean", "noisy"))
    mask = rows["loss_mask"][idx].to(device)
    R, L0 = prompt.shape
    L1 = rows["L1"]
    layout = BlockLayout.train(L0, L1, p["K"])
    ids = torch.cat([prompt, clean, noisy], dim=1)
    pos = layout.position_ids(device=device).expand(R, -1)
    dtype = next(model.parameters()).dtype
    if slim_attn:
        kw = {"block_layout": layout.to(device)}
    else:  # the dense additive [R, 1, N, N] mask every layer reads
        allowed = layout.dense_mask(device=device)
        m4 = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        kw = {"attention_mask": m4[:, None].expand(R, 1, -1, -1).contiguous()}
    if fused_logprob:
        h = model.model(input_ids=ids, position_ids=pos, use_cache=False, **kw).last_hidden_state
        h = h[:, L0 + L1:L0 + 2 * L1]
        lp = slim_ops.masked_logprob(h[mask], model.lm_head.weight, clean[mask])
        return torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_scatter(mask, lp), mask
    logits = model(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits  # [R, N, V]: every position
    logp = torch.log_softmax(logits.float(), dim=-1)[:, L0 + L1:L0 + 2 * L1]
    tok = logp.gather(-1, clean[..., None])[..., 0]
    return tok.masked_fill(~mask, 0.0), mask


def update_ref(model, rows, p: dict, device: str, *, slim_attn: bool, fused_logprob: bool):
    from slim_ops.ops.policy_loss.reference import slim_policy_loss_ref

    n = rows["noisy"].shape[0]
    mb = p["ref_micro_rows"]
    chunks = [torch.arange(s, min(n, s + mb)) for s in range(0, n, mb)]
    t0 = time.perf_counter()
    with torch.no_grad():
        old = torch.cat([_row_logp(model, rows, idx, p, device, slim_attn=slim_attn,
                                   fused_logprob=fused_logprob)[0].cpu() for idx in chunks])
    _sync(device)
    old_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for idx in chunks:
        lp, mask = _row_logp(model, rows, idx, p, device, slim_attn=slim_attn, fused_logprob=fused_logprob)
        loss, _ = slim_policy_loss_ref(lp, old[idx].to(device), mask, rows["advantages"][idx].to(device),
                                       rows["weights"][idx].to(device), level="sequence", clip_low=0.1,
                                       clip_high=0.1, clip_token=0.2, kl_coef=0.01, kl_estimator="k3",
                                       response_len=rows["L1"], block_size=p["K"])
        (loss * (idx.numel() / n)).backward()
        total += float(loss) * idx.numel()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    _record_grads(model.parameters())
    opt.step()
    return old, total / n, _GRADS_FILE["path"], old_s


def run_ref(p: dict, device: str, variant: str) -> dict:
    model = _model(p, device)
    if p["dtype"] != "float32":  # the reference implementations load the model in the compute dtype
        model = model.to(getattr(torch, p["dtype"]))
    slim_attn = variant == "ref+attention"
    if slim_attn:
        from slim_ops.integrations import hf

        model.set_attn_implementation(hf.register())
    prompts = _prompts(p)
    flat = [q for q in prompts for _ in range(p["G"])]
    rec: dict = {}
    base = _base(device)
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    tokens, lens, nfe = rollout_ref(model, flat, p, device, fused_step=variant == "ref+decode",
                                    slim_attn=slim_attn)
    _sync(device)
    rec["rollout_s"] = time.perf_counter() - t0
    rec["rollout_peak"] = _peak(device, base)
    rec["nfe"] = nfe
    rec["model_calls"] = nfe
    rec["generated_tokens"] = int(lens.sum())
    base = _base(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    rows = _rows(p, tokens, lens, model.pad_id, model.mask_id, flat)
    model.train()
    old, loss, grads, old_s = update_ref(model, rows, p, device, slim_attn=slim_attn,
                                         fused_logprob=variant == "ref+logprob")
    _sync(device)
    rec["update_s"] = time.perf_counter() - t0 - _RECORDING["s"]
    rec["logp_old_s"] = old_s
    rec["update_peak"] = _peak(device, base)
    rec["trained_tokens"] = int(rows["loss_mask"].sum())
    rec["rows"] = int(rows["noisy"].shape[0])
    rec["loss"] = loss
    return {"rec": rec, "tokens": tokens, "logp_old": old, "loss_mask": rows["loss_mask"], "grads": grads}


# ------------------------------------------------------------------------------------------ driver
def worker(path: str, preset: str, out: str, threads: int) -> None:
    p = PRESETS[preset]
    device = p["device"]
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    _GRADS_FILE["path"] = out + ".grads"
    with tempfile.TemporaryDirectory() as tmp:
        res = run_slim(p, device, tmp) if path == "slim" else run_ref(p, device, path)
    torch.save(res, out)


def _agreement(a: dict, b: dict) -> dict:
    L = min(a["tokens"].shape[1], b["tokens"].shape[1])
    same_tokens = torch.equal(a["tokens"][:, :L], b["tokens"][:, :L])
    m = a["loss_mask"]
    same_mask = torch.equal(m, b["loss_mask"])
    lp_err = float((a["logp_old"][m] - b["logp_old"][m]).abs().max()) if same_mask else math.inf
    lp_scale = float(b["logp_old"][m].abs().max()) if same_mask else 1.0
    loss_err = abs(a["rec"]["loss"] - b["rec"]["loss"])
    g_err = float((a["grads"] - b["grads"]).norm() / b["grads"].norm().clamp_min(1e-30))
    ok = (same_tokens and same_mask and lp_err <= 5e-4 * max(1.0, lp_scale)
          and loss_err <= 5e-4 * max(1.0, abs(b["rec"]["loss"])) and g_err <= 1e-3)
    return {"tokens_identical": same_tokens, "rows_identical": same_mask, "logp_old_max_abs_err": lp_err,
            "loss_abs_err": loss_err, "grad_rel_l2_err": g_err, "agree": bool(ok),
            "tolerances": {"logp_old": "5e-4 x max(1, |logp|)", "loss": "5e-4 x max(1, |loss|)", "grad_rel_l2": 1e-3}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu"))
    ap.add_argument("--allow-loaded", action="store_true", help="write the result even on a busy machine")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.preset, args.worker_out, args.threads)
        return
    from benchmarks.common import machine_load, metadata, write_json

    p = PRESETS[args.preset]
    before = machine_load()
    results: dict = {}
    raw: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths:
            out = os.path.join(tmp, f"{path}.pt")
            t0 = time.time()
            # glibc hands large blocks straight back to the system: the resident size follows the live tensors
            env = {**os.environ, **memory.MALLOC_ENV}
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--threads",
                                str(args.threads), "--worker", path, "--worker-out", out],
                               capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise SystemExit(f"{path} failed:\n{r.stderr[-4000:]}")
            raw[path] = torch.load(out, weights_only=False)
            raw[path]["grads"] = _load_grads(raw[path]["grads"])
            results[path] = raw[path]["rec"]
            print(f"{path:>14}: rollout {results[path]['rollout_s']:.1f} s, update {results[path]['update_s']:.1f} s "
                  f"({time.time() - t0:.0f} s with start-up)", flush=True)
    agreement = _agreement(raw["slim"], raw["reference"]) if {"slim", "reference"} <= set(raw) else None
    after = machine_load()
    for rec in results.values():
        rec["rollout_tokens_per_s"] = rec["generated_tokens"] / rec["rollout_s"]
        rec["update_tokens_per_s"] = rec["trained_tokens"] / rec["update_s"]
    table = {}
    if "reference" in results:
        ref = results["reference"]
        for path, rec in results.items():
            table[path] = {"rollout_speedup": ref["rollout_s"] / rec["rollout_s"],
                           "update_speedup": ref["update_s"] / rec["update_s"],
                           "update_peak_fraction": rec["update_peak"] / max(ref["update_peak"], 1),
                           "rollout_peak_fraction": rec["rollout_peak"] / max(ref["rollout_peak"], 1)}
    payload = {"meta": metadata(p["device"]), "preset": args.preset, "shape": p, "threads": args.threads,
               "load_before": before, "load_after": after, "agreement": agreement, "results": results,
               "vs_reference": table}
    if agreement is not None:
        # fp32: the gate (nothing is reported when the paths disagree); bf16 rounds differently in every kernel,
        # so there the agreement is recorded, not enforced
        agreement["enforced"] = p["dtype"] == "float32"
    if agreement is not None and agreement["enforced"] and not agreement["agree"]:
        print(json.dumps(agreement, indent=1))
        raise SystemExit("slim and reference paths disagree: no timing is reported")
    quiet = before["quiet"] and after["quiet"]
    payload["quiet"] = quiet
    if not quiet and not args.allow_loaded:
        raise SystemExit(f"machine busy (load {before['loadavg_1m']:.2f} before, {after['loadavg_1m']:.2f} after, "
                         f"busy processes {before['busy_processes'] + after['busy_processes']}): nothing written; "
                         "rerun on an idle machine or pass --allow-loaded")
    path = write_json(args.out, "rl_step", payload)
    print(json.dumps({"agreement": agreement, "vs_reference": table}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
