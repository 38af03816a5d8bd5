"""Wall time of a whole command (``make demo``, ``make test``), with the machine's load recorded: the
result file README's "Measured" table cites for such rows.

Usage:  python benchmarks/time_command.py --name demo -- make demo
        python benchmarks/time_command.py --name demo --json-from runs/demo/summary.json -- make demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

from benchmarks.common import add_load_flag, machine_load, metadata, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="result name (file: <name>_cpu_<stamp>.json)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu"))
    ap.add_argument("--json-from", default=None, help="a JSON file the command writes, copied into the result")
    add_load_flag(ap)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        raise SystemExit("time_command: give the command after --")
    load_before = machine_load()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"time_command: {' '.join(cmd)} failed with exit code {r.returncode}")
    payload = {"meta": metadata("cpu"), "command": " ".join(cmd), "wall_s": wall}
    if args.json_from:
        with open(os.path.join(ROOT, args.json_from)) as f:
            payload["output"] = json.load(f)
    path = write_result(args.out, args.name, payload, load_before=load_before, allow_loaded=args.allow_loaded)
    print(f"{' '.join(cmd)}: {wall:.1f} s; wrote {path}")


if __name__ == "__main__":
    main()
