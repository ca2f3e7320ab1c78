"""What each head attends: patterns (small frozen dataclasses that produce a block mask for a
geometry), over a 1-D sequence (``basic``), a video/image token grid (``grid``), or estimated per
call from q and k (``dynamic``); and the token geometry they are laid out on (``geometry``)."""

from autosparse.patterns.geometry import TokenGeometry, default_tile
from autosparse.patterns.basic import (MAX_PATTERN_DEPTH, BlockGeometry, Blocks, Dense, Global, Pattern, SinkLocal,
                                       Union, Window, pattern_from_spec, register_pattern, registered_kinds)
from autosparse.patterns.grid import GridPattern, Neighborhood, Spatial, Stripes, Temporal, window_mask
from autosparse.patterns.dynamic import BlockCdf, BlockTopK, DynamicPattern, VerticalSlash

__all__ = ["MAX_PATTERN_DEPTH", "BlockCdf", "BlockGeometry", "BlockTopK", "Blocks", "Dense", "DynamicPattern", "Global",
           "GridPattern", "Neighborhood", "Pattern", "SinkLocal", "Spatial", "Stripes", "Temporal", "TokenGeometry",
           "Union", "VerticalSlash", "Window", "default_tile", "pattern_from_spec", "register_pattern",
           "registered_kinds", "window_mask"]
