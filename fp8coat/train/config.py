"""Configuration of one training run (``fp8coat train``), validated up front."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import asdict, dataclass, field

from ..memory.state_bytes import OPTIMIZERS
from ..optim.master_weights import MASTER_MODES
from ..recipe import RECIPES
from .distributed import FSDP_MODES

__all__ = ["OPTIMIZERS", "TrainConfig"]



@dataclass
class TrainConfig:
    """Everything that determines a run. Two runs with equal configs see the same data in the same order."""

    out_dir: str = "runs/train"
    # model and precision
    model: str = "tiny"
    recipe: str = "coat"
    master_weights: str = "auto"  # fp8coat.AdamW master-weight mode; params are bf16 unless "fp32"
    optimizer: str = "fp8coat"  # "fp8coat" (FP8 states), "torch" (torch.optim.AdamW, fp32 states) or
    # "torchao-fp8" (torchao's AdamWFp8, for comparison: FP8 states in blocks of the flattened tensor, no expansion)
    expansion: bool = True  # dynamic range expansion of the FP8 optimizer states
    compile: bool = False
    chunked_loss: bool = True  # LM head + cross-entropy over token chunks: the logits are never kept for backward
    step_in_backward: bool = False  # update each parameter as soon as its gradient exists; no gradients kept
    cache_fp8_weights: bool = False  # FP8 linears keep their weights' E4M3 copies between steps (Recipe option)
    fp8_attention: bool = False  # the attention core saves FP8 q, k, v and recomputes itself (Recipe option; coat)
    activation_checkpointing: bool = False  # each decoder layer keeps only its input; recomputed in backward
    # several processes (torchrun)
    fsdp: str = "auto"  # shard the model with FSDP2: "on", "off", or "auto" (on when launched with WORLD_SIZE > 1)
    fsdp_reduce_fp32: bool = False  # FSDP: average the gradients over the ranks in fp32 (else in bf16)
    fp8_all_gather: bool = False  # FSDP: gather the converted linears' weights as E4M3 codes (else as bf16)
    # data
    data: str = "shakespeare"  # "shakespeare", "mix", or path(s) to text files / folders (comma-separated)
    tokenizer: str = "bpe"  # "bpe" (trained and cached), "bytes", or a tokenizer.json path
    vocab_size: int = 16384
    val_fraction: float = 0.02
    data_workers: int = -1  # image-text data: processes encoding batches ahead (-1: auto, 0: none); same batches
    # schedule
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_nonfinite_streak: int = 20  # stop once this many steps in a row had a NaN/inf gradient norm (0: never)
    # bookkeeping
    eval_every: int = 100
    eval_batches: int = 8
    caption_eval: int = 16  # vision-language models: held-out records captioned by greedy generation at the end
    save_every: int = 0  # 0: only at the end
    keep_last: int = 0  # keep only the newest N checkpoints (0: all)
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    extra: dict = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; expected one of {sorted(RECIPES)}")
        if self.master_weights not in MASTER_MODES:
            raise ValueError(f"unknown master-weight mode {self.master_weights!r}; expected one of {MASTER_MODES}")
        if self.fsdp not in FSDP_MODES:
            raise ValueError(f"unknown --fsdp {self.fsdp!r}; expected one of {', '.join(FSDP_MODES)}")
        if self.fp8_all_gather and (self.fsdp == "off" or self.recipe == "bf16"):
            raise ValueError("--fp8-all-gather gathers the weights of FP8 linear layers over the ranks: it needs "
                             "--fsdp on or auto and an FP8 recipe (fp8-linear or coat)")
        if self.cache_fp8_weights and self.recipe == "bf16":
            raise ValueError("--cache-fp8-weights keeps the FP8 weight copies of FP8 linear layers: it needs an "
                             "FP8 recipe (fp8-linear or coat)")
        if self.fp8_attention and self.recipe != "coat":
            raise ValueError("--fp8-attention has the attention core save FP8 q, k, v like coat's norms and "
                             "activations: it needs the coat recipe")
        if self.fsdp_reduce_fp32 and self.fsdp == "off":
            raise ValueError("--fsdp-reduce-fp32 sets how FSDP averages the gradients over the ranks: it needs "
                             "--fsdp on or auto")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "torchao-fp8" and importlib.util.find_spec("torchao") is None:
            raise ValueError("--optimizer torchao-fp8 needs torchao (pip install torchao): a peer library used for "
                             "comparisons, not a dependency of fp8coat")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "caption_eval", "eval_every", "save_every", "keep_last", "max_nonfinite_streak"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.data_workers < -1:
            raise ValueError(f"data-workers must be -1 (auto), 0 or more, got {self.data_workers}")
        _check_floats(self)
        if self.step_in_backward and self.optimizer != "fp8coat":
            raise ValueError("step-in-backward needs the fp8coat optimizer (--optimizer fp8coat)")
        if self.step_in_backward and self.grad_clip > 0:
            raise ValueError("step-in-backward updates each parameter before the other gradients exist, so the "
                             "global gradient norm cannot be clipped: pass --grad-clip 0")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "the configuration") -> TrainConfig:
        """The options in ``d`` (other keys are ignored) over the defaults; ValueError naming ``where`` (e.g. the
        file ``d`` was read from) and the option when a value has the wrong type."""
        known = {k: _typed(k, v, cls.__dataclass_fields__[k].type, where) for k, v in d.items()
                 if k in cls.__dataclass_fields__}
        return cls(**known)


# field type (as annotated) -> accepted JSON types, and how an error names the expected type
_TYPES = {"str": ((str,), "a string"), "bool": ((bool,), "true or false"), "int": ((int,), "an integer"),
          "float": ((int, float), "a number"), "dict": ((dict,), "an object")}


def _typed(name: str, value, annotation: str, where: str):
    """``value`` if it has the type of option ``name`` (an integer for a float option becomes a float)."""
    accepted, expected = _TYPES[annotation]
    if not isinstance(value, accepted) or (isinstance(value, bool) and annotation != "bool"):
        raise ValueError(f"{where}: {name!r} is {json.dumps(value)}, expected {expected}")
    return float(value) if annotation == "float" else value


def _check_floats(cfg: TrainConfig) -> None:
    """Every float option is a finite number in its range (``inf`` and ``nan`` pass plain comparisons)."""
    checks = [
        ("lr", cfg.lr, cfg.lr > 0, "a finite number > 0"),
        ("min-lr-ratio", cfg.min_lr_ratio, 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
        ("weight-decay", cfg.weight_decay, cfg.weight_decay >= 0, "a finite number >= 0"),
        ("beta1", cfg.beta1, 0 <= cfg.beta1 < 1, "in [0, 1)"),
        ("beta2", cfg.beta2, 0 <= cfg.beta2 < 1, "in [0, 1)"),
        ("grad-clip", cfg.grad_clip, cfg.grad_clip >= 0, "a finite number >= 0 (0: no clipping)"),
        ("val-fraction", cfg.val_fraction, 0 < cfg.val_fraction < 0.5, "in (0, 0.5)"),
    ]
    for name, value, in_range, expected in checks:
        if not (math.isfinite(value) and in_range):
            raise ValueError(f"{name} must be {expected}, got {value}")
