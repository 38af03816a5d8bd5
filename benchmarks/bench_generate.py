"""Decode throughput of the block-diffusion engine (slim_rl.generate) vs a per-sequence loop driver.

Both drivers run the same model, the same decode step op and the same selection rule; the loop driver
decodes one prompt at a time and asks the host after every step whether the block is complete (the
shape of the reference engines, docs/benchmarks.md). A correctness gate runs first: greedy outputs of both drivers
must agree token for token and contain no mask token.

    tokens/s     = Σ committed response tokens (all rows) / wall seconds of one full generate call
    NFE/token    = Σ_rows denoising forwards a row took / Σ committed tokens
    tok/forward  = 1 / (NFE/token);  mean EWC = mean over row steps of Σ_{j∈C}(1 − c_j)

Caches (``--caches``): LLaDA-shaped model, ``cache="none"`` vs Fast-dLLM's ``"prefix"`` / ``"dual"``:
    s/forward    = median wall seconds of one generate call / batched forward passes it ran (model_calls)
    NFE-normalised speed-up = (s/forward of "none") / (s/forward of the cache)
    wall speed-up = median seconds of "none" / median seconds of the cache (the caches decode blocks in lockstep,
                    so their forward counts differ a little)
    agreement    = fraction of the first max_new_tokens response slots (all rows) with the same greedy token
                   as "none"
  gated by: no mask token in the output, and with S = 1 (every block decoded by its exact refresh step) the
  cached outputs equal "none" token for token. ``--demo-llada`` adds the demo addition task with a LLaDA-shaped
  model after the demo's SFT stage (greedy held-out accuracy per cache).

Usage:  python benchmarks/bench_generate.py --device cpu --out benchmarks/results/local
        python benchmarks/bench_generate.py --device cuda --out $OUT     (SDAR-4B-shaped, few layers)
        python benchmarks/bench_generate.py --caches [--demo-llada] --out benchmarks/results/cpu
CPU: a tiny SDAR model (numbers are labelled CPU). CUDA: a random Qwen3/SDAR-4B-shaped model (hidden 2560,
32 heads / 8 KV heads, head dim 128, MLP 9728, V = 151936) with few layers, batch 64, block 16, bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

import slim_ops  # noqa: E402
from benchmarks.common import add_load_flag, load_fields, machine_load  # noqa: E402
from slim_rl.generate import generate  # noqa: E402
from slim_rl.models import tiny  # noqa: E402

STRATEGIES = ("tau_budget", "threshold", "topk")


# ---------------------------------------------------------------------------------------- loop driver
@torch.no_grad()
def loop_generate(model, prompts, *, block_size, max_new_tokens, steps_per_block=None, strategy="tau_budget",
                  tau=0.9, m=1.0):
    """Straightforward per-sequence SDAR driver (greedy): one prompt at a time, KV cache, a host check
    after every step. Returns (list of response tensors through the first EOS, total denoising forwards)."""
    from transformers import DynamicCache

    K = block_size
    S = steps_per_block or K
    nb = -(-max_new_tokens // K)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    mask_id, eos_id = model.mask_id, model.eos_id
    outs, nfe = [], 0
    for p in prompts:
        ids = torch.as_tensor(p, dtype=torch.int64, device=device)[None]
        L0 = ids.shape[1]
        j = torch.arange(L0, device=device)
        blk = -1 - (L0 - 1 - j) // K  # prompt blocks right-aligned to the prompt end
        hide = torch.finfo(dtype).min
        prefill_mask = torch.where(blk[None, :] <= blk[:, None], 0.0, hide).to(dtype)[None, None]
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=prefill_mask, position_ids=j[None], cache=cache, use_cache=True,
              logits_to_keep=1)
        resp = []
        for b in range(nb):
            Lc = L0 + b * K
            attn = torch.zeros(1, 1, K, Lc + K, dtype=dtype, device=device)
            pos = torch.arange(Lc, Lc + K, device=device)[None]
            block = torch.full((1, K), mask_id, dtype=torch.int64, device=device)
            for step in range(S):
                logits = model(input_ids=block, attention_mask=attn, position_ids=pos, cache=cache,
                               use_cache=True).logits
                cache.crop(-K)
                logits[..., mask_id] = float("-inf")
                nfe += 1
                out = slim_ops.tau_budget_step(logits, block, mask_id, tau=tau, m=m,
                                               floor=slim_ops.static_floor(K, S, step), strategy=strategy)
                block = out.block
                if not bool((block == mask_id).any()):  # host sync every step
                    break
            model(input_ids=block, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True,
                  logits_to_keep=1)
            resp.extend(block[0].tolist())
            if eos_id in block[0].tolist():
                break
        resp = resp[:max_new_tokens]
        if eos_id in resp:
            resp = resp[: resp.index(eos_id) + 1]
        outs.append(torch.tensor(resp, dtype=torch.int64))
    return outs, nfe


# ---------------------------------------------------------------------------------------- the floor
@torch.no_grad()
def floor_loop(model, prompt, out, *, block_size):
    """The forwards ``generate`` ran for one prompt (``out``: its GenerateOutput), as a plain loop over the model
    with nothing else: each step's block (or canvas) is rebuilt from the recorded step map, so every call sees
    exactly the engine's inputs, and no decode step, bookkeeping or host check runs. SDAR: the prefill fused
    with block 0's first step, then one forward per step against the KV cache (cropped after it) and a save
    pass per finished block; LLaDA / Dream (``cache="none"``): the whole canvas every step. Dense masks, B = 1."""
    K = block_size
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    hide = torch.finfo(dtype).min
    mask_id = model.mask_id
    ids = torch.as_tensor(prompt, dtype=torch.int64, device=device)[None]
    L0 = ids.shape[1]
    tokens, smap = out.tokens[0].to(device), out.full_step_map[0].to(device)
    n_blocks = -(-len(out.sequences[0]) // K)
    if model.block_causal:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        done = 0
        for b in range(n_blocks):
            cols = slice(b * K, (b + 1) * K)
            steps = int(smap[cols].max()) + 1 - done
            Lc = L0 + b * K
            pos = torch.arange(Lc, Lc + K, device=device)[None]
            dec = torch.zeros(1, 1, K, Lc + K, dtype=dtype, device=device)
            for j in range(steps):
                block = torch.where(smap[cols] < done + j, tokens[cols], mask_id)[None]
                if b == 0 and j == 0:
                    q = torch.arange(L0 + K, device=device)
                    blk = -1 - (L0 - 1 - q) // K
                    stair = torch.where(blk[None, :] <= blk[:, None], 0.0, hide).to(dtype)[None, None]
                    model(input_ids=torch.cat([ids, block], 1), attention_mask=stair, position_ids=q[None],
                          cache=cache, use_cache=True, logits_to_keep=K)
                else:
                    model(input_ids=block, attention_mask=dec, position_ids=pos, cache=cache, use_cache=True,
                          logits_to_keep=K)
                cache.crop(-K)
            done += steps
            if b + 1 < n_blocks:  # the engine's save pass: every decoded block but the row's last
                model(input_ids=tokens[cols][None], attention_mask=dec, position_ids=pos, cache=cache, use_cache=True,
                      logits_to_keep=1)
        return
    L1 = out.tokens.shape[1]
    N = L0 + L1
    attn = torch.zeros(1, 1, N, N, dtype=dtype, device=device)
    pos = torch.arange(N, device=device)[None]
    arK = torch.arange(K, device=device)
    shift = int(getattr(model, "shift", 0))
    nfe = int(out.nfe[0])
    for t in range(nfe):
        b = int((smap[:n_blocks * K] < t).view(n_blocks, K).all(1).sum())  # the block this step works on
        canvas = torch.cat([ids, torch.where((smap >= 0) & (smap < t), tokens, mask_id)[None]], 1)
        model(input_ids=canvas, attention_mask=attn, position_ids=pos, use_cache=False,
              logits_to_keep=L0 + b * K + arK - shift)


def batch1_rows(cfg, device, repeats):
    """One prompt per call: ``generate`` against the floor (the same forwards in a plain loop), tiny SDAR and
    LLaDA models, greedy τ-budget; the overhead is generate's time over the floor's."""
    rows = []
    prompt = _prompts(1, cfg["vocab"], cfg["prompt_max"], cfg["prompt_max"], seed=3)[0]
    gen_kw = dict(block_size=cfg["block"], max_new_tokens=cfg["new_tokens"], tau=cfg["tau"])
    for family in ("sdar", "llada"):
        model = tiny(family, vocab_size=cfg["vocab"], seed=0, hidden_size=cfg["hidden"], num_layers=cfg["layers"],
                     num_heads=cfg["heads"], num_kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                     intermediate_size=cfg["mlp"], head_std=cfg["head_std"], dtype=cfg["dtype"], device=device)
        out = generate(model, [prompt], **gen_kw)
        calls = []
        fwd = model.forward

        def counting(*a, _calls=calls, _fwd=fwd, **kw):
            _calls.append(1)
            return _fwd(*a, **kw)

        model.forward = counting
        floor_loop(model, prompt, out, block_size=cfg["block"])
        n_floor = len(calls)
        model.forward = fwd
        if n_floor != out.model_calls:
            raise SystemExit(f"floor gate failed ({family}): {n_floor} forwards, generate ran {out.model_calls}")
        t_gen = _time(lambda m=model: generate(m, [prompt], **gen_kw), device, repeats)
        t_floor = _time(lambda m=model, o=out: floor_loop(m, prompt, o, block_size=cfg["block"]), device, repeats)
        ratio = t_gen["median_s"] / t_floor["median_s"]
        rows.append({"family": family, "batch": 1, "generate": t_gen, "floor": t_floor, "forwards": out.model_calls,
                     "tokens": out.num_generated, "overhead_ratio": ratio})
        print(f"{family:>6} batch 1: generate {t_gen['median_s'] * 1e3:7.2f} ms, floor (same {out.model_calls} "
              f"forwards, plain loop) {t_floor['median_s'] * 1e3:7.2f} ms: x{ratio:.3f}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    """Median / p20 / p80 wall seconds of `repeats` calls (the caller has already run fn once: warm-up)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3], "runs": len(times)}


