"""Quick GPU check (stage 1 of benchmarks/gpu_check.sh): every kernel at one real size against its
``reference.py``, then timed with its baselines in the same process.

Correctness (each case): inputs are fresh random tensors (fixed seeds, never zeros); the CUDA caching
allocator is emptied and refilled with 0xFF bytes (NaN in every float dtype, -1 in integers) right before
the kernel runs, so outputs it fails to write come out poisoned; the reference is the op's ``reference.py``
on fp32-upcast inputs (autograd through it for gradients). Each output gets
    rel_err = ‖out − ref‖₂ / ‖ref‖₂   (fp64; a NaN/inf pattern that differs from the reference gives inf)
and passes when rel_err <= slim_ops.testing.tolerance(dtype)["rtol"], where dtype is the input dtype (the
table's meaning) — or float32 where the op reads exactly upcast inputs and does all its arithmetic in fp32
(decode-step confidences, log-probs from given logits). NaN never passes. Discrete outputs are exact:
greedy tokens equal the fp32 argmax (lowest index among equal maxima); sampled tokens equal the Gumbel-max
argmax of the counter-based stream of ops/tau_budget/reference.py except where the reference's best two
scores are within NEAR_TIE (rounding of log/exp may then differ; the mismatch rate is reported); commits,
counts and risks equal ``select_row_ref`` run on the kernel's own confidences, bit for bit.
At real sizes the reference runs on a subset where it would otherwise be slow or huge; each case states it
(``ref_rows`` / ``ref_batch``): decode step = vectorised reference formulas on all rows + the per-row
``tau_budget_step_ref`` on the first rows; attention = the first sequences of the batch (sequences are
independent, gradients of K/V included); masked_logprob = every row (fp32 reference in row chunks,
dweight accumulated over chunks).

Timing: common.time_fn (CUDA events; median of many runs, inputs allocated outside the timed region);
baselines in the same process on the same inputs (ms), floors and ceilings measured in the same run:
  tau_budget      copy floor (one read of the logits = half a clone), the reference's per-row loop (greedy),
                  the vectorised PyTorch backend; GB/s = R·K·V·bytes / time
  logprob_from_logits  torch log_softmax + gather; copy floor; GB/s = N·V·2 (fwd) or 3·N·V·2 (fwd+bwd) / time
  masked_logprob  full-logits reference (h·Wᵀ, fp32 log_softmax, gather, autograd), the chunked torch backend,
                  the three h·Wᵀ-shaped GEMMs alone (the ceiling); peak memory; TFLOP/s = 6·N·V·d / time
  policy_loss     torch backend, eager reference
  attention       SDPA with the dense boolean mask (K/V repeated to Hq heads); TFLOP/s on allowed pairs:
                  fwd 4·D·Hq·P, fwd+bwd 3.5·4·D·Hq·P, P = Σ allowed (q, k) pairs
``--stage3`` adds the compile-heavy baselines (FlexAttention with the layout's BlockMask, torch.compile of
the vectorised decode step and of the full-logits reference) and writes ``<op>_stage3_<device>.json``.

Output: one JSON per op folder, ``<out>/<op>_<device>.json`` (op ∈ tau_budget, masked_logprob, policy_loss,
attention) with device, git_sha, torch, triton and ``cases`` [{name, shapes, correct, rel_err, ms,
baselines {name: ms}, ...}], rewritten after every case; cases that cannot run (e.g. the CUDA backend
was not built) go to ``skipped`` with the reason. With ``--summary`` the same payloads are merged into that
JSON under ``ops``. Exit status 0 when every case is correct, 1 otherwise.

  python benchmarks/quick_gpu.py --out DIR [--summary FILE]          # on a GPU, real sizes (~2 min)
  python benchmarks/quick_gpu.py --dry-run --out DIR                 # CPU, tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback

OPS = ("tau_budget", "masked_logprob", "policy_loss", "attention")
NEAR_TIE = 1e-4
MASK_ID = 151669


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the per-op JSON files")
    ap.add_argument("--summary", default=None, help="summary JSON to merge the results into (key 'ops')")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton through its interpreter")
    ap.add_argument("--stage3", action="store_true", help="compile-heavy baselines (FlexAttention, torch.compile)")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="time budget: repetitions shrink as it runs out (the caller's timeout is the hard stop)")
    ap.add_argument("--device-name", default=None, help="device label for file names (default: from torch)")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before any slim_ops kernel module is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import slim_ops  # noqa: E402
from benchmarks.common import git_sha, time_fn  # noqa: E402
from slim_ops import BlockLayout  # noqa: E402
from slim_ops.ops.attention.reference import block_diffusion_attention_ref  # noqa: E402
from slim_ops.ops.masked_logprob.reference import logprob_from_logits_ref, masked_logprob_ref  # noqa: E402
from slim_ops.ops.policy_loss.reference import slim_policy_loss_ref  # noqa: E402
from slim_ops.ops.tau_budget import reference as tau_ref  # noqa: E402
from slim_ops.testing import tolerance  # noqa: E402

# one real size per kernel (the shapes) and a tiny one for --dry-run on the CPU
SIZES = {
    "real": dict(
        tau=dict(R=(256, 16), K=16, V=151936, dtype=torch.bfloat16, ref_rows=2),
        lfl=dict(N=1024, V=151936, dtype=torch.bfloat16),
        mlp=dict(N=16384, d=2560, V=151936, dtype=torch.bfloat16, chunk=2048),
        loss=dict(B=256, L=256, K=16),
        attn_train=dict(B=16, Hq=32, Hkv=8, D=128, L0=300, L1=256, K=16, noisy=3, dtype=torch.bfloat16,
                        ref_batch=2),
        attn_decode=dict(B=256, Hq=32, Hkv=8, D=128, cache=572, K=16, dtype=torch.bfloat16, ref_batch=8),
        reps=dict(fast=30, mid=10, slow=5, loop=3, warmup=3),
    ),
    "tiny": dict(
        tau=dict(R=(6, 3), K=4, V=1000, dtype=torch.bfloat16, ref_rows=2),
        lfl=dict(N=8, V=300, dtype=torch.bfloat16),
        mlp=dict(N=24, d=32, V=200, dtype=torch.bfloat16, chunk=16),
        loss=dict(B=4, L=24, K=8),
        attn_train=dict(B=1, Hq=2, Hkv=1, D=64, L0=9, L1=8, K=4, noisy=3, dtype=torch.bfloat16, ref_batch=1),
        attn_decode=dict(B=2, Hq=2, Hkv=1, D=64, cache=9, K=4, dtype=torch.bfloat16, ref_batch=2),
        reps=dict(fast=1, mid=1, slow=1, loop=1, warmup=0),  # the flow, not the numbers
    ),
}


class Skip(Exception):
    """A case that cannot run here (backend not built / not supported); the reason is recorded."""


# --------------------------------------------------------------------------------------------------------------
# run context: metadata, streaming JSON output, time budget
# --------------------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args):
        self.args = args
        self.dev = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
        if self.dev == "cpu" and not args.dry_run:
            raise SystemExit("quick_gpu: no CUDA device; use --dry-run on a CPU machine")
        self.S = SIZES["tiny" if args.dry_run else "real"]
        self.t0 = time.perf_counter()
        self.budget = args.budget_s
        name = args.device_name or (torch.cuda.get_device_name() if self.dev == "cuda" else "cpu")
        self.slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"  # as gpu_check.sh
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        self.meta = {
            "device": name, "torch_device": self.dev, "git_sha": git_sha(), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": bool(args.dry_run),
            "label": "GPU" if self.dev == "cuda" else "CPU dry run (Triton interpreter, tiny shapes, timings "
                                                      "meaningless)",
            "sizes": "tiny" if args.dry_run else "real", "stage": 3 if args.stage3 else 1,
            "near_tie": NEAR_TIE, "rel_err": "||out - ref||_2 / ||ref||_2 in fp64",
            "tolerance_table": {str(k).replace("torch.", ""): v["rtol"]
                                for k, v in ((torch.float32, tolerance(torch.float32)),
                                             (torch.bfloat16, tolerance(torch.bfloat16)))},
            "cuda_skip_reason": os.environ.get("SLIM_OPS_SKIP_CUDA_REASON") or None,
        }
        if self.dev == "cuda":
            cap = torch.cuda.get_device_capability()
            self.meta["capability"] = f"{cap[0]}.{cap[1]}"
        self.suffix = "_stage3" if args.stage3 else ""
        self.payloads = {op: {**self.meta, "op": op, "cases": [], "skipped": []} for op in OPS}
        os.makedirs(args.out, exist_ok=True)
        self.failures = 0

    def need(self, backend: str) -> None:
        """Skip a cuda case at once when the build stage recorded why the extension is missing."""
        if backend == "cuda" and self.meta["cuda_skip_reason"]:
            raise Skip(f"cuda backend skipped by the build stage: {self.meta['cuda_skip_reason']}")

    # ---- time budget
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def reps(self, kind: str) -> int:
        n = self.S["reps"][kind]
        frac = max(0.0, self.left()) / self.budget
        return max(min(n, 2), int(round(n * min(1.0, 2 * frac))))

    def time(self, fn, kind: str = "fast") -> dict:
        return time_fn(fn, self.dev, warmup=min(self.S["reps"]["warmup"], self.reps(kind)), reps=self.reps(kind))

    # ---- output
    def _write(self, op: str) -> None:
        path = os.path.join(self.args.out, f"{op}{self.suffix}_{self.slug}.json")
        _atomic_json(path, self.payloads[op])
        if self.args.summary:
            try:
                with open(self.args.summary) as f:
                    summary = json.load(f)
            except (OSError, ValueError):
                summary = {}
            summary.setdefault("ops", {})[op + self.suffix] = self.payloads[op]
            _atomic_json(self.args.summary, summary)

    def case(self, op: str, name: str, fn, **shape) -> None:
        """Run one case in isolation; fn(case) fills `case` or returns a list of case dicts."""
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {op}: {name}", flush=True)
        case: dict = {"name": name, **shape}
        t0 = time.perf_counter()
        try:
            got = fn(case)
            records = got if isinstance(got, list) else [case]
        except Skip as exc:
            self.payloads[op]["skipped"].append({"name": name, "reason": str(exc)})
            print(f"    skipped: {exc}", flush=True)
            self._write(op)
            return
        except Exception as exc:  # noqa: BLE001 - one failing case never stops the others
            case.update(correct=False, rel_err=None, ms=None, baselines=case.get("baselines", {}),
                        error=f"{type(exc).__name__}: {exc}"[:2000],
                        traceback=traceback.format_exc()[-3000:])
            records = [case]
        if self.dev == "cuda":
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001 - a sticky device error: record it with this case
                records[-1].update(correct=False, error=records[-1].get("error") or f"{type(exc).__name__}: {exc}")
        for rec in records:
            rec.setdefault("baselines", {})
            rec.setdefault("ms", None)
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            self.payloads[op]["cases"].append(rec)
            self.failures += not rec.get("correct", False)
            ms = f"{rec['ms']:.4f} ms" if isinstance(rec.get("ms"), float) else "-"
            base = ", ".join(f"{k} {v:.4f}" for k, v in rec["baselines"].items() if isinstance(v, float))
            err = rec.get("rel_err")
            print(f"    {rec['name']}: correct={rec.get('correct')} rel_err={err if err is None else f'{err:.2e}'} "
                  f"{ms}  [{base}]" + (f"  ERROR {rec['error']}" if "error" in rec else ""), flush=True)
        self._write(op)


def _atomic_json(path: str, payload) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_strict(payload), f, indent=1, default=_json_default, allow_nan=False)
    os.replace(tmp, path)


def _strict(o):
    """Non-finite floats as the strings "inf" / "-inf" / "nan": the files stay strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    return str(o)


