"""Several processes joined by ``torch.distributed`` on one machine (gloo: CPUs, as in CI), and the
one workaround diffusers' context parallelism needs on a machine without an accelerator.

diffusers 0.42 places rank ``r`` on ``torch.device(accelerator, r % torch.accelerator.device_count())``
in ``ModelMixin._resolve_parallel_config``; without an accelerator the type is ``"cpu"`` and the
count 0, so ``enable_parallelism`` divides by zero before anything else runs. Everything after that
(the device mesh on ``"cpu"``, the all-to-all and all-gathers over gloo) works on CPUs as it is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
import torch.multiprocessing as mp

__all__ = ["one_cpu_device", "spawn"]


def spawn(worker: Callable[..., None], world: int, init_method: str, *args: Any, timeout_s: float = 240.0) -> None:
    """Run ``worker(rank, world, init_method, *args)`` on ``world`` fresh processes (``spawn``: no
    state inherited); RuntimeError if any raises, or if they are not all done in ``timeout_s`` (a
    process that never reaches a collective leaves the others waiting: they are ended then)."""
    context = mp.start_processes(worker, args=(world, init_method, *args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            raise RuntimeError(f"{world} processes did not finish in {timeout_s:.0f} s")


@contextlib.contextmanager
def one_cpu_device() -> Iterator[None]:
    """While set up for context parallelism (``transformer.enable_parallelism``), a machine without
    an accelerator counts one device, the CPU, so diffusers' ``rank % device_count()`` is 0."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
        yield
