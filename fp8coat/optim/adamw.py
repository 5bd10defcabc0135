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
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch

from ..formats import get_format
from ..quantization import check_group_size, triton_available
from .layout import StateLayout, init_state, state_nbytes
from .master_weights import MASTER_MODES, resolve_master_mode
from .step_plan import GroupStepPlan, bump_versions
from .step_reference import StepScalars, adamw_step_reference

__all__ = ["AdamW"]

_OPTION_KEYS = ("m_format", "v_format", "group_size", "expansion", "min_quantized_numel", "master_weights")


class AdamW(torch.optim.Optimizer):
    """AdamW with FP8 optimizer states.

    Args:
        params: parameters or parameter groups (each group may override any keyword below).
        lr: learning rate, a float or a 0-d tensor (may change every step).
        betas, eps, weight_decay, maximize: as in :class:`torch.optim.AdamW`.
        m_format / v_format: ``"e4m3"`` (default) or ``"e5m2"`` for the first / second moment.
        group_size: elements per quantization group along the last dim (power of two >= 16; default 128).
        expansion: dynamic range expansion on (default) or off (plain per-group absmax, for ablations).
        min_quantized_numel: parameters with fewer elements (or < 2 dims) keep fp32 moments (default 4096).
        master_weights: ``"auto"`` | ``"fp32"`` | ``"bf16-remainder"`` | ``"bf16-stochastic"`` | ``"none"``.
        backend: ``None`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
        seed: seed of the stochastic-rounding stream.
        kernel_options: options of the fused step (``block_groups``, ``num_warps``, ``exact_math``; see
            ``fp8coat.optim.step_triton.fused_adamw_step``); defaults are tuned on H200.
    """

    def __init__(
        self,
        params: Iterable,
        lr: "float | torch.Tensor" = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
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
        self._layouts: dict[torch.Tensor, StateLayout] = {}
        self._interned: dict[StateLayout, StateLayout] = {}
        self._caches: dict[Any, Any] = {}
        self._sr_calls = 0
        self._group_of: "dict[int, tuple] | None" = None  # id(param) -> (group, index), built on first use
        self._plans: dict[int, GroupStepPlan] = {}  # group index -> its prepared fused update (fast path)
        super().__init__(params, defaults)

    # ---------------------------------------------------------------------------------------------------------
    # configuration

    @staticmethod
    def _validate_group(group: dict) -> None:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"lr as a tensor must hold one element, got shape {tuple(lr.shape)}")
        elif not (lr >= 0.0):
            raise ValueError(f"invalid learning rate {lr!r}")
        b1, b2 = group["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {group['betas']!r}")
        if not group["eps"] >= 0.0:
            raise ValueError(f"invalid eps {group['eps']!r}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"invalid weight_decay {group['weight_decay']!r}")
        get_format(group["m_format"])
        get_format(group["v_format"])
        check_group_size(group["group_size"])
        if group["master_weights"] not in MASTER_MODES:
            raise ValueError(f"master_weights={group['master_weights']!r} is not one of {MASTER_MODES}")
        if not isinstance(group["min_quantized_numel"], int) or group["min_quantized_numel"] < 0:
            raise ValueError(f"min_quantized_numel must be an int >= 0, got {group['min_quantized_numel']!r}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._group_of = None
        self._plans = {}
        group = self.param_groups[-1]
        self._validate_group(group)
        for p in group["params"]:
            if p.is_complex():
                raise ValueError("fp8coat.AdamW does not support complex parameters")
            if not p.is_floating_point():
                raise ValueError(f"fp8coat.AdamW needs floating-point parameters, got {p.dtype}")
            resolve_master_mode(group["master_weights"], p, self._param_name(p))

    def _param_name(self, p: torch.Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}].params[{pi}] (shape {tuple(p.shape)})"
        return f"parameter of shape {tuple(p.shape)}"

    def layout_of(self, p: torch.Tensor, group: "dict | None" = None) -> StateLayout:
        """The storage layout of ``p``'s state, from its group's options."""
        if p in self._layouts:
            return self._layouts[p]
        if group is None:
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        quantized = p.dim() >= 2 and p.numel() >= group["min_quantized_numel"]
        layout = StateLayout(
            m_format=get_format(group["m_format"]) if quantized else None,
            v_format=get_format(group["v_format"]) if quantized else None,
            group_size=group["group_size"],
            expand=bool(group["expansion"]),
            master=resolve_master_mode(group["master_weights"], p, self._param_name(p)),
        )
        layout = self._interned.setdefault(layout, layout)  # equal layouts share one object (cheap bucket keys)
        self._layouts[p] = layout
        return layout

    # ---------------------------------------------------------------------------------------------------------
    # step

    def _use_triton(self, p: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "triton":
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
        self._sr_calls += 1
        for gi, group in enumerate(self.param_groups):
            plan = self._plans.pop(gi, None)
            if plan is not None and plan.run(group, self._seed(gi), self._launch_fused):
                self._plans[gi] = plan
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
        if self._group_of is None:
            self._group_of = {id(p): (gi, i) for gi, g in enumerate(self.param_groups) for i, p in enumerate(g["params"])}
        for p in params:
            where = self._group_of.get(id(p))
            if where is None:
                raise ValueError("step_params: a parameter that this optimizer does not hold")
            gi, index = where  # one launch per parameter; the seed also names the parameter (independent rounding)
            self._step_group(gi, self.param_groups[gi], [p], salt=index)

    def _seed(self, gi: int, salt: "int | None" = None) -> int:
        """The stochastic-rounding seed of group ``gi`` in this optimizer step (tensor i of a launch uses seed + i)."""
        return hash((self.seed, self._sr_calls, gi) + (() if salt is None else (salt,))) & 0x7FFFFFFF

    def _launch_fused(self, params, grads, states, layout, scalars, seed, cache):
        from .step_triton import fused_adamw_step

        return fused_adamw_step(params, grads, states, layout, scalars, seed=seed, cache=cache, **self.kernel_options)

    def _step_group(self, gi: int, group: dict, params: "list[torch.Tensor]", salt: "int | None" = None) -> None:
        """The general path: checks every gradient, sorts the parameters into buckets (one fused launch each on
        CUDA) and, after a full step in which every parameter went to the fused kernel as it is, prepares the
        group's :class:`GroupStepPlan` for the next steps."""
        items = []
        for p in params:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError("fp8coat.AdamW does not support sparse gradients")
            if grad.is_complex():
                raise RuntimeError("fp8coat.AdamW does not support complex gradients")
            if grad.shape != p.shape:
                raise RuntimeError(f"gradient shape {tuple(grad.shape)} != parameter shape {tuple(p.shape)}")
            state = self.state[p]
            layout = self.layout_of(p, group)
            if not state:
                state.update(init_state(p, layout))
            items.append((p, grad, state, layout))
        if not items:
            return
        torch._foreach_add_([s["step"] for _, _, s, _ in items], 1.0)
        buckets: dict[tuple, list] = {}
        layouts: dict[int, StateLayout] = {}
        use_triton = self._use_triton
        plannable = salt is None and len(items) == len(params)
        for p, grad, state, layout in items:
            fused = use_triton(p) and p.is_contiguous() and p.data_ptr() % 16 == 0
            plannable = plannable and fused
            if fused and (not grad.is_contiguous() or grad.data_ptr() % 16):
                grad = grad.clone(memory_format=torch.contiguous_format)
                plannable = False
            elif not grad.is_contiguous():
                grad = grad.contiguous()
            flat = p.dim() > 0 and (p.shape[-1] if layout.m_format else p.numel()) % layout.group_size == 0
            layouts[id(layout)] = layout  # interned by layout_of: equal layouts are one object
            key = (id(layout), p.device, p.dtype, grad.dtype, int(state["step"].item()), fused, flat)
            buckets.setdefault(key, []).append((p, grad, state))
        seed = self._seed(gi, salt)
        planned = []
        for (layout_id, device, _, grad_dtype, step, fused, _), bucket in buckets.items():
            layout = layouts[layout_id]
            scalars = StepScalars(
                lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                weight_decay=group["weight_decay"], step=step, maximize=group["maximize"],
            )
            if fused:
                ckey = (gi, layout, device) + tuple(id(p) for p, _, _ in bucket)
                bps, bgs, bss = [b[0] for b in bucket], [b[1] for b in bucket], [b[2] for b in bucket]
                self._caches[ckey] = self._launch_fused(bps, bgs, bss, layout, scalars, seed, self._caches.get(ckey))
                bump_versions(bps)  # the kernel writes through raw pointers: tell autograd and FP8 caches
                planned.append((layout, bps, bss, grad_dtype, step, self._caches[ckey]))
            else:  # the i-th tensor of a bucket gets the rounding key seed + i, as in the fused step
                for i, (p, grad, state) in enumerate(bucket):
                    adamw_step_reference(p, grad, state, layout, scalars, sr_key=seed + i)
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
        sd = super().state_dict()
        sd["fp8coat"] = {"stochastic_rounding_calls": self._sr_calls, "seed": self.seed}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by this class; FP8/uint8/int16 state tensors keep their dtypes.

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype (fp8 -> fp32,
        int16 -> bf16 would lose the remainder bits), so the tensors are set here instead, after checking
        that each one has the dtype and shape the current options give.
        """
        extra = state_dict.get("fp8coat", {})
        self._group_of = None
        self._plans = {}
        self._sr_calls = int(extra.get("stochastic_rounding_calls", 0))
        self.seed = int(extra.get("seed", self.seed))
        saved_groups = state_dict["param_groups"]
        for g in saved_groups:
            missing = [k for k in _OPTION_KEYS if k not in g]
            if missing:
                raise ValueError(f"state dict is not from fp8coat.AdamW: param group lacks {missing}")
        saved_state = state_dict["state"]
        stripped = {
            "state": {pid: {"step": s["step"]} for pid, s in saved_state.items()},
            "param_groups": saved_groups,
        }
        super().load_state_dict(stripped)
        self._layouts.clear()
        self._caches.clear()
        id_map = dict(
            zip(
                itertools.chain.from_iterable(g["params"] for g in saved_groups),
                itertools.chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        for pid, saved in saved_state.items():
            if pid not in id_map:
                continue
            p = id_map[pid]
            expected = init_state(p.detach().to("meta"), self.layout_of(p))
            state = self.state[p]
            for key, ref in expected.items():
                if key == "step":
                    continue
                if key not in saved:
                    raise ValueError(f"state of {self._param_name(p)} lacks {key!r}: saved with other options?")
                value = saved[key]
                if value.dtype != ref.dtype or value.shape != ref.shape:
                    raise ValueError(
                        f"state {key!r} of {self._param_name(p)} is {value.dtype} {tuple(value.shape)}, expected "
                        f"{ref.dtype} {tuple(ref.shape)}: the checkpoint was saved with other optimizer options"
                    )
                state[key] = value.detach().to(device=p.device, copy=True)
            state["step"] = state["step"].clone()  # never share a step counter with the source optimizer
            extra = set(saved) - set(expected)
            if extra:
                raise ValueError(f"state of {self._param_name(p)} has unexpected keys {sorted(extra)}")