# --------------------------------------------------------------------------------------------------------------
# correctness helpers
# --------------------------------------------------------------------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖₂ / ‖ref‖₂ in fp64; inf when shapes, NaN or inf patterns differ (NaN never passes)."""
    a = out.detach().to(torch.float64)
    e = ref.detach().to(device=a.device, dtype=torch.float64)
    if a.shape != e.shape:
        return math.inf
    na, ne = torch.isnan(a), torch.isnan(e)
    if not torch.equal(na, ne):
        return math.inf
    ia, ie = torch.isinf(a), torch.isinf(e)
    if not torch.equal(ia, ie) or not torch.equal(a[ia], e[ie]):
        return math.inf
    skip = ne | ie
    a = torch.where(skip, 0.0, a)
    e = torch.where(skip, 0.0, e)
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    if not math.isfinite(num):
        return math.inf
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _max_abs(out: torch.Tensor, ref: torch.Tensor) -> float | None:
    """Largest |out − ref| over the finite reference entries (diagnostic; rel_err decides)."""
    if out.shape != ref.shape:
        return None
    e = ref.detach().to(device=out.device, dtype=torch.float64)
    d = (out.detach().to(torch.float64) - e).abs()
    d = d[torch.isfinite(e)]
    return float(d.max()) if d.numel() else 0.0


