"""``fp8coat plan``: predicted memory per GPU of a training configuration, without building the model.

    fp8coat plan --model llama2-7b --recipe coat --batch-size 16 --seq-len 2048
    fp8coat plan --model llama2-7b --recipe bf16 --optimizer torch --batch-size 3 --seq-len 2048 --json
    fp8coat plan --model path/to/config.json --max-batch --memory-gib 80

``--model`` is a preset of ``fp8coat train``, an HF config JSON or a checkpoint directory (its ``config.json`` is
read; no weights are loaded). The options mean what they mean for ``fp8coat train``; ``--gpus N`` plans FSDP2 over
N GPUs with ``--batch-size`` the global batch.
"""

from __future__ import annotations

import argparse
import json

from ..memory.model_shape import ModelShape
from ..memory.plan import PlanSettings, max_batch, plan_memory
from ..memory.state_bytes import MASTER_MODES, OPTIMIZERS
from .memory_plan import gpu_memory_gib
from .presets import PRESET_VOCAB, PRESETS, model_config

__all__ = ["add_plan_parser", "run_plan"]


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


def add_plan_parser(sub) -> argparse.ArgumentParser:
    """Add the ``plan`` command to ``sub`` (the subparsers of ``fp8coat``)."""
    p = sub.add_parser("plan", help="predicted memory per GPU of a training configuration (no GPU needed)",
                       description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama2-7b",
                   help=f"preset ({', '.join(PRESETS)}), an HF config JSON, or a checkpoint dir (default: llama2-7b)")
    p.add_argument("--recipe", default="coat", help="bf16 | fp8-linear | coat (default: coat)")
    p.add_argument("--optimizer", default="fp8coat", help=f"{' | '.join(OPTIMIZERS)} (default: fp8coat)")
    p.add_argument("--master-weights", dest="master_weights", default="auto",
                   help=f"{' | '.join(MASTER_MODES)} (default: auto)")
    p.add_argument("--batch-size", dest="batch_size", type=_int, default=16,
                   help="sequences per micro-batch, all GPUs together (default: 16)")
    p.add_argument("--seq-len", dest="seq_len", type=_int, default=2048, help="tokens per sequence "
                   "(default: 2048)")
    p.add_argument("--grad-accum", dest="grad_accum", type=_int, default=1,
                   help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--gpus", type=_int, default=1, help="GPUs the model is sharded over with FSDP2 "
                   "(default: 1)")
    p.add_argument("--vocab-size", dest="vocab_size", type=_int, default=None,
                   help=f"vocabulary size (default: the config's; {PRESET_VOCAB} for presets)")
    p.add_argument("--step-in-backward", dest="step_in_backward", action=argparse.BooleanOptionalAction,
                   default=False, help="update each parameter inside backward and free its gradient")
    p.add_argument("--chunked-loss", dest="chunked_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="LM head and cross-entropy over chunks of tokens (default: on)")
    p.add_argument("--loss-chunk", dest="loss_chunk", type=_int, default=None,
                   help="tokens per chunk of the chunked loss (default: its own choice)")
    p.add_argument("--activation-checkpointing", dest="activation_checkpointing",
                   action=argparse.BooleanOptionalAction, default=False,
                   help="each decoder layer keeps only its input and recomputes the rest in backward")
    p.add_argument("--cache-fp8-weights", dest="cache_fp8_weights", action=argparse.BooleanOptionalAction,
                   default=False, help="converted linears keep their FP8 weight copies between steps, 1 byte "
                   "per weight (default: off, as fp8coat train)")
    p.add_argument("--fp8-attention", dest="fp8_attention", action=argparse.BooleanOptionalAction,
                   default=False, help="coat only: the attention core keeps FP8 q, k, v for backward and recomputes "
                   "itself there (default: off, as fp8coat train)")
    p.add_argument("--compile", dest="compiled", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile each decoder layer")
    p.add_argument("--expansion", action=argparse.BooleanOptionalAction, default=True,
                   help="dynamic range expansion of the FP8 optimizer states (one byte per group)")
    p.add_argument("--device", default="cuda", help="cuda | cpu: which kernels run (default: cuda)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--max-batch", dest="max_batch", action="store_true",
                   help="print the largest --batch-size whose peak fits in --memory-gib")
    p.add_argument("--memory-gib", dest="memory_gib", type=float, default=None,
                   help="memory per GPU for --max-batch (default: 95%% of the CUDA GPU's total memory, if there "
                        "is one)")
    p.set_defaults(func=run_plan)
    return p


def run_plan(args) -> int:
    shape = ModelShape.from_config(model_config(args.model), vocab_size=args.vocab_size)
    settings = PlanSettings(
        batch=args.batch_size, seq=args.seq_len, recipe=args.recipe, optimizer=args.optimizer,
        master_weights=args.master_weights, gpus=args.gpus, step_in_backward=args.step_in_backward,
        chunked_loss=args.chunked_loss, loss_chunk_tokens=args.loss_chunk,
        activation_checkpointing=args.activation_checkpointing, cache_fp8_weights=args.cache_fp8_weights,
        fp8_attention=args.fp8_attention,
        grad_accum=args.grad_accum, compiled=args.compiled, expansion=args.expansion, device=args.device,
    )
    if args.max_batch:
        gib = args.memory_gib if args.memory_gib is not None else gpu_memory_gib()
        if gib is None:
            raise ValueError("--max-batch needs --memory-gib (no CUDA GPU here to read its memory from)")
        best = max_batch(shape, settings, gib)
        if args.json:
            print(json.dumps({"max_batch": best, "memory_gib": gib, "settings": vars(args) | {"func": None}}))
        else:
            print(f"largest batch that fits in {gib:g} GiB per GPU: {best}"
                  + ("" if best else " (none: even batch " f"{settings.gpus} does not fit)"))
        return 0
    plan = plan_memory(shape, settings)
    print(plan.to_json() if args.json else plan.table())
    return 0
