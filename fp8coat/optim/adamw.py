"""``fp8coat.AdamW``: torch's AdamW with FP8 moments, dynamic range expansion and compact master weights.

The update is exactly torch's AdamW (decoupled weight decay, bias correction on both moments, eps added after
the bias-corrected sqrt(v)); what changes is how state is stored:

* m and v in FP8 (E4M3 by default; E5M2 optional, per moment), shaped like the parameter, with one fp32 absmax
  and one uint8 exponent per 1×G group along the last dim (G = 128): 2.078 bytes per element. Parameters with
  fewer than ``min_quantized_numel`` elements or fewer than 2 dims keep fp32 moments.
* Dynamic range expansion (``expansion=True``) raises each group to the power k that stretches its dynamic range
  over FP8's before quantizing (``state_codec.py``); ``expansion=False`` is plain absmax per group.
* Master weights (``master_weights``): ``fp32`` parameters, ``bf16-remainder`` (bf16 params + int16 low bits:
  bit-identical to fp32 masters), ``bf16-stochastic``, or ``none`` (round to nearest in the param dtype);
  ``auto`` picks ``fp32`` for fp32 params and ``bf16-remainder`` for bf16 params.

On CUDA one fused Triton launch updates every tensor of a bucket (same layout, dtype and step count): no host
syncs, no recompilation when ``lr`` changes (a float, or a tensor read on device). Elsewhere the torch
reference runs with the same arithmetic.

Robustness, the same on both backends (``step_reference.py`` has the arithmetic):

* Non-finite gradients: an element whose gradient is NaN or ±inf is skipped for that step (its parameter, master
  remainder, m and v keep their values; no weight decay); the rest of its tensor and quantization group update
  normally, and :attr:`AdamW.nonfinite_grad_count` counts the skipped elements on device. Finite gradients never
  make parameters or states NaN or inf: m and v are clamped to ±2^63 and 2^126.
* A parameter whose dtype or device changes after its state was created (``model.float()``, ``model.to(...)``),
  and options changed in ``param_groups`` after the first step, are noticed at the next step (or
  ``state_dict()``): the state is converted (``state_conversion.py``), or a ValueError names the parameter and
  what to do where that would lose the exact master weights. Invalid option values raise ValueError then, and
  ``lr``, ``betas``, ``eps`` and ``weight_decay`` are checked at every step (a tensor ``lr`` only for its shape:
  reading it would synchronize).

Per-tensor amax of the new weights (``record_amax_of``): the step reads and writes every parameter anyway, so for
the parameters named there it also records the absmax of the local shard it wrote (:meth:`AdamW.recorded_amax`),
on device, without another pass over the weights. ``fp8coat.precompute_fp8_scales(model, optimizer)`` takes the
per-tensor scales of FP8-gathered weights from it.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..formats import get_format
from ..ops.fp8_gather import FP8AllGatherWeight
from ..quantization import check_group_size, check_triton_device, triton_available
from .layout import (
    OPTION_KEYS,
    StateLayout,
    group_options,
    has_fp8_moments,
    init_state,
    state_nbytes,
    state_shape,
)
from .master_weights import MASTER_MODES, concrete_master_mode, resolve_master_mode
from .sharding import as_dtensor_like, check_sharding, is_sharded, local_part_of, local_tensor
from .state_conversion import StateSpec, convert_state, master_conversion_error
from .step_plan import GroupStepPlan, bump_versions
from .step_reference import StepScalars, adamw_step_reference

__all__ = ["AdamW"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # parameter and gradient dtypes of the Triton step

# Above this beta2 an FP8 second moment drifts: each step moves v by (1 - beta2) of itself, less than FP8 resolves,
# and re-encoding it every step biases it (benchmarks/moment_drift.py measures it; docs/optimizer_state_error.md)
FP8_V_MAX_BETA2 = 0.99


def _fp8_v_drift_warning(group: dict, params: Iterable[torch.Tensor]) -> "str | None":
    """The warning text when ``group`` stores FP8 second moments for any of ``params`` at a beta2 above
    :data:`FP8_V_MAX_BETA2`; None otherwise."""
    beta2 = group["betas"][1]
    if beta2 <= FP8_V_MAX_BETA2:
        return None
    if not any(has_fp8_moments(state_shape(p), group["min_quantized_numel"]) for p in params):
        return None
    return (f"fp8coat.AdamW: betas[1]={beta2} with FP8 second moments ({group['v_format']}): each step moves v by "
            f"{1 - beta2:.3g} of itself, less than FP8 resolves, so re-encoding it every step lets v drift from "
            "torch's (at 0.999 with heavy-tailed gradients to about half, raising every update by ~40%: "
            f"docs/optimizer_state_error.md). Use betas[1] <= {FP8_V_MAX_BETA2} (the default is 0.95), or "
            "min_quantized_numel above the largest parameter for fp32 moments")


def _checked_gradient(p: torch.Tensor) -> torch.Tensor:
    """``p.grad`` if the optimizer can use it, else RuntimeError: the one place gradients are validated (a prepared
    :class:`~fp8coat.optim.step_plan.GroupStepPlan` only tests whether a gradient still fits its launches and
    otherwise leaves the step to the general path, which calls this)."""
    grad = p.grad
    if grad.is_sparse:
        raise RuntimeError("fp8coat.AdamW does not support sparse gradients")
    if grad.is_complex():
        raise RuntimeError("fp8coat.AdamW does not support complex gradients")
    if grad.shape != p.shape:
        raise RuntimeError(f"gradient shape {tuple(grad.shape)} != parameter shape {tuple(p.shape)}")
    if is_sharded(p) and (not is_sharded(grad) or tuple(grad.placements) != tuple(p.placements)):
        placements = tuple(grad.placements) if is_sharded(grad) else "a plain tensor"
        raise RuntimeError(f"the gradient of a DTensor parameter with placements {tuple(p.placements)} is "
                           f"{placements}: fp8coat.AdamW updates each rank's shard from the gradient's matching shard")
    return grad


def _check_lr(lr, read_tensor: bool) -> None:
    """lr must be finite and >= 0. A tensor lr must hold one element; its value is read only if ``read_tensor``
    (at construction: at a step reading it would synchronize with the device)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr as a tensor must hold one element, got shape {tuple(lr.shape)}")
        if not read_tensor:
            return
        lr = float(lr)
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"invalid learning rate {lr!r}: it must be finite and >= 0")


