"""Command line: ``fp8coat train``, ``fp8coat compare`` and ``fp8coat plan`` (also ``python -m fp8coat ...``).

    fp8coat train --model 60m --recipe coat --data mix --steps 500 --batch-size 64 --seq-len 512
    fp8coat train --out-dir runs/train --resume            # continue the run from its newest intact checkpoint
    fp8coat compare --variants bf16-torchopt,coat --steps 300   # same data order and seed; table + loss.png
    fp8coat plan --model llama2-7b --recipe coat --batch-size 16 --seq-len 2048   # predicted memory per GPU
    torchrun --nproc_per_node=8 -m fp8coat train --model 1b --batch-size 64   # sharded over 8 GPUs (FSDP2)

Every option of :class:`fp8coat.train.TrainConfig` is a flag (``--seq-len``, ``--grad-accum``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .compare import DEFAULT_VARIANTS, compare, diverged_message
from .config import TrainConfig
from .distributed import launch_world
from .finite import NonFiniteError
from .loop import train
from .plan_cmd import add_plan_parser
from .progress import format_summary
from .runs import resumed_config, saved_config

__all__ = ["build_parser", "main"]

_HELP = {
    "out_dir": "run directory: config.json, metrics.jsonl, checkpoints/, summary.json",
"model": "preset (tiny, 25m, 60m, 125m, 350m, 1b, llama2-7b; vision-language: tiny-llava, tiny-qwen2vl, "
             "llava-100m, qwen2vl-100m), an HF config JSON, or a pretrained checkpoint dir (LLM or LLaVA / Qwen2-VL)",
    "recipe": "bf16 (model unchanged) | fp8-linear (FP8 linear layers) | coat (FP8 linear layers and FP8-saved "
              "activations)",
    "master_weights": "where fp8coat's AdamW keeps the exact weights: auto (fp32 params stay fp32, bf16 ones get "
                      "bf16-remainder) | fp32 (fp32 params) | bf16-remainder (bf16 params + 16-bit remainders) | "
                      "bf16-stochastic (bf16 params, stochastic rounding) | none (round to nearest)",
    "optimizer": "fp8coat (FP8 states) | torch (torch.optim.AdamW, fp32 params and states) | torchao-fp8 "
                 "(torchao's AdamWFp8 with fp32 params, for comparisons; needs torchao)",
    "expansion": "dynamic range expansion of the FP8 optimizer states",
    "compile": "torch.compile each decoder layer in place (the whole body for models without decoder layers)",
    "chunked_loss": "LM head and cross-entropy over chunks of tokens, never keeping the logits for backward",
    "step_in_backward": "update each parameter inside backward and free its gradient (needs --grad-clip 0)",
    "activation_checkpointing": "each decoder layer keeps only its input for backward and runs its forward again "
                                "there (HF gradient checkpointing, non-reentrant): less memory, about one more "
                                "forward of the layers per step",
    "cache_fp8_weights": "FP8 linear layers keep their weights' E4M3 copies between optimizer steps (1 byte per "
                         "weight for the whole run), quantizing each weight once per step: that pays only under "
                         "--grad-accum. Off (the default), the weights are quantized in every forward and nothing "
                         "is held from forward to backward: same results, and on Llama-2-7B the same speed with "
                         "1 byte per weight less memory",
    "fp8_attention": "coat only: the attention core (SDPA) keeps FP8 copies of q, k, v for backward instead of q, "
                     "k, v and its output in BF16, and its backward runs the attention forward again (one more "
                     "attention forward per step); the forward is unchanged, the gradients are those at the "
                     "quantized q, k, v",
    "fsdp": "shard the model over the processes of torchrun with FSDP2: auto (on when WORLD_SIZE > 1) | on | off. "
            "--batch-size is the global batch: each rank takes an equal share of its rows (it must divide evenly), "
            "so a step sees the data of one process; rank 0 logs and writes the files; checkpoints resume on any "
            "number of ranks. Parameters are gathered as bf16 for the forward and backward",
    "fsdp_reduce_fp32": "with FSDP, average the gradients over the ranks in fp32 (default: in bf16)",
    "fp8_all_gather": "with FSDP, gather the weights of the FP8 linear layers as E4M3 codes under each weight's "
                      "scale (half the bytes of bf16, no quantization after the gather; default: as bf16)",
    "data": "shakespeare | mix | text file(s) / folder(s), comma-separated; for a vision-language model: synthetic | "
            "synthetic:N | digits | a JSONL file or folder of image-text records (docs/vlm_data.md)",
    "tokenizer": "bpe (trained once, cached) | bytes | path to a tokenizer.json (vision-language models: bpe or "
                 "bytes, the family's tokenizer with its image and chat tokens)",
    "vocab_size": "vocabulary size of the BPE tokenizer trained for --tokenizer bpe",
    "val_fraction": "share of the documents held out for validation, in (0, 0.5)",
    "data_workers": "image-text data: processes that resize, normalize and tokenize batches ahead of the training "
                    "step (the same batches in the same order; text batches need none): -1 auto (on a GPU "
                    "min(4, CPUs / 2), on the CPU 0), 0 encodes them in the training process",
    "steps": "optimizer steps of the run (with --resume it may change: a larger value extends the run)",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step (gradient accumulation)",
    "seq_len": "tokens per training sequence (vision-language models: every record padded or cut to it, image "
               "tokens included)",
    "lr": "peak learning rate, reached after the warm-up; cosine decay to --min-lr-ratio times it at the last step",
    "min_lr_ratio": "learning rate at the last step, as a fraction of --lr, in [0, 1]",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "weight_decay": "AdamW weight decay of matrices and embeddings (norm weights and biases get none)",
    "beta1": "AdamW decay rate of the first moment, in [0, 1)",
    "beta2": "AdamW decay rate of the second moment, in [0, 1)",
    "grad_clip": "clip the global L2 norm of the gradients to this value (0: no clipping, the norm is only "
                 "measured). A step whose gradient norm is NaN or inf: with clipping all its gradients become NaN, so "
                 "fp8coat's AdamW skips the whole step (torch's AdamW writes NaN weights: the run stops as "
                 "diverged); without clipping fp8coat's AdamW skips only the non-finite elements. Such steps are "
                 "counted in metrics.jsonl, on the progress line and in the summary",
    "max_nonfinite_streak": "stop the run (an error naming the steps; no checkpoint after them) once the gradient "
                            "norm was NaN or inf in this many consecutive steps: every one of them was skipped, so "
                            "the weights stopped changing (0: never stop)",
    "eval_every": "validation loss every N steps and at the last step (0: only at the last step)",
    "eval_batches": "validation batches per evaluation",
    "caption_eval": "vision-language models: at the end of the run, greedy captions (at most 16 new tokens, eval "
                    "mode) of the first N held-out records, scored by exact match (caption_exact_match in the "
                    "summary); 0 skips it",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "keep_last": "keep only the N newest checkpoints, deleting older ones once a new one is complete (0: keep all)",
    "log_every": "metrics line and progress update every N steps",
    "seed": "seed of the model's initialization and of the data order",
    "device": "auto | cpu | cuda | cuda:N",
}

_RESUME_HELP = ("continue the run in --out-dir from its newest intact checkpoint (damaged newer ones are reported "
                "and skipped), with the run's saved configuration and the checkpoint's tokenizer: of the flags given "
                "again, only --steps (a larger value extends the run; the cosine decay is then recomputed to end at "
                "the new last step), --eval-every, --save-every, --log-every, --keep-last, --device, --compile and "
                "--fsdp may differ from the run; any other flag that differs is an error, and so is training data that "
                "is not the data the run started with")
_OVERWRITE_HELP = ("start a new run in an --out-dir that holds one: its config.json, metrics.jsonl, summary.json "
                   "and checkpoints/ are deleted first (without this, a new run refuses such a folder)")


def _add_config_flags(parser: argparse.ArgumentParser, defaults, given_only: bool = False) -> None:
    """One flag per :class:`~fp8coat.train.TrainConfig` option. With ``given_only``, options not on the command
    line stay out of the parsed namespace (their defaults are shown in the help only)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = _HELP.get(f.name, "")
        shown = f"{help_text} (default: {default})".strip()
        if f.type in (bool, "bool"):
            if given_only:  # BooleanOptionalAction shows no default of its own when it is SUPPRESS
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                    default=argparse.SUPPRESS, help=shown)
            else:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                    help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=type(default),
                                default=argparse.SUPPRESS if given_only else default, help=shown)


