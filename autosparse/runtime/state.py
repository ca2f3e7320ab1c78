"""What a patched model carries while it runs: its counts, settings and guard, and per thread the
context of the forward call in flight (token geometry, denoising step, this forward's mask verdict)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from autosparse.guard import Guard
from autosparse.patterns.geometry import TokenGeometry

__all__ = ["AttentionStats", "CallContext", "PatchState"]

log = logging.getLogger("autosparse")


@dataclass
class AttentionStats:
    """Attention calls since patching.

    ``sparse``: served by the block-sparse kernel. ``dense``: run dense by design (the profile is
    dense for every head of the layer, a decode step, cross-attention), by reason. ``fallback``: run
    dense because the kernel could not serve the call exactly, by reason (``strict=True`` raises).
    """

    sparse: int = 0
    dense: Counter[str] = field(default_factory=Counter)
    fallback: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.sparse + sum(self.dense.values()) + sum(self.fallback.values())

    def __str__(self) -> str:
        parts = [f"sparse={self.sparse}"]
        parts += [f"dense[{reason}]={n}" for reason, n in sorted(self.dense.items())]
        parts += [f"fallback[{reason}]={n}" for reason, n in sorted(self.fallback.items())]
        return "AttentionStats(" + ", ".join(parts) + ")"


@dataclass
class CallContext:
    """What the model's current forward call says about its attention calls (one per thread): the
    token geometry of the attention sequence (None: unknown, only 1-D patterns apply), the
    denoising step, and what the step is counted from (see ``advance``); plus the padding-mask
    verdict of this forward, reused by its later layers."""

    tokens: TokenGeometry | None = None
    step: int | None = None
    timestep: float | None = None
    repeats: int = 0  # calls seen at ``timestep``
    per_step: int | None = None  # calls per timestep at this generation's first step (classifier-free guidance: 2)
    # The same padding mask reaches every layer of one forward (eagerly the same object; in a compiled
    # graph a view of the same buffer per layer): classify it once. (weakref to the base, view key, layer, verdict)
    mask_seen: tuple[Any, tuple, int, Any] | None = None

    def advance(self, timestep: float) -> None:
        """Count the denoising step of a call at ``timestep``. Denoising runs from high to low
        timesteps: a lower one is the next step; the same one again is classifier-free guidance's
        next call of this step, until it repeats more often than the generation's first step did;
        a higher one, or such a repeat, starts a new generation at step 0."""
        previous = self.timestep
        new_generation = (previous is None or self.step is None or timestep > previous
                          or (timestep == previous and self.per_step is not None and self.repeats >= self.per_step))
        if new_generation:
            self.step, self.repeats, self.per_step = 0, 1, None
        elif timestep < previous:
            if self.per_step is None:
                self.per_step = self.repeats
            self.step, self.repeats = self.step + 1, 1
        else:
            self.repeats += 1
        self.timestep = timestep


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.context = CallContext()


@dataclass
class PatchState:
    """One patched model: counts, strictness, the guard, the current call's context (per thread:
    two threads may run the same model), and for transformers models the attention implementation
    it had (what calls autosparse cannot serve run)."""

    strict: bool
    guard: Guard | None = None
    stats: AttentionStats = field(default_factory=AttentionStats)
    original_implementation: str | None = None
    # Calibration (autosparse.search): sees every served call's q/k/v before it is served.
    observer: Any = None
    # Sparse decode (runtime.decode): the policy (None: decode runs dense) and, for page top-k, each
    # layer's page statistics of the sequence being generated.
    decode: Any = None
    pages: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _local: _PerThread = field(default_factory=_PerThread, repr=False, compare=False)

    @property
    def context(self) -> CallContext:
        return self._local.context

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy: counts and settings, no call in flight
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "observer", "pages")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, observer=None, pages={}, _local=_PerThread())

    def count_fallback(self, where: str, reason: str) -> None:
        if self.strict:
            raise RuntimeError(f"autosparse cannot serve attention in {where}: {reason} (strict=True)")
        log.debug("%s: dense fallback: %s", where, reason)
        self.stats.fallback[reason] += 1
