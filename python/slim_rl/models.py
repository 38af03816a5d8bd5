"""Model families for block-diffusion decoding: tiny random models for tests and demos, and a local loader.

Three families (SPEC §1, §3):

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


def load(path: str | os.PathLike, family: str, *, dtype: torch.dtype | None = None, device: str | None = None,
         mask_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
         trust_remote_code: bool = False, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Load a local checkpoint directory of one family, offline (no hub access).

    The checkpoint's ``config.json`` decides the architecture. SDAR and Dream checkpoints whose
    ``model_type`` is not a transformers architecture (``"sdar"``, ``"Dream"``) are loaded into the
    equivalent Qwen3 / Qwen2 classes (their weight names match); a LLaDA checkpoint with its own
    modeling code needs ``trust_remote_code=True`` (the code must be in the directory).

    Special ids: keyword arguments > ``mask_token_id`` / ``eos_token_id`` / ``pad_token_id`` in the config
    > the released checkpoints' ids (SDAR μ=151669, LLaDA μ=126336, Dream μ=151666).

    Returns the model in eval mode with the attributes documented in :func:`tiny`.
    """
    import transformers

    family = _check_family(family)
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path!r} is not a checkpoint directory: no config.json "
                                "(load() is offline only)")
    with open(cfg_file) as f:
        raw = json.load(f)
    model_type = str(raw.get("model_type", ""))
    common = dict(local_files_only=True, attn_implementation=attn_implementation)
    if dtype is not None:
        common["dtype"] = dtype
    cfg_cls, model_cls, _, _ = _classes(family)
    if model_type in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **common)
    elif family in ("sdar", "dream"):
        skip = ("model_type", "architectures", "auto_map")
        keys = {k: v for k, v in raw.items() if not k.startswith("_") and k not in skip}
        cfg = cfg_cls(**keys)
        model = model_cls.from_pretrained(path, config=cfg, **common)
    elif trust_remote_code:
        model = transformers.AutoModel.from_pretrained(path, trust_remote_code=True, **common)
    else:
        raise ValueError(f"checkpoint model_type {model_type!r} is not a transformers architecture; "
                         f"pass trust_remote_code=True to use the modeling code shipped in {path!r}")
    if device is not None:
        model = model.to(device)
    ids = _REAL_IDS[family]
    cfg = model.config

    def pick(given: int | None, attr: str, key: str) -> int:
        if given is not None:
            return int(given)
        found = _first_id(getattr(cfg, attr, None))
        return ids[key] if found is None else found

    mask = pick(mask_id, "mask_token_id", "mask_id")
    eos = pick(eos_id, "eos_token_id", "eos_id")
    pad = pick(pad_id, "pad_token_id", "pad_id")
    return _annotate(model.eval(), family, mask, eos, pad)


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    """The decoding attributes of a model from :func:`tiny` / :func:`load`, validated."""
    missing = [a for a in ("family", "mask_id", "eos_id", "pad_id", "shift") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"model lacks attribute(s) {missing}: build it with slim_rl.models.tiny() or "
                        f"slim_rl.models.load(), or set them by hand")
    return {a: getattr(model, a) for a in ("family", "mask_id", "eos_id", "pad_id", "shift", "block_causal")}