def _git_sha():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - a benchmark outside a checkout still runs
        return "unknown"


def _prompts(n, vocab, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab - 3, (L,), generator=g).tolist() for L in lens]


def run(cfg, device, repeats, loop_repeats, loop_rows):
    model = tiny("sdar", vocab_size=cfg["vocab"], seed=0, hidden_size=cfg["hidden"], num_layers=cfg["layers"],
                 num_heads=cfg["heads"], num_kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                 intermediate_size=cfg["mlp"], head_std=cfg["head_std"], dtype=cfg["dtype"], device=device)
    prompts = _prompts(cfg["batch"], cfg["vocab"], cfg["prompt_min"], cfg["prompt_max"], seed=1)
    gen_kw = dict(block_size=cfg["block"], max_new_tokens=cfg["new_tokens"], tau=cfg["tau"])
    results = []
    for strategy in STRATEGIES:
        # correctness gate (and warm-up): engine == loop driver (greedy, token for token) on the loop's rows
        eng = generate(model, prompts, strategy=strategy, **gen_kw)
        ref, ref_nfe = loop_generate(model, prompts[:loop_rows], strategy=strategy, **gen_kw)
        for i, r in enumerate(ref):
            if not torch.equal(eng.sequences[i], r):
                raise SystemExit(f"correctness gate failed ({strategy}, row {i}): engine "
                                 f"{eng.sequences[i].tolist()} != loop driver {r.tolist()}")
            if (eng.sequences[i] == model.mask_id).any():
                raise SystemExit(f"correctness gate failed ({strategy}, row {i}): mask token in the output")
        if int(eng.nfe[:loop_rows].sum()) != ref_nfe:
            raise SystemExit(f"correctness gate failed ({strategy}): NFE {int(eng.nfe[:loop_rows].sum())} "
                             f"!= loop driver {ref_nfe}")
        t_eng = _time(lambda s=strategy: generate(model, prompts, strategy=s, **gen_kw), device, repeats)
        t_loop = _time(lambda s=strategy: loop_generate(model, prompts[:loop_rows], strategy=s, **gen_kw),
                       device, loop_repeats)
        tok_eng = eng.num_generated
        tok_loop = int(eng.commits[:loop_rows].sum())  # same tokens as the engine rows (gate above)
        eng_tps = tok_eng / t_eng["median_s"]
        loop_tps = tok_loop / t_loop["median_s"]
        met = eng.metrics()
        results.append({
            "strategy": strategy,
            "engine": {**t_eng, "tokens": tok_eng, "tokens_per_s": eng_tps, "model_calls": eng.model_calls},
            "loop_driver": {**t_loop, "rows": loop_rows, "tokens": tok_loop, "tokens_per_s": loop_tps},
            "speedup_tokens_per_s": eng_tps / loop_tps,
            "nfe_per_token": met["nfe_per_token"], "tokens_per_forward": met["tokens_per_forward"],
            "mean_ewc": met["mean_ewc"], "commits_histogram": met["commits_histogram"],
        })
        print(f"{strategy:>10}: engine {eng_tps:9.1f} tok/s  loop {loop_tps:9.1f} tok/s  "
              f"x{eng_tps / loop_tps:5.2f}  NFE/token {met['nfe_per_token']:.3f}  "
              f"tok/fwd {met['tokens_per_forward']:.2f}  mean EWC {met['mean_ewc']:.4f}", flush=True)
    if device.type == "cuda":
        results.append(_slim_attention_row(model, prompts, gen_kw, device, repeats))
    return results


