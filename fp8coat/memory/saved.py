"""Count the bytes a forward pass keeps alive for backward.

``measure_saved_tensors(fn, *args)`` runs ``fn`` and walks the autograd graph of its outputs. Every tensor a node
holds for backward is collected — ``_saved_*`` attributes of built-in nodes, ``saved_tensors`` and plain tensor
attributes of Python/custom-op nodes — and counted once per **storage** (a view keeps its whole storage alive;
one tensor saved by three ops costs once). Storages of the given modules' parameters and buffers are reported
apart (``parameter_bytes``): they exist whether or not backward runs — the parameters registered before ``fn``
and those registered when it returns (FSDP2 registers its unsharded parameters in forward; the DTensor shards it
registers at rest count by their local tensors; gathered weights that FSDP freed after the forward hold nothing
and are left out). Each storage is attributed to the first autograd op (node name, in forward order) that saved
it and to the innermost module that was running when it was saved.

Tensors packed by other saved-tensor hooks (activation checkpointing, offloading) are read as packed, never
unpacked: a checkpointed region counts what its holders keep (nothing: it is recomputed in backward), not its
recomputation, and measuring does not run it.

Not saved tensors but also held from forward to backward: the FP8 copies of the weights that the given modules'
converted linear layers cache (with ``Recipe.cache_fp8_weights`` on; off by default, when they hold none), 1 byte
per weight — reported apart as ``weight_copy_bytes``.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..conversion import weight_caches
from ..nn.hooks import observer

__all__ = ["SavedTensors", "measure_saved_tensors"]


@dataclass
class SavedTensors:
    """Result of :func:`measure_saved_tensors` (bytes are unique-storage bytes)."""

    total_bytes: int = 0
    parameter_bytes: int = 0
    weight_copy_bytes: int = 0  # FP8 weight copies cached by converted linears (held, not saved; apart)
    by_op: dict = field(default_factory=dict)
    by_module: dict = field(default_factory=dict)
    entries: list = field(default_factory=list)  # (op, module, dtype, shape, storage bytes)

    def table(self, unit_bytes: "float | None" = None, unit_name: str = "U") -> str:
        """Markdown table of the per-op breakdown (optionally also in units of ``unit_bytes``)."""
        lines = ["| op | bytes | " + (f"{unit_name} |" if unit_bytes else "") + " tensors (dtype shape) |",
                 "|---|---|" + ("---|" if unit_bytes else "") + "---|"]
        per_op: dict[str, list] = defaultdict(list)
        for op, _, dtype, shape, _ in self.entries:
            per_op[op].append(f"{str(dtype).replace('torch.', '')} {list(shape)}")
        for op, nbytes in sorted(self.by_op.items(), key=lambda kv: -kv[1]):
            u = f" {nbytes / unit_bytes:.2f} |" if unit_bytes else ""
            lines.append(f"| {op} | {nbytes:,} |{u} {'; '.join(per_op[op][:4])}{' …' if len(per_op[op]) > 4 else ''} |")
        u = f" {self.total_bytes / unit_bytes:.2f} |" if unit_bytes else ""
        lines.append(f"| **total (excluding parameters)** | **{self.total_bytes:,}** |{u} |")
        if self.weight_copy_bytes:
            u = f" {self.weight_copy_bytes / unit_bytes:.2f} |" if unit_bytes else ""
            lines.append(f"| FP8 weight copies (held, not saved) | {self.weight_copy_bytes:,} |{u} |")
        return "\n".join(lines)


def _flatten_tensors(obj: Any) -> "list[torch.Tensor]":
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict) or hasattr(obj, "to_tuple"):
        values = obj.values() if isinstance(obj, dict) else obj.to_tuple()
        return [t for v in values for t in _flatten_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flatten_tensors(v)]
    return []


def _packed(raw) -> "list[torch.Tensor] | None":
    """The tensors held by saved variable(s) ``raw`` (``torch._C._autograd.SavedTensor``) as they were packed: the
    saved tensor itself, or what another saved-tensor hook packed (a checkpoint's empty holder, an offloaded
    copy), without calling any unpack hook. None where this torch offers no way to read a saved variable so
    (releases whose ``SavedTensor`` has neither ``unpack`` nor ``data``)."""
    if isinstance(raw, (list, tuple)):
        parts = [_packed(r) for r in raw]
        return None if any(p is None for p in parts) else [t for p in parts for t in p]
    if not hasattr(raw, "unpack_hook"):
        return []
    try:
        if raw.unpack_hook is None and hasattr(raw, "unpack"):
            return _flatten_tensors(raw.unpack())
        if hasattr(raw, "data"):  # the packed object (the tensor itself where no hook packed it)
            return _flatten_tensors(raw.data)
    except RuntimeError:  # already freed
        return []
    return None


def _unpacked(node, raw_name: str) -> "list[torch.Tensor]":
    """The tensors of ``node``'s saved variable(s) ``raw_name`` (``_raw_saved_<x>``) through the unpacking
    attribute (``_saved_<x>``, ``saved_tensors`` of Python nodes): this calls unpack hooks (a checkpointed region
    is recomputed); used only where :func:`_packed` cannot read them."""
    name = "saved_tensors" if raw_name == "_raw_saved_tensors" else "_saved_" + raw_name[len("_raw_saved_"):]
    try:
        return _flatten_tensors(getattr(node, name))
    except RuntimeError:  # already freed
        return []


def _hook_state(raw, seen: set) -> "list[torch.Tensor]":
    """Saved tensors kept by the state that the unpack hook of ``raw`` closes over, each state object once (in
    ``seen``): the inputs of a non-reentrant checkpoint (``torch.utils.checkpoint`` keeps them, as saved tensors,
    on the frame its hooks share)."""
    found: list[torch.Tensor] = []
    for cell in getattr(raw.unpack_hook, "__closure__", None) or ():
        try:
            state = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if id(state) in seen:
            continue
        seen.add(id(state))
        for value in getattr(state, "__dict__", {}).values():
            if isinstance(value, (list, tuple)):
                found += _packed([v for v in value if isinstance(v, torch._C._autograd.SavedTensor)]) or []
    return found


def _node_tensors(node, hook_states: set) -> "tuple[list[torch.Tensor], list[torch.Tensor]]":
    """(tensors ``node`` saved, tensors kept for it by the state of other saved-tensor hooks)."""
    found: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    names = [a for a in dir(node) if a.startswith("_raw_saved_")]
    for name in names:
        try:
            raws = getattr(node, name)
        except RuntimeError:  # already freed
            continue
        packed = _packed(raws)
        found += packed if packed is not None else _unpacked(node, name)
        for raw in raws if isinstance(raws, (list, tuple)) else [raws]:
            if getattr(raw, "unpack_hook", None) is not None:
                kept += _hook_state(raw, hook_states)
    if "_raw_saved_tensors" in names:  # a Python / custom-op node
        for value in getattr(node, "__dict__", {}).values():  # tensors kept as plain ctx attributes
            found += _flatten_tensors(value)
    return found, kept


def _storage_key(t: torch.Tensor) -> tuple:
    t = getattr(t, "_local_tensor", t)  # a DTensor's storage is its local tensor's
    s = t.untyped_storage()
    return (t.device, s.data_ptr(), s.nbytes())


def _moved(t: "torch.Tensor | None", key: tuple) -> bool:
    """Whether tensor ``t`` (saved with storage key ``key``) is gone or no longer has that storage."""
    return t is None or _storage_key(t) != key


def _add_parameter_storages(keys: set, modules: "list[torch.nn.Module]") -> None:
    for root in modules:
        for t in list(root.parameters()) + list(root.buffers()):
            if t.numel():
                keys.add(_storage_key(t))


def _op_name(node) -> str:
    name = node.name()
    name = name.replace("GeneratedBackwardFor_", "").replace("_defaultBackward", "")
    return name[:-len("Backward0")] if name.endswith("Backward0") else name


def measure_saved_tensors(
    fn: Callable, *args, modules: "torch.nn.Module | list[torch.nn.Module] | None" = None, **kwargs
) -> "tuple[Any, SavedTensors]":
    """Run ``fn(*args, **kwargs)`` and count what its autograd graph keeps for backward.

    ``modules``: module(s) whose parameters/buffers are reported apart, whose submodules name the ``by_module``
    breakdown and whose converted linears' FP8 weight copies make ``weight_copy_bytes``. Returns
    ``(output, SavedTensors)``; the graph stays usable for backward.
    """
    if isinstance(modules, torch.nn.Module):
        modules = [modules]
    modules = modules or []
    param_keys = set()
    names: dict[int, str] = {}
    stack: list[str] = []
    handles = []
    _add_parameter_storages(param_keys, modules)
    for root in modules:
        for fqn, m in root.named_modules():
            names[id(m)] = fqn or type(root).__name__
            # observers: converted modules keep their fused paths (fp8coat.nn.hooks); hooks must return None
            handles.append(m.register_forward_pre_hook(observer(lambda m, a: stack.append(names[id(m)]) and None)))
            handles.append(m.register_forward_hook(observer(lambda m, a, o: stack.pop() and None)))
    module_of: dict[tuple, tuple] = {}  # storage key -> (module name, weak reference to the first tensor saved)

    def pack(t: torch.Tensor):
        if t.numel():
            key = _storage_key(t)
            first = module_of.get(key)
            if first is None or _moved(first[1](), key):  # a storage freed since (FSDP's gathered weights) whose
                module_of[key] = (stack[-1] if stack else "", weakref.ref(t))  # memory now holds another one
        # a new tensor object on the same storage: holding ``t`` itself would make a saved output hold its own
        # grad_fn, a reference cycle that keeps the whole graph (and its memory) alive after the output is gone
        return t.detach()

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    _add_parameter_storages(param_keys, modules)  # and those registered in forward (FSDP2's unsharded ones)

    report = SavedTensors()
    caches = {id(c): c for root in modules for c in weight_caches(root)}
    report.weight_copy_bytes = sum(c.nbytes for c in caches.values())
    seen_nodes, seen_storages = set(), set()
    todo = [t.grad_fn for t in _flatten_tensors(out) if t.grad_fn is not None]
    nodes = []
    while todo:
        node = todo.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        nodes.append(node)
        todo.extend(nxt for nxt, _ in node.next_functions)
    nodes.sort(key=lambda n: n._sequence_nr() if hasattr(n, "_sequence_nr") else 0)  # forward order
    hook_states: set = set()
    for node in nodes:
        op = _op_name(node)
        found, kept = _node_tensors(node, hook_states)
        for t, op in [(t, op) for t in found] + [(t, "Checkpoint (inputs)") for t in kept]:
            if not t.numel():
                continue
            key = _storage_key(t)
            if key in seen_storages or not key[2]:  # counted, or freed (FSDP frees the gathered weights)
                continue
            seen_storages.add(key)
            nbytes = key[2]
            if key in param_keys:
                report.parameter_bytes += nbytes
                continue
            module = module_of.get(key, ("",))[0]
            report.total_bytes += nbytes
            report.by_op[op] = report.by_op.get(op, 0) + nbytes
            report.by_module[module] = report.by_module.get(module, 0) + nbytes
            report.entries.append((op, module, t.dtype, tuple(t.shape), nbytes))
    return out, report
