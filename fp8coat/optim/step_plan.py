"""A parameter group's fused update, prepared once and replayed every step (the optimizer's fast path).

``AdamW._step_group`` sorts parameters into buckets and launches one fused kernel per bucket; most of its host
time is spent re-deriving the same buckets every step (layouts, contiguity, alignment, step counts: tens of µs
of Python per parameter). Once a step has sent every parameter of a group to the fused kernel, the group's
buckets are frozen into a :class:`GroupStepPlan`. Each later step the plan checks, before launching anything,
that the group holds the same parameters at the same addresses and of the same dtypes (a dtype or device change
of a parameter replaces its storage or changes its dtype), and that every gradient is still present, dense,
contiguous, 16-byte aligned and of the recorded dtype and shape; if not, it does nothing and returns False, and
the optimizer takes its general path (which reports errors, converts states and builds a new plan). Changes of
the group's options are noticed by the optimizer, which drops the plan. The step counters of the planned
parameters become views of one fp32 tensor, so one addition advances them all (``state["step"]`` stays a 0-d
fp32 CPU tensor per parameter). Each bucket keeps which of its tensors record their amax (``record_amax`` of the
fused step) and passes that to every launch; :attr:`GroupStepPlan.recording` tells the optimizer where each
recording parameter's amax lands.
"""

from __future__ import annotations

import functools
import operator

import torch

from .layout import StateLayout
from .sharding import local_tensor
from .step_reference import StepScalars

__all__ = ["GroupStepPlan", "bump_versions"]

_dtype_of = operator.attrgetter("dtype")


@functools.cache
def _versions_take_lists() -> bool:
    """Whether ``torch._C._increment_version`` takes a list of tensors (torch >= 2.6)."""
    try:
        torch._C._increment_version([torch.empty(0)])
        return True
    except TypeError:
        return False


def bump_versions(tensors: "list[torch.Tensor]") -> None:
    """Tell autograd (and the FP8 weight caches keyed on versions) that ``tensors`` were written in place."""
    if _versions_take_lists():
        torch._C._increment_version(tensors)
    else:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


class _Bucket:
    __slots__ = ("layout", "index", "params", "states", "grad_dtype", "step", "cache", "records")

    def __init__(self, layout: StateLayout, index: "list[int]", params, states, grad_dtype, step: int, cache,
                 records: "tuple[bool, ...]"):
        self.records = records
        self.layout = layout
        self.index = index
        self.params = params
        self.states = states
        self.grad_dtype = grad_dtype
        self.step = step
        self.cache = cache


class GroupStepPlan:
    """The buckets of one parameter group. ``buckets``: ``(layout, params, states, grad dtype, step, launch
    cache, records)`` per bucket, together covering ``params`` (the group's parameters, in order; the buckets hold
    the local shards of DTensor parameters) exactly once; ``records``: per tensor of the bucket, whether its
    launches record the amax of its new parameter.

    :attr:`recording`: ``(parameter, bucket, t)`` for each recording parameter: after a step, its amax is
    ``bucket.cache.amax_slots[t]`` (the launch cache of the bucket, which a step may replace)."""

    def __init__(self, params: "list[torch.Tensor]", buckets: list):
        self.params = list(params)
        self.locals = [local_tensor(p) for p in self.params]  # what the launches update
        position = {id(p): i for i, p in enumerate(self.locals)}
        self.buckets = [_Bucket(layout, [position[id(p)] for p in bps], list(bps), list(sts), gdt, step, cache,
                                tuple(records))
                        for layout, bps, sts, gdt, step, cache, records in buckets]
        covered = sorted(i for b in self.buckets for i in b.index)
        if covered != list(range(len(self.params))):
            raise ValueError("GroupStepPlan: the buckets must cover the group's parameters exactly once")
        self.recording = [(self.params[i], b, t) for b in self.buckets for t, i in enumerate(b.index)
                          if b.records and b.records[t]]
        self.grad_dtypes = [None] * len(self.params)
        for b in self.buckets:
            for i in b.index:
                self.grad_dtypes[i] = b.grad_dtype
        states = [None] * len(self.params)
        for b in self.buckets:
            for i, s in zip(b.index, b.states):
                states[i] = s
        self.steps = torch.stack([s["step"] for s in states])  # (n,) fp32 CPU: one add advances every counter
        for i, s in enumerate(states):
            s["step"] = self.steps[i]
        self.addresses = [p.data_ptr() for p in self.locals]
        self.dtypes = [p.dtype for p in self.locals]
        self.shapes = [p.shape for p in self.locals]

    def run(self, group: dict, seed: int, launch) -> bool:
        """One step of the group, or False (nothing done) when a gradient no longer fits the plan.
        ``launch(params, grads, states, layout, scalars, seed, cache, records) -> cache`` runs one fused
        update."""
        members = group["params"]
        if len(members) != len(self.params) or not all(map(operator.is_, members, self.params)):
            return False  # the group's parameter list was edited in place
        grads = []
        locals_ = [local_tensor(p) for p in self.params]
        if not all(map(operator.is_, locals_, self.locals)):
            return False  # a DTensor parameter's local shard was replaced
        if list(map(torch.Tensor.data_ptr, locals_)) != self.addresses:
            return False  # a parameter's storage was replaced (e.g. p.data = ..., model.to(...))
        if list(map(_dtype_of, locals_)) != self.dtypes:
            return False  # a parameter's dtype changed in place (p.data = p.data.view(dtype))
        for p, local, dtype, shape in zip(self.params, locals_, self.grad_dtypes, self.shapes):
            g = p.grad
            if g is not None:
                g = local_tensor(g)
            if (g is None or g.dtype != dtype or g.layout != torch.strided or not g.is_contiguous()
                    or g.data_ptr() % 16 or g.shape != shape or local.shape != shape):
                return False  # (a parameter reshaped in place: p.data = p.data.view(...))
            grads.append(g)
        self.steps += 1
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        wd, maximize = group["weight_decay"], group["maximize"]
        for b in self.buckets:
            b.step += 1
            scalars = StepScalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, step=b.step,
                                  maximize=maximize)
            b.cache = launch(b.params, [grads[i] for i in b.index], b.states, b.layout, scalars, seed, b.cache,
                             b.records)
        bump_versions(self.locals)
        return True