class Check:
    """Collects the checks of one case: rel errors against the tolerance table and exact conditions."""

    def __init__(self):
        self.errs: dict[str, dict] = {}
        self.exact: dict[str, bool] = {}
        self.notes: list[str] = []

    def close(self, name: str, out: torch.Tensor, ref: torch.Tensor, tol_dtype: torch.dtype) -> float:
        r = rel_err(out, ref)
        tol = tolerance(tol_dtype)["rtol"]
        self.errs[name] = {"rel_err": r, "tol": tol, "tol_dtype": str(tol_dtype).replace("torch.", ""),
                           "ok": bool(math.isfinite(r) and r <= tol), "max_abs_err": _max_abs(out, ref)}
        return r

    def equal(self, name: str, ok: bool, detail: str = "") -> None:
        self.exact[name] = bool(ok)
        if not ok and detail:
            self.notes.append(f"{name}: {detail}")

    def fill(self, case: dict, names: list[str] | None = None) -> dict:
        errs = {k: v for k, v in self.errs.items() if names is None or k in names}
        exact = {k: v for k, v in self.exact.items() if names is None or k in names}
        case["correct"] = bool(errs or exact) and all(v["ok"] for v in errs.values()) and all(exact.values())
        case["rel_err"] = max((v["rel_err"] for v in errs.values()), default=0.0)
        case["checks"] = {**{k: {kk: vv for kk, vv in v.items()} for k, v in errs.items()},
                          **{k: {"ok": v} for k, v in exact.items()}}
        if self.notes:
            case["notes"] = list(self.notes)
        return case


def poison(dev: str, nbytes: int) -> None:
    """Refill the CUDA caching allocator with 0xFF bytes so the next outputs start as NaN / -1."""
    if dev != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    big = torch.empty(int(min(nbytes, 0.5 * free)), dtype=torch.uint8, device=dev).fill_(255)
    small = [torch.empty(1 << 19, dtype=torch.uint8, device=dev).fill_(255) for _ in range(32)]
    del big, small


def gen(dev: str, seed: int) -> torch.Generator:
    return torch.Generator(device=dev).manual_seed(seed)


def peak_mib(fn, dev: str) -> float | None:
    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del r
    return peak


def backend_call(fn):
    """Run fn(); an 'unavailable backend' error becomes a Skip carrying the library's reason."""
    try:
        return fn()
    except (RuntimeError, ValueError) as exc:
        msg = str(exc)
        if "unavailable" in msg or "has no" in msg or "not built" in msg:
            raise Skip(msg) from None
        raise


