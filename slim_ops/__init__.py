"""slim_ops: fused kernels for RL of block-diffusion language models (SDAR, LLaDA, Dream).

Public API (pinned by tests/test_api.py; documented in docs/). Every op has a plain fp32 PyTorch
reference (``ops/<op>/reference.py``) and torch / triton / cuda backends chosen by
:mod:`slim_ops._backend`. Names are resolved lazily so ``import slim_ops`` needs neither triton nor a GPU
and stays cheap.
"""

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

# public name -> module that defines it (the one table; pinned by tests/test_api.py)
_EXPORTS: dict[str, str] = {
    # decode step (docs/decode.md)
    "StepOutput": "slim_ops.ops.tau_budget.op",
    "tau_budget_step": "slim_ops.ops.tau_budget.op",
    "tau_budget_select": "slim_ops.ops.tau_budget.op",
    "static_floor": "slim_ops.ops.tau_budget.op",
    # attention (docs/attention.md)
    "BlockLayout": "slim_ops.layout",
    "block_diffusion_attention": "slim_ops.ops.attention.op",
    # log-prob and loss (docs/objective.md)
    "masked_logprob": "slim_ops.ops.masked_logprob.op",
    "logprob_from_logits": "slim_ops.ops.masked_logprob.op",
    "slim_policy_loss": "slim_ops.ops.policy_loss.op",
    "slim_loss_from_hidden": "slim_ops.ops.policy_loss.op",
    # rows and schedules (docs/objective.md)
    "quadrature": "slim_ops.objective",
    "block_mask_probs": "slim_ops.objective",
    "build_slim_rows": "slim_ops.objective",
    "build_trace_rows": "slim_ops.objective",
    "build_random_rows": "slim_ops.objective",
    # backends
    "available_backends": "slim_ops._backend",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> object:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'slim_ops' has no attribute {name!r}")
    value = getattr(_importlib.import_module(mod), name)
    globals()[name] = value
    return value


# subpackages a user imports by name (``from slim_ops import compat``, ``slim_ops.integrations.hf``)
_SUBMODULES = ("compat", "integrations", "testing")


def __dir__() -> list[str]:
    return sorted(set(__all__) | {m for m in _SUBMODULES if m in globals()})


if _typing.TYPE_CHECKING:  # pragma: no cover - static names for type checkers and IDEs
    from slim_ops._backend import available_backends  # noqa: F401
    from slim_ops.layout import BlockLayout  # noqa: F401
    from slim_ops.objective import (  # noqa: F401
        block_mask_probs,
        build_random_rows,
        build_slim_rows,
        build_trace_rows,
        quadrature,
    )
    from slim_ops.ops.attention.op import block_diffusion_attention  # noqa: F401
    from slim_ops.ops.masked_logprob.op import logprob_from_logits, masked_logprob  # noqa: F401
    from slim_ops.ops.policy_loss.op import slim_loss_from_hidden, slim_policy_loss  # noqa: F401
    from slim_ops.ops.tau_budget.op import (  # noqa: F401
        StepOutput,
        static_floor,
        tau_budget_select,
        tau_budget_step,
    )