def _slim_attention_row(model, prompts, gen_kw, device, repeats):
    """τ-budget engine with slim_ops block-diffusion attention (BlockLayouts, no mask tensors) instead of
    SDPA with dense masks. bf16 kernels round differently, so greedy outputs are compared, not gated."""
    from slim_ops.integrations import hf

    row = {"strategy": "tau_budget", "attention": "slim_ops layouts"}
    try:
        dense = generate(model, prompts, **gen_kw)
        model.set_attn_implementation(hf.register())
        out = generate(model, prompts, attention="layout", **gen_kw)
        same = sum(torch.equal(a, b) for a, b in zip(dense.sequences, out.sequences, strict=True))
        t = _time(lambda: generate(model, prompts, attention="layout", **gen_kw), device, repeats)
        row.update(engine={**t, "tokens": out.num_generated, "tokens_per_s": out.num_generated / t["median_s"]},
                   rows_identical_to_dense=f"{same}/{len(prompts)}", nfe_per_token=out.nfe_per_token)
        print(f"tau_budget with slim_ops attention: {row['engine']['tokens_per_s']:9.1f} tok/s, "
              f"{same}/{len(prompts)} rows identical to the SDPA run", flush=True)
    except Exception as e:  # noqa: BLE001 - report, keep the other numbers
        row["error"] = f"{type(e).__name__}: {e}"
        print(f"slim_ops attention run failed: {row['error']}", flush=True)
    finally:
        model.set_attn_implementation("sdpa")
    return row


