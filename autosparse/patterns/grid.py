"""Grid patterns: N-D neighbourhoods over the token grid of video/image diffusion transformers.

A grid pattern says, per grid dimension, which key coordinates a query coordinate may see; a query
token attends a key token iff every dimension allows it. That separable rule covers NATTEN's
neighbourhoods (with stride and dilation), same-frame and same-position-across-frames heads, and
stripes such as the first frame; ``Union`` mixes them. Like every pattern it means a set of blocks,
laid out on ``BlockGeometry.tokens``' kernel order: the grid tokens (in its tile order, if any) from
kernel position ``tokens.grid_start``; text tokens are excluded here (the layout makes them dense).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from autosparse.patterns.basic import BlockGeometry, Pattern, _check_int, register_pattern
from autosparse.patterns.geometry import _int_tuple

__all__ = ["GridPattern", "Neighborhood", "Spatial", "Stripes", "Temporal", "window_mask"]

# Memory one chunk of query blocks may take in ``GridPattern.block_mask``: its grid occupancy and
# the contraction's temporaries (HunyuanVideo's 118,800 tokens: 141 query blocks per chunk).
MAX_CHUNK_BYTES = 256 * 1024 * 1024


def window_mask(
    length: int, window: int, stride: int = 1, dilation: int = 1, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool ``[length, length]``: row = query coordinate, columns = the key coordinates it sees along
    one dim, under NATTEN's neighbourhood rule with stride and dilation (GNA).

    Coordinates split into ``dilation`` groups by residue ``i % dilation``; a window lives in its
    query's group (group index ``j = i // dilation``, ``Lg`` coordinates, window ``min(window, Lg)``).
    Queries in a run of ``stride`` group indices share the window of the run's centre
    ``lead = (j // stride) * stride + stride // 2`` (the right one of two centres when ``stride`` is
    even, as NATTEN picks; at most ``Lg - 1``). The window starts at
    ``clamp(lead - window // 2, 0, Lg - window)``: at the borders it shifts inside rather than
    shrinking, so every query sees exactly ``min(window, Lg)`` keys. With ``stride`` equal to the
    tile's size along the dim and ``window`` an odd multiple of it (no dilation, the dim a multiple
    of the tile), every window is whole tiles: the layout has full blocks only.
    """
    coord = torch.arange(length, device=device)
    residue, index = coord % dilation, coord // dilation
    group_len = (length - residue + dilation - 1) // dilation
    size = group_len.clamp(max=window)
    lead = torch.minimum((index // stride) * stride + stride // 2, group_len - 1)
    start = torch.minimum((lead - size // 2).clamp(min=0), group_len - size)
    same_group = residue[:, None] == residue[None, :]
    return same_group & (index[None, :] >= start[:, None]) & (index[None, :] < (start + size)[:, None])


def _all_keys(length: int, device: torch.device | str) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device)


@dataclass(frozen=True)
class GridPattern(Pattern):
    """Base class of the separable grid rules. Subclasses implement ``rank_error`` (or
    ``grid_error``) and ``dim_masks``; the base lays the rule out in blocks, exactly."""

    @property
    def needs_grid(self) -> bool:
        return True

    def rank_error(self, rank: int, grid: tuple[int, ...] | None = None) -> str | None:
        """Why the pattern cannot be laid out on a ``rank``-D grid (``grid``, if the call's is known;
        None: any grid of the model), or None. None here: a subclass that only implements
        ``grid_error`` is checked per call."""
        return None

    def grid_error(self, grid: tuple[int, ...]) -> str | None:
        """Why the pattern cannot be laid out on ``grid`` (e.g. its window has other dims), or None."""
        return self.rank_error(len(grid), grid)

    def unfit(self, geometry: BlockGeometry) -> str | None:
        if geometry.tokens is None:
            return f"{self.kind} needs a token grid (BlockGeometry.tokens, non-causal), got None"
        return self.grid_error(geometry.tokens.grid)

    def unfit_layer(self, causal: bool, grid_rank: int | None) -> str | None:
        if grid_rank is None:
            return f"{self.kind} needs a token grid, and this model's attention calls have none"
        return self.rank_error(grid_rank)

    def dim_masks(self, grid: tuple[int, ...], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Per grid dim ``d`` a bool ``[L_d, L_d]``: row = query coordinate, column = key coordinate."""
        raise NotImplementedError(f"{type(self).__name__} must implement dim_masks")

    def block_mask(self, geometry: BlockGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
        """A block pair is attended iff a grid query of the query block sees a grid key of the key
        block; text positions attend nothing here."""
        reason = self.unfit(geometry)
        if reason is not None:
            raise ValueError(reason)
        return _grid_block_mask(self.dim_masks(geometry.tokens.grid, device), geometry, device)


def _grid_block_mask(masks: list[torch.Tensor], geometry: BlockGeometry, device: torch.device | str) -> torch.Tensor:
    """``[NQ, NK]`` bool of the separable rule ``masks`` without building the token mask.

    Per chunk of query blocks: mark each block's grid queries on the grid (``[chunk, *grid]``),
    contract every dim with its mask (a key's sum over the block's queries of the product of the
    dims' 0/1 entries is positive iff some query of the block may see it; no cancellation), read the
    reached keys in kernel order and OR them per key block."""
    tokens = geometry.tokens
    n = tokens.grid_tokens
    order = tokens.order(device)
    start = tokens.grid_start  # kernel position of grid position 0 (0 in tile order, text after the grid)
    position = start + torch.arange(n, device=device)  # kernel position of grid position p
    q_block_of, k_block_of = position // geometry.q_block, position // geometry.kv_block
    dim_masks = [m.float() for m in masks]
    mask = torch.zeros(geometry.num_q_blocks, geometry.num_kv_blocks, dtype=torch.bool, device=device)
    first, last = start // geometry.q_block, (start + n - 1) // geometry.q_block
    chunk = max(1, MAX_CHUNK_BYTES // (4 * 4 * n))  # ~4 float32 [chunk, n] arrays live at once
    for b0 in range(first, last + 1, chunk):
        b1 = min(b0 + chunk, last + 1)
        grid_rows = slice(max(b0 * geometry.q_block - start, 0), min(b1 * geometry.q_block - start, n))
        reached = torch.zeros(b1 - b0, n, device=device)
        reached[q_block_of[grid_rows] - b0, order[grid_rows]] = 1.0
        reached = reached.view(b1 - b0, *tokens.grid)
        for dim_mask in dim_masks:  # contracting dim 1 appends the key dim last: after all, in order
            reached = torch.tensordot(reached, dim_mask, dims=([1], [0]))
        hits = reached.reshape(b1 - b0, n).index_select(1, order)
        per_block = torch.zeros(b1 - b0, geometry.num_kv_blocks, device=device).index_add_(1, k_block_of, hits)
        mask[b0:b1] = per_block > 0
    return mask


def _grid_name(grid: tuple[int, ...] | None) -> str:
    return "the model's token grid" if grid is None else f"BlockGeometry.tokens.grid {grid}"


def _grid_dims_error(owner: str, ndim: int, rank: int, grid: tuple[int, ...] | None) -> str | None:
    if rank == ndim:
        return None
    return f"{owner} is {ndim}-D, but {_grid_name(grid)} is {rank}-D"


@register_pattern
@dataclass(frozen=True)
class Neighborhood(GridPattern):
    """N-D neighbourhood attention (NATTEN / generalized neighbourhood attention): a query sees the
    keys inside its window along every dim, ``window_mask(L_d, window[d], stride[d], dilation[d])``.
    ``stride`` and ``dilation`` default to ones (stored filled in, so specs round-trip stably; a spec
    may leave them out)."""

    kind: ClassVar[str] = "neighborhood"
    window: tuple[int, ...]
    stride: tuple[int, ...] | None = None
    dilation: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        window = _int_tuple("neighborhood.window", self.window)
        object.__setattr__(self, "window", window)
        for name in ("stride", "dilation"):
            value = getattr(self, name)
            value = (1,) * len(window) if value is None else _int_tuple(f"neighborhood.{name}", value)
            if len(value) != len(window):
                raise ValueError(f"neighborhood.{name} {list(value)} must have one entry per window dim {list(window)}")
            object.__setattr__(self, name, value)

    def rank_error(self, rank: int, grid: tuple[int, ...] | None = None) -> str | None:
        return _grid_dims_error(f"neighborhood.window {list(self.window)}", len(self.window), rank, grid)

    def dim_masks(self, grid: tuple[int, ...], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        return [window_mask(*dims, device=device) for dims in zip(grid, self.window, self.stride, self.dilation)]


@register_pattern
@dataclass(frozen=True)
class Spatial(GridPattern):
    """Same-frame attention on a ``(T, H, W)`` grid: every key of the ``frames`` frames centred on
    the query's (``window_mask`` along T, shifted inside at the ends)."""

    kind: ClassVar[str] = "spatial"
    frames: int = 1

    def __post_init__(self) -> None:
        _check_int("spatial", "frames", self.frames, 1)

    def rank_error(self, rank: int, grid: tuple[int, ...] | None = None) -> str | None:
        return _grid_dims_error(f"{self.kind} (a (T, H, W) rule)", 3, rank, grid)

    def dim_masks(self, grid: tuple[int, ...], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        frames, height, width = grid
        return [window_mask(frames, self.frames, device=device), _all_keys(height, device), _all_keys(width, device)]


@register_pattern
@dataclass(frozen=True)
class Temporal(GridPattern):
    """The same spatial neighbourhood in every frame of a ``(T, H, W)`` grid (Sparse-VideoGen's
    temporal heads, Sparse-vDiT's multi-diagonal): all frames, ``window_mask`` along H and W."""

    kind: ClassVar[str] = "temporal"
    window: tuple[int, ...] = (1, 1)

    def __post_init__(self) -> None:
        window = _int_tuple("temporal.window", self.window)
        if len(window) != 2:
            raise ValueError(f"temporal.window must be [h, w], got {list(window)}")
        object.__setattr__(self, "window", window)

    def rank_error(self, rank: int, grid: tuple[int, ...] | None = None) -> str | None:
        return _grid_dims_error(f"{self.kind} (a (T, H, W) rule)", 3, rank, grid)

    def dim_masks(self, grid: tuple[int, ...], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        frames, height, width = grid
        return [_all_keys(frames, device), window_mask(height, self.window[0], device=device),
                window_mask(width, self.window[1], device=device)]


@register_pattern
@dataclass(frozen=True)
class Stripes(GridPattern):
    """Vertical stripes: every query sees the keys whose coordinate along ``dim`` is in ``at`` (e.g.
    the first frame, an attention sink of video models); coordinates past the end are ignored."""

    kind: ClassVar[str] = "stripes"
    dim: int = 0
    at: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        _check_int("stripes", "dim", self.dim, 0)
        object.__setattr__(self, "at", tuple(sorted(set(_int_tuple("stripes.at", self.at, minimum=0)))))

    def rank_error(self, rank: int, grid: tuple[int, ...] | None = None) -> str | None:
        if self.dim < rank:
            return None
        if grid is None:
            return f"stripes.dim {self.dim} is out of range for the model's {rank}-D token grid"
        return f"stripes.dim {self.dim} is out of range for the {rank}-D BlockGeometry.tokens.grid {grid}"

    def dim_masks(self, grid: tuple[int, ...], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        masks = [_all_keys(length, device) for length in grid]
        stripe = torch.zeros(grid[self.dim], dtype=torch.bool, device=device)
        stripe[[c for c in self.at if c < grid[self.dim]]] = True
        masks[self.dim] = stripe[None, :].expand(grid[self.dim], -1)
        return masks
