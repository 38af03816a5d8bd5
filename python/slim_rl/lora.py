"""LoRA adapters (through PEFT) on the trainer's models, in place.

``model.lora.r > 0``: :func:`apply` injects adapters into the chosen linear layers of a loaded model
(PEFT's ``inject_adapter_in_model``: the model keeps its class, attributes and decoder, so the generation
engine, the scorer and FSDP2 see the same module tree) and freezes every base weight. Then:

* only the adapters train, and only they are checkpointed (:mod:`slim_rl.checkpoint` saves the trainable
  parameters of a model that has adapters; the base comes from ``model.path`` or the tiny model's seed);
* the KL reference of ``objective.kl_reference=ref`` is the base model: the same modules with the adapters
  switched off (:func:`disabled`), no second copy of the weights;
* ``slim-rl export`` merges the adapters into the base weights (:func:`merge`) and writes a plain
  checkpoint that :func:`slim_rl.models.load` and transformers read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["apply", "has_adapters", "adapter_layers", "disabled", "merge"]


def apply(model: torch.nn.Module, r: int, alpha: float, dropout: float, target_modules: str, *,
          seed: int = 0) -> torch.nn.Module:
    """Inject rank-``r`` LoRA adapters (B = 0: the model's function is unchanged) and freeze the rest. The
    adapters' random init (A) is drawn from ``seed``: every rank and every rebuild get the same adapters."""
    from peft import LoraConfig, inject_adapter_in_model

    targets: str | list[str] = target_modules.strip()
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    cfg = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
                     bias="none")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            inject_adapter_in_model(cfg, model)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        from slim_rl.errors import ConfigError

        raise ConfigError(f"config: model.lora.target_modules={target_modules!r}: {str(e).splitlines()[0]}") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that carry LoRA adapters."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "enable_adapters")]


def has_adapters(model: torch.nn.Module) -> bool:
    return bool(adapter_layers(model))


@contextlib.contextmanager
def disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The base model: every adapter of ``model`` switched off inside the block (exactly the base weights'
    function), back on afterwards. A no-op for a model without adapters."""
    layers = adapter_layers(model)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)  # PEFT marks the adapters trainable again


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight (W + B·A·alpha/r) and put the plain layer back in its
    place: a model with the original module names and no PEFT modules (in place; returned)."""
    for name, m in list(model.named_modules()):
        if not (hasattr(m, "lora_A") and hasattr(m, "get_base_layer")):
            continue
        with torch.no_grad():
            m.merge()
        base = m.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