CPU_CFG = dict(vocab=64, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128, head_std=2.0,
               dtype=torch.float32, batch=32, block=8, new_tokens=32, prompt_min=6, prompt_max=20, tau=0.9)
GPU_CFG = dict(vocab=151936, hidden=2560, layers=4, heads=32, kv_heads=8, head_dim=128, mlp=9728,
               head_std=0.2, dtype=torch.bfloat16, batch=64, block=16, new_tokens=64, prompt_min=48,
               prompt_max=128, tau=0.9)


def run_families(cfg, device, repeats):
    """Engine only, τ-budget, greedy: the LLaDA- and Dream-shaped variants of the same tiny model (whole
    canvas every step; rows move through their blocks independently: max_r NFE_r forwards a batch)."""
    prompts = _prompts(cfg["batch"], cfg["vocab"], cfg["prompt_min"], cfg["prompt_max"], seed=1)
    gen_kw = dict(block_size=cfg["block"], max_new_tokens=cfg["new_tokens"], tau=cfg["tau"])
    rows = []
    for family in ("llada", "dream"):
        model = tiny(family, vocab_size=cfg["vocab"], seed=0, hidden_size=cfg["hidden"], num_layers=cfg["layers"],
                     num_heads=cfg["heads"], num_kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                     intermediate_size=cfg["mlp"], head_std=cfg["head_std"], dtype=cfg["dtype"], device=device)
        out = generate(model, prompts, **gen_kw)
        if any((s == model.mask_id).any() for s in out.sequences):
            raise SystemExit(f"correctness gate failed ({family}): mask token in the output")
        t = _time(lambda m=model: generate(m, prompts, **gen_kw), device, repeats)
        met = out.metrics()
        rows.append({"family": family, "strategy": "tau_budget",
                     "engine": {**t, "tokens": out.num_generated, "tokens_per_s": out.num_generated / t["median_s"],
                                "model_calls": out.model_calls, "max_row_nfe": int(out.nfe.max())},
                     "nfe_per_token": met["nfe_per_token"], "tokens_per_forward": met["tokens_per_forward"],
                     "mean_ewc": met["mean_ewc"]})
        print(f"{family:>10}: engine {rows[-1]['engine']['tokens_per_s']:9.1f} tok/s  "
              f"NFE/token {met['nfe_per_token']:.3f}  model calls {out.model_calls} "
              f"(max row NFE {int(out.nfe.max())})", flush=True)
    return rows