# --------------------------------------------------------------------------------------------------------------
# tau_budget: decode step
# --------------------------------------------------------------------------------------------------------------
def tau_inputs(R, K, V, dtype, dev, seed):
    g = gen(dev, seed)
    logits = (torch.randn(R, K, V, device=dev, generator=g) * 3).to(dtype)
    sharp = torch.rand(R, K, device=dev, generator=g) < 0.6
    peak = torch.randint(0, V, (R, K), device=dev, generator=g)
    rows = sharp.flatten().nonzero().flatten()
    logits.view(R * K, V)[rows, peak.flatten()[rows]] = 25.0  # confident slots, so that τ-commits happen
    logits[0, 1, V // 3] = float("nan")  # invalid slots: token = mask_id, confidence NaN, never committed
    logits[R - 1, K - 1] = float("-inf")
    masked = torch.rand(R, K, device=dev, generator=g) < 0.7
    block = torch.where(masked, MASK_ID % V, torch.randint(0, V, (R, K), device=dev, generator=g))
    return logits, block


def tau_cases(run: Run) -> None:
    S = run.S["tau"]
    K, V, dtype = S["K"], S["V"], S["dtype"]
    mask_id = MASK_ID % V
    for R in S["R"][:1] if run.args.stage3 else S["R"]:  # stage 3: torch.compile recompiles per shape
        for T in (0.0, 1.0):
            baselines: dict = {}
            for bi, backend in enumerate(("triton", "cuda")):
                seed = 100 * R + 10 * int(T) + bi
                shape = dict(function="tau_budget_step", backend=backend, R=R, K=K, V=V,
                             dtype=str(dtype).replace("torch.", ""), temperature=T, strategy="tau_budget",
                             tau=0.9, m=1.0, floor=1)
                run.case("tau_budget", f"tau_budget_step {backend} R={R} T={T:g}",
                         lambda case, b=backend, s=seed, R=R, T=T, bl=baselines:
                         tau_case(run, case, b, R, K, V, dtype, T, mask_id, s, bl), **shape)


def tau_case(run: Run, case, backend, R, K, V, dtype, T, mask_id, seed, baselines):
    run.need(backend)
    dev = run.dev
    logits, block = tau_inputs(R, K, V, dtype, dev, seed)
    kw = dict(tau=0.9, m=1.0, floor=1, temperature=T)

    def step(be, generator_seed=None):
        g = gen(dev, generator_seed) if T > 0 else None
        return slim_ops.tau_budget_step(logits, block, mask_id, generator=g, backend=be, **kw)

    poison(dev, 8 * R * K * 8 * 4)
    out = backend_call(lambda: step(backend, seed))
    # the op draws one int64 seed from the generator (reference.py); draw the same one here
    rseed = torch.randint(-(2**63), 2**63 - 1, (1,), generator=gen(dev, seed), device=dev, dtype=torch.int64)
    tok, conf, gap = tau_ref.slot_candidates_ref(logits, rseed, T, mask_id)
    chk = Check()
    differ = out.tokens != tok
    near = gap <= NEAR_TIE
    case["mismatch_rate"] = differ.float().mean().item()
    case["near_ties"] = int(near.sum())
    if T == 0.0:
        chk.equal("tokens", not bool(differ.any()), f"{int(differ.sum())} greedy tokens differ from the fp32 argmax")
    else:
        bad = differ & ~near
        chk.equal("tokens", not bool(bad.any()),
                  f"{int(bad.sum())} sampled tokens differ away from near-ties (gap > {NEAR_TIE})")
    same = ~differ
    chk.close("confidence", out.confidence[same], conf[same], torch.float32)
    # selection: exactly select_row_ref on the kernel's own confidences (every row)
    c_k, blk, com, num, risk, toks = (t.cpu() for t in (out.confidence, block, out.commit, out.num_committed,
                                                        out.risk, out.tokens))
    bad_rows = []
    for r in range(R):
        c_ref, k_ref, risk_ref = tau_ref.select_row_ref(c_k[r], blk[r] == mask_id, 0.9, 1.0, 1, "tau_budget")
        if not (torch.equal(com[r], c_ref) and int(num[r]) == k_ref and float(risk[r]) == risk_ref):
            bad_rows.append(r)
    chk.equal("selection", not bad_rows, f"rows {bad_rows[:8]} differ from select_row_ref")
    chk.equal("block", torch.equal(out.block.cpu(), torch.where(com, toks, blk)), "block != where(commit, tokens)")
    # end to end: the per-row reference loop on the first rows
    n = min(R, run.S["tau"]["ref_rows"])
    e2e = tau_ref.tau_budget_step_ref(logits[:n].cpu(), block[:n].cpu(), mask_id, tau=0.9, m=1.0, floor=1,
                                      temperature=T, seed=rseed.cpu())
    e_tok, e_conf = e2e[2], e2e[3]
    ok_tok = (e_tok == toks[:n]) | (gap[:n].cpu() <= NEAR_TIE)
    chk.equal("tokens_vs_tau_budget_step_ref", bool(ok_tok.all()), "tokens differ from tau_budget_step_ref")
    same_n = e_tok == toks[:n]
    chk.close("confidence_vs_tau_budget_step_ref", c_k[:n][same_n], e_conf[same_n], torch.float32)
    case["ref_rows"] = f"all {R} rows (vectorised reference formulas + select_row_ref), first {n} rows through " \
                       "tau_budget_step_ref"
    chk.fill(case)
    # timing (same inputs; the generator draws a new seed each call, as in decoding)
    g_t = gen(dev, seed + 1)
    t = run.time(lambda: slim_ops.tau_budget_step(logits, block, mask_id, generator=g_t if T > 0 else None,
                                                  backend=backend, **kw), "fast")
    nbytes = R * K * V * logits.element_size()
    case.update(ms=t["median_ms"], ms_p20=t["p20_ms"], ms_p80=t["p80_ms"], runs=t["runs"],
                GB_per_s=nbytes / (t["median_ms"] * 1e-3) / 1e9, bytes_formula="R*K*V*sizeof(dtype)")
    if not baselines:  # once per (R, T): shared by the backends of this shape
        clone = run.time(lambda: logits.clone(), "fast")
        baselines["copy_floor"] = clone["median_ms"] / 2  # a clone reads and writes: one read = half
        g_b = gen(dev, seed + 2)
        baselines["torch_vectorised"] = run.time(
            lambda: slim_ops.tau_budget_step(logits, block, mask_id, generator=g_b if T > 0 else None,
                                             backend="torch", **kw), "mid")["median_ms"]
        if T == 0.0:
            baselines["per_row_loop"] = run.time(lambda: tau_ref.per_row_loop(logits, block, mask_id), "loop")[
                "median_ms"]
        if run.args.stage3:
            baselines.update(_tau_compiled(run, logits, block, mask_id, T))
    case["baselines"] = dict(baselines)
    case["pct_of_copy_bw"] = 100 * baselines["copy_floor"] / t["median_ms"]
    return case


def _tau_compiled(run: Run, logits, block, mask_id, T) -> dict:
    """torch.compile of the vectorised PyTorch backend (stage 3 only: compilation takes a while)."""
    try:
        from slim_ops.ops.tau_budget.op import _params
        from slim_ops.ops.tau_budget.torch_impl import tau_budget_step_torch

        R = logits.shape[0]
        tau32, bud, fl = _params("quick_gpu", R, logits.device, 0.9, 1.0, 1)
        seed = torch.zeros(1, dtype=torch.int64, device=logits.device)
        compiled = torch.compile(tau_budget_step_torch, dynamic=False)
        f = lambda: compiled(logits, block, mask_id, tau32, bud, fl, seed, T, 0)  # noqa: E731
        f()
        return {"torch_compile_vectorised": run.time(f, "mid")["median_ms"]}
    except Exception as exc:  # noqa: BLE001
        return {"torch_compile_vectorised_error": f"{type(exc).__name__}: {exc}"[:300]}


# --------------------------------------------------------------------------------------------------------------
# masked_logprob folder: logprob_from_logits and masked_logprob
# --------------------------------------------------------------------------------------------------------------
def lfl_cases(run: Run) -> None:
    S = run.S["lfl"]
    shared: dict = {}
    for i, backend in enumerate(("cuda", "triton")):
        shape = dict(function="logprob_from_logits", backend=backend, N=S["N"], V=S["V"], dtype="bfloat16")
        run.case("masked_logprob", f"logprob_from_logits {backend} fwd, fwd+bwd",
                 lambda case, b=backend, s=20 + i: lfl_case(run, case, b, S["N"], S["V"], s, shared), **shape)


def lfl_case(run: Run, case, backend, N, V, seed, baselines):
    run.need(backend)
    dev = run.dev
    g = gen(dev, seed)
    logits = (torch.randn(N, V, device=dev, generator=g) * 3).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), device=dev, generator=g)
    up = torch.randn(N, device=dev, generator=g)
    lf = logits.float().requires_grad_()
    lr, er = logprob_from_logits_ref(lf, y)
    (lr * up).sum().backward()
    poison(dev, 3 * N * V * 2)
    lg = logits.clone().requires_grad_()
    lp, ent = backend_call(lambda: slim_ops.logprob_from_logits(lg, y, return_entropy=True, backend=backend))
    (lp * up).sum().backward()
    chk = Check()
    chk.close("logp", lp, lr, torch.float32)
    chk.close("entropy", ent, er, torch.float32)
    chk.close("dlogits", lg.grad, lf.grad, torch.bfloat16)
    del lf, lr, er
    fwd = {**case, "name": f"logprob_from_logits fwd {backend}", "ref_rows": f"all {N}"}
    bwd = {**case, "name": f"logprob_from_logits fwd+bwd {backend}", "ref_rows": f"all {N}"}
    chk.fill(fwd, ["logp", "entropy"])
    chk.fill(bwd)
    lt = logits.clone().requires_grad_()

    def ours_fwd():
        return slim_ops.logprob_from_logits(logits, y, backend=backend)

    def ours_bwd():
        return torch.autograd.grad(slim_ops.logprob_from_logits(lt, y, backend=backend), lt, grad_outputs=up)

    def torch_fwd():
        return torch.log_softmax(logits.float(), -1).gather(1, y[:, None])[:, 0]

    def torch_bwd():
        return torch.autograd.grad(torch.log_softmax(lt.float(), -1).gather(1, y[:, None])[:, 0], lt,
                                   grad_outputs=up)

    if not baselines:
        clone = run.time(lambda: logits.clone(), "fast")["median_ms"]
        baselines["fwd"] = {"copy_floor": clone / 2, "torch_log_softmax_gather": run.time(torch_fwd, "mid")[
            "median_ms"]}
        baselines["bwd"] = {"copy_floor": 1.5 * clone, "torch_log_softmax_gather": run.time(torch_bwd, "mid")[
            "median_ms"]}
    for rec, fn, nb, key, formula in ((fwd, ours_fwd, N * V * 2, "fwd", "N*V*2"),
                                      (bwd, ours_bwd, 3 * N * V * 2, "bwd", "3*N*V*2")):
        t = run.time(fn, "fast")
        rec.update(ms=t["median_ms"], ms_p20=t["p20_ms"], ms_p80=t["p80_ms"], runs=t["runs"],
                   GB_per_s=nb / (t["median_ms"] * 1e-3) / 1e9, bytes_formula=formula,
                   baselines=dict(baselines[key]))
    return [fwd, bwd]


