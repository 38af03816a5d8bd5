"""``slim-rl plan``: will this configuration fit, and where is the peak? — from the model's ``config.json``.

For one GPU (or the CPU) of a run it predicts the peak memory of the two phases of an RL step:

* **rollout**: what stays resident (master weights, AdamW state: gradients are dropped after each update),
  the weights decoding uses (a compute-dtype copy, or FSDP2's gathered model), the exact KV cache of the
  committed blocks (SDAR) or none (LLaDA / Dream decode the whole canvas), the logits of the decoded block
  and one layer's transient activations;
* **training micro-batch** (``optim.micro_batch_rows`` rows over ``[P ‖ C ‖ X₁ … X_g]``): master weights,
  gradients, AdamW state, the activations autograd saves per decoder layer (an inventory of the tensors
  the transformers decoder layer and slim_ops' ops save, per token; with activation checkpointing only each
  layer's input plus one recomputed layer), the dense mask or none (slim attention), the masked log-prob's
  inputs, and the transients of the backward and of the optimizer step.

Sharding (FSDP2: parameters, gradients and state divided by the world size, plus the gathered root unit and
two decoder layers in flight), CPU offload (none of those on the GPU), DDP's gradient buckets, mixed
precision (fp32 master, compute-dtype copies) and LoRA (only adapters have gradients and state) are
accounted for. The inventory was checked against autograd's saved tensors and the measured peak resident
memory of training micro-batches on the CPU (tests/slim_rl/test_plan.py); on a GPU the CUDA caching
allocator's fragmentation comes on top (the table keeps 10 % of the GPU free for it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from slim_rl.config import Config
from slim_rl.errors import ConfigError

__all__ = ["ModelShape", "model_shape", "predict_train", "predict_rollout", "plan", "format_plan"]

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1 << 30
HEADROOM = 0.9  # fraction of a GPU's memory a plan may fill (the rest: allocator fragmentation, CUDA context)


@dataclasses.dataclass
class ModelShape:
    family: str
    vocab: int
    d: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    tied: bool
    qk_norm: bool   # SDAR (Qwen3): RMS norm on q and k
    qkv_bias: bool  # Dream (Qwen2)

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer."""
        d, q, kv, inter = self.d, self.q, self.kv, self.inter
        return [(d, q), (d, kv), (d, kv), (q, d), (d, inter), (d, inter), (inter, d)]

    def layer_params(self) -> int:
        n = sum(i * o for i, o in self.linears()) + 2 * self.d
        if self.qk_norm:
            n += 2 * self.head_dim
        if self.qkv_bias:
            n += self.q + 2 * self.kv
        return n

    def embed_params(self) -> int:
        return self.vocab * self.d

    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.d

    def total_params(self) -> int:
        return self.layers * self.layer_params() + self.embed_params() + self.head_params() + self.d

    def describe(self) -> str:
        arch = {"sdar": "Qwen3", "llada": "Llama", "dream": "Qwen2"}[self.family]
        return (f"{self.family} ({arch}) {self.total_params() / 1e9:.2f}B parameters, V={self.vocab}, "
                f"{self.layers} layers, d={self.d}, {self.heads}/{self.kv_heads} heads of {self.head_dim}, "
                f"MLP {self.inter}")