CACHE_CPU_CFG = dict(vocab=64, hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, mlp=256, head_std=2.0,
                     dtype=torch.float32, batch=16, block=8, new_tokens=64, prompt_min=32, prompt_max=64, tau=0.9)


def run_caches(cfg, device, repeats, backend=None):
    """LLaDA-shaped random model: cache none vs prefix vs dual (see the module docstring for the formulas)."""
    model = tiny("llada", vocab_size=cfg["vocab"], seed=0, hidden_size=cfg["hidden"], num_layers=cfg["layers"],
                 num_heads=cfg["heads"], num_kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                 intermediate_size=cfg["mlp"], head_std=cfg["head_std"], dtype=cfg["dtype"], device=device)
    prompts = _prompts(cfg["batch"], cfg["vocab"], cfg["prompt_min"], cfg["prompt_max"], seed=1)
    gen_kw = dict(block_size=cfg["block"], max_new_tokens=cfg["new_tokens"], tau=cfg["tau"], backend=backend)
    n = cfg["new_tokens"]
    base = generate(model, prompts, **gen_kw)
    one = generate(model, prompts, steps_per_block=1, **gen_kw)
    rows, t_none = [], None
    for cache in ("none", "prefix", "dual"):
        out = generate(model, prompts, cache=cache, **gen_kw)
        if any((s == model.mask_id).any() for s in out.sequences):
            raise SystemExit(f"correctness gate failed (cache={cache}): mask token in the output")
        if not torch.equal(generate(model, prompts, cache=cache, steps_per_block=1, **gen_kw).tokens, one.tokens):
            raise SystemExit(f"correctness gate failed (cache={cache}): the refresh steps differ from cache='none'")
        t = _time(lambda c=cache: generate(model, prompts, cache=c, **gen_kw), device, repeats)
        per_fwd = t["median_s"] / out.model_calls
        if cache == "none":
            t_none = (t["median_s"], per_fwd)
        agree = float((out.tokens[:, :n] == base.tokens[:, :n]).double().mean())
        rows.append({"family": "llada", "cache": cache, **t, "model_calls": out.model_calls,
                     "nfe_total": int(out.nfe.sum()), "forward_tokens": out.forward_tokens,
                     "s_per_forward": per_fwd, "nfe_normalised_speedup": t_none[1] / per_fwd,
                     "wall_speedup": t_none[0] / t["median_s"], "token_agreement_vs_none": agree,
                     "tokens_per_forward": out.tokens_per_forward})
        print(f"cache={cache:>6}: {t['median_s'] * 1e3:8.1f} ms/call  {out.model_calls:4d} forwards  "
              f"{per_fwd * 1e3:7.2f} ms/forward  NFE-normalised x{t_none[1] / per_fwd:5.2f}  "
              f"wall x{t_none[0] / t['median_s']:5.2f}  agreement {agree:.3f}", flush=True)
    return rows


