"""Suite-wide setup: Triton through its interpreter when no GPU is present, the `gpu` marker, and the
compile report printed at the end of the run."""

from __future__ import annotations

import os
import shutil
import subprocess

# Must happen before any slim_ops kernel module is imported (triton.jit reads it at decoration time).
_HAS_GPU = shutil.which("nvidia-smi") is not None and subprocess.run(
    ["nvidia-smi", "-L"], capture_output=True).returncode == 0
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPORT_LINES: list[str] = []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run benchmarks/gpu_check.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if REPORT_LINES:
        terminalreporter.section("kernel resource report")
        for line in REPORT_LINES:
            terminalreporter.write_line(line)


@pytest.fixture
def report():
    """Append lines to the end-of-run kernel report."""
    return REPORT_LINES.append


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
