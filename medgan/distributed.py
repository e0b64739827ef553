"""Rank and world size, read once; process-group setup that never falls into MPI discovery.

Everything else asks :class:`DistributedContext` (``context.is_main``) instead of reading the environment.
"""

from __future__ import annotations

import atexit
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from data_prep.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DistributedContext:
    """Where this process sits in the job. ``is_main`` guards every rank-0 side effect."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launched_by_a_launcher() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def read_context() -> DistributedContext:
    """The launcher's variables (deepspeed, torchrun, srun-started launchers), or a 1-rank job."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # torchrun sets LOCAL_WORLD_SIZE; DeepSpeed's launcher sets LOCAL_SIZE
    local_world_size = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world_size)))
    return DistributedContext(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world_size,
        local_world_size=int(local_world_size),
    )


def set_thread_share(context: DistributedContext) -> int:
    """Give each local rank its share of the CPU cores (torch defaults every rank to all of them, which
    oversubscribes the machine when several ranks share it). Returns the thread count set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, context.local_world_size))
    torch.set_num_threads(threads)
    return threads


def _shared_memory_buffer() -> Path:
    """The /dev/shm segment DeepSpeed's CPU all-reduce makes for this rank (66 MB, named after the
    master's address and port; see deepspeed/ops/csrc/cpu/comm/shm.cpp). DeepSpeed never removes it."""
    name = "_".join(
        ["deepspeed_allreduce_buffer", str(os.getuid()), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]]
    )
    return Path("/dev/shm") / f"{name}_{os.environ['RANK']}"


def _remove_shared_memory_buffer(path: Path) -> None:
    path.unlink(missing_ok=True)


def init_distributed() -> DistributedContext:
    """Initialise the default process group once: NCCL on GPUs, gloo on the CPU.

    Without launcher variables (``python -m medgan --mode train``) a 1-rank group on a free local port is
    set up here, because ``deepspeed.init_distributed()`` would otherwise try MPI discovery.
    """
    import deepspeed

    if not _launched_by_a_launcher():
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1"
        )
        os.environ["MASTER_PORT"] = str(_free_port())
    context = read_context()
    if torch.cuda.is_available():
        torch.cuda.set_device(context.local_rank)
    if not torch.cuda.is_available():
        # A stale buffer from an earlier run on the same port would be opened by the other ranks as if it
        # were this run's, before this rank rewrites it; every rank removes its own before the rendezvous,
        # and again at exit (mapped segments stay valid for processes that have them open).
        buffer = _shared_memory_buffer()
        _remove_shared_memory_buffer(buffer)
        atexit.register(_remove_shared_memory_buffer, buffer)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return context


def max_over_ranks(value: float) -> float:
    """The largest ``value`` over the ranks (one all-reduce), on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def all_ranks_agree(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (one all-reduce; used to stop together)."""
    return max_over_ranks(1.0 if flag else 0.0) > 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def all_gather_objects(value: object) -> list[object]:
    """Every rank's ``value``, in rank order (a list of one without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def run_on_main(work: Callable[[], T], timeout: timedelta, what: str) -> T:
    """Rank 0 runs ``work`` while the other ranks wait for it, up to ``timeout`` (longer than the process
    group's, which only bounds training's own collectives); every rank returns rank 0's result.

    A UserError on rank 0 is raised again on every rank; any other failure there is re-raised on rank 0
    and reported by the others as a UserError naming ``what``; so is a wait longer than ``timeout``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    # a gloo side group: its own (long) timeout, and it works whatever the training backend is
    group = dist.new_group(backend="gloo", timeout=timeout)
    rank = dist.get_rank()
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if rank == 0:
        try:
            payload = [("ok", work())]
        except UserError as error:
            failure, payload = error, [("user_error", str(error))]
        except BaseException as error:
            failure, payload = error, [("failed", f"{type(error).__name__}: {error}")]
    try:
        dist.broadcast_object_list(payload, src=0, group=group)
    except RuntimeError as error:
        reason = str(error).splitlines()[0][:200]
        if rank == 0:
            raise UserError(
                f"rank 0 could {what}, but the other ranks had stopped waiting after {timeout} ({reason})"
            ) from None
        raise UserError(f"rank {rank} waited {timeout} for rank 0 to {what} and gave up ({reason})") from None
    finally:
        dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    status, value = payload[0]
    if status == "user_error":
        raise UserError(value)
    if status == "failed":
        raise UserError(f"rank 0 failed to {what}: {value}")
    return value
