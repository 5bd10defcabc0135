"""Command-line entry point: ``fp8coat <command>`` (or ``python -m fp8coat <command>``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, seed=args.seed, threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp8coat", description="Memory-efficient FP8 training (COAT).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="CPU demo: a small Llama on Shakespeare with torch.optim.AdamW vs fp8coat.AdamW"
    )
    demo.add_argument("--steps", type=int, default=200, help="training steps per optimizer (default 200)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: "list[str] | None" = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"fp8coat {args.command}: error: {err}", file=sys.stderr)
        return 2