def model_shape(cfg: Config) -> ModelShape:
    """The shape of ``model.path``'s config.json (no weights read), or of the configured tiny model."""
    mc = cfg.model
    fam = mc.family
    if not mc.path:
        hd = mc.hidden_size // mc.num_heads
        return ModelShape(fam, mc.vocab_size, mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_kv_heads, hd,
                          mc.intermediate_size or 2 * mc.hidden_size, False, fam == "sdar", fam == "dream")
    from slim_rl import models

    cj = mc.path if mc.path.endswith(".json") else os.path.join(mc.path, "config.json")
    try:
        with open(cj) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"plan: cannot read {cj} ({e})") from None
    if fam == "llada":
        kw, problems = models._llada_config(raw)
    else:
        kw, problems = models._qwen_config(raw, fam)
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in kw]
    if missing:
        raise ConfigError(f"plan: {cj} does not describe a {fam} model ({'; '.join(problems) or missing})")
    heads = int(kw["num_attention_heads"])
    return ModelShape(fam, int(kw["vocab_size"]), int(kw["hidden_size"]), int(kw["num_hidden_layers"]), heads,
                      int(kw.get("num_key_value_heads") or heads),
                      int(kw.get("head_dim") or int(kw["hidden_size"]) // heads), int(kw["intermediate_size"]),
                      bool(kw.get("tie_word_embeddings", False)), fam == "sdar",
                      fam == "dream")


def _lora_params(s: ModelShape, r: int, targets: str) -> tuple[int, int]:
    """(adapter parameters of one layer, adapters per layer)."""
    if r <= 0:
        return 0, 0
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    want = names if targets.strip() == "all-linear" else [t.strip() for t in targets.split(",")]
    chosen = [io for n, io in zip(names, s.linears()) if n in want]
    return sum(r * (i + o) for i, o in chosen), len(chosen)


def act_per_token_layer(s: ModelShape, b: int, attention: str, lora_r: int = 0, n_adapters: int = 0) -> int:
    """Bytes autograd keeps per token for one decoder layer (compute dtype ``b`` bytes; the RMS norms keep
    their fp32 internals): the inventory of the transformers layer with SDPA (k/v repeated to every head) or
    slim_ops' attention (q, k, v, o and the log-sum-exp)."""
    d, q, kv, inter, H, Hkv = s.d, s.q, s.kv, s.inter, s.heads, s.kv_heads
    frozen = 0 if lora_r > 0 else 1              # a frozen norm weight needs no saved normalised input
    norms = 2 * (4 * ((1 + frozen) * d + 1) + b * d)   # input, 1/rms, normalised (fp32); the output in b
    qk = 4 * ((1 + frozen) * q + H) + 4 * ((1 + frozen) * kv + Hkv) if s.qk_norm else 0
    attn = b * 4 * q + 4 * H if attention == "dense" else b * (2 * q + 2 * kv) + 4 * H
    out = b * q                                  # o_proj's input
    mlp = 4 * b * inter                          # gate, up, silu(gate), their product
    return norms + qk + attn + out + mlp + n_adapters * b * lora_r


@dataclasses.dataclass
class Setting:
    """What the prediction depends on besides the model's shape."""

    strategy: str           # single | ddp | fsdp
    world: int
    device: str             # cuda | cpu
    compute: str            # model.dtype
    master: str             # model.master_dtype
    attention: str          # dense | slim
    checkpointing: bool
    offload: bool
    lora_r: int
    lora_targets: str
    micro_rows: int         # optim.micro_batch_rows
    group: int              # rows sharing one clean stream (n_q with objective.shared_clean)
    prompt_len: int         # L0
    response_len: int       # L1 (rollout.max_new_tokens)
    block: int              # K
    decode_rows: int        # rows per decode call on this rank
    mask_frac: float = 0.5  # loss positions per row / L1 (the quadrature levels average 1/2)


def _params(s: ModelShape, st: Setting) -> dict[str, int]:
    lora_layer, n_ad = _lora_params(s, st.lora_r, st.lora_targets)
    total = s.total_params() + s.layers * lora_layer
    trainable = s.layers * lora_layer if st.lora_r > 0 else total
    return {"total": total, "trainable": trainable, "adapters_per_layer": n_ad}


def predict_train(s: ModelShape, st: Setting) -> dict[str, float]:
    """Bytes per rank of one training micro-batch in the steady state (AdamW state allocated)."""
    mb, b = _BYTES[st.master], _BYTES[st.compute]
    pr = _params(s, st)
    W = st.world if st.strategy == "fsdp" else 1
    on_dev = 0.0 if st.offload else 1.0
    P = pr["total"] * mb / W * on_dev
    G = pr["trainable"] * mb / W * on_dev
    O = 2 * pr["trainable"] * mb / W * on_dev
    mixed = st.compute != st.master
    R = max(1, st.micro_rows // st.group)
    N = st.prompt_len + (1 + st.group) * st.response_len
    tokens = R * N
    a_layer = act_per_token_layer(s, b, st.attention, st.lora_r, pr["adapters_per_layer"])
    if st.checkpointing:
        A_layers = s.layers * tokens * b * s.d + tokens * a_layer   # layer inputs + one recomputed layer
    else:
        A_layers = s.layers * tokens * a_layer
    n_loss = st.micro_rows * st.response_len * st.mask_frac
    outer = tokens * (4 * (2 * s.d + 1) + b * s.d)                 # the final norm over every position
    outer += 2 * tokens * s.head_dim * b                           # rotary cos / sin
    outer += n_loss * (b * s.d + 8)                                # masked log-prob: selected states, lse
    if st.attention == "dense":
        outer += R * N * N * (b + 1)                               # the [R, N, N] mask (+ its bool source)
    A = A_layers + outer
    head = (s.head_params() or s.embed_params()) * mb
    if st.lora_r > 0:
        head = 0.0                                                 # the head is frozen: no gradient
    T_bwd = 3 * tokens * max(s.inter, s.d) * b                     # activation gradients of one layer
    copies = 0.0
    if st.strategy == "fsdp":                                      # gathered: root unit + two layers in flight
        copies = ((s.embed_params() + s.head_params()) + 2 * s.layer_params()) * b
    elif mixed:                                                    # autocast's weight casts kept for backward
        copies = (s.layers * s.layer_params() + (s.head_params() or s.embed_params())) * b
    ddp_buckets = G if st.strategy == "ddp" else 0.0
    if st.strategy != "fsdp":
        T_opt = 0.0                                                # fused AdamW (slim_rl.precision.adamw): in place
    elif st.device == "cuda":
        T_opt = G                                                  # foreach AdamW over shards: one list of temporaries
    else:
        largest = max(s.embed_params(), s.head_params(), *(i * o for i, o in s.linears()))
        if st.lora_r > 0:
            largest = max(r_io for r_io in (st.lora_r * max(i, o) for i, o in s.linears()))
        T_opt = 2 * largest * mb / W * on_dev                      # per-tensor AdamW: sqrt(v) and its quotient
    backward = P + O + A + copies + head / W + T_bwd
    optimizer = P + G + O + T_opt + ddp_buckets
    peak = max(backward, optimizer)
    host = (pr["total"] * mb + 3 * pr["trainable"] * mb) / W if st.offload else 0.0
    return {"weights": P, "gradients": G, "adamw_state": O, "activations": A, "weight_copies": copies,
            "backward_transient": head / W + T_bwd, "optimizer_transient": T_opt + ddp_buckets, "peak": peak,
            "backward_peak": backward, "optimizer_peak": optimizer, "host_offload": host,
            "tokens": float(tokens), "activations_per_layer": float(A_layers / max(s.layers, 1))}


def predict_rollout(s: ModelShape, st: Setting) -> dict[str, float]:
    """Bytes per rank while decoding: resident state, the decode weights, KV cache, logits, transients."""
    mb, b = _BYTES[st.master], _BYTES[st.compute]
    pr = _params(s, st)
    W = st.world if st.strategy == "fsdp" else 1
    on_dev = 0.0 if st.offload else 1.0
    resident = (pr["total"] * mb + 2 * pr["trainable"] * mb) / W * on_dev   # master + AdamW state
    if st.strategy == "fsdp":
        decode_w = pr["total"] * b                                 # the whole model gathered once per rollout
    elif st.compute != st.master:
        decode_w = pr["total"] * b                                 # the compute-dtype copy
    else:
        decode_w = 0.0
    B = st.decode_rows
    canvas = st.prompt_len + st.response_len
    if s.family == "sdar":
        kv_cache = B * canvas * s.layers * 2 * s.kv * b
        fwd_tokens = B * st.block
    else:
        kv_cache = 0.0                                             # no cache: the whole canvas every step
        fwd_tokens = B * canvas
    logits = B * st.block * s.vocab * (b + 4)                      # the block's logits + fp32 for the decode rule
    transient = fwd_tokens * (3 * s.inter + 4 * s.d + 2 * s.q) * b
    peak = resident + decode_w + kv_cache + logits + transient
    return {"resident": resident, "decode_weights": decode_w, "kv_cache": kv_cache, "logits": logits,
            "forward_transient": transient, "peak": peak}


def setting_of(cfg: Config, *, gpus: int = 1, device: str = "cuda", prompt_len: int = 256) -> Setting:
    oc, rc = cfg.objective, cfg.rollout
    group = oc.num_nodes if (oc.name == "slim" and oc.shared_clean) else 1
    strategy = cfg.dist.strategy if gpus > 1 else "single"
    rows = rc.prompts_per_step * rc.group_size
    per_rank = -(-rows // gpus)
    decode = min(per_rank, rc.batch_size) if rc.batch_size else per_rank
    return Setting(strategy, gpus, device, cfg.model.dtype, cfg.model.master_dtype, cfg.model.attention,
                   cfg.model.gradient_checkpointing, cfg.dist.cpu_offload and strategy == "fsdp", cfg.model.lora.r,
                   cfg.model.lora.target_modules, cfg.optim.micro_batch_rows, group, prompt_len,
                   rc.max_new_tokens, rc.block_size, decode)


def plan(cfg: Config, *, gpus: int = 1, gpu_mem_gb: float = 80.0, device: str = "cuda",
         prompt_len: int = 256) -> dict[str, Any]:
    """The prediction for ``cfg`` on ``gpus`` devices of ``gpu_mem_gb``, and settings that fit if it does not."""
    s = model_shape(cfg)
    st = setting_of(cfg, gpus=gpus, device=device, prompt_len=prompt_len)
    budget = gpu_mem_gb * 1e9 * HEADROOM
    tr, ro = predict_train(s, st), predict_rollout(s, st)
    phase = "training" if tr["peak"] >= ro["peak"] else "rollout"
    peak = max(tr["peak"], ro["peak"])
    out: dict[str, Any] = {"model": s.describe(), "shape": dataclasses.asdict(s), "setting": dataclasses.asdict(st),
                           "gpu_mem_gb": gpu_mem_gb, "budget_bytes": budget, "train": tr, "rollout": ro,
                           "bottleneck": phase, "peak_bytes": peak, "fits": peak <= budget, "suggestions": []}
    if peak > budget:
        out["suggestions"] = _suggest(cfg, s, st, budget)
    return out


def _suggest(cfg: Config, s: ModelShape, st: Setting, budget: float) -> list[dict[str, Any]]:
    """The cheapest changes (in this order: checkpointing, smaller micro-batches, offload, LoRA, fewer rows per
    decode call) that bring both phases under the budget; each as config overrides with its peak."""
    base = dataclasses.asdict(st)
    steps = [("model.gradient_checkpointing=true", {"checkpointing": True})]
    rows = st.micro_rows
    while rows > st.group:
        rows = max(st.group, rows // 2)
        steps.append((f"optim.micro_batch_rows={rows}", {"micro_rows": rows}))
    if st.strategy == "fsdp":
        steps.append(("dist.cpu_offload=true", {"offload": True}))
    steps.append(("model.lora.r=16", {"lora_r": 16}))
    dec = st.decode_rows
    while dec > 1:
        dec = max(1, dec // 2)
        steps.append((f"rollout.batch_size={dec}", {"decode_rows": dec}))
    def peaks(changes: dict[str, dict[str, Any]]) -> tuple[float, float]:
        trial = Setting(**{**base, **{k: v for ch in changes.values() for k, v in ch.items()}})
        return predict_train(s, trial)["peak"], predict_rollout(s, trial)["peak"]

    chosen: dict[str, dict[str, Any]] = {}   # override text -> its change, in the order taken
    for text, change in steps:
        key = text.split("=")[0]
        chosen = {t: c for t, c in chosen.items() if t.split("=")[0] != key}
        chosen[text] = change
        if max(peaks(chosen)) <= budget:
            break
    else:
        return []
    for text in list(chosen):  # drop what the later changes made unnecessary
        rest = {t: c for t, c in chosen.items() if t != text}
        if max(peaks(rest)) <= budget:
            chosen = rest
    tr, ro = peaks(chosen)
    return [{"overrides": list(chosen), "train_peak_bytes": tr, "rollout_peak_bytes": ro}]


def _gb(x: float) -> str:
    return f"{x / 1e9:8.2f}"


def format_plan(p: dict[str, Any]) -> str:
    st, tr, ro = p["setting"], p["train"], p["rollout"]
    where = f"{st['world']} x {p['gpu_mem_gb']:g} GB {st['device']}" if st["device"] == "cuda" else "CPU"
    lines = [f"slim-rl plan: {p['model']}",
             f"  {where}, {st['strategy']}, compute {st['compute']}, master {st['master']}, attention "
             f"{st['attention']}, checkpointing {'on' if st['checkpointing'] else 'off'}, offload "
             f"{'on' if st['offload'] else 'off'}, LoRA {'r=' + str(st['lora_r']) if st['lora_r'] else 'off'}",
             f"  training micro-batch: {st['micro_rows']} rows ({st['group']} per clean stream), "
             f"L0={st['prompt_len']} L1={st['response_len']}: {int(tr['tokens'])} tokens; rollout: "
             f"{st['decode_rows']} rows per decode call, K={st['block']}",
             "",
             f"  {'phase':<10} {'component':<34} {'GB/GPU':>8}"]
    rows = [("rollout", "master weights + AdamW state", ro["resident"]),
            ("rollout", "decode weights (compute dtype)", ro["decode_weights"]),
            ("rollout", "KV cache", ro["kv_cache"]), ("rollout", "block logits", ro["logits"]),
            ("rollout", "forward transients", ro["forward_transient"]), ("rollout", "PEAK", ro["peak"]),
            ("training", "master weights", tr["weights"]), ("training", "gradients", tr["gradients"]),
            ("training", "AdamW state", tr["adamw_state"]), ("training", "weight copies (compute dtype)",
                                                             tr["weight_copies"]),
            ("training", "activations" + (" (checkpointed)" if st["checkpointing"] else ""), tr["activations"]),
            ("training", "backward transients", tr["backward_transient"]),
            ("training", "optimizer-step transients", tr["optimizer_transient"]), ("training", "PEAK", tr["peak"])]
    for ph, comp, v in rows:
        lines.append(f"  {ph:<10} {comp:<34} {_gb(v)}")
    if tr["host_offload"]:
        lines.append(f"  {'host':<10} {'offloaded shards + state (CPU)':<34} {_gb(tr['host_offload'])}")
    lines.append("")
    budget = p["budget_bytes"]
    lines.append(f"  bottleneck: {p['bottleneck']} ({p['peak_bytes'] / 1e9:.2f} GB of the {budget / 1e9:.1f} GB "
                 f"usable per GPU: {HEADROOM:.0%} of {p['gpu_mem_gb']:g} GB): "
                 f"{'fits' if p['fits'] else 'does NOT fit'}")
    if not p["fits"]:
        if p["suggestions"]:
            sug = p["suggestions"][0]
            lines.append(f"  fits with: {' '.join(sug['overrides'])} (training {sug['train_peak_bytes'] / 1e9:.2f} "
                         f"GB, rollout {sug['rollout_peak_bytes'] / 1e9:.2f} GB)")
        else:
            lines.append("  no combination of checkpointing, micro-batch rows, offload, LoRA and decode rows fits: "
                         "use more GPUs")
    return "\n".join(lines)