def _check_hyper(group: dict, read_tensor_lr: bool = False) -> None:
    """lr, betas, eps and weight_decay of a parameter group (cheap: checked at every step)."""
    _check_lr(group["lr"], read_tensor_lr)
    b1, b2 = group["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {group['betas']!r}")
    if not 0.0 <= group["eps"] < math.inf:
        raise ValueError(f"invalid eps {group['eps']!r}: it must be finite and >= 0")
    if not 0.0 <= group["weight_decay"] < math.inf:
        raise ValueError(f"invalid weight_decay {group['weight_decay']!r}: it must be finite and >= 0")


def _check_options(group: dict) -> None:
    """The state-layout options of a parameter group (``layout.OPTION_KEYS``); errors name the option."""
    for key in ("m_format", "v_format"):
        try:
            get_format(group[key])
        except ValueError as e:
            raise ValueError(f"{key}={group[key]!r}: {e}") from None
    check_group_size(group["group_size"])
    if group["expansion"] not in (True, False):
        raise ValueError(f"expansion must be True or False, got {group['expansion']!r}")
    mqn = group["min_quantized_numel"]
    if not isinstance(mqn, int) or isinstance(mqn, bool) or mqn < 0:
        raise ValueError(f"min_quantized_numel must be an int >= 0, got {mqn!r}")
    if group["master_weights"] not in MASTER_MODES:
        raise ValueError(f"master_weights={group['master_weights']!r} is not one of {MASTER_MODES}")


