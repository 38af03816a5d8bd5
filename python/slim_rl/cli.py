"""`slim-rl` command line: demo, train, eval, export, compare, config (and the decode-step demo).

Every command takes ``--config FILE`` (YAML, see ``configs/``) and ``section.key=value``
overrides anywhere after the command, applied in order, e.g.
``slim-rl train --config configs/demo.yaml optim.lr=3e-4 --out runs/a train.steps=60``.
Multi-process: ``torchrun --nproc_per_node=2 -m slim_rl train --config ...``.

The whole configuration is validated before anything is built or written. User mistakes (a bad value,
a missing file, a run folder that holds an earlier run, a checkpoint that does not fit) print one line
``slim-rl: error: ...`` and exit with code 2; a run that cannot go on (e.g. diverged) exits with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from slim_rl.errors import TrainingError, UserError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``slim-rl: error: ...``, exit code 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        _fail(f"{message} (see {self.prog} --help)", 2)


def _fail(message: str, code: int, every_rank: bool = False):
    # under torchrun every rank fails alike: one line, from rank 0; a peer failure is reported by every rank
    # still alive (rank 0 may be the one that stalled) and leaves at once: the process group is not torn down
    # in order (that would wait for the missing rank again)
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(f"slim-rl: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    if every_rank:
        sys.stdout.flush()
        os._exit(code)
    raise SystemExit(code)


def _common(p: argparse.ArgumentParser, out_help: str = "run folder (overrides train.out_dir)") -> None:
    p.add_argument("--config", default=None, help="YAML config (defaults: the demo settings)")
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _load(args, *, run_config: bool = False):
    """The validated config (+ file checks). ``run_config``: without ``--config``, a run folder's own
    ``config.yaml`` is the base (eval / export of a run need no repeated overrides)."""
    from slim_rl.config import check_files, load_config

    ov = list(args.overrides)
    if getattr(args, "block_size", None) is not None:
        ov.append(f"rollout.block_size={args.block_size}")
    if args.out and args.cmd not in ("compare", "ablate"):  # --out: the results folder, runs in train.out_dir
        ov.append(f"train.out_dir={args.out}")
    path = args.config
    if path is None and run_config:
        base = load_config(None, ov)
        own = os.path.join(base.train.out_dir, "config.yaml")
        if os.path.isfile(own):
            path = own
    cfg = load_config(path, ov)
    if args.cmd != "config":
        check_files(cfg)
    return cfg


def _checkpoint_of(args, cfg) -> str | None:
    """The checkpoint eval / export read: ``--checkpoint``, else the run folder's newest committed one."""
    from slim_rl.errors import RunFolderError
    from slim_rl.runs import latest_checkpoint

    if args.checkpoint:
        if not os.path.isdir(args.checkpoint):
            raise RunFolderError(f"--checkpoint {args.checkpoint} does not exist")
        return args.checkpoint
    if getattr(args, "no_checkpoint", False):
        return None
    run = cfg.train.out_dir
    if not os.path.isdir(run):
        raise RunFolderError(f"{args.cmd}: the run folder {run} does not exist (pass --out RUN_FOLDER)")
    path = latest_checkpoint(os.path.join(run, "checkpoints"))
    if path is None:
        hint = " or --no-checkpoint to evaluate the configured model" if args.cmd == "eval" else ""
        raise RunFolderError(f"{args.cmd}: {run} holds no committed checkpoint (pass --checkpoint DIR{hint})")
    return path


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slim-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for name, text in (("demo", "SFT + SLIM-RL on the embedded addition task (the `make demo` job)"),
                       ("train", "train with a config (SFT stage when sft.steps > 0, then RL)")):
        p = sub.add_parser(name, help=text)
        _common(p)
        g = p.add_mutually_exclusive_group()
        g.add_argument("--resume", action="store_true", help="continue the run folder's last checkpoint")
        g.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run in the folder (its files go once this run has a result)")
        p.add_argument("--quiet", action="store_true", help="no progress bars; print the summary as JSON")
    p = sub.add_parser("eval", help="greedy held-out accuracy of a run's last checkpoint")
    _common(p)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the run's latest)")
    p.add_argument("--no-checkpoint", action="store_true", help="evaluate the configured model itself")
    p = sub.add_parser("export", help="a checkpoint as one Hugging Face folder (config.json + safetensors)")
    _common(p)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the run's latest)")
    p.add_argument("--to", required=True, help="new folder to write (must not exist or be empty)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written weights (default: model.dtype, the compute dtype)")
    p = sub.add_parser("compare", help="slim vs baselines (tracerl, random), same rollout budget -> JSON + plots")
    _common(p, "results folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--objectives", nargs="+", default=["slim", "tracerl"], metavar="{slim,tracerl,random}",
                   help="objectives to compare, each from the same SFT model (default: slim tracerl)")
    p.add_argument("--block-size", type=int, default=None, help="K (same as rollout.block_size=K)")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("ablate", help="the block-size study: slim/tracerl/random curves and the ablation table "
                                      "(resumable, parallel) -> summary.json + plots")
    _common(p, "results folder (paper_k16/ and ablations/ are written inside)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--study", choices=("compare", "ablations", "all"), default="all")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes, one torch thread each)")
    p.add_argument("--summarize-only", action="store_true", help="only write summaries from the finished runs")
    p.add_argument("--sft-seed", type=int, default=None,
                   help="one SFT run (this seed) as every seed's RL start (default: one SFT run per seed)")
    p = sub.add_parser("plan", help="predicted per-GPU peak memory of a rollout and a training micro-batch, "
                                    "from the model's config.json, and settings that fit")
    _common(p)
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) of the run (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GB (default 80)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens L0 (default 256)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the run computes")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p = sub.add_parser("config", help="every config key with its default (or resolved value) and meaning")
    _common(p)
    sub.add_parser("demo-decode", help="the decode-step demo (one τ-budget step on random logits)")
    return parser


# modules of the optional `rl` extra (pyproject.toml); without them a command fails with the install line
_RL_EXTRA = ("yaml", "transformers", "safetensors", "tqdm", "matplotlib", "math_verify", "tokenizers", "peft")


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except UserError as e:
        _fail(str(e), 2)
    except TrainingError as e:
        _fail(str(e), 1, every_rank=getattr(e, "every_rank", False))
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _RL_EXTRA:
            raise
        _fail(f"this command needs the 'rl' extra (missing module {e.name!r}): pip install 'slim_ops[rl]'", 2)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; a command's ``section.key=value`` overrides may sit before, between or after its
    options (``slim-rl train a.b=1 --out X c.d=2``), in the order given."""
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if not argv or argv[0] not in sub.choices:  # --help, no or an unknown command: argparse's own message
        return parser.parse_args(argv)
    args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
    args.cmd = argv[0]
    if args.cmd == "compare":  # overrides written after --objectives land in its list: move them back, in order
        pool = [o for o in args.objectives if "=" in o] + list(args.overrides)
        args.objectives = [o for o in args.objectives if "=" not in o]
        args.overrides = []
        for tok in argv[1:]:
            if tok in pool:
                pool.remove(tok)
                args.overrides.append(tok)
    return args


def _main(argv: list[str] | None) -> None:
    args = _parse(argv)
    if args.cmd == "demo-decode":
        from slim_rl.demo_decode import main as demo_main

        demo_main()
        return
    if args.cmd == "config":
        from slim_rl.config import describe

        given = args.config is not None or args.overrides or args.out
        print(describe(_load(args) if given else None))
        return
    if args.cmd == "plan":
        from slim_rl.config import load_config
        from slim_rl.errors import ConfigError
        from slim_rl.plan import format_plan, plan

        if args.gpus < 1 or args.gpu_mem <= 0 or args.prompt_len < 1:
            raise ConfigError("plan: --gpus and --prompt-len must be >= 1 and --gpu-mem > 0")
        cfg = load_config(args.config, list(args.overrides))  # no file checks: only config.json is read
        res = plan(cfg, gpus=args.gpus, gpu_mem_gb=args.gpu_mem, device=args.device, prompt_len=args.prompt_len)
        print(json.dumps(res, indent=2) if args.json else format_plan(res))
        return
    cfg = _load(args, run_config=args.cmd in ("eval", "export"))
    if args.cmd in ("demo", "train"):
        from slim_rl.runs import check_run_folder

        check_run_folder(cfg.train.out_dir, resume=args.resume, overwrite=args.overwrite)  # before loading torch
        from slim_rl.demo import run_demo

        summary = run_demo(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
        if args.quiet and os.environ.get("RANK", "0") == "0":
            print(json.dumps({k: v for k, v in summary.items() if k != "plots"}, indent=2))
    elif args.cmd == "eval":
        path = _checkpoint_of(args, cfg)  # before loading torch: a missing run folder fails at once
        from slim_rl.checkpoint import load_weights
        from slim_rl.trainer import Trainer

        tr = Trainer(cfg)
        if path:
            load_weights(path, tr.model, info=tr.info)
        res = tr.evaluate()
        res["checkpoint"] = path
        if tr.info.is_main:
            print(json.dumps(res, indent=2))
    elif args.cmd == "export":
        if os.path.exists(args.to) and (not os.path.isdir(args.to) or os.listdir(args.to)):
            from slim_rl.errors import RunFolderError

            raise RunFolderError(f"export: {args.to} already exists and is not empty")
        path = _checkpoint_of(args, cfg)
        from slim_rl.checkpoint import export_model, load_weights
        from slim_rl.trainer import build_model

        model = build_model(cfg, "cpu")
        step = load_weights(path, model)
        from slim_rl import lora

        if lora.has_adapters(model):
            lora.merge(model)  # a plain checkpoint: the adapters folded into the base weights
        from slim_rl.precision import dtype_of

        model.to(dtype_of(args.dtype or cfg.model.dtype))
        export_model(model, args.to, tokenizer=cfg.task.tokenizer or None)
        print(f"wrote {args.to} (step {step} of {path}); load it with slim_rl.models.load({args.to!r}, "
              f"{cfg.model.family!r}) or transformers.AutoModelForCausalLM.from_pretrained")
    elif args.cmd == "ablate":
        from slim_rl.ablate import run_study

        # the command that runs (or resumes) the study; a --summarize-only call records it without that flag
        cmd = "slim-rl " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
                                    if a != "--summarize-only")
        res = run_study(cfg, seeds=args.seeds, out=args.out or "benchmarks/results", study=args.study,
                        jobs=args.jobs, summarize_only=args.summarize_only, command=cmd, sft_seed=args.sft_seed)
        for part, summ in res.items():
            if isinstance(summ, dict) and summ.get("missing"):
                print(f"{part}: {len(summ['missing'])} runs missing: {' '.join(summ['missing'])}")
        print(f"wrote the summaries under {args.out or 'benchmarks/results'}")
    elif args.cmd == "compare":
        from slim_rl.compare import run_compare

        out = args.out or cfg.train.out_dir
        cmd = "slim-rl " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        res = run_compare(cfg, seeds=args.seeds, out_dir=out, objectives=args.objectives, progress=not args.quiet,
                          command=cmd)
        print(json.dumps(res["summary"], indent=2))
        print(f"wrote {res['json']} and plots in {os.path.dirname(res['json'])}")


if __name__ == "__main__":
    main()
