"""Where a training run executes: its device, its place in a torchrun job, and stopping on a signal."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch


class StopOnSignal:
    """While active, SIGINT and SIGTERM only set ``requested``; the loop stops at its next step boundary.

    Only the main thread can install handlers; elsewhere this is inert (signals keep their handlers).
    Further signals while stopping are ignored, so a second Ctrl-C cannot cut the final save in half.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is None:
            self.requested = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the torchrun job described by the environment, if any (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size())


def resolve_device(name: str) -> torch.device:
    """The device ``name`` names; "auto": this process's CUDA device (``LOCAL_RANK``) if any, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def stop_requested(stop: StopOnSignal, dist_info: Distributed, device: torch.device) -> bool:
    """Whether a signal asked to stop; in a torchrun job, whether any rank was asked, so all stop together."""
    wanted = stop.requested is not None
    if dist_info.world_size > 1:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if wanted else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        wanted = bool(flag.item())
    return wanted