def run_demo_llada(threads, backend=None):
    """The demo task (2-digit addition) with a LLaDA-shaped model after the demo's SFT stage: greedy held-out
    accuracy with each cache (demo decoding settings: K = 2, 6 new tokens, τ-budget τ = 0.9)."""
    import tempfile

    from slim_rl.config import load_config
    from slim_rl.demo import prepare

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                          ["model.family=llada", f"train.out_dir={tmp}/run", "train.checkpoint_every=0",
                           f"train.threads={threads}"])
        t0 = time.time()
        trainer, _ = prepare(cfg, overwrite=True, progress=False)
        sft_s = time.time() - t0
    exs = trainer.task.eval_set()
    rc = cfg.rollout
    kw = dict(block_size=rc.block_size, max_new_tokens=rc.max_new_tokens, tau=rc.tau, m=rc.m, backend=backend)
    res = {"family": "llada", "sft_steps": cfg.sft.steps, "sft_seconds": sft_s, "num_prompts": len(exs),
           "decode": dict(kw, strategy=rc.strategy)}
    base = None
    for cache in ("none", "prefix", "dual"):
        out = generate(trainer.model, [e.prompt for e in exs], cache=cache, **kw)
        acc = sum(trainer.task.reward([s.tolist() for s in out.sequences], exs)) / len(exs)
        base = out if base is None else base
        agree = float((out.tokens[:, :rc.max_new_tokens] == base.tokens[:, :rc.max_new_tokens]).double().mean())
        res[cache] = {"accuracy": acc, "token_agreement_vs_none": agree, "model_calls": out.model_calls}
        print(f"demo task, LLaDA-shaped, cache={cache:>6}: accuracy {acc:.3f}  agreement {agree:.3f}", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "local"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="override the model depth")
    ap.add_argument("--caches", action="store_true", help="only the LLaDA cache comparison (none/prefix/dual)")
    ap.add_argument("--demo-llada", action="store_true", help="with --caches: also the demo task accuracy")
    ap.add_argument("--backend", default=None, help="with --caches: decode-step backend (default: auto)")
    add_load_flag(ap)
    args = ap.parse_args(argv)
    args.load_before = machine_load()
    if args.caches:
        return main_caches(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    cfg = dict(CPU_CFG if device.type == "cpu" else GPU_CFG)
    if args.layers:
        cfg["layers"] = args.layers
    repeats = args.repeats or (5 if device.type == "cpu" else 3)
    loop_rows = cfg["batch"] if device.type == "cpu" else 4
    loop_repeats = 3 if device.type == "cpu" else 2
    print(f"bench_generate on {device.type.upper()}: {cfg}", flush=True)
    res = run(cfg, device, repeats, loop_repeats, loop_rows)
    fam = run_families(cfg, device, repeats) if device.type == "cpu" else []
    batch1 = batch1_rows(cfg, device, max(repeats, 15)) if device.type == "cpu" else []
    dev_name = (torch.cuda.get_device_name() if device.type == "cuda"
                else f"CPU ({platform.processor() or 'cpu'}, {os.cpu_count()} cores)")
    import transformers
    import triton

    record = {
        "benchmark": "generate", "device": dev_name, "label": device.type.upper(), "threads": args.threads,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "triton": triton.__version__, "python": platform.python_version()},
        "git_sha": _git_sha(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items()},
        "formulas": {
            "tokens_per_s": "sum of committed response tokens over rows / median wall seconds of one call",
            "nfe_per_token": "sum over rows of denoising forwards / committed tokens",
            "loop_driver": "one prompt at a time, batch 1, host check after every step; "
                           "timed on `rows` prompts",
        },
        "results": res,
        "other_families": fam,
        "batch1_vs_floor": batch1,
    }
    record.update(load_fields("bench_generate", args.load_before, args.allow_loaded))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_generate_{device.type}_{time.strftime('%Y%m%dT%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")


def main_caches(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    cfg = dict(CACHE_CPU_CFG)
    if device.type == "cuda":
        cfg.update(vocab=151936, hidden=2048, layers=4, heads=16, kv_heads=4, head_dim=128, mlp=8192,
                   head_std=0.2, dtype=torch.bfloat16, batch=32, block=32, new_tokens=256, prompt_min=128,
                   prompt_max=256)
    if args.layers:
        cfg["layers"] = args.layers
    repeats = args.repeats or 5
    print(f"bench_generate caches on {device.type.upper()}: {cfg}", flush=True)
    rows = run_caches(cfg, device, repeats, args.backend)
    demo = run_demo_llada(args.threads, args.backend) if args.demo_llada else None
    dev_name = (torch.cuda.get_device_name() if device.type == "cuda"
                else f"CPU ({platform.processor() or 'cpu'}, {os.cpu_count()} cores)")
    import transformers

    record = {
        "benchmark": "generate_caches", "device": dev_name, "label": device.type.upper(), "threads": args.threads,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "git_sha": _git_sha(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items()},
        "formulas": {
            "s_per_forward": "median wall seconds of one generate call / model_calls of that call",
            "nfe_normalised_speedup": "s_per_forward(none) / s_per_forward(cache)",
            "wall_speedup": "median_s(none) / median_s(cache)",
            "token_agreement_vs_none": "mean over rows and the first max_new_tokens slots of token equality",
        },
        "backend": args.backend or "auto", "results": rows, "demo_task": demo,
    }
    record.update(load_fields("bench_generate", args.load_before, args.allow_loaded))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_generate_caches_{device.type}_{time.strftime('%Y%m%dT%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
