"""Token geometry: where the grid tokens of a video/image transformer sit in its sequence.

A DiT attends over ``prefix`` text tokens, then the ``T*H*W`` (or ``H*W``) latent tokens in raster
order (last dim fastest), then ``suffix`` text tokens. A multi-view model such as VGGT puts
``frame_prefix`` special tokens (camera, registers) at the start of every frame (every index of the
leading grid dim) instead. In raster order a key block of 128 tokens is a thin strip of one row, so
a 3-D neighbourhood touches many blocks and computes most of them only in part. Permuting the grid
tokens tile by tile (a tile of ``kv_block`` tokens is a compact box) makes blocks boxes: the same
neighbourhood then touches fewer blocks and fills them. The attention op permutes q/k/v into this
order before the kernel and the output back after it.

Kernel order. Without a tile and without per-frame specials the kernel sees the model's order (no
permutation). Otherwise the order is ours, so it is: the grid tokens (in tile order, or in raster
order without a tile) at kernel positions ``[0, G)``, then the prefix text tokens, then the frame
specials (frame by frame), then the suffix text tokens. Text and specials attend everything and are
attended by everything, so where they sit changes only block alignment; put first, a prefix that is
not a multiple of the block size (CogVideoX: 226 text tokens, 64x128 blocks) would shift every tile
across two blocks and lose tile order's gain, and specials left between frames would split blocks
at every frame. ``grid_start``, ``kernel_prefix`` and ``kernel_suffix`` say where grid and text sit
in kernel order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

__all__ = ["TOKEN_ORDERS", "TokenGeometry", "default_tile"]

# The orders a token grid's patterns can be laid out in (``autosparse.layout.grid_order`` chooses).
TOKEN_ORDERS = ("auto", "tile", "raster")


def _int_tuple(owner: str, value: Any, minimum: int = 1) -> tuple[int, ...]:
    """``value`` as a non-empty tuple of ints >= ``minimum``; errors name ``owner``."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{owner} must be a non-empty list of ints >= {minimum}, got {value!r}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or item < minimum:
            raise ValueError(f"{owner}[{i}] must be an int >= {minimum}, got {item!r}")
    return tuple(value)