def mlp_cases(run: Run) -> None:
    S = run.S["mlp"]
    shared: dict = {}
    for i, backend in enumerate(("triton", "cuda")):
        shape = dict(function="masked_logprob", backend=backend, N=S["N"], d=S["d"], V=S["V"], dtype="bfloat16")
        run.case("masked_logprob", f"masked_logprob fwd+bwd {backend}",
                 lambda case, b=backend, s=30 + i: mlp_case(run, case, b, S, s, shared), **shape)


def mlp_case(run: Run, case, backend, S, seed, baselines):
    run.need(backend)
    dev = run.dev
    N, d, V, chunk = S["N"], S["d"], S["V"], S["chunk"]
    g = gen(dev, seed)
    h = (torch.randn(N, d, device=dev, generator=g) * 0.5).to(torch.bfloat16)
    w = (torch.randn(V, d, device=dev, generator=g) * 0.05).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), device=dev, generator=g)
    up = torch.randn(N, device=dev, generator=g)
    poison(dev, 2 * (N + V) * d * 2)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp = backend_call(lambda: slim_ops.masked_logprob(hl, wl, y, backend=backend))
    dh, dw = torch.autograd.grad(lp, (hl, wl), grad_outputs=up)
    del hl, wl
    # fp32 reference over every row, in row chunks (dweight accumulates over the chunks)
    wf = w.float().requires_grad_()
    ref_lp, ref_dh = [], []
    for r0 in range(0, N, chunk):
        hf = h[r0:r0 + chunk].float().requires_grad_()
        lr, _ = masked_logprob_ref(hf, wf, y[r0:r0 + chunk])
        (lr * up[r0:r0 + chunk]).sum().backward()
        ref_lp.append(lr.detach())
        ref_dh.append(hf.grad)
    chk = Check()
    chk.close("logp", lp, torch.cat(ref_lp), torch.bfloat16)
    chk.close("dhidden", dh, torch.cat(ref_dh), torch.bfloat16)
    chk.close("dweight", dw, wf.grad, torch.bfloat16)
    del wf, ref_lp, ref_dh, dh, dw, lp
    chk.fill(case)
    case["ref_rows"] = f"all {N} (fp32 reference in chunks of {chunk} rows)"
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()

    def ours():
        return torch.autograd.grad(slim_ops.masked_logprob(hl, wl, y, backend=backend), (hl, wl), grad_outputs=up)

    def full_logits():
        z = hl @ wl.t()
        lpr = torch.log_softmax(z.float(), -1).gather(1, y[:, None])[:, 0]
        return torch.autograd.grad(lpr, (hl, wl), grad_outputs=up)

    def chunked():
        return torch.autograd.grad(slim_ops.masked_logprob(hl, wl, y, backend="torch"), (hl, wl), grad_outputs=up)

    flops = 6 * N * V * d
    case["peak_mib"] = peak_mib(ours, dev)
    t = run.time(ours, "slow")
    case.update(ms=t["median_ms"], ms_p20=t["p20_ms"], ms_p80=t["p80_ms"], runs=t["runs"],
                useful_tflops=flops / (t["median_ms"] * 1e-3) / 1e12, flops_formula="6*N*V*d (3 GEMMs)")
    if not baselines:
        gz = torch.randn(N, V, device=dev, generator=g).to(torch.bfloat16)

        def gemms():  # the three GEMMs of fwd+bwd alone: z = h·Wᵀ, dh = dz·W, dW = dzᵀ·h
            return h @ w.t(), gz @ w, gz.t() @ h

        baselines["gemms_only"] = run.time(gemms, "slow")["median_ms"]
        baselines["gemms_only_peak_mib"] = peak_mib(gemms, dev)
        del gz
        baselines["full_logits_reference_peak_mib"] = peak_mib(full_logits, dev)
        baselines["full_logits_reference"] = run.time(full_logits, "slow")["median_ms"]
        baselines["torch_chunked_peak_mib"] = peak_mib(chunked, dev)
        baselines["torch_chunked"] = run.time(chunked, "slow")["median_ms"]
        if run.args.stage3:
            try:
                cf = torch.compile(full_logits)
                cf()
                baselines["torch_compile_full_logits"] = run.time(cf, "slow")["median_ms"]
            except Exception as exc:  # noqa: BLE001
                baselines["torch_compile_full_logits_error"] = f"{type(exc).__name__}: {exc}"[:300]
    case["baselines"] = dict(baselines)
    case["pct_of_gemm_ceiling"] = 100 * baselines["gemms_only"] / t["median_ms"]
    return case


