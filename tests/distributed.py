"""Running a test function on several CPU processes joined in a gloo process group.

``run_ranks(worker, world_size, *args)`` spawns ``world_size`` processes; each sets the torchrun environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), joins a gloo group, calls ``worker(rank, world_size,
*args)`` and sends its return value back (serialized with ``torch.save``). ``worker`` must be a module-level
function of an importable module (a test module is). A failure in any rank raises here with that
rank's traceback; a rank that hangs is killed after ``timeout`` seconds. Each rank imports ``conftest`` (the
Triton interpreter's fixes; ``TRITON_INTERPRET`` itself comes through the environment).
"""

from __future__ import annotations

import io
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_ranks", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, results, worker, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import conftest  # noqa: F401  (the Triton interpreter's float-cast fix, as in the pytest process)

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            # serialized here, by value: a tensor sent as it is travels as shared memory whose file descriptor the
            # receiver fetches from this process, which has exited by then
            buffer = io.BytesIO()
            torch.save(worker(rank, world_size, *args), buffer)
            results.put((rank, "ok", buffer.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(worker, world_size: int, *args, timeout: float = 240.0) -> list:
    """``[worker(0, world_size, *args), ..., worker(world_size - 1, ...)]``, each computed in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(rank, world_size, port, results, worker, args), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    errors = []
    try:
        while len(out) + len(errors) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"{world_size - len(out)} of {world_size} ranks did not finish in {timeout} s; "
                                   f"errors so far: {errors}") from None
            if status == "ok":
                out[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the other ranks may now wait forever in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("a rank failed\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]
