"""Preemption: a signal asks every rank to stop at the same step boundary.

SLURM sends SIGUSR1 ahead of a preemption or time limit (``slurm/train.sbatch``,
``--signal``), a scheduler or a user SIGTERM. The signal may reach one rank or all of
them, at different moments of a step, so each rank only notes it (``StopRequest``) and
the ranks agree on the step to stop at (``StopAgreement``).

The agreement costs no host sync of its own. At every step boundary each rank's flag
goes into an asynchronous all-reduce (MAX), and the result of the previous boundary's
all-reduce is read, which finished long ago: on CPU the gloo work is waited for, on a
GPU the result was copied to pinned host memory behind the reduction and the copy's
event has passed, because torchtitan's train step reads the global token count from
the device (``.item()``) at its start. All ranks read the same reduced flags at the
same boundary, so they stop at the same step, one step after the signal at most.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist
from torchtitan.tools.logging import logger

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The first preemption signal this process received (a flag; the step or save under
    way runs to completion and later signals change nothing)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum
            logger.warning(f"{signal.Signals(signum).name}: stopping at the next step boundary with a checkpoint")


class StopAgreement:
    """Whether any rank has asked to stop, decided at the same step boundary on every rank."""

    def __init__(self, request: StopRequest, device: torch.device):
        self.request = request
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._on_host = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._pending = None

    def any_rank_stopped(self) -> bool:
        if not self.distributed:
            return self.request.signal is not None
        stop = self._read_previous()
        self._flag.fill_(int(self.request.signal is not None))  # a kernel, not a host-to-device copy
        work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
        if self._flag.device.type == "cuda":
            work.wait()  # orders the copy after the reduction on the stream; the host does not wait
            self._on_host.copy_(self._flag, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            self._pending = ready
        else:
            self._pending = work
        return stop

    def _read_previous(self) -> bool:
        if self._pending is None:
            return False
        if isinstance(self._pending, torch.cuda.Event):
            self._pending.synchronize()
            return bool(self._on_host.numpy()[0])  # host memory: no device sync
        self._pending.wait()
        return bool(self._flag.numpy()[0])

    def close(self) -> None:
        """Let an all-reduce still in flight finish before the process group goes."""
        self._read_previous()
        self._pending = None
