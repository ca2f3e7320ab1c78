"""A layer's per-head patterns at one step, with the summaries every call reads."""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

from autosparse.patterns import Pattern

__all__ = ["HeadSet"]

_HEAD_SETS: weakref.WeakValueDictionary[tuple, HeadSet] = weakref.WeakValueDictionary()


@dataclass(frozen=True, eq=False)
class HeadSet:
    """The per-head patterns of one layer at one step, one object per distinct tuple of patterns
    (``HeadSet.of``: hashed by identity, it keys call plans cheaply, and layers with the same
    patterns share plans); its summaries are computed once: they are read on every call.

    ``whole``: for a Ulysses rank's slice of a layer's heads, the layer's whole set. The token
    order a grid is laid out in is the whole layer's (``layer_patterns`` choose it): a slice's
    heads then mean what they mean in the single-process call, whichever heads share their rank."""

    patterns: tuple[Pattern, ...]
    whole: HeadSet | None = None

    @classmethod
    def of(cls, patterns: tuple[Pattern, ...], whole: HeadSet | None = None) -> HeadSet:
        key = (patterns, whole)
        heads = _HEAD_SETS.get(key)
        if heads is None:
            heads = _HEAD_SETS.setdefault(key, cls(patterns, whole))
        return heads

    @property
    def layer_patterns(self) -> tuple[Pattern, ...]:
        """The patterns of every head of the layer (``whole``'s for a slice)."""
        return self.patterns if self.whole is None else self.whole.patterns

    @functools.cached_property
    def is_dense(self) -> bool:
        return all(p.is_dense for p in self.patterns)

    @functools.cached_property
    def needs_grid(self) -> bool:
        return any(p.needs_grid for p in self.patterns)

    @functools.cached_property
    def dynamic_heads(self) -> dict[Pattern, tuple[int, ...]]:
        """The heads of each dynamic pattern (layout estimated per call from q and k)."""
        heads: dict[Pattern, list[int]] = {}
        for h, p in enumerate(self.patterns):
            if p.is_dynamic:
                heads.setdefault(p, []).append(h)
        return {p: tuple(hs) for p, hs in heads.items()}

    @functools.cached_property
    def dense_heads(self) -> tuple[int, ...]:
        """Heads whose pattern is dense, in a set that also has sparse heads (else empty)."""
        dense = tuple(h for h, p in enumerate(self.patterns) if p.is_dense)
        return dense if len(dense) < len(self.patterns) else ()
