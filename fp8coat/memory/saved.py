"""Count the bytes a forward pass keeps alive for backward.

``measure_saved_tensors(fn, *args)`` runs ``fn`` and walks the autograd graph of its outputs. Every tensor a node
holds for backward is collected — ``_saved_*`` attributes of built-in nodes, ``saved_tensors`` and plain tensor
attributes of Python/custom-op nodes — and counted once per **storage** (a view keeps its whole storage alive;
one tensor saved by three ops costs once). Storages of the given modules' parameters and buffers are reported
apart (``parameter_bytes``): they exist whether or not backward runs. Each storage is attributed to the first
autograd op (node name, in forward order) that saved it and to the innermost module that was running when it was
saved.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..nn.hooks import observer

__all__ = ["SavedTensors", "measure_saved_tensors"]


@dataclass
class SavedTensors:
    """Result of :func:`measure_saved_tensors` (bytes are unique-storage bytes)."""

    total_bytes: int = 0
    parameter_bytes: int = 0
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


def _node_tensors(node) -> "list[torch.Tensor]":
    found: list[torch.Tensor] = []
    names = [a for a in dir(node) if a.startswith("_saved_")]
    for name in names:
        try:
            found += _flatten_tensors(getattr(node, name))
        except RuntimeError:  # already freed
            pass
    if hasattr(node, "saved_tensors") and not names:
        try:
            found += _flatten_tensors(node.saved_tensors)
        except RuntimeError:
            pass
        for value in getattr(node, "__dict__", {}).values():  # tensors kept as plain ctx attributes
            found += _flatten_tensors(value)
    return found


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device, s.data_ptr(), s.nbytes())


def _op_name(node) -> str:
    name = node.name()
    name = name.replace("GeneratedBackwardFor_", "").replace("_defaultBackward", "")
    return name[:-len("Backward0")] if name.endswith("Backward0") else name


def measure_saved_tensors(
    fn: Callable, *args, modules: "torch.nn.Module | list[torch.nn.Module] | None" = None, **kwargs
) -> "tuple[Any, SavedTensors]":
    """Run ``fn(*args, **kwargs)`` and count what its autograd graph keeps for backward.

    ``modules``: module(s) whose parameters/buffers are reported apart and whose submodules name the
    ``by_module`` breakdown. Returns ``(output, SavedTensors)``; the graph stays usable for backward.
    """
    if isinstance(modules, torch.nn.Module):
        modules = [modules]
    modules = modules or []
    param_keys = set()
    names: dict[int, str] = {}
    stack: list[str] = []
    handles = []
    for root in modules:
        for t in list(root.parameters()) + list(root.buffers()):
            if t.numel():
                param_keys.add(_storage_key(t))
        for fqn, m in root.named_modules():
            names[id(m)] = fqn or type(root).__name__
            # observers: converted modules keep their fused paths (fp8coat.nn.hooks); hooks must return None
            handles.append(m.register_forward_pre_hook(observer(lambda m, a: stack.append(names[id(m)]) and None)))
            handles.append(m.register_forward_hook(observer(lambda m, a, o: stack.pop() and None)))
    module_of: dict[tuple, str] = {}

    def pack(t: torch.Tensor):
        if t.numel():
            module_of.setdefault(_storage_key(t), stack[-1] if stack else "")
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()

    report = SavedTensors()
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
    for node in nodes:
        op = _op_name(node)
        for t in _node_tensors(node):
            if not t.numel():
                continue
            key = _storage_key(t)
            if key in seen_storages:
                continue
            seen_storages.add(key)
            nbytes = key[2]
            if key in param_keys:
                report.parameter_bytes += nbytes
                continue
            module = module_of.get(key, "")
            report.total_bytes += nbytes
            report.by_op[op] = report.by_op.get(op, 0) + nbytes
            report.by_module[module] = report.by_module.get(module, 0) + nbytes
            report.entries.append((op, module, t.dtype, tuple(t.shape), nbytes))
    return out, report