# --------------------------------------------------------------------------------------------------------------
# policy_loss
# --------------------------------------------------------------------------------------------------------------
def loss_cases(run: Run) -> None:
    S = run.S["loss"]
    for i, level in enumerate(("sequence", "block", "token")):
        shape = dict(function="slim_policy_loss", backend="triton", B=S["B"], L=S["L"], block_size=S["K"], level=level,
                     dtype="float32")
        run.case("policy_loss", f"slim_policy_loss fwd+bwd triton level={level}",
                 lambda case, lv=level, s=40 + i: loss_case(run, case, lv, S, s), **shape)


def loss_case(run: Run, case, level, S, seed):
    dev = run.dev
    B, L, K = S["B"], S["L"], S["K"]
    g = gen(dev, seed)
    old = -torch.rand(B, L, device=dev, generator=g) * 5
    logp = old + 0.3 * torch.randn(B, L, device=dev, generator=g)
    mask = torch.rand(B, L, device=dev, generator=g) < 0.6
    mask[0] = False  # an empty row contributes nothing
    adv = torch.randn(B, device=dev, generator=g)
    wts = torch.rand(B, device=dev, generator=g) + 0.5
    kw = dict(level=level, block_size=K)
    poison(dev, 64 * B * L * 4)
    lp = logp.clone().requires_grad_()
    loss, metrics = backend_call(lambda: slim_ops.slim_policy_loss(lp, old, mask, adv, wts, backend="triton", **kw))
    (grad,) = torch.autograd.grad(loss, lp)
    lr = logp.double().requires_grad_()
    ref_loss, ref_m = slim_policy_loss_ref(lr, old.double(), mask, adv.double(), wts.double(), **kw)
    (ref_grad,) = torch.autograd.grad(ref_loss, lr)
    chk = Check()
    chk.close("loss", loss, ref_loss, torch.float32)
    chk.close("dlogp", grad, ref_grad, torch.float32)
    for k, v in ref_m.items():
        if k in metrics:
            chk.close(f"metric {k}", metrics[k], v, torch.float32)
    chk.fill(case)
    case["ref_rows"] = f"all {B}"
    lt = logp.clone().requires_grad_()

    def step(be):
        def f():
            out, _ = slim_ops.slim_policy_loss(lt, old, mask, adv, wts, backend=be, **kw)
            return torch.autograd.grad(out, lt)
        return f

    def reference():
        out, _ = slim_policy_loss_ref(lt, old, mask, adv, wts, **kw)
        return torch.autograd.grad(out, lt)

    t = run.time(step("triton"), "fast")
    case.update(ms=t["median_ms"], ms_p20=t["p20_ms"], ms_p80=t["p80_ms"], runs=t["runs"])
    case["baselines"] = {"torch_backend": run.time(step("torch"), "fast")["median_ms"],
                         "reference_eager": run.time(reference, "fast")["median_ms"]}
    return case


