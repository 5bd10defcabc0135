"""Analytic memory planner: predicted GPU memory of a training step of ``fp8coat train``, per rank.

``plan_memory(shape, settings)`` adds up, in bytes:

* resident between steps — weights (bf16, or fp32 with fp32 masters and for torch's and torchao's optimizers),
  master data (``bf16-remainder``'s int16 remainders), optimizer states (:mod:`.state_bytes`), FP8 weight copies
  (one E4M3 copy + fp32 scale + int32 (4,) record per converted linear weight: ``numel + 20`` bytes, only with
  ``cache_fp8_weights`` on — off by default — and the model not sharded);
* gradients in the parameters' dtype, held from backward to the optimizer step (none held with step-in-backward,
  where each is freed after its update, except across gradient-accumulation micro-batches);
* activations saved for backward (:mod:`.layer_saved`: per decoder layer × layers + the rest of the model), the
  loss's saved and transient buffers and one layer's backward workspace (:mod:`.transient`);
* under FSDP2 (``gpus`` > 1): parameters, gradients, masters and states sharded along dim 0, each rank running
  ``batch / gpus`` sequences, bf16 copies of the root's parameters (embedding, final norm, LM head: gathered for
  the forward and kept through the backward) and of two decoder layers (the one computing and the one
  prefetched), plus one layer's unsharded bf16 gradients before their reduce-scatter.

The peak is the largest of these moments:

* ``forward``: resident + saved activations + the loss's forward transient (+ gradients of earlier micro-batches);
* ``backward (loss)``: the same, with the loss's backward buffers instead;
* ``backward (layers)``: for each decoder layer in backward order, what is still saved, the gradients made so far
  and that layer's backward workspace (with activation checkpointing, also its recomputed saved tensors);
* ``optimizer``: resident + all gradients + the step's temporaries (none for the fused CUDA steps of fp8coat and
  torch; about two bytes per element of the largest parameter for torchao's compiled per-parameter step).

CUDA allocator details (block rounding, fragmentation, library workspaces, the CUDA context) are not counted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from .layer_saved import (
    DEVICES,
    FP8_OP,
    RECIPE_NAMES,
    checkpointed_layer_bytes,
    layer_saved_bytes,
    rest_saved_bytes,
)
from .model_shape import ModelShape
from .state_bytes import MASTER_MODES, OPTIMIZERS, dtype_bytes, master_bytes, optimizer_state_bytes_of, shard_shape
from .transient import layer_backward_workspace, loss_transients

__all__ = ["GIB", "MemoryPlan", "PlanSettings", "max_batch", "plan_memory"]

GIB = 2**30
_LOSS_OPS = ("LogSoftmax", "NllLoss")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class PlanSettings:
    """One training configuration, in ``fp8coat train``'s terms.

    ``batch``: sequences per micro-batch over all ranks (each of ``gpus`` ranks runs ``batch / gpus``); ``seq``:
    tokens per sequence. ``recipe``: ``bf16`` | ``fp8-linear`` | ``coat``. ``optimizer``: ``fp8coat`` |
    ``torch`` | ``torchao-fp8``. ``master_weights``: fp8coat.AdamW's mode (``auto``: ``bf16-remainder`` for the
    bf16 parameters fp8coat trains, ``fp32`` makes them fp32). ``loss_chunk_tokens``: tokens per chunk of the
    chunked loss (None: its default). ``activation_checkpointing``: each decoder layer keeps only its input and
    recomputes the rest in backward. ``cache_fp8_weights``: converted linears keep their weights' FP8 copies
    between steps (``Recipe.cache_fp8_weights``; off by default, as in ``fp8coat train``). ``fp8_attention``:
    the attention core saves FP8 q, k, v and recomputes itself in backward (``Recipe.fp8_attention``; ``coat``
    only). ``compiled``:
    ``torch.compile`` per decoder layer. ``device``: ``cuda`` or ``cpu`` (which attention kernel saves what, and
    whether the fused kernels run).
    """

    batch: int
    seq: int
    recipe: str = "coat"
    optimizer: str = "fp8coat"
    master_weights: str = "auto"
    gpus: int = 1
    step_in_backward: bool = False
    chunked_loss: bool = True
    loss_chunk_tokens: "int | None" = None
    activation_checkpointing: bool = False
    cache_fp8_weights: bool = False
    fp8_attention: bool = False
    grad_accum: int = 1
    compiled: bool = False
    expansion: bool = True
    device: str = "cuda"

    def __post_init__(self):
        for name in ("batch", "seq", "gpus", "grad_accum"):
            _positive_int(name, getattr(self, name))
        if self.loss_chunk_tokens is not None:
            _positive_int("loss_chunk_tokens", self.loss_chunk_tokens)
        if self.recipe not in RECIPE_NAMES:
            raise ValueError(f"unknown recipe {self.recipe!r}; expected one of {', '.join(RECIPE_NAMES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.master_weights not in MASTER_MODES:
            raise ValueError(f"unknown master-weight mode {self.master_weights!r}; expected one of "
                             f"{', '.join(MASTER_MODES)}")
        if self.optimizer != "fp8coat" and self.master_weights not in ("auto", "fp32"):
            raise ValueError(f"master_weights={self.master_weights!r} is a mode of fp8coat's AdamW; optimizer "
                             f"{self.optimizer!r} keeps fp32 parameters (use auto)")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; expected one of {', '.join(DEVICES)}")
        if self.step_in_backward and self.optimizer != "fp8coat":
            raise ValueError("step-in-backward needs the fp8coat optimizer")
        if self.batch % self.gpus:
            raise ValueError(f"batch {self.batch} must be a multiple of gpus {self.gpus} (each rank takes an equal "
                             "share of the rows)")
        if self.fp8_attention and self.recipe != "coat":
            raise ValueError(f"fp8_attention is an option of the coat recipe, not of {self.recipe!r}")
        if self.gpus > 1 and self.optimizer == "torchao-fp8":
            raise ValueError("optimizer torchao-fp8 is not supported with FSDP (gpus > 1)")

    @property
    def param_dtype(self) -> str:
        """``bf16``, or ``fp32`` for fp32 masters and for torch's and torchao's optimizers (as the trainer)."""
        return "fp32" if self.optimizer != "fp8coat" or self.master_weights == "fp32" else "bf16"

    @property
    def master_mode(self) -> str:
        """The concrete master mode (``auto`` resolved by the parameters' dtype)."""
        if self.optimizer != "fp8coat":
            return "fp32"
        if self.master_weights == "auto":
            return "fp32" if self.param_dtype == "fp32" else "bf16-remainder"
        return self.master_weights

    @property
    def precision(self) -> str:
        """``bf16`` (bf16 parameters), ``amp`` (fp32 parameters, bf16 recipe: bf16 autocast) or ``fp32``."""
        if self.param_dtype == "bf16":
            return "bf16"
        return "amp" if self.recipe == "bf16" else "fp32"

    @property
    def rank_batch(self) -> int:
        return self.batch // self.gpus


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory of one rank, in bytes (see the module docstring). ``layer_saved`` and ``rest_saved``:
    ``{op: bytes}`` saved for backward by one decoder layer and outside the layers (the loss's entries excluded:
    they are in ``loss_saved``); ``phases``: the total at each moment; ``peak`` their maximum."""

    settings: PlanSettings
    shape: ModelShape
    weights: int
    gradients: int
    master_weights: int
    optimizer_states: int
    fp8_weight_copies: int
    layer_saved: dict = field(default_factory=dict)
    rest_saved: dict = field(default_factory=dict)
    loss_saved: int = 0
    loss_transient: int = 0
    fsdp_gathered: int = 0
    workspace: int = 0
    phases: dict = field(default_factory=dict)

    @property
    def layer_activations(self) -> int:
        return sum(self.layer_saved.values())

    @property
    def activations(self) -> int:
        """Saved for backward: per layer × layers + the rest (the loss's own buffers apart)."""
        return self.layer_activations * self.shape.layers + sum(self.rest_saved.values())

    @property
    def resident(self) -> int:
        return self.weights + self.master_weights + self.optimizer_states + self.fp8_weight_copies

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def rows(self) -> "list[tuple[str, int]]":
        """(line, bytes) of the breakdown, in the order of :meth:`table`."""
        n = self.shape.layers
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("master weights", self.master_weights),
            ("optimizer states", self.optimizer_states),
            ("fp8 weight copies", self.fp8_weight_copies),
            (f"activations saved for backward ({n} layers x {self.layer_activations / GIB:.3f} GiB + rest "
             f"{sum(self.rest_saved.values()) / GIB:.3f} GiB)", self.activations),
            ("logits / loss (saved + largest transient)", self.loss_saved + self.loss_transient),
            ("FSDP gathered buffers", self.fsdp_gathered),
            ("workspace (one layer's backward)", self.workspace),
        ]

    def table(self) -> str:
        """Markdown table of the breakdown and the phases, in GiB."""
        s = self.settings
        recipe = s.recipe + (" + FP8 attention inputs" if s.fp8_attention else "")
        title = (f"{recipe}, optimizer {s.optimizer} ({s.master_mode} master, {s.param_dtype} params), batch "
                 f"{s.batch} x seq {s.seq}" + (f" over {s.gpus} GPUs ({s.rank_batch} per GPU)" if s.gpus > 1 else "")
                 + (", step in backward" if s.step_in_backward else "")
                 + (", chunked loss" if s.chunked_loss else ", full logits")
                 + (", activation checkpointing" if s.activation_checkpointing else "")
                 + (", compiled" if s.compiled else "") + (f", grad accum {s.grad_accum}" if s.grad_accum > 1 else ""))
        lines = [f"Memory plan per GPU: {title}", "", "| memory | GiB |", "|---|---|"]
        lines += [f"| {name} | {nbytes / GIB:.2f} |" for name, nbytes in self.rows()]
        for phase, nbytes in self.phases.items():
            lines.append(f"| total at {phase} | {nbytes / GIB:.2f} |")
        lines.append(f"| **peak** ({self.peak_phase}) | **{self.peak / GIB:.2f}** |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: settings, model shape, the breakdown in bytes, phases and the peak (bytes and GiB)."""
        return {
            "settings": asdict(self.settings),
            "model": asdict(self.shape),
            "param_dtype": self.settings.param_dtype,
            "master_mode": self.settings.master_mode,
            "bytes": {
                "weights": self.weights, "gradients": self.gradients, "master_weights": self.master_weights,
                "optimizer_states": self.optimizer_states, "fp8_weight_copies": self.fp8_weight_copies,
                "activations": self.activations, "activations_per_layer": self.layer_activations,
                "activations_rest": sum(self.rest_saved.values()), "loss_saved": self.loss_saved,
                "loss_transient": self.loss_transient, "fsdp_gathered": self.fsdp_gathered,
                "workspace": self.workspace,
            },
            "layer_saved_by_op": dict(self.layer_saved),
            "rest_saved_by_op": dict(self.rest_saved),
            "phases": dict(self.phases),
            "peak_bytes": self.peak,
            "peak_gib": self.peak / GIB,
            "peak_phase": self.peak_phase,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _step_temporaries(shape: ModelShape, settings: PlanSettings) -> int:
    """Bytes an optimizer step allocates beyond parameters, gradients and states (estimates): none for the fused
    CUDA steps; torchao's compiled per-parameter step about 2 bytes per element of the largest parameter; the
    CPU paths fp32 copies of the largest parameter (fp8coat's torch reference) or of all states (torch foreach)."""
    largest = max(p.numel for p in shape.parameters())
    if settings.optimizer == "torchao-fp8":
        return 2 * largest
    if settings.device == "cuda":
        return 0
    if settings.optimizer == "fp8coat":
        return 6 * 4 * largest
    return 4 * shape.n_params


def plan_memory(shape: ModelShape, settings: PlanSettings) -> MemoryPlan:
    """The predicted memory of one rank for ``settings`` on a model of ``shape`` (see the module docstring)."""
    s = settings
    n = s.gpus
    pb = dtype_bytes(s.param_dtype)
    params = shape.parameters()
    weights = grads_all = states = masters = 0
    for p in params:
        local = shard_shape(p.shape, n)
        numel = 1
        for d in local:
            numel *= d
        weights += numel * pb
        grads_all += numel * pb
        states += optimizer_state_bytes_of(local, s.optimizer, s.param_dtype, global_shape=p.shape,
                                           expansion=s.expansion)
        masters += master_bytes(local, s.optimizer, s.master_mode)
    layer_params = sum(p.numel for p in shape.layer_parameters())
    layer_grads = _numel_sum(shape.layer_parameters(), n) * pb  # one layer's gradients (this rank's shards)
    head_grads = grads_all - shape.layers * layer_grads  # embedding, final norm, LM head
    copies = 0
    if s.recipe != "bf16" and s.cache_fp8_weights and n == 1:
        copies = shape.layers * sum(w.numel + 4 + 16 for w in shape.linear_weights())

    b, seq, prec = s.rank_batch, s.seq, s.precision
    compiled = s.compiled
    eager_layer = layer_saved_bytes(shape, s.recipe, b, seq, device=s.device, precision=prec, compiled=compiled,
                                    fp8_attention=s.fp8_attention)
    if s.activation_checkpointing:
        layer = checkpointed_layer_bytes(shape, b, seq, precision=prec)
    else:
        layer = eager_layer
    rest = rest_saved_bytes(shape, b, seq, precision=prec, chunked_loss=s.chunked_loss,
                            checkpointing=s.activation_checkpointing)
    loss_saved = sum(rest.pop(op, 0) for op in _LOSS_OPS)
    if s.chunked_loss:
        loss_saved = rest.pop(FP8_OP)
    loss_fwd, loss_bwd = loss_transients(shape, b, seq, precision=prec, chunked=s.chunked_loss, device=s.device,
                                         chunk_tokens=s.loss_chunk_tokens)
    grad_elem = 2 if n > 1 else pb  # FSDP computes the unsharded gradients in bf16
    workspace = layer_backward_workspace(shape, s.recipe, b, seq, precision=prec, device=s.device,
                                         grad_bytes=grad_elem, compiled=compiled, fp8_attention=s.fp8_attention)

    fsdp_fwd = fsdp_bwd = 0
    if n > 1:
        root = sum(p.numel for p in params if p.layer is None) * 2
        fsdp_fwd = root + 2 * layer_params * 2
        fsdp_bwd = fsdp_fwd + layer_params * 2

    resident = weights + masters + states + copies
    held_before = grads_all if s.grad_accum > 1 else 0  # gradients of earlier micro-batches
    held_grads = not s.step_in_backward or s.grad_accum > 1
    layer_bytes, rest_bytes = sum(layer.values()), sum(rest.values())
    acts = shape.layers * layer_bytes + rest_bytes
    phases = {
        "forward": resident + held_before + acts + loss_saved + loss_fwd + fsdp_fwd,
        "backward (loss)": resident + held_before + acts + loss_saved + loss_bwd + fsdp_bwd,
    }
    # layers in backward order: k layers done, their saved tensors freed, their gradients made
    base = rest.get("Embedding", 0) + (rest.get("Mul", 0) if not s.activation_checkpointing else 0)
    recompute = sum(eager_layer.values()) if s.activation_checkpointing else 0
    worst = 0
    for k in range(shape.layers):
        if held_grads:
            grads = grads_all if s.grad_accum > 1 else head_grads + k * layer_grads
        else:
            grads = 0
        worst = max(worst, base + (shape.layers - k) * layer_bytes + recompute + grads + workspace)
    phases["backward (layers)"] = resident + worst + fsdp_bwd
    if not s.step_in_backward:
        phases["optimizer"] = resident + grads_all + _step_temporaries(shape, s)
    return MemoryPlan(
        settings=s, shape=shape, weights=weights, gradients=grads_all if held_grads else 0, master_weights=masters,
        optimizer_states=states, fp8_weight_copies=copies, layer_saved=dict(layer), rest_saved=dict(rest),
        loss_saved=loss_saved, loss_transient=max(loss_fwd, loss_bwd), fsdp_gathered=fsdp_bwd, workspace=workspace,
        phases=phases,
    )


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _numel_sum(specs, ranks: int) -> int:
    return sum(_numel(shard_shape(p.shape, ranks)) for p in specs)


def max_batch(shape: ModelShape, settings: PlanSettings, gib: float, *, limit: int = 1 << 16) -> int:
    """The largest ``batch`` (a multiple of ``settings.gpus``) whose planned peak fits in ``gib`` GiB per GPU; 0
    if none does. The peak grows with the batch, so a binary search over multiples of ``gpus`` finds it."""
    if not gib > 0:
        raise ValueError(f"memory must be > 0 GiB, got {gib!r}")
    budget = gib * GIB
    step = settings.gpus

    def fits(units: int) -> bool:
        return plan_memory(shape, replace(settings, batch=units * step)).peak <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi * step <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit // step + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo * step
