"""Model families for block-diffusion decoding: tiny random models for tests and demos, and a local loader.

Three families (docs/trainer.md, docs/attention.md):

========  =====================  ==========================================  =====
family    architecture           attention while decoding                    shift
========  =====================  ==========================================  =====
``sdar``  Qwen3 (``Qwen3ForCausalLM``)  block-causal staircase + KV cache of committed blocks  0
``llada`` Llama (``LlamaForCausalLM``)  bidirectional over the whole canvas  0
``dream`` Qwen2 (``Qwen2ForCausalLM``)  bidirectional over the whole canvas  1
========  =====================  ==========================================  =====

``shift`` is the logit shift: with ``shift = 1`` (Dream) logit row ``j - 1`` scores the token at ``j``;
SDAR and LLaDA score position ``j`` with row ``j``. The generation engine (:mod:`slim_rl.generate`)
always passes an explicit 4D additive attention mask, so the HF classes' own causal masking is never
used; the attention modules of the bidirectional families are additionally marked ``is_causal = False``.

Every model returned here carries plain attributes ``family``, ``mask_id``, ``eos_id``, ``pad_id``,
``shift`` and ``block_causal`` (the engine reads nothing else beyond the HF forward signature).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

FAMILIES = ("sdar", "llada", "dream")

# family -> (transformers config class name, model class name, shift, block_causal)
_ARCH: dict[str, tuple[str, str, int, bool]] = {
    "sdar": ("Qwen3Config", "Qwen3ForCausalLM", 0, True),
    "llada": ("LlamaConfig", "LlamaForCausalLM", 0, False),
    "dream": ("Qwen2Config", "Qwen2ForCausalLM", 1, False),
}

# Special ids of the released checkpoints (used by `load` when the checkpoint does not state them).
_REAL_IDS: dict[str, dict[str, int]] = {
    "sdar": {"mask_id": 151669, "eos_id": 151643, "pad_id": 151643},
    "llada": {"mask_id": 126336, "eos_id": 126081, "pad_id": 126081},
    "dream": {"mask_id": 151666, "eos_id": 151643, "pad_id": 151643},
}


def _check_family(family: str) -> str:
    if not isinstance(family, str) or family.lower() not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return family.lower()


def _classes(family: str):
    import transformers

    cfg_name, model_name, shift, block_causal = _ARCH[family]
    return getattr(transformers, cfg_name), getattr(transformers, model_name), shift, block_causal


def _annotate(model: torch.nn.Module, family: str, mask_id: int, eos_id: int, pad_id: int) -> torch.nn.Module:
    """Attach the attributes the generation engine and the trainer read; mark attention non-causal."""
    _, _, shift, block_causal = _ARCH[family]
    vocab = model.get_output_embeddings().weight.shape[0]
    for name, v in (("mask_id", mask_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if not (0 <= int(v) < vocab):
            raise ValueError(f"{name}={v} is outside the vocabulary [0, {vocab})")
    if int(mask_id) == int(eos_id):
        raise ValueError(f"mask_id and eos_id must differ, both are {mask_id}")
    model.family = family
    model.mask_id = int(mask_id)
    model.eos_id = int(eos_id)
    model.pad_id = int(pad_id)
    model.shift = shift
    model.block_causal = block_causal
    # keep them in the config too, so save_pretrained / load round-trips them
    model.config.mask_token_id = int(mask_id)
    model.config.eos_token_id = int(eos_id)
    model.config.pad_token_id = int(pad_id)
    model.config.slim_family = family
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model


def tiny(family: str, vocab_size: int = 32, seed: int = 0, *, hidden_size: int = 64, num_layers: int = 2,
         num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None,
         intermediate_size: int | None = None, max_positions: int = 4096, init_std: float = 0.02,
         head_std: float | None = None, mask_id: int | None = None, eos_id: int | None = None,
         pad_id: int | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A small randomly initialised model of one family's architecture (CPU-cheap; for tests and demos).

    Args:
        family: ``"sdar"`` (Qwen3-shaped), ``"llada"`` (Llama-shaped, bidirectional) or ``"dream"``
            (Qwen2-shaped, logits shifted by one).
        vocab_size: V (>= 4). Special ids default to the last three: ``mask_id = V-1``,
            ``eos_id = V-2``, ``pad_id = V-3``.
        seed: the weights are a deterministic function of (family, sizes, seed).
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size: sizes
            (``head_dim`` defaults to ``hidden_size // num_heads``, ``intermediate_size`` to ``2·hidden``).
        init_std: std of the normal init of every linear / embedding weight.
        head_std: std of the output head only (defaults to ``init_std``); a larger value gives peakier
            distributions, i.e. higher decode confidences.
        dtype, device: where the parameters live (weights are drawn on ``device`` from a generator
            seeded with ``seed``, so they are deterministic per device type).

    Returns:
        a ``transformers`` ``*ForCausalLM`` in eval mode with attributes ``family``, ``mask_id``,
        ``eos_id``, ``pad_id``, ``shift`` (1 for Dream, else 0) and ``block_causal`` (True for SDAR).
    """
    family = _check_family(family)
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (mask, eos, pad + one token), got {vocab_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    head_dim = head_dim or hidden_size // num_heads
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    cfg_cls, model_cls, _, _ = _classes(family)
    cfg_kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=max_positions, initializer_range=init_std,
        tie_word_embeddings=False, attention_dropout=0.0, use_cache=True,
    )
    cfg = cfg_cls(**cfg_kwargs)
    cfg._attn_implementation = attn_implementation
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    with device:
        model = model_cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                std = head_std if (head_std is not None and name.startswith("lm_head")) else init_std
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * std)
            elif "bias" in name:
                p.zero_()
            else:  # norm weights
                p.fill_(1.0)
    model = model.to(dtype).eval()
    return _annotate(model, family,
                     vocab_size - 1 if mask_id is None else mask_id,
                     vocab_size - 2 if eos_id is None else eos_id,
                     vocab_size - 3 if pad_id is None else pad_id)