def _options(args) -> dict:
    """The :class:`~fp8coat.train.TrainConfig` options in ``args``: for ``train`` (parsed with ``given_only``) those
    typed on the command line, for ``compare`` every one."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}


def _train_config(args):
    """A new run's configuration (the given options over the defaults), or with ``--resume`` the saved one of the
    run in ``--out-dir`` with the given options that may change on resume (others that differ: ValueError)."""
    given = _options(args)
    if not args.resume:
        return TrainConfig(**given).validate()
    out_dir = given.get("out_dir", TrainConfig.out_dir)
    saved, where = saved_config(out_dir)
    return resumed_config(saved, given, out_dir, where).validate()


def _train(args) -> int:
    cfg = _train_config(args)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if launch_world()[0] == 0:  # under torchrun, rank 0 prints
        print(format_summary(summary, cfg.out_dir))
    return 0


def _compare(args) -> int:
    if args.recipe is not None:
        raise ValueError("--recipe has no effect in compare: each variant names its recipe "
                         "(e.g. --variants bf16-torchopt,coat)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    # the recipe and the seed of each run come from its variant and --seeds
    base = argparse.Namespace(**{**vars(args), "recipe": TrainConfig.recipe, "seed": seeds[0] if seeds else 0})
    results = compare(TrainConfig(**_options(base)).validate(), variants, seeds, args.out_dir)
    message = diverged_message(results, args.out_dir)
    if message is not None:  # the report is written; a comparison with a diverged run is not a success
        raise NonFiniteError(message)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp8coat", description="Memory-efficient FP8 training (COAT).")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train or fine-tune a model (CPU or GPU)")
    _add_config_flags(p_train, TrainConfig(), given_only=True)
    p_train.add_argument("--resume", action="store_true", help=_RESUME_HELP)
    p_train.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p_train.set_defaults(func=_train)

    p_cmp = sub.add_parser("compare", help="train several recipes on identical data; table + loss plot",
                           conflict_handler="resolve")  # --out-dir, --recipe, --seed below replace the run flags
    _add_config_flags(p_cmp, TrainConfig(out_dir="runs/compare", eval_every=50))
    p_cmp.add_argument("--out-dir", dest="out_dir", default="runs/compare",
                       help="compare.md, compare.json, loss.png, and one run directory per variant and seed "
                            "(<variant>_seed<N>/) (default: runs/compare)")
    p_cmp.add_argument("--recipe", default=None, help=argparse.SUPPRESS)  # an error: the variants set it
    p_cmp.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                       help="comma-separated variants: a recipe (bf16, fp8-linear, coat) optionally followed by "
                            "-torchopt (torch.optim.AdamW, fp32 params and states), -noexp, -fp32master, "
                            "-torchaofp8. Gaps and memory ratios are relative to the first bf16 variant with "
                            "-torchopt (else the first bf16 one, else the first one) "
                            f"(default: {','.join(DEFAULT_VARIANTS)}: BF16 with torch's AdamW against coat "
                            "with fp8coat's AdamW)")
    p_cmp.add_argument("--seeds", "--seed", dest="seeds", default="0",
                       help="comma-separated seeds; each variant runs once per seed (default: 0)")
    p_cmp.set_defaults(func=_compare)
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world_size, _ = launch_world()
    who = f"fp8coat {args.command}" + (f" (rank {rank})" if world_size > 1 else "")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"{who}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:  # a run diverged (in compare: after the report of every run): not a usage error
        print(f"{who}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{who}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
