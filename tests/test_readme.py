"""Every ```python block of README.md and docs/*.md runs (CPU, tiny sizes), and the README cites nothing
outside the repository.

The blocks of one file run in order in one namespace (a later block may use names an earlier one defined,
as a reader would); every file starts from a fresh namespace. A block preceded by the line
``<!-- snippet: skip (reason) -->`` is skipped (GPU or network only; keep them rare: the skip is visible in
the markdown).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = re.compile(r"<!--\s*snippet:\s*skip\b")
FENCE = re.compile(r"^```python\s*\n(.*?)^```\s*$", re.S | re.M)
FILES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def python_blocks(path: str) -> tuple[list[tuple[int, str]], int]:
    """(line number, code) of every runnable python block, and how many were marked skipped."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks, skipped = [], 0
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if SKIP.search(before):
            skipped += 1
            continue
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return blocks, skipped


def test_every_markdown_file_is_collected():
    assert os.path.isdir(os.path.join(ROOT, "docs"))
    names = {os.path.relpath(p, ROOT) for p in FILES}
    assert {"README.md", "docs/index.md", "docs/decode.md", "docs/adopting.md"} <= names
    total = sum(len(python_blocks(p)[0]) for p in FILES)
    skipped = sum(python_blocks(p)[1] for p in FILES)
    assert total >= 15 and skipped <= 2, (total, skipped)


def test_python_blocks_run(tmp_path):
    """All files in one interpreter (imports once), each file in its own fresh namespace, blocks in order."""
    parts = ["import torch", "torch.set_num_threads(1)"]
    for path in FILES:
        rel = os.path.relpath(path, ROOT)
        parts += ["torch.manual_seed(0)", "__ns = {'__name__': '__snippets__'}"]
        for line, code in python_blocks(path)[0]:
            # compiled under "file:line", so a failure names the markdown file and line
            parts.append(f"exec(compile({code!r}, {rel + ':' + str(line)!r}, 'exec'), __ns)")
    script = tmp_path / "snippets.py"
    script.write_text("\n".join(parts) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]


def test_readme_and_docs_cite_nothing_outside_the_repository():
    for path in FILES:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rel = os.path.relpath(path, ROOT)
        assert "SPEC" not in text, f"{rel} cites an internal spec"
        # every relative markdown link points at a file of the repository
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            assert os.path.exists(os.path.join(os.path.dirname(path), target)), f"{rel}: broken link {target}"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "docs/" in readme and "LICENSE" in readme
    assert "pip install 'slim_ops[rl]'" in readme and "slim_ops[triton]" in readme
    assert os.path.isfile(os.path.join(ROOT, "LICENSE"))


_TIME = re.compile(r"\d\s*(ms|s|min)\b|\d+ min\b|\d+ s\b")
_RESULT = re.compile(r"benchmarks/results/[\w./-]+\.json")


def measured_rows() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Measured", 1)[1].split("\n## ", 1)[0]
    return [ln for ln in section.splitlines() if ln.startswith("|") and not set(ln) <= set("|-: ")][1:]


def test_measured_timings_cite_quiet_result_files():
    """Every row of README's "Measured" table that quotes a time names its result file, the file is
    committed, and it records a quiet machine (no other busy process during the run)."""
    import json

    rows = measured_rows()
    assert len(rows) >= 4
    timed = [r for r in rows if _TIME.search(r.split("|")[3] if r.count("|") >= 4 else r)]
    assert timed, rows
    for row in timed:
        files = _RESULT.findall(row)
        assert files, f"a timing without its result file: {row[:120]}"
        for rel in files:
            path = os.path.join(ROOT, rel)
            assert os.path.isfile(path), rel
            with open(path) as f:
                res = json.load(f)
            assert res.get("quiet") is True, f"{rel} was not measured on a quiet machine"
            assert res["load_before"]["busy_processes"] == [] and res["load_after"]["busy_processes"] == []