# --------------------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------------------
def _left_pad(B: int, L0: int, g: torch.Generator, dev: str) -> torch.Tensor:
    n = torch.randint(0, max(1, L0 // 3), (B,), device=dev, generator=g)
    return torch.arange(L0, device=dev)[None, :] < n[:, None]


def attn_cases(run: Run) -> None:
    S = run.S["attn_train"]
    shape = {k: S[k] for k in ("B", "Hq", "Hkv", "D", "L0", "L1", "K", "noisy")}
    run.case("attention", "block_diffusion_attention train layout triton",
             lambda case: attn_train_case(run, case, S, 50), function="block_diffusion_attention", backend="triton",
             layout="packed", dtype="bfloat16", **shape)
    S = run.S["attn_decode"]
    shape = {k: S[k] for k in ("B", "Hq", "Hkv", "D", "cache", "K")}
    run.case("attention", "block_diffusion_attention decode layout triton",
             lambda case: attn_decode_case(run, case, S, 60), function="block_diffusion_attention", backend="triton",
             layout="decode", Lq=S["K"], dtype="bfloat16", **shape)


def _attn_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, g, dev):
    q = torch.randn(B, Hq, Lq, D, device=dev, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, device=dev, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, device=dev, generator=g).to(dtype)
    do = torch.randn(B, Hq, Lq, D, device=dev, generator=g).to(dtype)
    return q, k, v, do


def _sdpa_dense(lay: BlockLayout, G: int):
    mask = lay.dense_mask()[:, None]

    def f(a, b, c):
        return F.scaled_dot_product_attention(a, b.repeat_interleave(G, 1), c.repeat_interleave(G, 1),
                                              attn_mask=mask)
    return f


def _flex(lay: BlockLayout, B: int, dev: str):
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = lay.flex_block_mask(B, None, dev)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda a, b, c: compiled(a, b, c, block_mask=block_mask, enable_gqa=True)


def _timed(run: Run, fn, q, k, v, do, mode: str, flops: float) -> dict:
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        def call():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    if run.dev == "cuda":
        call()  # compile / autotune outside the timed region
    peak = peak_mib(call, run.dev)
    t = run.time(call, "mid")
    return {"ms": t["median_ms"], "ms_p20": t["p20_ms"], "ms_p80": t["p80_ms"], "runs": t["runs"],
            "tflops": flops / (t["median_ms"] * 1e-3) / 1e12, "peak_mib": peak}


def attn_train_case(run: Run, case, S, seed):
    dev = run.dev
    B, Hq, Hkv, D, L0, L1, K, n = (S[k] for k in ("B", "Hq", "Hkv", "D", "L0", "L1", "K", "noisy"))
    g = gen(dev, seed)
    pad = _left_pad(B, L0, g, dev)
    lay = BlockLayout.packed(L0, L1, K, n, prompt_pad=pad)
    N = lay.seq_len
    q, k, v, do = _attn_inputs(B, Hq, Hkv, N, N, D, S["dtype"], g, dev)
    ours = lambda a, b, c: slim_ops.block_diffusion_attention(a, b, c, lay, backend="triton")  # noqa: E731
    poison(dev, 8 * q.numel() * 2)
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    o = backend_call(lambda: ours(ql, kl, vl))
    dq, dk, dv = torch.autograd.grad(o, (ql, kl, vl), do)
    nb = min(B, S["ref_batch"])
    lay_c = BlockLayout.packed(L0, L1, K, n, prompt_pad=pad[:nb])
    qf, kf, vf = (t[:nb].float().requires_grad_() for t in (q, k, v))
    ref_o = block_diffusion_attention_ref(qf, kf, vf, lay_c)
    rdq, rdk, rdv = torch.autograd.grad(ref_o, (qf, kf, vf), do[:nb].float())
    chk = Check()
    chk.close("o", o[:nb], ref_o, torch.bfloat16)
    chk.close("dq", dq[:nb], rdq, torch.bfloat16)
    chk.close("dk", dk[:nb], rdk, torch.bfloat16)
    chk.close("dv", dv[:nb], rdv, torch.bfloat16)
    del qf, kf, vf, ref_o, rdq, rdk, rdv, o, dq, dk, dv
    P = int(lay.allowed_pairs().sum()) * (B if lay.batch_size == 1 else 1)
    info = dict(N=N, allowed_pairs=P, dense_pairs=B * N * N, ref_batch=f"first {nb} of {B} sequences",
                flops_formula="fwd 4*D*Hq*allowed_pairs, fwd+bwd 3.5x")
    fwd = {**case, **info, "name": case["name"] + " fwd"}
    bwd = {**case, **info, "name": case["name"] + " fwd+bwd"}
    chk.fill(fwd, ["o"])
    chk.fill(bwd)
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    sdpa = _sdpa_dense(lay, Hq // Hkv)
    flex = _flex(lay, B, dev) if run.args.stage3 else None
    for rec, mode, mult in ((fwd, "fwd", 1.0), (bwd, "fwd_bwd", 3.5)):
        fl = mult * 4 * D * Hq * P
        r = _timed(run, ours, qt, kt, vt, do, mode, fl)
        rec.update(r)
        rec["pct_of_peak_bf16_789"] = 100 * r["tflops"] / 789.0 if dev == "cuda" else None
        rec["baselines"] = {}
        for bname, bfn in (("sdpa_dense_mask", sdpa), ("flex_attention", flex)):
            if bfn is None:
                continue
            try:
                b = _timed(run, bfn, qt, kt, vt, do, mode, fl)
                rec["baselines"][bname] = b["ms"]
                rec["baselines"][bname + "_tflops"] = b["tflops"]
                rec["baselines"][bname + "_peak_mib"] = b["peak_mib"]
            except Exception as exc:  # noqa: BLE001 - a baseline failing never hides our kernel's numbers
                rec["baselines"][bname + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return [fwd, bwd]


def attn_decode_case(run: Run, case, S, seed):
    dev = run.dev
    B, Hq, Hkv, D, ell, K = (S[k] for k in ("B", "Hq", "Hkv", "D", "cache", "K"))
    g = gen(dev, seed)
    pad = _left_pad(B, ell, g, dev)
    lay = BlockLayout.decode(ell, K, cache_pad=pad)
    Lq, Lk = lay.num_queries, lay.num_keys
    q, k, v, do = _attn_inputs(B, Hq, Hkv, Lq, Lk, D, S["dtype"], g, dev)
    ours = lambda a, b, c: slim_ops.block_diffusion_attention(a, b, c, lay, backend="triton")  # noqa: E731
    poison(dev, 8 * q.numel() * 2)
    with torch.no_grad():
        o = backend_call(lambda: ours(q, k, v))
    nb = min(B, S["ref_batch"])
    lay_c = BlockLayout.decode(ell, K, cache_pad=pad[:nb])
    ref_o = block_diffusion_attention_ref(q[:nb].float(), k[:nb].float(), v[:nb].float(), lay_c)
    chk = Check()
    chk.close("o", o[:nb], ref_o, torch.bfloat16)
    chk.fill(case)
    P = int(lay.allowed_pairs().sum()) * (B if lay.batch_size == 1 else 1)
    fl = 4 * D * Hq * P
    case.update(Lk=Lk, allowed_pairs=P, ref_batch=f"first {nb} of {B} sequences", flops_formula="4*D*Hq*allowed_pairs")
    case.update(_timed(run, ours, q, k, v, do, "fwd", fl))
    case["baselines"] = {}
    cands = [("sdpa_dense_mask", _sdpa_dense(lay, Hq // Hkv))]
    if run.args.stage3:
        cands.append(("flex_attention", _flex(lay, B, dev)))
    for bname, bfn in cands:
        try:
            b = _timed(run, bfn, q, k, v, do, "fwd", fl)
            case["baselines"][bname] = b["ms"]
            case["baselines"][bname + "_tflops"] = b["tflops"]
        except Exception as exc:  # noqa: BLE001
            case["baselines"][bname + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return case


# --------------------------------------------------------------------------------------------------------------
def main(args) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references run in true fp32
    torch.backends.cudnn.allow_tf32 = False
    run = Run(args)
    only = set(args.only.split(",")) if args.only else set(OPS)
    unknown = only - set(OPS)
    if unknown:
        print(f"quick_gpu: error: unknown op(s) {sorted(unknown)}; choose from {', '.join(OPS)}", file=sys.stderr)
        return 2
    print(f"quick_gpu: device={run.meta['device']} torch={run.meta['torch']} triton={run.meta['triton']} "
          f"sizes={run.meta['sizes']} stage={run.meta['stage']} git={run.meta['git_sha'][:12]}", flush=True)
    plan = [("tau_budget", tau_cases), ("policy_loss", loss_cases), ("masked_logprob", lfl_cases),
            ("masked_logprob", mlp_cases), ("attention", attn_cases)]
    if args.stage3:  # the compile-heavy baselines belong to these ops only; FlexAttention first
        plan = [("attention", attn_cases), ("tau_budget", tau_cases), ("masked_logprob", mlp_cases)]
    for op in OPS:  # every op file exists from the start, even if a later case crashes the process
        if op in only and any(op == p for p, _ in plan):
            run._write(op)
    for op, fn in plan:
        if op in only:
            try:
                fn(run)
            except Exception as exc:  # noqa: BLE001 - set-up of an op failed: record it, go on
                run.payloads[op]["cases"].append({"name": f"{fn.__name__} set-up", "correct": False, "rel_err": None,
                                                  "ms": None, "baselines": {},
                                                  "error": f"{type(exc).__name__}: {exc}"[:2000]})
                run.failures += 1
                run._write(op)
    total = sum(len(p["cases"]) for p in run.payloads.values())
    print(f"quick_gpu: {total - run.failures}/{total} cases correct, "
          f"{sum(len(p['skipped']) for p in run.payloads.values())} skipped, "
          f"{time.perf_counter() - run.t0:.1f} s", flush=True)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
