"""What diffusers' context parallelism does to an attention module's calls, read where diffusers
keeps it: the module's processor (``processor._parallel_config``, set by
``transformer.enable_parallelism``), read per call, never baked into a compiled graph.

Facts (diffusers 0.42, ``attention_dispatch.py`` and ``hooks/context_parallel.py``): the model's
``_cp_plan`` cuts each input stream (the latent tokens; FLUX's text as well) into equal pieces, one
per rank of the flattened ``(ring, ulysses)`` mesh (flat rank ``ring_rank * ulysses + ulysses_rank``),
and a joint attention concatenates a rank's pieces in the model's order (FLUX: text, then image).
Ulysses (``TemplatedUlyssesAttention``) swaps sequence for heads with an all-to-all: rank ``u`` then
holds heads ``[u * H / U, (u + 1) * H / U)`` over every rank's pieces, in rank order. Ring
(``TemplatedRingAttention``) keeps its queries and visits the key chunks in the order ``rank, rank
+ 1, ...`` (mod the ring degree), one chunk being ``ulysses`` consecutive pieces. The gathered
sequence is therefore the model's sequence with each segment of its token geometry (text prefix,
grid, text suffix) dealt out piece by piece: ``gathered_positions`` is that order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from autosparse.patterns.geometry import TokenGeometry

__all__ = ["ContextParallel", "context_parallel", "gathered_positions", "segments"]


@dataclass(frozen=True)
class ContextParallel:
    """The context parallelism one attention module runs under: Ulysses and ring degrees and this
    rank's place on each, and whether the pieces are equal (``ulysses_anything`` / ``ring_anything``
    cut streams into unequal pieces, which autosparse does not lay out)."""

    ulysses: int
    ulysses_rank: int
    ring: int
    ring_rank: int
    even: bool = True

    @property
    def pieces(self) -> int:
        """How many pieces each input stream is cut into: one per rank of the flattened mesh."""
        return self.ulysses * self.ring

    def heads(self, num_heads: int, call_heads: int) -> tuple[int, int] | None:
        """``[start, stop)``: the layer's heads a call with ``call_heads`` heads holds: all of them,
        or this Ulysses rank's contiguous slice; None when the call holds neither."""
        if call_heads == num_heads:
            return 0, num_heads
        per_rank = -(-num_heads // self.ulysses)
        start = self.ulysses_rank * per_rank
        if self.ulysses > 1 and call_heads == min(per_rank, num_heads - start) and call_heads > 0:
            return start, start + call_heads
        return None


def context_parallel(module: nn.Module) -> ContextParallel | None:
    """The context parallelism ``module``'s attention processor runs under, None without (or before
    diffusers has set its mesh up)."""
    processor = getattr(module, "processor", None)
    config = getattr(getattr(processor, "_parallel_config", None), "context_parallel_config", None)
    if config is None or config._ulysses_local_rank is None:
        return None
    return ContextParallel(config.ulysses_degree, config._ulysses_local_rank, config.ring_degree,
                           config._ring_local_rank, not (config.ulysses_anything or config.ring_anything))


def segments(tokens: TokenGeometry) -> tuple[int, ...]:
    """The lengths of the streams a CP plan cuts one by one, in the model's order: text prefix,
    grid tokens (with VGGT's frame specials), text suffix; empty ones left out."""
    return tuple(n for n in (tokens.prefix, tokens.grid_tokens + tokens.frame_specials, tokens.suffix) if n)


def gathered_positions(tokens: TokenGeometry, pieces: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Long ``[length]``: ``out[m]`` is the position, in the sequence gathered from ``pieces``
    ranks, of the token at model position ``m``; None when that is the model's order (one segment,
    or one piece). ValueError when a segment does not cut into equal pieces. Cached: do not modify."""
    return _gathered(tokens, pieces, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _gathered(tokens: TokenGeometry, pieces: int, device: str) -> torch.Tensor | None:
    lengths = segments(tokens)
    if pieces == 1 or len(lengths) < 2:
        return None
    if any(n % pieces for n in lengths):
        raise ValueError(f"token segments {lengths} do not cut into {pieces} equal pieces")
    piece = torch.tensor([n // pieces for n in lengths], device=device)  # per segment: one piece's tokens
    before = torch.cumsum(piece, 0) - piece  # a piece's offset inside its rank's share
    out = []
    for s, n in enumerate(lengths):
        position = torch.arange(n, device=device)
        rank, offset = position // piece[s], position % piece[s]
        out.append(rank * int(piece.sum()) + before[s] + offset)
    return torch.cat(out)