class AdamW(torch.optim.Optimizer):
    """AdamW with FP8 optimizer states.

    Args:
        params: parameters or parameter groups (each group may override any keyword below).
        lr: learning rate, a float or a 0-d tensor (may change every step).
        betas, eps, weight_decay, maximize: as in :class:`torch.optim.AdamW`, except that ``betas`` defaults to
            (0.9, 0.95): above ``beta2`` = 0.99 an FP8 second moment drifts from torch's (each step changes it
            by less than FP8 resolves), and a group that stores one at such a beta2 gets a UserWarning with the
            measured drift (:data:`FP8_V_MAX_BETA2`).
        m_format / v_format: ``"e4m3"`` (default) or ``"e5m2"`` for the first / second moment.
        group_size: elements per quantization group along the last dim (power of two >= 16; default 128).
        expansion: dynamic range expansion on (default) or off (plain per-group absmax, for ablations).
        min_quantized_numel: parameters with fewer elements (or < 2 dims) keep fp32 moments (default 4096).
        master_weights: ``"auto"`` | ``"fp32"`` | ``"bf16-remainder"`` | ``"bf16-stochastic"`` | ``"none"``.
        backend: ``None`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"`` (parameters or gradients
            of other dtypes than float32, bfloat16 and float16 always take the torch path).
        seed: seed of the stochastic-rounding stream.
        kernel_options: options of the fused step (``block_groups``, ``num_warps``, ``exact_math``; see
            ``fp8coat.optim.step_triton.fused_adamw_step``); defaults are tuned on H200.
        record_amax_of: parameters (of ``params``) whose new local-shard absmax every step records, e.g. the
            weights gathered in FP8 under FSDP2 (:meth:`recorded_amax`; ``fp8coat.precompute_fp8_scales`` reads it).

    Gradient elements that are NaN or ±inf are skipped: the element keeps its parameter (and master remainder),
    m and v for that step, with no weight decay; everything else updates normally. :attr:`nonfinite_grad_count`
    counts them. Finite gradients, however large, never make parameters or states NaN or inf (m and v are
    clamped to ±2^63 and 2^126).

    Options may be changed in ``param_groups`` between steps (they are validated at the next step, and existing
    states are re-encoded for the new layout); a parameter may change device or dtype between steps where its
    exact master survives (bf16 + remainder -> float32 writes the fp32 master into the parameter; ``none`` and
    ``bf16-stochastic`` follow any dtype their mode accepts). Conversions that would lose the exact master
    (float32 master -> bf16 or fp16, bf16 + remainder -> fp16) raise ValueError at the next step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: "float | torch.Tensor" = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        m_format: str = "e4m3",
        v_format: str = "e4m3",
        group_size: int = 128,
        expansion: bool = True,
        min_quantized_numel: int = 4096,
        master_weights: str = "auto",
        maximize: bool = False,
        amsgrad: bool = False,
        backend: "str | None" = None,
        seed: int = 0,
        kernel_options: "dict | None" = None,
        record_amax_of: Iterable[torch.Tensor] = (),
    ):
        if amsgrad:
            raise NotImplementedError("fp8coat.AdamW does not implement amsgrad; use torch.optim.AdamW for it")
        if backend not in (None, "torch", "triton"):
            raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
            m_format=m_format, v_format=v_format, group_size=group_size, expansion=expansion,
            min_quantized_numel=min_quantized_numel, master_weights=master_weights,
        )
        self._validate_group(defaults)
        self.backend = backend
        self.seed = int(seed)
        self.kernel_options = dict(kernel_options or {})
        self._specs: dict[torch.Tensor, StateSpec] = {}  # param -> what its state was made for
        self._checked: dict[int, tuple] = {}  # group index -> its options as last validated
        self._nonfinite: dict[torch.device, torch.Tensor] = {}  # device -> int64 count of skipped grad elements
        self._interned: dict[StateLayout, StateLayout] = {}
        self._caches: dict[Any, Any] = {}
        self._sr_calls = 0
        self._group_of: "dict[int, tuple] | None" = None  # id(param) -> (group, index), built on first use
        self._plans: dict[int, GroupStepPlan] = {}  # group index -> its prepared fused update (fast path)
        # recording param -> (amax, content version) of its last step (None before it); param -> reference-path slot
        self._amax_records: dict[torch.Tensor, "tuple[torch.Tensor, Any] | None"] = {}
        self._amax_slots: dict[torch.Tensor, torch.Tensor] = {}
        super().__init__(params, defaults)
        held = {id(p) for group in self.param_groups for p in group["params"]}
        for p in record_amax_of:
            if id(p) not in held:
                raise ValueError(f"record_amax_of: a tensor of shape {tuple(p.shape)} that is not one of this "
                                 "optimizer's parameters")
            self._amax_records[p] = None

    # ---------------------------------------------------------------------------------------------------------
    # configuration

    @staticmethod
    def _validate_group(group: dict) -> None:
        """All options and hyper-parameters of a group (a tensor lr is read: done at construction only)."""
        _check_hyper(group, read_tensor_lr=True)
        _check_options(group)

    def _check_group_at_step(self, gi: int, group: dict) -> None:
        """Validate group ``gi`` before a step: hyper-parameters every time, options when they changed."""
        _check_hyper(group)
        self._check_group_options(gi, group)

    def _check_group_options(self, gi: int, group: dict) -> None:
        """Validate the options of group ``gi`` when they changed since they were last validated (a change also
        drops the group's prepared plan: its states are converted on the general path)."""
        options = group_options(group)
        if self._checked.get(gi) != options:
            _check_options(group)
            self._checked[gi] = options
            self._plans.pop(gi, None)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._group_of = None
        self._plans = {}
        group = self.param_groups[-1]
        self._validate_group(group)
        message = _fp8_v_drift_warning(group, group["params"])
        if message:
            warnings.warn(message, UserWarning, stacklevel=3)
        for p in group["params"]:
            if p.is_complex():
                raise ValueError("fp8coat.AdamW does not support complex parameters")
            if not p.is_floating_point():
                raise ValueError(f"fp8coat.AdamW needs floating-point parameters, got {p.dtype}")
            if concrete_master_mode(group["master_weights"], p.dtype) is None:
                resolve_master_mode(group["master_weights"], p, self._param_name(p))  # raises, naming p

    def _param_name(self, p: torch.Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}].params[{pi}] (shape {tuple(p.shape)})"
        return f"parameter of shape {tuple(p.shape)}"

    def _group_holding(self, p: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def layout_of(self, p: torch.Tensor, group: "dict | None" = None) -> StateLayout:
        """The storage layout of ``p``'s state; for a parameter without state, the layout its group's options
        give it now."""
        spec = self._specs.get(p)
        if spec is not None and self.state.get(p):
            return spec.layout
        return self._derive_layout(p, group if group is not None else self._group_holding(p))

    def _derive_layout(self, p: torch.Tensor, group: dict, dtype: "torch.dtype | None" = None) -> StateLayout:
        """The layout ``group``'s options give ``p`` (as a parameter of ``dtype``, default ``p.dtype``); raises
        ValueError naming ``p`` where ``master_weights`` does not accept that dtype."""
        dtype = p.dtype if dtype is None else dtype
        master = concrete_master_mode(group["master_weights"], dtype)
        if master is None:  # raises with the reason
            resolve_master_mode(group["master_weights"], torch.empty(0, dtype=dtype), self._param_name(p))
        quantized = has_fp8_moments(p.shape, group["min_quantized_numel"])
        check_sharding(p, quantized, self._param_name(p))  # (shape and numel are the global parameter's)
        layout = StateLayout(
            m_format=get_format(group["m_format"]) if quantized else None,
            v_format=get_format(group["v_format"]) if quantized else None,
            group_size=group["group_size"],
            expand=bool(group["expansion"]),
            master=master,
        )
        return self._interned.setdefault(layout, layout)  # equal layouts share one object (cheap bucket keys)

    def _bind(self, p: torch.Tensor, group: dict, options: tuple) -> StateLayout:
        """The layout of ``p``'s state for this step. Creates the state, or converts it where ``p``'s dtype or
        device or the group's ``options`` changed since it was made (``state_conversion.py``); raises ValueError
        where that is not possible."""
        state = self.state[p]
        spec = self._specs.get(p)
        local = local_tensor(p)
        if state and tuple(state["exp_avg"].shape) != state_shape(local):
            raise ValueError(f"{self._param_name(p)} has shape {tuple(p.shape)}, but its optimizer state was made "
                             f"for shape {tuple(state['exp_avg'].shape)}: a parameter cannot change shape under "
                             "fp8coat.AdamW (its moments are laid out per row); restore the shape, or drop its state "
                             "(del opt.state[p]) to start it afresh")
        if spec is not None and state and spec.options == options and spec.dtype == p.dtype and spec.device == p.device:
            return spec.layout
        if spec is not None and state and spec.dtype != p.dtype:
            error = master_conversion_error(spec.layout.master, spec.dtype, p.dtype, self._param_name(p))
            if error is not None:
                raise ValueError(error)
        try:
            layout = self._derive_layout(p, group)
        except ValueError as e:
            if spec is None or spec.dtype == p.dtype:
                raise
            raise ValueError(f"{e}; it was {spec.dtype} when its optimizer state was created: set its group's "
                             f"master_weights to one that accepts {p.dtype} ('auto' or 'none'), or convert it back"
                             ) from None
        if not state:
            state.update(init_state(local, layout))
        elif spec is not None and (spec.layout, spec.dtype, spec.device) != (layout, p.dtype, p.device):
            convert_state(local, state, spec, layout)
            self._caches.clear()  # launch tables hold addresses of the replaced state tensors
            self._plans.clear()
        self._specs[p] = StateSpec(layout, p.dtype, p.device, options)
        return layout

    def _bind_all(self) -> None:
        """Bring every existing state up to date with its parameter and group (see :meth:`_bind`)."""
        for gi, group in enumerate(self.param_groups):
            self._check_group_options(gi, group)
            options = group_options(group)
            for p in group["params"]:
                if self.state.get(p):
                    self._bind(p, group, options)

    # ---------------------------------------------------------------------------------------------------------
    # non-finite gradients

    def _nonfinite_counter(self, device: torch.device) -> torch.Tensor:
        count = self._nonfinite.get(device)
        if count is None:
            count = self._nonfinite[device] = torch.zeros((), dtype=torch.int64, device=device)
        return count

    @property
    def nonfinite_grad_count(self) -> torch.Tensor:
        """Number of gradient elements that were NaN or ±inf (and so were not updated), summed over all steps of
        this optimizer: an int64 0-d tensor on the parameters' device, updated on device (reading its value is a
        host sync; ``.zero_()`` resets it). With parameters on several devices, a sum on the first one's."""
        if not self._nonfinite:
            first = next(p for g in self.param_groups for p in g["params"])
            return self._nonfinite_counter(first.device)
        counts = list(self._nonfinite.values())
        if len(counts) == 1:
            return counts[0]
        return sum(c.to(counts[0].device) for c in counts)

    # ---------------------------------------------------------------------------------------------------------
    # amax of the new weights

    def recorded_amax(self, p: torch.Tensor) -> "tuple[torch.Tensor, Any] | None":
        """``(amax, version)`` of parameter ``p`` (one of ``record_amax_of``) as its last update left it, or None
        (``p`` does not record, or has not been updated yet).

        ``amax``: the absmax of ``p``'s local shard (the whole tensor where ``p`` is not a DTensor) **as stored**,
        a 0-d fp32 tensor on its device: equal, bit for bit, to ``fp8coat.quantization.tensor_amax`` of that
        shard (the values of the parameter dtype, e.g. the bf16 weights of ``bf16-remainder`` and
        ``bf16-stochastic`` masters; NaN counts as +inf; 0 for an empty shard), so ``scale_from_amax(amax)`` is
        the stored weight's scale. The step computes it from the values it writes, on device, with no host sync
        (the fused step: inside its kernel; the torch path: from the written tensor). It is the optimizer's
        buffer, overwritten by later steps: copy it to keep it.

        ``version``: the content version ``amax`` belongs to, as the step left it:
        :meth:`FP8AllGatherWeight.content_version() <fp8coat.ops.fp8_gather.FP8AllGatherWeight.content_version>`
        of the local shard for a weight wrapped for FP8 all-gather, else the local tensor's ``_version``. A
        write into the weight after the step changes that version: compare it with the weight's current one
        before using ``amax``.
        """
        return self._amax_records.get(p)

    def _record_amax(self, p: torch.Tensor, amax: torch.Tensor) -> None:
        self._amax_records[p] = (amax, _content_version(p))

    def _amax_slot(self, p: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The 0-d fp32 tensor that receives ``p``'s amax on the torch path."""
        slot = self._amax_slots.get(p)
        if slot is None or slot.device != device:
            slot = self._amax_slots[p] = torch.zeros((), dtype=torch.float32, device=device)
        return slot

    # ---------------------------------------------------------------------------------------------------------
    # step

    def _use_triton(self, p: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "triton":
            check_triton_device(p)
            return True
        return p.is_cuda and triton_available()

    @torch.no_grad()
    def step(self, closure: "Callable[[], Any] | None" = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
            return loss  # nothing to do (e.g. every parameter was already updated in backward)
        for gi, group in enumerate(self.param_groups):  # before any update: an invalid group changes nothing
            self._check_group_at_step(gi, group)
        self._sr_calls += 1
        for gi, group in enumerate(self.param_groups):
            plan = self._plans.pop(gi, None)
            if plan is not None and plan.run(group, self._seed(gi), self._launch_fused):
                self._plans[gi] = plan
                for p, bucket, t in plan.recording:
                    self._record_amax(p, bucket.cache.amax_slots[t])
                continue
            self._step_group(gi, group, group["params"])
        return loss

    @torch.no_grad()
    def step_params(self, params: "list[torch.Tensor]", *, new_step: bool) -> None:
        """Update only ``params`` (each must belong to this optimizer) from their current gradients.

        Used by :class:`fp8coat.optim.StepInBackward`, which updates every parameter as soon as its gradient is
        complete. ``new_step``: True for the first call of an optimizer step (it advances the stochastic-rounding
        seed, as :meth:`step` does once per call).
        """
        if new_step:
            self._sr_calls += 1
        self._plans.clear()  # partial updates move step counters apart: the general path re-buckets
        for p in params:
            where = self._where(p)
            if where is None:
                raise ValueError("step_params: a parameter that this optimizer does not hold")
            gi, index = where  # one launch per parameter; the seed also names the parameter (independent rounding)
            group = self.param_groups[gi]
            self._check_group_at_step(gi, group)
            self._step_group(gi, group, [p], salt=index)

    def _where(self, p: torch.Tensor) -> "tuple[int, int] | None":
        """(group index, index in the group) of ``p``; the map is rebuilt when ``p`` is not in it (a parameter
        list edited in place)."""
        where = self._group_of.get(id(p)) if self._group_of is not None else None
        if where is not None:
            gi, i = where
            members = self.param_groups[gi]["params"] if gi < len(self.param_groups) else ()
            if i < len(members) and members[i] is p:
                return where
        self._group_of = {id(q): (gi, i) for gi, g in enumerate(self.param_groups) for i, q in enumerate(g["params"])}
        return self._group_of.get(id(p))

    def _seed(self, gi: int, salt: "int | None" = None) -> int:
        """The stochastic-rounding seed of group ``gi`` in this optimizer step (tensor i of a launch uses seed + i)."""
        return hash((self.seed, self._sr_calls, gi) + (() if salt is None else (salt,))) & 0x7FFFFFFF

    def _launch_fused(self, params, grads, states, layout, scalars, seed, cache, records=()):
        from .step_triton import fused_adamw_step

        return fused_adamw_step(params, grads, states, layout, scalars, seed=seed, cache=cache,
                                nonfinite_count=self._nonfinite_counter(params[0].device), record_amax=records,
                                **self.kernel_options)

    def _step_group(self, gi: int, group: dict, params: "list[torch.Tensor]", salt: "int | None" = None) -> None:
        """The general path: checks every gradient, sorts the parameters into buckets (one fused launch each on
        CUDA) and, after a full step in which every parameter went to the fused kernel as it is, prepares the
        group's :class:`GroupStepPlan` for the next steps."""
        items = []
        options = group_options(group)
        for p in params:
            if p.grad is None:
                continue
            grad = _checked_gradient(p)
            layout = self._bind(p, group, options)
            items.append((local_tensor(p), local_tensor(grad), self.state[p], layout, p))  # local shards of DTensors
        if not items:
            return
        torch._foreach_add_([s["step"] for _, _, s, _, _ in items], 1.0)
        buckets: dict[tuple, list] = {}
        layouts: dict[int, StateLayout] = {}
        use_triton = self._use_triton
        plannable = salt is None and len(items) == len(params)
        for p, grad, state, layout, param in items:
            fused = (use_triton(p) and p.is_contiguous() and p.data_ptr() % 16 == 0 and p.dtype in _FUSED_DTYPES
                     and grad.dtype in _FUSED_DTYPES)
            plannable = plannable and fused
            if fused and (not grad.is_contiguous() or grad.data_ptr() % 16):
                grad = grad.clone(memory_format=torch.contiguous_format)
                plannable = False
            elif not grad.is_contiguous():
                grad = grad.contiguous()
            flat = p.dim() > 0 and (p.shape[-1] if layout.m_format else p.numel()) % layout.group_size == 0
            layouts[id(layout)] = layout  # interned by layout_of: equal layouts are one object
            key = (id(layout), p.device, p.dtype, grad.dtype, int(state["step"].item()), fused, flat)
            buckets.setdefault(key, []).append((p, grad, state, param))
        seed = self._seed(gi, salt)
        planned = []
        for (layout_id, device, _, grad_dtype, step, fused, _), bucket in buckets.items():
            layout = layouts[layout_id]
            scalars = StepScalars(
                lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                weight_decay=group["weight_decay"], step=step, maximize=group["maximize"],
            )
            records = tuple(b[3] in self._amax_records for b in bucket) if self._amax_records else ()
            if fused:
                ckey = (gi, layout, device) + tuple(id(p) for p, _, _, _ in bucket)
                bps, bgs, bss = [b[0] for b in bucket], [b[1] for b in bucket], [b[2] for b in bucket]
                cache = self._caches[ckey] = self._launch_fused(bps, bgs, bss, layout, scalars, seed,
                                                                self._caches.get(ckey), records)
                bump_versions(bps)  # the kernel writes through raw pointers: tell autograd and FP8 caches
                for t, b in enumerate(bucket):
                    if records and records[t]:
                        self._record_amax(b[3], cache.amax_slots[t])
                planned.append((layout, bps, bss, grad_dtype, step, cache, records))
            else:  # the i-th tensor of a bucket gets the rounding key seed + i, as in the fused step
                for i, (p, grad, state, param) in enumerate(bucket):
                    slot = self._amax_slot(param, p.device) if records and records[i] else None
                    adamw_step_reference(p, grad, state, layout, scalars, sr_key=seed + i,
                                         nonfinite_count=self._nonfinite_counter(p.device), amax_out=slot)
                    if slot is not None:
                        self._record_amax(param, slot)
        if plannable:
            self._plans[gi] = GroupStepPlan(params, planned)

    # ---------------------------------------------------------------------------------------------------------
    # memory accounting

    def state_nbytes(self, include_master: bool = True) -> int:
        """Bytes of optimizer state on device (moments + side data, and the bf16 remainders if included)."""
        return sum(state_nbytes(s, include_master) for s in self.state.values())

    # ---------------------------------------------------------------------------------------------------------
    # checkpointing

    def state_dict(self) -> dict:
        """torch's state dict with fp8coat's additions: each parameter's state records the ``param_dtype`` it was
        made for (so that it loads into parameters of another dtype), and each param group an ``fp8coat`` entry
        with the stochastic-rounding position and seed. The state tensors of DTensor parameters are presented as
        DTensors with the parameter's mesh and placements (``sharding.py``), as distributed checkpoints need.
        States are first brought up to date with their parameters and groups (a pending conversion happens, or
        raises, here)."""
        self._bind_all()
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for index, state in list(sd["state"].items()):
            p = params[index]
            spec = self._specs.get(p)
            if is_sharded(p):
                state = {k: as_dtensor_like(v, p) if k != "step" and isinstance(v, torch.Tensor) else v
                         for k, v in state.items()}
            else:
                state = dict(state)
            if spec is not None:
                state["param_dtype"] = str(spec.dtype).removeprefix("torch.")
            sd["state"][index] = state
        for group in sd["param_groups"]:
            group["fp8coat"] = {"stochastic_rounding_calls": self._sr_calls, "seed": self.seed}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by this class; FP8/uint8/int16 state tensors keep their dtypes.

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype (fp8 -> fp32,
        int16 -> bf16 would lose the remainder bits), so the tensors are set here instead, after checking
        that each one has the dtype and shape the saved options give a parameter of the saved dtype. A state
        saved for parameters of another dtype is converted at the next step, as after a dtype change (a
        ``bf16-remainder`` state loaded for float32 parameters writes its exact master into them then); where
        that conversion would lose the exact master, this raises ValueError. State tensors may be DTensors or
        plain tensors holding the whole state, for plain or DTensor parameters (``sharding.local_part_of``).
        """
        saved_groups = state_dict["param_groups"]
        for g in saved_groups:
            missing = [k for k in OPTION_KEYS if k not in g]
            if missing:
                raise ValueError(f"state dict is not from fp8coat.AdamW: param group lacks {missing}")
        extra = next((g["fp8coat"] for g in saved_groups if "fp8coat" in g), state_dict.get("fp8coat", {}))
        saved_state = state_dict["state"]
        stripped = {
            "state": {pid: {"step": s["step"]} for pid, s in saved_state.items()},
            "param_groups": saved_groups,
        }
        super().load_state_dict(stripped)
        for group in self.param_groups:
            group.pop("fp8coat", None)
        self._group_of = None
        self._plans = {}
        self._caches.clear()
        self._specs.clear()
        self._checked.clear()
        self._sr_calls = int(extra.get("stochastic_rounding_calls", 0))
        self.seed = int(extra.get("seed", self.seed))
        saved_dtypes = {int(k): v for k, v in extra.get("param_dtypes", {}).items()}  # (older state dicts)
        for gi, group in enumerate(self.param_groups):
            self._check_group_options(gi, group)
        id_map = dict(
            zip(
                itertools.chain.from_iterable(g["params"] for g in saved_groups),
                ((p, g) for g in self.param_groups for p in g["params"]),
            )
        )
        for pid, saved in saved_state.items():
            if pid not in id_map:
                continue
            p, group = id_map[pid]
            name = saved.get("param_dtype", saved_dtypes.get(pid))
            dtype = _dtype_named(name) if name is not None else p.dtype
            self._load_param_state(p, group, dtype, saved)

    def _load_param_state(self, p: torch.Tensor, group: dict, dtype: torch.dtype, saved: dict) -> None:
        """Set ``p``'s state from ``saved``, a state made for a parameter of ``dtype`` under ``group``'s options."""
        layout = self._derive_layout(p, group, dtype)
        if dtype != p.dtype:
            error = master_conversion_error(layout.master, dtype, p.dtype, self._param_name(p))
            if error is not None:
                raise ValueError(f"{error} (the checkpoint's state was saved for {dtype} parameters)")
        expected = init_state(torch.empty(p.shape, dtype=dtype, device="meta"), layout)
        state = self.state[p]
        local = local_tensor(p)
        for key, ref in expected.items():
            if key == "step":
                continue
            if key not in saved:
                raise ValueError(f"state of {self._param_name(p)} lacks {key!r}: saved with other options?")
            value = saved[key]
            if value.dtype != ref.dtype or value.shape != ref.shape:
                raise ValueError(
                    f"state {key!r} of {self._param_name(p)} is {value.dtype} {tuple(value.shape)}, expected "
                    f"{ref.dtype} {tuple(ref.shape)}: the checkpoint was saved with other optimizer options "
                    "or for a parameter of another shape"
                )
            state[key] = local_part_of(value.detach(), p).to(device=local.device, copy=True)
        state["step"] = state["step"].clone()  # never share a step counter with the source optimizer
        unexpected = set(saved) - set(expected) - {"param_dtype"}
        if unexpected:
            raise ValueError(f"state of {self._param_name(p)} has unexpected keys {sorted(unexpected)}")
        self._specs[p] = StateSpec(layout, dtype, p.device, group_options(group))


def _content_version(p: torch.Tensor):
    """The version of ``p``'s local content that :meth:`AdamW.recorded_amax` reports (see there)."""
    local = p._local_tensor if is_sharded(p) else p
    if isinstance(local, FP8AllGatherWeight):
        return local.content_version()
    return local._version


def _dtype_named(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"state dict names an unknown parameter dtype {name!r}")
    return dtype
