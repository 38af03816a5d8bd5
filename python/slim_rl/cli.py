"""`slim-rl` command line: demo, train, eval, compare (and the decode-step demo).

Every command takes ``--config FILE`` (YAML, see ``configs/``) and trailing ``section.key=value``
overrides, e.g. ``slim-rl train --config configs/demo.yaml optim.lr=3e-4 train.steps=60``.
Multi-process: ``torchrun --nproc_per_node=2 -m slim_rl train --config ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (defaults: the demo settings)")
    p.add_argument("--out", default=None, help="run folder (overrides train.out_dir)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _load(args) -> object:
    from slim_rl.config import load_config

    ov = list(args.overrides)
    if args.out and args.cmd != "compare":  # compare: --out is the results folder, runs stay in train.out_dir
        ov.append(f"train.out_dir={args.out}")
    return load_config(args.config, ov)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="slim-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="SFT + SLIM-RL on the embedded addition task (the `make demo` job)")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("train", help="train with a config (SFT stage when sft.steps > 0, then RL)")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("eval", help="greedy held-out accuracy of a checkpoint (or the config's model)")
    _common(p)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the run's latest)")
    p = sub.add_parser("compare", help="slim vs tracerl with the same rollout budget -> JSON + plots")
    _common(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--quiet", action="store_true")
    sub.add_parser("demo-decode", help="the decode-step demo (one τ-budget step on random logits)")
    args = parser.parse_args(argv)

    if args.cmd == "demo-decode":
        from slim_rl.demo_decode import main as demo_main

        demo_main()
        return
    cfg = _load(args)
    if args.cmd in ("demo", "train"):
        from slim_rl.demo import run_demo

        summary = run_demo(cfg, resume=args.resume, progress=not args.quiet)
        if args.quiet:
            print(json.dumps({k: v for k, v in summary.items() if k != "plots"}, indent=2))
    elif args.cmd == "eval":
        from slim_rl.checkpoint import latest_checkpoint, load_checkpoint
        from slim_rl.trainer import Trainer

        tr = Trainer(cfg)
        path = args.checkpoint or latest_checkpoint(tr.ckpt_dir)
        if path:
            load_checkpoint(path, tr.model, None, restore_rng=False)
        res = tr.evaluate()
        res["checkpoint"] = path
        print(json.dumps(res, indent=2))
    elif args.cmd == "compare":
        from slim_rl.compare import run_compare

        out = args.out or cfg.train.out_dir
        cmd = "slim-rl " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        res = run_compare(cfg, seeds=args.seeds, out_dir=out, progress=not args.quiet, command=cmd)
        print(json.dumps(res["summary"], indent=2))
        print(f"wrote {res['json']} and plots in {os.path.dirname(res['json'])}")


if __name__ == "__main__":
    main()
