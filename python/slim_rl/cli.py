"""`slim-rl` command line (the trainer issue fills in train / eval / compare)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="slim-rl")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="run the embedded demo")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from slim_rl.demo_decode import main as demo_main

        demo_main()
    else:  # pragma: no cover
        sys.exit(f"unknown command {args.cmd}")


if __name__ == "__main__":
    main()
