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


def test_namespace_is_clean():
    """dir(slim_ops) shows the public API (and subpackages once imported), no helper imports."""
    shown = {n for n in dir(slim_ops) if not n.startswith("__")}
    assert shown - {"compat", "integrations", "testing"} == PUBLIC, shown ^ PUBLIC
    public_globals = {n for n in vars(slim_ops) if not n.startswith("_")}
    assert public_globals <= PUBLIC | {"compat", "integrations", "testing", "ops", "layout", "objective"}, \
        public_globals - PUBLIC
    for name in ("Any", "TYPE_CHECKING", "importlib", "annotations"):
        assert name not in dir(slim_ops) and not hasattr(slim_ops, name), name


def test_compat_is_importable_by_name():
    from slim_ops import compat

    assert set(compat.__all__) == {"slim_rl_get_transfer_index", "fast_dllm_get_transfer_index",
                                   "get_num_transfer_tokens", "sdar_get_num_transfer_tokens", "sdar_block_step"}


def test_import_is_silent_without_triton():
    """Importing every op (attention included) without triton prints nothing and raises no warning."""
    code = ("import sys, warnings; sys.modules['triton'] = None\n"
            "warnings.simplefilter('error')\n"
            "import slim_ops\n"
            "for n in slim_ops.__all__: getattr(slim_ops, n)\n"
            "import slim_ops.compat, slim_ops.integrations.hf\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and p.stderr == "", p.stderr


def test_num_committed_is_int32_count():
    """num_committed is a per-row count (<= K <= 64) in int32, as documented; blocks and tokens are int64."""
    import torch

    out = slim_ops.tau_budget_step(torch.randn(3, 5, 40), torch.full((3, 5), 39), 39, tau=0.5)
    assert out.num_committed.dtype == torch.int32 and out.block.dtype == torch.int64
    assert torch.equal(out.num_committed.long(), out.commit.sum(1))
    commit, k, _ = slim_ops.tau_budget_select(torch.rand(3, 5), torch.ones(3, 5, dtype=torch.bool), tau=0.5)
    assert k.dtype == torch.int32 and torch.equal(k.long(), commit.sum(1))


def test_cli_without_rl_extra_names_the_install_line():
    code = ("import sys; sys.modules['yaml'] = None\n"
            "from slim_rl.cli import main\n"
            "main(['demo', '--out', '/nonexistent/never-written'])\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": "python"})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slim-rl: error:"), p.stderr
    assert "pip install 'slim_ops[rl]'" in lines[0] and "yaml" in lines[0]