def _first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


# ---------------------------------------------------------------------------------------------------------------
# published checkpoint layouts -> the engine's transformers classes
# ---------------------------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A checkpoint whose config or parameter names :func:`load` cannot map onto the engine's model."""


# model_type values accepted per family: the published one and the transformers one it maps to
_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "sdar": ("sdar", "qwen3"),
    "llada": ("llada", "llama"),
    "dream": ("dream", "qwen2"),
}


def _rope_theta(raw: dict[str, Any], default: float) -> float:
    if "rope_theta" in raw and raw["rope_theta"] is not None:
        return float(raw["rope_theta"])
    rp = raw.get("rope_parameters") or {}
    return float(rp.get("rope_theta", default))


def _check_rope(raw: dict[str, Any], problems: list[str]) -> None:
    scaling = raw.get("rope_scaling")
    rp = raw.get("rope_parameters") or {}
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) if scaling else rp.get("rope_type")
    if kind not in (None, "default"):
        problems.append(f"rope scaling {kind!r} (only plain RoPE is mapped)")


def _qwen_config(raw: dict[str, Any], family: str) -> tuple[dict[str, Any], list[str]]:
    """SDAR (Qwen3-shaped, q/k RMS norm) and Dream (Qwen2-shaped, q/k/v bias): the config fields are Qwen's."""
    problems: list[str] = []
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if k not in raw]
    if missing:
        problems.append(f"config.json lacks {missing}")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {raw.get('hidden_act')!r} (only 'silu' is mapped)")
    if raw.get("use_sliding_window"):
        problems.append("use_sliding_window=true (sliding-window attention is not mapped)")
    _check_rope(raw, problems)
    heads = int(raw.get("num_attention_heads", 1))
    kw: dict[str, Any] = {k: raw[k] for k in need if k in raw}
    kw.update(num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
              max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
              rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
              tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
              rope_theta=_rope_theta(raw, 10000.0 if family == "dream" else 1000000.0),
              attention_dropout=0.0, hidden_act="silu")
    if "hidden_size" in raw:  # SDAR states head_dim; Dream's code uses hidden_size / heads
        kw["head_dim"] = int(raw.get("head_dim") or int(raw["hidden_size"]) // heads) if family == "sdar" \
            else int(raw["hidden_size"]) // heads
    if family == "sdar":
        kw["attention_bias"] = bool(raw.get("attention_bias", False))
    return kw, problems


def _llada_dims(raw: dict[str, Any]) -> dict[str, int]:
    d, h = int(raw["d_model"]), int(raw["n_heads"])
    kv = raw.get("n_kv_heads")
    mqa = raw.get("multi_query_attention")
    kv = (1 if mqa else h) if kv is None else (1 if mqa else int(kv))
    hidden = raw.get("mlp_hidden_size")
    hidden = int(hidden) if hidden is not None else int(raw.get("mlp_ratio", 4)) * d
    return {"d": d, "heads": h, "kv": kv, "head_dim": d // h, "hidden": hidden,
            "vocab": int(raw.get("embedding_size") or raw["vocab_size"])}


def _llada_config(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """LLaDA's own (OLMo-derived) config fields -> a Llama config with the same maths."""
    if str(raw.get("model_type", "")).lower() == "llama":
        return _qwen_like_llama(raw)
    problems: list[str] = []
    missing = [k for k in ("d_model", "n_heads", "n_layers", "vocab_size") if k not in raw]
    if missing:
        return {}, [f"config.json lacks {missing}"]
    block = raw.get("block_type", "llama")
    act = raw.get("activation_type", "silu" if block == "llama" else "swiglu")
    unsupported = {
        "alibi": raw.get("alibi", False), "rope disabled": not raw.get("rope", True),
        "attention_layer_norm": raw.get("attention_layer_norm", False), "clip_qkv": raw.get("clip_qkv") is not None,
        "include_bias": raw.get("include_bias", False), "include_qkv_bias": raw.get("include_qkv_bias", False),
        "input_emb_norm": raw.get("input_emb_norm", False), "scale_logits": raw.get("scale_logits", False),
        "layer_norm_with_affine=false": not raw.get("layer_norm_with_affine", True),
        "bias_for_layer_norm": raw.get("bias_for_layer_norm", False),
    }
    problems += [f"{k} (not mapped)" for k, v in unsupported.items() if v]
    if raw.get("layer_norm_type", "rms") != "rms":
        problems.append(f"layer_norm_type {raw.get('layer_norm_type')!r} (only 'rms' is mapped)")
    if (block, act) not in (("llama", "silu"), ("sequential", "swiglu")):
        problems.append(f"block_type {block!r} with activation_type {act!r} (mapped: llama+silu, "
                        "sequential+swiglu)")
    dims = _llada_dims(raw)
    if dims["d"] % dims["heads"]:
        problems.append(f"d_model {dims['d']} is not a multiple of n_heads {dims['heads']}")
    inter = dims["hidden"] // 2 if block == "sequential" else dims["hidden"]
    kw = dict(vocab_size=dims["vocab"], hidden_size=dims["d"], intermediate_size=inter,
              num_hidden_layers=int(raw["n_layers"]), num_attention_heads=dims["heads"],
              num_key_value_heads=dims["kv"], head_dim=dims["head_dim"],
              max_position_embeddings=int(raw.get("max_sequence_length", 4096)),
              rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)), rope_theta=float(raw.get("rope_theta", 10000.0)),
              tie_word_embeddings=bool(raw.get("weight_tying", False)), attention_bias=False, mlp_bias=False,
              attention_dropout=0.0, hidden_act="silu")
    return kw, problems


