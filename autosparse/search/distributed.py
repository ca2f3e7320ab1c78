"""A search split over the processes of a ``torch.distributed`` group (``torchrun``, ``accelerate launch``).

Every process is given the same model and the same inputs; process ``rank`` of ``world`` runs inputs
``rank, rank + world, ...`` (a count that does not divide evenly gives some processes one input fewer,
or none), and what each input measured is gathered to every process and combined there in input
order. Combining per input and in input order, whatever the split, is what makes the result the
single-process one bit for bit: a floating-point sum depends on the order of its terms, so summing
per process and then across processes would differ in the last bits, and a head whose error lies
within those bits of the budget could choose another pattern. What must not be repeated per
process (a kernel timed on the GPU: each process would time its own, differently) is measured by
the group's first process and handed to the others.

Only object collectives are used (``all_gather_object``): the data are small (per input and layer a
few ``[heads, candidates]`` float64 tables), and they run on gloo, on NCCL once each process has set
its GPU (``torch.cuda.set_device``), and on a ``"cpu:gloo,cuda:nccl"`` group (carried by gloo).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Share"]

T = TypeVar("T")


@dataclass(frozen=True)
class Share:
    """This process's part of work split over ``group``: inputs ``rank, rank + world, ...``.
    ``Share()`` is a process alone: every input, no communication."""

    rank: int = 0
    world: int = 1
    group: Any = None  # a torch.distributed ProcessGroup

    @classmethod
    def of(cls, group: Any) -> Share:
        """This process's share of ``group`` (None: a process alone)."""
        if group is None:
            return cls()
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised; call torch.distributed.init_process_group() "
                             "first (torchrun and accelerate launch set the environment it reads)")
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of it")
        return cls(rank, dist.get_world_size(group), group)

    @property
    def first(self) -> bool:
        """Whether this is the group's first process (the one that writes results and times kernels)."""
        return self.rank == 0

    def indices(self, count: int) -> list[int]:
        """The indices of this process's inputs among ``count``, ascending."""
        return list(range(self.rank, count, self.world))

    def gather(self, value: T) -> list[T]:
        """Every process's ``value``, by rank (every process must call it)."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value, group=self.group)
        return values

    def by_input(self, mine: dict[int, T], count: int) -> list[T]:
        """Per input, in input order, the value of the process that ran it; ``mine``: this
        process's values by input index."""
        merged: dict[int, T] = {}
        for values in self.gather(mine):
            merged.update(values)
        return [merged[i] for i in range(count)]

    def from_first(self, make: Callable[[], T]) -> T:
        """``make()`` of the first process, on every process; the others do not call it."""
        return self.gather(make() if self.first else None)[0]

    def check_same(self, inputs: Sequence[Any], what: str) -> None:
        """ValueError unless every process holds the same ``inputs`` (count, shapes, dtypes, bytes):
        processes given different inputs (a factory's unseeded random latents) would merge
        measurements of different data into one result."""
        if self.world == 1:
            return
        mine = [_fingerprint(x) for x in inputs]
        for rank, theirs in enumerate(self.gather(mine)):
            if theirs == mine:
                continue
            differ = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
            found = (f"input {differ} differs" if differ is not None
                     else f"{len(theirs)} inputs, this process {len(mine)}")
            raise ValueError(f"{what}: process {rank} of the group has other ones than process {self.rank} ({found}); "
                             "every process must make the same inputs (seed their random tensors)")


def _fingerprint(value: Any) -> Any:
    """What identifies an input across processes: each tensor's shape, dtype and a digest of its
    bytes; plain values themselves; other objects by type (their repr may hold an address)."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().flatten().view(torch.uint8).numpy()
        return ("tensor", tuple(value.shape), str(value.dtype), hashlib.blake2b(data, digest_size=16).hexdigest())
    if isinstance(value, dict):
        return {key: _fingerprint(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__
