"""Structural profiles: a neighborhood for every head, sized by block density, without calibration.

Sliding Tile Attention's observation, in GNA terms: a window that moves tile by tile (stride = tile)
and spans an odd number of tiles per dim makes every computed block full, so the block density is
the window's own token density (no partial blocks, the speed-of-light case for a block-sparse
kernel). ``tile_window`` picks, for one token grid, the largest such window whose layout stays within
a target block density; ``structural_profile`` puts it on every head, with dense first denoising
steps (the steps that fix the layout of the image are the most sensitive to sparsity).

These profiles are uncalibrated: nothing checked the error on real outputs. A calibrated profile
(``autosparse profile``) chooses per head, under an error budget.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from autosparse.patterns.grid import Neighborhood
from autosparse.layout import BlockLayout
from autosparse.patterns.basic import BlockGeometry
from autosparse.profile import DEFAULT_BLOCK_SIZE, Profile
from autosparse.patterns.geometry import TokenGeometry, default_tile

__all__ = ["tile_window", "structural_profile"]

_MAX_TILES = 15  # odd tile counts tried per dim: 1, 3, ..., 15, and the whole dim


def tile_window(tokens: TokenGeometry, density: float, *, block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
                device: torch.device | str = "cpu") -> tuple[Neighborhood, float]:
    """The tile-stepped neighborhood with the most keys whose block density on ``tokens`` is at most
    ``density``, and that density. Ties in key count go to the more even window (in tiles)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    tile = default_tile(len(tokens.grid), block_size[1])
    tiled = tokens.with_tile(tile)
    geometry = BlockGeometry(tiled.length, tiled.length, *block_size, False, tiled)
    per_dim = [sorted({min(k * t, n) for k in range(1, _MAX_TILES + 1, 2)} | {n}) for n, t in zip(tokens.grid, tile)]

    def rank(window: tuple[int, ...]) -> tuple[int, float]:  # most keys first, then the most even
        tiles = [w / t for w, t in zip(window, tile)]
        return -math.prod(window), max(tiles) / min(tiles)

    def balanced(window: tuple[int, ...]) -> bool:
        """Close to a cube of tiles (STA's windows are 3x3x3 tiles): tile counts differ by at most 2
        between dims."""
        counts = [-(-w // t) for w, t in zip(window, tile)]
        return max(counts) - min(counts) <= 2

    # A window's token share bounds its block density from below: only those can fit, and the
    # first (largest) one whose layout fits wins.
    candidates = [w for w in itertools.product(*per_dim)
                  if math.prod(w) <= density * tokens.grid_tokens and balanced(w)]
    for window in sorted(candidates, key=rank):
        pattern = Neighborhood(window, stride=tile)
        got = BlockLayout.from_patterns([pattern], geometry, device).density()
        if got <= density:
            return pattern, got
    raise ValueError(f"no tile-stepped window reaches block density <= {density} on grid {tokens.grid}")


def structural_profile(model: nn.Module, tokens: TokenGeometry, *, density: float, dense_steps: int = 0,
                       block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE, target: str = "") -> Profile:
    """One ``tile_window`` neighborhood on every served head of ``model`` (text tokens stay dense),
    dense for the first ``dense_steps`` denoising steps. ``target`` names the resolution it was
    sized for (recorded in the profile's metadata)."""
    pattern, got = tile_window(tokens, density, block_size=block_size)
    profile = Profile.uniform(model, pattern, block_size=block_size)
    profile.token_order = "tile"  # the order the window was stepped and sized in
    profile.search = {
        "method": "structural",
        "calibrated": False,
        "note": ("Uncalibrated: a tile-stepped neighborhood (Sliding-Tile / GNA style) on every head, sized for "
                 "block density, not checked against real outputs. Calibrate on your prompts with "
                 "`autosparse profile --factory module:function --dense-steps 10 --out my_profile.json` "
                 "(see examples/dit_factory.py)."),
        "target": target,
        "grid": list(tokens.grid),
        "text_tokens": tokens.text_tokens,
        "pattern": pattern.to_spec(),
        "block_density": round(got, 4),
        "dense_steps": dense_steps,
    }
    return profile.with_dense_steps(dense_steps) if dense_steps else profile
