"""How far a profile holds: beyond the length it was calibrated and validated for, a layer whose
patterns do not scale with length runs dense, counted and logged once."""

from __future__ import annotations

import logging

from autosparse.patterns.basic import Dense, Pattern, SinkLocal, Union, Window

__all__ = ["LENGTH_FREE", "beyond_length", "count_beyond", "scales_with_length"]

log = logging.getLogger("autosparse")

# Patterns whose keys per query do not depend on the sequence length: a window (and sinks) keeps
# the same keys relative to each query however long the sequence grows, so what a profile measured
# for a query holds at any length (the StreamingLLM argument; the longer the sequence the larger the
# share of attention mass it drops, but each query keeps the context it was validated with). Every
# other kind (fixed blocks or global tokens, top-k or mass-fraction estimates, vertical-slash, grid
# neighbourhoods) is defined at the lengths it was measured at: beyond a profile's recorded length a
# layer with any of them runs dense (``beyond_length``).
LENGTH_FREE: tuple[type[Pattern], ...] = (Dense, Window, SinkLocal)


def scales_with_length(pattern: Pattern) -> bool:
    """Whether ``pattern`` means the same attention per query at any sequence length
    (``LENGTH_FREE``, or a union of such patterns)."""
    if isinstance(pattern, Union):
        return all(scales_with_length(member) for member in pattern.of)
    return isinstance(pattern, LENGTH_FREE)


def beyond_length(plan, heads, keys: int) -> str | None:
    """The reason a call with ``keys`` keys runs dense: longer than the profile's recorded length
    (``Profile.length_limit``) while one of the layer's patterns does not scale with length; else None."""
    limit = plan.profile.length_limit()
    if limit is None or keys <= limit[0] or all(scales_with_length(p) for p in heads.patterns):
        return None
    return f"beyond the profile's {limit[1]} length {limit[0]}"


def count_beyond(plan, reason: str, keys: int) -> None:
    """Count a call of ``keys`` keys run dense for ``reason`` (``beyond_length``), logged once per
    patched model and length."""
    stats = plan.state.stats
    if not stats.dense[reason]:
        log.warning("autosparse: calls with %d keys run dense in the layers whose patterns do not scale "
                    "with length (%s; first: %s)", keys, reason, plan.name)
    stats.dense[reason] += 1
