"""Command line: ``fp8coat train`` and ``fp8coat compare`` (also ``python -m fp8coat ...``).

    fp8coat train --model 60m --recipe coat --data mix --steps 500 --batch-size 64 --seq-len 512
    fp8coat train --out-dir runs/train --resume            # continue the latest checkpoint exactly
    fp8coat compare --variants bf16,coat --steps 300       # same data order and seed; table + loss.png

Every option of :class:`fp8coat.train.TrainConfig` is a flag (``--seq-len``, ``--grad-accum``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

__all__ = ["main", "build_parser"]

_HELP = {
    "out_dir": "run directory: config.json, metrics.jsonl, checkpoints/, summary.json",
    "model": "preset (tiny, 25m, 60m, 125m, 350m, 1b, llama2-7b), an HF config JSON, or a pretrained checkpoint dir",
    "recipe": "bf16 | fp8-linear | coat",
    "master_weights": "auto | fp32 | bf16-remainder | bf16-stochastic | none",
    "optimizer": "fp8coat (FP8 states) | torch (torch.optim.AdamW, fp32 params and states) | torchao-fp8 "
                 "(torchao's AdamWFp8 with fp32 params, for comparisons; needs torchao)",
    "expansion": "dynamic range expansion of the FP8 optimizer states",
    "data": "shakespeare | mix | text file(s) / folder(s), comma-separated",
    "tokenizer": "bpe (trained once, cached) | bytes | path to a tokenizer.json",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "device": "auto | cpu | cuda | cuda:N",
    "step_in_backward": "update each parameter inside backward and free its gradient (needs --grad-clip 0)",
    "compile": "torch.compile each decoder layer in place (the whole body for models without decoder layers)",
}


def _add_config_flags(parser: argparse.ArgumentParser, defaults) -> None:
    from .train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = _HELP.get(f.name, "")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            kind = type(default)
            parser.add_argument(flag, dest=f.name, type=kind, default=default,
                                help=f"{help_text} (default: {default})".strip())


def _config(args):
    from .train import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "extra"}
    return TrainConfig(**values).validate()


def _train(args) -> int:
    from .train import train

    summary = train(_config(args), resume=args.resume)
    print({k: v for k, v in summary.items() if v is not None})
    return 0


def _compare(args) -> int:
    from .train import compare

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    compare(_config(args), variants, seeds, args.out_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="fp8coat", description="Memory-efficient FP8 training (COAT).")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train or fine-tune a model (CPU or GPU)")
    _add_config_flags(p_train, TrainConfig())
    p_train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    p_train.set_defaults(func=_train)

    p_cmp = sub.add_parser("compare", help="train several recipes on identical data; table + loss plot")
    _add_config_flags(p_cmp, TrainConfig(out_dir="runs/compare", eval_every=50))
    p_cmp.add_argument("--variants", default="bf16,coat",
                       help="comma-separated recipes, optionally with -noexp / -torchopt / -fp32master")
    p_cmp.add_argument("--seeds", default="0", help="comma-separated seeds (each variant runs once per seed)")
    p_cmp.set_defaults(func=_compare)
    return parser


def main(argv: "list[str] | None" = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"fp8coat {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fp8coat {args.command}: interrupted", file=sys.stderr)
        return 130
