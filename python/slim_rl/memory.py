"""Memory of a training micro-batch and of a rollout: measured (CPU, peak RSS) and predicted (``slim-rl plan``).

:func:`measure_train` runs one training micro-batch exactly as the trainer does (the scorer's forward over
``[P ‖ C ‖ X₁ … X_g]``, the masked log-prob, backward, one AdamW step that creates the optimizer state) in
a fresh Python process and reports its peak resident memory above the process's baseline (torch and the
package imported, nothing built). glibc is told to hand large blocks straight back to the system
(``MALLOC_MMAP_THRESHOLD_``), so the resident size follows the live tensors.

:func:`predict_train` and :func:`predict_rollout` (in :mod:`slim_rl.plan`) predict the same figures from
the model's ``config.json`` alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

__all__ = ["measure_train", "rss_bytes", "peak_rss_bytes", "reset_peak_rss", "MALLOC_ENV"]

# glibc: large blocks go straight back to the system when freed, so the resident size follows the live tensors
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident memory since the last :func:`reset_peak_rss` (Linux)."""
    return _status("VmHWM")


def reset_peak_rss() -> None:
    """Start the peak over from the current resident size (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def micro_batch(model, rows: int, group: int, prompt_len: int, response_len: int, seed: int = 0):
    """A synthetic training micro-batch of ``rows`` rows (``rows // group`` responses, each with ``group``
    noisy streams sharing its clean stream), half of every response masked; the scorer's arguments."""
    import torch

    g = torch.Generator().manual_seed(seed)
    R = max(1, rows // group)
    V = int(model.get_output_embeddings().weight.shape[0])
    hi = max(4, V - 3)
    prompt = torch.randint(0, hi, (R, prompt_len), generator=g)
    ppad = torch.zeros(R, prompt_len, dtype=torch.bool)
    clean = torch.randint(0, hi, (R, response_len), generator=g)
    mask = torch.rand(R, group, response_len, generator=g) < 0.5
    noisy = torch.where(mask, int(model.mask_id), clean[:, None, :])
    labels = clean.repeat_interleave(group, 0)
    if group == 1:
        noisy = noisy[:, 0]
    return prompt, ppad, clean, noisy, labels, mask.reshape(R * group, response_len)


def _measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import slim_ops  # noqa: F401 - part of the baseline
    from slim_rl import precision as P
    from slim_rl.config import load_config
    from slim_rl.trainer import Scorer, build_model, enable_checkpointing

    torch.set_num_threads(1)
    cfg = load_config(None, spec["overrides"])
    # the baseline: every module the run needs imported (a throwaway 1-layer model of the same family and
    # attention runs one step), nothing of the measured model built
    warm = load_config(None, spec["overrides"] + ["model.path=", "model.hidden_size=8", "model.num_heads=2",
                                                  "model.num_kv_heads=1", "model.num_layers=1",
                                                  "model.vocab_size=16", "model.intermediate_size=8",
                                                  "model.lora.r=0"])
    w = build_model(warm)
    wb = micro_batch(w, 2, spec["group"], 2, cfg.rollout.block_size)
    with P.autocast("cpu", P.dtype_of(cfg.model.dtype), torch.float32):
        out = Scorer(w, cfg.rollout.block_size)(*wb)
    out.sum().backward()
    P.adamw(w.parameters()).step()
    del w, wb
    base = rss_bytes()
    reset_peak_rss()
    model = build_model(cfg)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    weights = rss_bytes() - base
    scorer = Scorer(model, cfg.rollout.block_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = P.adamw(trainable, lr=1e-6)  # as the trainer builds it
    batch = micro_batch(model, spec["rows"], spec["group"], spec["prompt_len"], spec["response_len"])
    compute = P.dtype_of(cfg.model.dtype)
    master = next(model.parameters()).dtype
    marks: dict[str, int] = {}
    # two micro-batches, each followed by an optimizer step: the second runs as every later one does, with
    # the AdamW state already allocated (the steady state a long run lives in)
    for it in range(2):
        opt.zero_grad(set_to_none=True)
        with P.autocast("cpu", compute, master):
            lp = scorer(*batch)
        loss = -lp.float().sum() / max(lp.numel(), 1)
        marks[f"forward{it}"] = peak_rss_bytes() - base
        loss.backward()
        marks[f"backward{it}"] = peak_rss_bytes() - base
        opt.step()
        del lp
    peak = peak_rss_bytes() - base
    return {"peak_bytes": peak, "weights_bytes": weights, "loss": float(loss),
            **{f"{k}_bytes": v for k, v in marks.items()}}


def measure_train(overrides: list[str], *, rows: int, group: int, prompt_len: int, response_len: int,
                  timeout: float = 600) -> dict[str, Any]:
    """Peak resident memory (bytes above the baseline) of one training micro-batch of the config given by
    ``overrides``, measured in a fresh process on the CPU."""
    spec = {"overrides": list(overrides), "rows": rows, "group": group, "prompt_len": prompt_len,
            "response_len": response_len}
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(here), os.path.dirname(os.path.dirname(here)),
                                          os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "slim_rl.memory", json.dumps(spec)], env=env, capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
