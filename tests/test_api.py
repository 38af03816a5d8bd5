"""The public API is pinned: names, and that `import slim_ops` needs neither triton nor a GPU."""

from __future__ import annotations

import subprocess
import sys

import slim_ops

PUBLIC = {
    "BlockLayout", "StepOutput", "available_backends", "block_diffusion_attention", "block_mask_probs",
    "build_random_rows", "build_slim_rows", "build_trace_rows", "logprob_from_logits", "masked_logprob",
    "quadrature",
    "slim_loss_from_hidden", "slim_policy_loss", "static_floor", "tau_budget_select", "tau_budget_step",
}


def test_all_is_pinned():
    assert set(slim_ops.__all__) == PUBLIC | {"__version__"}


def test_every_public_name_resolves():
    for name in PUBLIC:
        assert getattr(slim_ops, name) is not None, name


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, slim_ops\n"
            "out = slim_ops.tau_budget_step(torch.randn(2, 4, 50), torch.full((2, 4), 49), 49)\n"
            "assert out.block.shape == (2, 4)\n"
            "assert 'triton' not in slim_ops.available_backends('cpu')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