def _qwen_like_llama(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A transformers-native Llama config (what :func:`tiny` saves for LLaDA): its own field names."""
    problems: list[str] = []
    _check_rope(raw, problems)
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        problems.append("attention_bias / mlp_bias (not mapped)")
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if k not in raw]
    if missing:
        return {}, [f"config.json lacks {missing}"]
    heads = int(raw["num_attention_heads"])
    kw = {k: raw[k] for k in need}
    kw.update(num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
              head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
              max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
              rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)), rope_theta=_rope_theta(raw, 10000.0),
              tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), attention_dropout=0.0,
              hidden_act=raw.get("hidden_act", "silu"))
    return kw, problems


_LLADA_BLOCK = {  # LLaDA llama-block parameter -> Llama decoder-layer parameter
    "attn_norm.weight": "input_layernorm.weight", "ff_norm.weight": "post_attention_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight", "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight", "attn_out.weight": "self_attn.o_proj.weight",
    "ff_proj.weight": "mlp.gate_proj.weight", "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}
_LLADA_TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
              "transformer.ff_out.weight": "lm_head.weight"}
_LLADA_BLOCK_RE = re.compile(r"^transformer\.(?:blocks\.(\d+)|block_groups\.(\d+)\.(\d+))\.(.+)$")


def _rename_llada(sd: dict[str, torch.Tensor], raw: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LLaDA names (``model.transformer.blocks.N.q_proj.weight``, ``att_proj``/``ff_proj``/``up_proj``/``ff_out``,
    ``wte``, ``ln_f``) -> Llama names; fused ``att_proj`` / SwiGLU ``ff_proj`` (sequential blocks) are split."""
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    group = int(raw.get("block_group_size", 1) or 1)
    dims = _llada_dims(raw) if all(k in raw for k in ("d_model", "n_heads", "vocab_size")) else None
    for key, t in sd.items():
        k = key[len("model."):] if key.startswith("model.") else key
        if k in _LLADA_TOP:
            out[_LLADA_TOP[k]] = t
            continue
        m = _LLADA_BLOCK_RE.match(k)
        if m is None:
            unmapped.append(key)
            continue
        layer = int(m.group(1)) if m.group(1) is not None else int(m.group(2)) * group + int(m.group(3))
        rest, pre = m.group(4), f"model.layers.{layer}."
        if rest == "ff_proj.weight" and raw.get("block_type") == "sequential":
            up, gate = t.chunk(2, dim=0)  # SwiGLU: x, gate = ff_proj(h).chunk(2); silu(gate) * x
            out[pre + "mlp.up_proj.weight"], out[pre + "mlp.gate_proj.weight"] = up, gate
        elif rest in _LLADA_BLOCK:
            out[pre + _LLADA_BLOCK[rest]] = t
        elif rest == "att_proj.weight" and dims is not None:
            nq, nkv = dims["d"], dims["kv"] * dims["head_dim"]
            if t.shape[0] != nq + 2 * nkv:
                unmapped.append(f"{key} (shape {tuple(t.shape)}, expected {nq + 2 * nkv} rows)")
                continue
            q, k_, v = t.split([nq, nkv, nkv], dim=0)
            out[pre + "self_attn.q_proj.weight"], out[pre + "self_attn.k_proj.weight"] = q, k_
            out[pre + "self_attn.v_proj.weight"] = v
        else:
            unmapped.append(key)
    return out, unmapped


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` lists."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' (parameter name -> shard file)")
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if absent:
            raise CheckpointError(f"{path!r}: shard file(s) {absent} listed in model.safetensors.index.json "
                                  "are missing")
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            part = load_file(os.path.join(path, shard))
            sd.update(part)
        not_found = sorted(k for k in weight_map if k not in sd)
        if not_found:
            raise CheckpointError(f"{path!r}: index lists {len(not_found)} tensor(s) absent from their shards: "
                                  f"{not_found[:10]}")
        return sd
    if os.path.isfile(single):
        return load_file(single)
    raise CheckpointError(f"{path!r}: no model.safetensors or model.safetensors.index.json "
                          "(load() reads safetensors checkpoints)")


def _no_init():
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _listing(label: str, keys: list[str]) -> str:
    more = f" (+{len(keys) - 12} more)" if len(keys) > 12 else ""
    return f"{label} ({len(keys)}): {', '.join(keys[:12])}{more}"


def load_tokenizer(path: str | os.PathLike):
    """A local tokenizer folder (``tokenizer.json`` / ``tokenizer_config.json``), offline, no remote code.

    Folders whose ``tokenizer_config.json`` names a custom class (Dream's ``DreamTokenizer``) are read through
    their ``tokenizer.json`` with :class:`transformers.PreTrainedTokenizerFast`."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer {path!r} is not a directory")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError) as e:
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"tokenizer {path!r}: cannot be read without remote code and has no "
                                    f"tokenizer.json ({e})") from e
        extra: dict[str, Any] = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                tc = json.load(f)
            for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
                v = tc.get(k)
                if isinstance(v, dict):
                    v = v.get("content")
                if isinstance(v, str):
                    extra[k] = v
            if isinstance(tc.get("chat_template"), str):
                extra["chat_template"] = tc["chat_template"]
        return PreTrainedTokenizerFast(tokenizer_file=tj, **extra)


def load(path: str | os.PathLike, family: str, *, dtype: torch.dtype | None = None, device: str | None = None,
         mask_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
         tokenizer: str | os.PathLike | bool | None = None,
         attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Load a local checkpoint of one family into the engine's model, offline, without running its code.

    Reads the published layouts (``config.json`` + ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``) and maps them onto transformers classes with the same maths:

    * ``sdar`` (``SDARForCausalLM``, model_type ``sdar``): Qwen3 (q/k RMS norm per head, RoPE θ from the
      config); the parameter names are Qwen3's.
    * ``dream`` (``DreamModel``, model_type ``Dream``): Qwen2 (bias on q/k/v); names are Qwen2's; the engine
      applies Dream's one-position logit shift (``model.shift = 1``).
    * ``llada`` (``LLaDAModelLM``, model_type ``llada``): Llama. Config ``d_model``, ``n_heads``, ``n_kv_heads``,
      ``n_layers``, ``mlp_hidden_size``, ``embedding_size``, ``weight_tying`` ...; names
      ``model.transformer.wte`` / ``blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj,
      up_proj, ff_out}`` / ``ln_f`` / ``ff_out`` (``block_groups`` and the fused ``att_proj`` of sequential
      blocks included).

    Checkpoints saved by this library (model_type ``qwen3`` / ``llama`` / ``qwen2``) load the same way. Anything
    that cannot be mapped (an unknown parameter name, a missing or mis-shaped parameter, a config option
    such as ALiBi or sliding windows) raises one :class:`CheckpointError` listing all of it.

    Args:
        path: checkpoint directory. family: ``"sdar"`` | ``"llada"`` | ``"dream"``.
        dtype: parameter dtype (default: the checkpoint's). device: where to put the model.
        mask_id, eos_id, pad_id: special ids; default ``mask_token_id`` / ``eos_token_id`` / ``pad_token_id``
            of the config, else the released checkpoints' ids (SDAR μ=151669, LLaDA μ=126336, Dream μ=151666).
        tokenizer: a local tokenizer folder (or ``True``: the checkpoint folder) loaded with
            :func:`load_tokenizer` and attached as ``model.tokenizer``; it must fit the vocabulary.
        attn_implementation: transformers attention backend (``"sdpa"``, ``"eager"``, or slim_ops' registered name).

    Returns the model in eval mode with the attributes documented in :func:`tiny`.
    """
    family = _check_family(family)
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path!r} is not a checkpoint directory: no config.json "
                                "(load() is offline only)")
    with open(cfg_file) as f:
        raw = json.load(f)
    model_type = str(raw.get("model_type", "")).lower()
    if model_type not in _MODEL_TYPES[family]:
        raise CheckpointError(f"{path!r}: model_type {raw.get('model_type')!r} is not a {family} checkpoint "
                              f"(expected one of {_MODEL_TYPES[family]})")
    if family == "llada":
        kw, problems = _llada_config(raw)
    else:
        kw, problems = _qwen_config(raw, family)
    if problems:
        raise CheckpointError(f"{path!r}: cannot map the {family} config: " + "; ".join(problems))
    sd = _read_safetensors(path)
    unmapped: list[str] = []
    if family == "llada" and model_type == "llada":
        sd, unmapped = _rename_llada(sd, raw)
    ignorable = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
    sd = {k: v for k, v in sd.items() if not ignorable.search(k)}

    cfg_cls, model_cls, _, _ = _classes(family)
    rope_theta = kw.pop("rope_theta")
    cfg = cfg_cls(**kw)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if hasattr(cfg, "rope_theta"):
        cfg.rope_theta = rope_theta
    cfg._attn_implementation = attn_implementation
    if dtype is None:
        floats = [t.dtype for t in sd.values() if t.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _no_init():
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    own = model.state_dict()
    tied = bool(kw.get("tie_word_embeddings"))
    unmapped += [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd and not (tied and k == "lm_head.weight")]
    mis_shaped = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in sd
                  if k in own and sd[k].shape != own[k].shape]
    if unmapped or missing or mis_shaped:
        parts = [_listing(label, keys) for label, keys in (("unmapped checkpoint tensors", unmapped),
                                                           ("model parameters missing from the checkpoint", missing),
                                                           ("shape mismatches", mis_shaped)) if keys]
        raise CheckpointError(f"{path!r}: cannot load as {family}: " + "; ".join(parts))
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    if tied:
        model.tie_weights()
    if device is not None:
        model = model.to(device)
    ids = _REAL_IDS[family]

    def pick(given: int | None, key: str, name: str) -> int:
        if given is not None:
            return int(given)
        found = _first_id(raw.get(key))
        return ids[name] if found is None else found

    eos = pick(eos_id, "eos_token_id", "eos_id")
    # no pad id stated (SDAR's config): pad with EOS, as the released checkpoints do
    pad = pick(pad_id, "pad_token_id", "pad_id") if pad_id is not None or raw.get("pad_token_id") is not None \
        or raw.get("eos_token_id") is None else eos
    model = _annotate(model.eval(), family, pick(mask_id, "mask_token_id", "mask_id"), eos, pad)
    if tokenizer is not None and tokenizer is not False:
        tok = load_tokenizer(path if tokenizer is True else tokenizer)
        vocab = model.get_output_embeddings().weight.shape[0]
        if len(tok) > vocab:
            raise CheckpointError(f"tokenizer {os.fspath(path if tokenizer is True else tokenizer)!r} has "
                                  f"{len(tok)} tokens but the model's vocabulary is {vocab}")
        model.tokenizer = tok
    return model


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    """The decoding attributes of a model from :func:`tiny` / :func:`load`, validated."""
    missing = [a for a in ("family", "mask_id", "eos_id", "pad_id", "shift") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"model lacks attribute(s) {missing}: build it with slim_rl.models.tiny() or "
                        f"slim_rl.models.load(), or set them by hand")
    return {a: getattr(model, a) for a in ("family", "mask_id", "eos_id", "pad_id", "shift", "block_causal")}