@dataclass(frozen=True)
class TokenGeometry:
    """The token layout of one attention call: text prefix, grid tokens (with per-frame special
    tokens), text suffix.

    Attributes:
        grid: ``(T, H, W)`` or ``(H, W)``: the grid tokens, in the model's sequence in raster order.
        prefix: text/global tokens before the grid tokens in the sequence.
        suffix: text/global tokens after them.
        tile: ``None``: the kernel sees the grid tokens in raster order. Else it sees them tile by
            tile: tiles in raster order over the tile grid (``ceil(L_d / tile_d)`` tiles per dim,
            the last one per dim partial where ``tile_d`` does not divide ``L_d``; no padding tokens
            are ever added), tokens inside a tile in raster order.
        frame_prefix: special tokens at the start of every frame (every index of ``grid[0]``), as
            VGGT's camera and register tokens: the model's sequence is ``prefix`` text, then per
            frame ``frame_prefix`` specials and the frame's ``prod(grid[1:])`` grid tokens, then
            ``suffix`` text. Specials are global tokens, like text.

    Kernel order (what ``permutation()`` gives and block layouts are laid out in): without a tile
    and without frame specials, the model's order (``prefix`` text, grid in raster order, ``suffix``
    text). Otherwise (``permuted``) the grid tokens first, in tile order (raster order without a
    tile), at kernel positions ``[0, grid_tokens)`` (from a block boundary), then the ``prefix``
    text tokens, then the frame specials frame by frame, then the ``suffix`` text tokens: in kernel
    order all text is a suffix (``kernel_prefix == 0``, ``kernel_suffix == text_tokens``,
    ``grid_start == 0``).
    """

    grid: tuple[int, ...]
    prefix: int = 0
    suffix: int = 0
    tile: tuple[int, ...] | None = None
    frame_prefix: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", _int_tuple("TokenGeometry.grid", self.grid))
        for name in ("prefix", "suffix", "frame_prefix"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TokenGeometry.{name} must be an int >= 0, got {value!r}")
        if self.tile is not None:
            tile = _int_tuple("TokenGeometry.tile", self.tile)
            if len(tile) != len(self.grid):
                raise ValueError(f"TokenGeometry.tile {tile} must have one entry per grid dim {self.grid}")
            object.__setattr__(self, "tile", tile)

    @property
    def grid_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def frame_specials(self) -> int:
        """Special tokens of all frames: ``grid[0] * frame_prefix``."""
        return self.grid[0] * self.frame_prefix

    @property
    def text_tokens(self) -> int:
        """Tokens outside the grid (text and frame specials): dense in every head."""
        return self.prefix + self.frame_specials + self.suffix

    @property
    def length(self) -> int:
        """The whole sequence: text prefix, grid tokens and frame specials, text suffix."""
        return self.grid_tokens + self.text_tokens

    @property
    def has_text(self) -> bool:
        return self.text_tokens > 0

    @property
    def permuted(self) -> bool:
        """Whether the kernel order differs from the model's (a tile, or frame specials to gather)."""
        return self.tile is not None or self.frame_prefix > 0

    @property
    def grid_start(self) -> int:
        """Kernel position of the first grid token: ``prefix`` in the model's order, 0 when
        ``permuted``. The grid tokens occupy kernel positions ``[grid_start, grid_start + grid_tokens)``."""
        return 0 if self.permuted else self.prefix

    @property
    def kernel_prefix(self) -> int:
        """Text tokens before the grid in kernel order: ``prefix`` in the model's order, 0 when ``permuted``."""
        return 0 if self.permuted else self.prefix

    @property
    def kernel_suffix(self) -> int:
        """Text tokens after the grid in kernel order: ``suffix`` in the model's order, ``text_tokens``
        when ``permuted`` (the prefix text, then the frame specials, then the suffix text)."""
        return self.text_tokens if self.permuted else self.suffix

    def with_tile(self, tile: tuple[int, ...] | None) -> TokenGeometry:
        return replace(self, tile=tile)

    def order(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Long ``[grid_tokens]``: ``order[p]`` is the raster index (over the grid tokens alone,
        frame specials not counted) of the grid token the kernel sees at grid position ``p``, i.e.
        kernel position ``grid_start + p`` (the identity without a tile). Cached: do not modify."""
        return _orders(self, str(torch.device(device))).order

    def coords(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Long ``[grid_tokens, ndim]``: grid coordinates of the token at each grid position ``p``
        (kernel position ``grid_start + p``)."""
        return _orders(self, str(torch.device(device))).coords

    def permutation(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Long ``[length]`` for the whole sequence, ``None`` unless ``permuted``:
        ``x_kernel = x.index_select(seq_dim, permutation)``; ``permutation[i]`` is the model position
        of the token at kernel position ``i``: the grid tokens in tile (or raster) order, then the
        prefix text, the frame specials and the suffix text (see the class docstring). Cached: do
        not modify."""
        return _orders(self, str(torch.device(device))).permutation

    def inverse_permutation(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Long ``[length]``, ``None`` unless ``permuted``: ``out = out_kernel.index_select(seq_dim, inverse)``;
        ``inverse[j]`` is the kernel position of the token at model position ``j``. Cached: do not modify."""
        return _orders(self, str(torch.device(device))).inverse

    def query_rows(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Int32 ``permutation``, ``None`` unless ``permuted``: the kernel's ``q_rows`` (it reads each
        query from, and writes its output to, the token's model position). Cached: do not modify."""
        return _orders(self, str(torch.device(device))).query_rows


class _Orders(NamedTuple):
    order: torch.Tensor
    coords: torch.Tensor
    permutation: torch.Tensor | None
    inverse: torch.Tensor | None
    query_rows: torch.Tensor | None


@functools.lru_cache(maxsize=64)
def _orders(tokens: TokenGeometry, device: str) -> _Orders:
    """All index maps of one geometry, built once per device (the op permutes on every call)."""
    order = _tile_order(tokens.grid, tokens.tile).to(device)
    strides = [math.prod(tokens.grid[d + 1 :]) for d in range(len(tokens.grid))]
    coords = torch.stack([(order // s) % n for s, n in zip(strides, tokens.grid)], dim=1)
    if not tokens.permuted:
        return _Orders(order, coords, None, None, None)
    # Kernel order: grid tokens in tile order, then the prefix text, the frame specials, the suffix text.
    # In the model's order frame f is its frame_prefix specials, then its grid tokens.
    per_frame = tokens.grid_tokens // tokens.grid[0]
    stride = tokens.frame_prefix + per_frame
    frame_start = tokens.prefix + torch.arange(tokens.grid[0], device=device) * stride
    grid = frame_start[order // per_frame] + tokens.frame_prefix + order % per_frame
    specials = (frame_start[:, None] + torch.arange(tokens.frame_prefix, device=device)).flatten()
    grid_end = tokens.prefix + tokens.grid_tokens + tokens.frame_specials
    permutation = torch.cat([grid, torch.arange(tokens.prefix, device=device), specials,
                             torch.arange(grid_end, tokens.length, device=device)])
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(tokens.length, device=device)
    return _Orders(order, coords, permutation, inverse, permutation.to(torch.int32))


def _tile_order(grid: tuple[int, ...], tile: tuple[int, ...] | None) -> torch.Tensor:
    """Raster indices of the grid tokens in tile order. The grid is padded up to whole tiles with
    ``-1`` entries only to reshape it into ``[tiles_0, tile_0, tiles_1, tile_1, ...]``; bringing the
    tile-grid axes first and dropping the ``-1`` entries leaves each partial tile's tokens, in order."""
    raster = torch.arange(math.prod(grid))
    if tile is None:
        return raster
    tiles = [-(-n // t) for n, t in zip(grid, tile)]
    padded = torch.full([n * t for n, t in zip(tiles, tile)], -1, dtype=torch.long)
    padded[tuple(slice(0, n) for n in grid)] = raster.view(grid)
    split = padded.view([size for pair in zip(tiles, tile) for size in pair])
    ndim = len(grid)
    tiled = split.permute([2 * d for d in range(ndim)] + [2 * d + 1 for d in range(ndim)]).reshape(-1)
    return tiled[tiled >= 0]


def default_tile(ndim: int, kv_block: int) -> tuple[int, ...]:
    """A tile of exactly ``kv_block`` tokens (a power of two) for an ``ndim``-D grid.

    Factors of two are dealt round robin, the last dim first: to the spatial dims (the last two)
    until each is 8, then to the leading (time) dims until each is 8, then to every dim. Spatial
    first because latent grids are wide in space and short in time (Wan: 21x30x52), and windows
    are wide in space; a box of 8x8 keeps a key block within a few rows of a query's window.
    3-D: 64 -> (1, 8, 8), 128 -> (2, 8, 8), 256 -> (4, 8, 8); 2-D: 64 -> (8, 8), 128 -> (8, 16),
    256 -> (16, 16); 1-D: (kv_block,). (Wan's 21x30x52 grid, window (4, 16, 16), stride (2, 8, 8),
    64x128 blocks: tile (2, 8, 8) computes 0.106 of the blocks, raster order 0.122. Small windows can
    do better in raster order; the runtime builds both and keeps the cheaper.)
    """
    if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
        raise ValueError(f"default_tile: ndim must be an int >= 1, got {ndim!r}")
    if isinstance(kv_block, bool) or not isinstance(kv_block, int) or kv_block < 1 or kv_block & (kv_block - 1):
        raise ValueError(f"default_tile: kv_block must be a power of two, got {kv_block!r}")
    last_first = list(range(ndim - 1, -1, -1))
    phases = ((last_first[:2], 8), (last_first[2:], 8), (last_first, kv_block))
    tile = [1] * ndim
    for dims, cap in phases:
        while math.prod(tile) < kv_block and any(tile[d] < cap for d in dims):
            for d in dims:
                if tile[d] < cap and math.prod(tile) < kv_block:
                    tile[d] *= 2
    return tuple(tile)
