"""The processes of one training run: one (the default), or several launched by ``torchrun`` that share the
model through FSDP2 (``--fsdp``).

``torchrun --nproc_per_node=N -m fp8coat.train.cli train ...`` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK in their environment. :func:`start_ranks` joins them in a process group (NCCL on CUDA, each rank on
``cuda:LOCAL_RANK``; gloo on the CPU) and returns a :class:`Ranks`, which the loop uses for everything that
involves more than one process: the rows of a batch that are this rank's, averages over ranks, the files only
rank 0 writes, and errors that must stop every rank. With ``--fsdp on`` outside torchrun the run is one rank in
a group of its own (sharded like N ranks, for resuming a sharded run on one process).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["FSDP_MODES", "Ranks", "launch_world", "resolve_device", "start_ranks", "stop_ranks"]

FSDP_MODES = ("auto", "on", "off")  # auto: on when launched with WORLD_SIZE > 1


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run. ``sharded``: the model is sharded with FSDP2 over the ``world_size``
    ranks (then a process group exists); otherwise a single process, where every method is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sharded: bool = False
    owns_group: bool = False  # the group was started by start_ranks (and is ended by stop_ranks)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs and writes the run's files."""
        return self.rank == 0

    @property
    def _collective(self) -> bool:
        return self.world_size > 1

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the rows of a global batch (all of it on one rank)."""
        if self.world_size == 1:
            return batch
        self.check_batch(batch.shape[0])
        per_rank = batch.shape[0] // self.world_size
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def check_batch(self, batch_size: int) -> None:
        """ValueError unless a global batch of ``batch_size`` rows splits evenly over the ranks."""
        if batch_size % self.world_size:
            raise ValueError(f"--batch-size {batch_size} does not split evenly over {self.world_size} ranks: each "
                             "rank takes an equal share of the rows of every batch (the batch is the global one); "
                             f"pass a multiple of {self.world_size}")

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the ranks (a new tensor; ``t`` itself on one process)."""
        if not self._collective:
            return t
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def sum_int(self, value: int) -> int:
        """The sum of the integer ``value`` over the ranks."""
        if not self._collective:
            return value
        t = torch.tensor(value, dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t)

    def barrier(self) -> None:
        if self._collective:
            dist.barrier()

    def on_main(self, fn, share: bool = True):
        """``fn()`` run on rank 0 only. Returns its result there and, with ``share`` (a picklable result), on
        every rank (else None on the others). When ``fn`` raises, the same error is raised on every rank, so that
        no rank waits for the others forever."""
        if not self._collective:
            return fn()
        if not self.is_main:
            error, shared = self._announce(None)
            if error is not None:
                raise error
            return shared
        try:
            result = fn()
        except Exception as err:
            self._announce((err, None))
            raise
        self._announce((None, result if share else None))
        return result

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block before the others (which wait for it): for work whose result is cached on disk,
        such as preparing the data. An error in rank 0's block is raised on every rank."""
        if not self._collective:
            yield
            return
        if self.is_main:
            try:
                yield
            except Exception as err:
                self._announce((err, None))
                raise
            self._announce((None, None))
        else:
            error, _ = self._announce(None)
            if error is not None:
                raise error
            yield

    def _announce(self, outcome: tuple | None) -> tuple:
        """Rank 0's ``(error or None, value)``, sent from rank 0 (which passes it) to every rank. An error that
        does not pickle travels as a RuntimeError with its message."""
        if self.is_main:
            error, value = outcome
            try:
                pickle.dumps(outcome)
            except Exception:  # noqa: BLE001 -- anything that does not pickle
                outcome = (RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}") if error else None,
                           None)
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _device(self) -> torch.device:
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def launch_world() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment; ``(0, 1, 0)`` outside torchrun."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them): {err}") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` (the GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; ValueError for another
    name or a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here (use --device cpu, or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _wants_fsdp(mode: str, world_size: int) -> bool:
    if mode not in FSDP_MODES:
        raise ValueError(f"unknown --fsdp {mode!r}; expected one of {', '.join(FSDP_MODES)}")
    if mode == "off" and world_size > 1:
        raise ValueError(f"--fsdp off with {world_size} processes (WORLD_SIZE={world_size}): each would train its "
                         "own copy into the same --out-dir. Launch one process, or shard the model with --fsdp on "
                         "(or auto)")
    return mode == "on" or (mode == "auto" and world_size > 1)


def start_ranks(fsdp: str, device: str) -> tuple[Ranks, torch.device]:
    """The run's :class:`Ranks` and the device of this process, for ``--fsdp`` ``fsdp`` and ``--device``
    ``device``. Sharded runs join the process group torchrun describes (or one already started, which is then
    left running), NCCL with ``cuda:LOCAL_RANK`` on GPUs, gloo on the CPU; ``--fsdp on`` outside torchrun starts
    a group of one process. Unsharded runs get :func:`resolve_device`'s device."""
    rank, world_size, local_rank = launch_world()
    if not _wants_fsdp(fsdp, world_size):
        return Ranks(), resolve_device(device)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device} with --fsdp: each rank takes cuda:LOCAL_RANK on GPUs; pass --device "
                         "auto, cuda or cpu")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    resolve_device("cuda" if on_gpu else "cpu")  # a clear error where CUDA is asked for and missing
    if on_gpu:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} CUDA "
                             "device(s); launch at most that many processes per node")
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if on_gpu else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        else:  # --fsdp on without torchrun: a group of this process alone
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device_ = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return Ranks(rank, world_size, local_rank, sharded=True, owns_group=owns), device_


def stop_ranks(ranks: Ranks, finished: bool = True) -> None:
    """End the process group :func:`start_ranks` started (a group started by the caller is left running). After
    a ``finished`` run the ranks first wait for each other, so that no rank tears its connections down while
    another still uses them; after an error they do not (the others may never arrive)."""
    if ranks.owns_group and dist.is_initialized():
        if finished and ranks.world_size > 1:
            dist.barrier()
        dist.destroy_process_group()


def sharded_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of the DTensors ``tensors`` taken together (0-d fp32), as of their global values: the squared
    norms of the local shards, summed over the ranks of their device mesh. Each element of a ``Shard``-placed
    tensor lives on one rank; a ``Replicate``-placed one counts once. ValueError for tensors of several meshes or
    of other placements (such as a mix of both)."""
    from torch.distributed.tensor import Replicate, Shard

    meshes = {t.device_mesh for t in tensors}
    if len(meshes) != 1:
        raise ValueError(f"the gradients lie on {len(meshes)} device meshes: their norm needs one")
    mesh = meshes.pop()
    split: list[torch.Tensor] = []
    whole: list[torch.Tensor] = []
    for t in tensors:
        if all(isinstance(p, Shard) for p in t.placements) and mesh.ndim == 1:
            split.append(t.to_local())
        elif all(isinstance(p, Replicate) for p in t.placements):
            whole.append(t.to_local())
        else:
            raise ValueError(f"a gradient has placements {t.placements} on a {mesh.ndim}-d mesh: the global norm "
                             "is computed for Shard or Replicate placements on a 1-d mesh (FSDP2's fully_shard)")
    device = tensors[0].to_local().device

    def squared(parts: list[torch.Tensor]) -> torch.Tensor:
        if not parts:
            return torch.zeros((), dtype=torch.float32, device=device)
        norms = torch._foreach_norm(parts)
        return torch.stack([n.to(device=device, dtype=torch.float32) for n in norms]).square().sum()

    total = squared(split)
    if split:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return (total + squared(whole)).sqrt()
