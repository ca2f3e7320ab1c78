"""Token grids and grid patterns: tile order, every kind's layout against a token-level definition
written independently of ``dim_masks`` (in the form of NATTEN's reference mask), block densities,
and the kernel on a tiled layout (PyTorch path, and Triton under its interpreter) against two
oracles: float64 dense attention on the brute-force mask, and FlexAttention."""

from __future__ import annotations

import itertools
import json
import math
import sys

import pytest
import torch

from autosparse import (BlockGeometry, BlockLayout, Dense, Global, Neighborhood, Spatial, Stripes, Temporal,
                        TokenGeometry, Union, Window, default_tile, pattern_from_spec)
from autosparse.patterns.grid import window_mask
from autosparse.kernels import block_sparse_attention_torch
from autosparse.testing.reference import attention, in_model_order
from autosparse.testing.interpreter import run_interpreted



def geometry(tokens: TokenGeometry, q_block: int, kv_block: int) -> BlockGeometry:
    return BlockGeometry(tokens.length, tokens.length, q_block, kv_block, causal=False, tokens=tokens)


def raster_index(coord: tuple[int, ...], grid: tuple[int, ...]) -> int:
    index = 0
    for c, n in zip(coord, grid):
        index = index * n + c
    return index


# --------------------------------------------------------------------------------------------------
# tile order
# --------------------------------------------------------------------------------------------------
def brute_tile_order(grid: tuple[int, ...], tile: tuple[int, ...]) -> list[int]:
    """Raster indices sorted by (tile coordinate, coordinate): tiles in raster order, then raster
    order inside each tile."""
    coords = itertools.product(*(range(n) for n in grid))
    ordered = sorted(coords, key=lambda c: (tuple(x // t for x, t in zip(c, tile)), c))
    return [raster_index(c, grid) for c in ordered]


def model_positions(tokens: TokenGeometry) -> tuple[list[int], list[int]]:
    """Model positions of the grid tokens (by raster index) and of the frame specials (frame by
    frame), walking the sequence as the model lays it out: the prefix text, then per frame (index of
    the leading grid dim) its specials and its grid tokens, then the suffix text."""
    grid, specials, position = [], [], tokens.prefix
    per_frame = math.prod(tokens.grid[1:])
    for _ in range(tokens.grid[0]):
        specials += range(position, position + tokens.frame_prefix)
        grid += range(position + tokens.frame_prefix, position + tokens.frame_prefix + per_frame)
        position += tokens.frame_prefix + per_frame
    assert position + tokens.suffix == tokens.length
    return grid, specials


def brute_permutation(tokens: TokenGeometry) -> list[int] | None:
    """Model position of the token at each kernel position, ``None`` without a tile or frame
    specials: the grid tokens in tile (else raster) order first, then the prefix text, then the
    frame specials, then the suffix text."""
    if tokens.tile is None and tokens.frame_prefix == 0:
        return None
    grid, specials = model_positions(tokens)
    order = brute_tile_order(tokens.grid, tokens.tile) if tokens.tile else range(tokens.grid_tokens)
    return ([grid[r] for r in order] + list(range(tokens.prefix)) + specials
            + list(range(tokens.length - tokens.suffix, tokens.length)))


TOKENS = [
    TokenGeometry((3, 5, 7), prefix=5, suffix=3, tile=(2, 2, 4)),
    TokenGeometry((4, 8, 8), tile=(2, 4, 4)),
    TokenGeometry((9, 13), prefix=7, tile=(4, 8)),
    TokenGeometry((9, 13), suffix=4, tile=(3, 5)),
    TokenGeometry((10,), prefix=1, suffix=1, tile=(4,)),
    TokenGeometry((2, 3), tile=(5, 5)),  # one partial tile: the raster order
]


@pytest.mark.parametrize("tokens", TOKENS, ids=str)
def test_tile_order_is_the_documented_permutation(tokens):
    order = tokens.order()
    assert order.tolist() == brute_tile_order(tokens.grid, tokens.tile)
    expected_coords = [list(c) for c in itertools.product(*(range(n) for n in tokens.grid))]
    assert tokens.coords().tolist() == [expected_coords[r] for r in order.tolist()]
    perm, inverse = tokens.permutation(), tokens.inverse_permutation()
    assert perm.tolist() == brute_permutation(tokens)
    assert sorted(perm.tolist()) == list(range(tokens.length))
    assert perm[inverse].tolist() == list(range(tokens.length)) == inverse[perm].tolist()
    # kernel order: grid in tile order at [0, G), then the prefix text, then the suffix text
    grid_tokens = tokens.grid_tokens
    assert (tokens.grid_start, tokens.kernel_prefix, tokens.kernel_suffix) == (0, 0, tokens.prefix + tokens.suffix)
    assert (perm[:grid_tokens] - tokens.prefix).tolist() == order.tolist()
    assert perm[grid_tokens : grid_tokens + tokens.prefix].tolist() == list(range(tokens.prefix))
    assert perm[grid_tokens + tokens.prefix :].tolist() == list(range(tokens.prefix + grid_tokens, tokens.length))
    x = torch.randn(2, tokens.length, 3)  # what the op does: permute, then un-permute
    assert torch.equal(x.index_select(1, perm).index_select(1, inverse), x)
    assert tokens.order() is order  # cached per (geometry, device)


FRAME_TOKENS = [
    TokenGeometry((3, 4, 5), frame_prefix=5),  # VGGT's global attention: 5 specials per frame, no text
    TokenGeometry((3, 4, 5), prefix=2, suffix=3, tile=(2, 2, 4), frame_prefix=5),
    TokenGeometry((4, 7), prefix=1, tile=(2, 4), frame_prefix=2),  # 2-D: a frame is a row
]


@pytest.mark.parametrize("tokens", FRAME_TOKENS, ids=str)
def test_frame_specials_are_gathered_after_the_grid(tokens):
    """Specials at the start of every frame: always permuted (with or without a tile), every token
    read from its own model position: the grid tokens (tile or raster order), then the prefix text,
    the specials frame by frame, the suffix text."""
    frames, per_frame = tokens.grid[0], math.prod(tokens.grid[1:])
    assert tokens.length == tokens.prefix + frames * (tokens.frame_prefix + per_frame) + tokens.suffix
    assert tokens.frame_specials == frames * tokens.frame_prefix and tokens.has_text and tokens.permuted
    # what sits at each model position, written out sequentially
    labels = [("prefix", i) for i in range(tokens.prefix)]
    coords = list(itertools.product(*(range(n) for n in tokens.grid)))
    for f in range(frames):
        labels += [("special", f, j) for j in range(tokens.frame_prefix)]
        labels += [("grid", c) for c in coords[f * per_frame:(f + 1) * per_frame]]
    labels += [("suffix", i) for i in range(tokens.suffix)]
    perm, inverse = tokens.permutation(), tokens.inverse_permutation()
    assert perm.tolist() == brute_permutation(tokens)
    assert perm[inverse].tolist() == list(range(tokens.length)) == inverse[perm].tolist()
    assert torch.equal(tokens.query_rows(), perm.to(torch.int32))
    kernel = [labels[p] for p in perm.tolist()]
    g = tokens.grid_tokens
    assert kernel[:g] == [("grid", tuple(c)) for c in tokens.coords().tolist()]
    order = brute_tile_order(tokens.grid, tokens.tile) if tokens.tile else list(range(g))
    assert tokens.order().tolist() == order
    assert kernel[g:] == ([("prefix", i) for i in range(tokens.prefix)]
                          + [("special", f, j) for f in range(frames) for j in range(tokens.frame_prefix)]
                          + [("suffix", i) for i in range(tokens.suffix)])
    assert (tokens.grid_start, tokens.kernel_prefix, tokens.kernel_suffix) == (0, 0, tokens.length - g)
    assert tokens.with_tile(None).permutation() is not None and tokens.with_tile(None).frame_prefix == tokens.frame_prefix
    # specials and text are dense in every head, in the model's order too
    layout = BlockLayout.from_patterns([Window(3), Stripes(0, (0,))], geometry(tokens, 8, 8))
    dense = layout.to_dense_model_order()
    is_grid = torch.tensor([label[0] == "grid" for label in labels])
    assert dense[:, ~is_grid].all() and dense[:, :, ~is_grid].all()
    assert not dense[:, is_grid][:, :, is_grid].all(-1).all(-1).any()  # the grid part of every head is sparse


def test_raster_order_and_lengths():
    tokens = TokenGeometry([3, 5, 7], prefix=5, suffix=3)
    assert tokens.grid == (3, 5, 7) and tokens.grid_tokens == 105 and tokens.length == 113
    assert tokens.order().tolist() == list(range(105)) and tokens.coords()[8].tolist() == [0, 1, 1]
    assert tokens.permutation() is None and tokens.inverse_permutation() is None
    assert (tokens.grid_start, tokens.kernel_prefix, tokens.kernel_suffix) == (5, 5, 3)  # kernel order = model order
    tiled = tokens.with_tile([2, 2, 4])
    same = TokenGeometry((3, 5, 7), 5, 3, (2, 2, 4))
    assert tiled == same and hash(tiled) == hash(same)
    assert tiled.with_tile(None) == tokens


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grid": (0, 4)}, "TokenGeometry.grid[0] must be an int >= 1, got 0"),
        ({"grid": ()}, "TokenGeometry.grid must be a non-empty list"),
        ({"grid": (4, 4), "prefix": -1}, "TokenGeometry.prefix must be an int >= 0, got -1"),
        ({"grid": (4, 4), "suffix": 1.5}, "TokenGeometry.suffix must be an int >= 0"),
        ({"grid": (4, 4), "frame_prefix": -5}, "TokenGeometry.frame_prefix must be an int >= 0, got -5"),
        ({"grid": (4, 4), "tile": (2,)}, "TokenGeometry.tile (2,) must have one entry per grid dim"),
        ({"grid": (4, 4), "tile": (2, 0)}, "TokenGeometry.tile[1] must be an int >= 1, got 0"),
    ],
)
def test_token_geometry_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        TokenGeometry(**kwargs)
    assert message in str(err.value)


def test_block_geometry_checks_its_tokens():
    tokens = TokenGeometry((4, 4), prefix=2)
    assert BlockGeometry(18, 18, 16, 16, False, tokens).tokens is tokens
    with pytest.raises(ValueError, match=r"BlockGeometry.tokens: its length 18 must equal q_len and kv_len"):
        BlockGeometry(18, 20, 16, 16, False, tokens)
    with pytest.raises(ValueError, match="BlockGeometry.tokens: a token grid is for non-causal attention"):
        BlockGeometry(18, 18, 16, 16, True, tokens)
    with pytest.raises(ValueError, match="BlockGeometry.tokens must be a TokenGeometry"):
        BlockGeometry(18, 18, 16, 16, False, (4, 4))


def test_default_tile():
    assert [default_tile(3, b) for b in (64, 128, 256)] == [(1, 8, 8), (2, 8, 8), (4, 8, 8)]
    assert [default_tile(2, b) for b in (64, 128, 256)] == [(8, 8), (8, 16), (16, 16)]
    assert default_tile(1, 128) == (128,)
    for ndim, exponent in itertools.product(range(1, 5), range(4, 11)):
        tile = default_tile(ndim, 2**exponent)
        assert len(tile) == ndim and math.prod(tile) == 2**exponent
    with pytest.raises(ValueError, match="kv_block must be a power of two, got 96"):
        default_tile(3, 96)


# --------------------------------------------------------------------------------------------------
# every kind against its token-level definition
# --------------------------------------------------------------------------------------------------
def natten_keys(i: int, length: int, window: int, stride: int = 1, dilation: int = 1) -> set[int]:
    """The key coordinates query coordinate ``i`` sees, in the form of NATTEN's reference mask: the
    stride group's leader, clamped so that the window fits, as the window's centre (``w // 2``
    keys left of it, ``w - 1 - w // 2`` right), within the query's dilation group."""
    group = [c for c in range(length) if c % dilation == i % dilation]
    j, w = group.index(i), min(window, len(group))
    left, right = w // 2, w - 1 - w // 2
    leader = min((j // stride) * stride + stride // 2, len(group) - 1)
    centre = min(max(leader, left), len(group) - 1 - right)
    return {group[x] for x in range(centre - left, centre + right + 1)}


def allowed_keys(pattern, grid: tuple[int, ...]) -> list[list[set[int]]]:
    """Per dim, per query coordinate: the key coordinates the pattern allows along that dim."""
    every = [[set(range(n))] * n for n in grid]
    if isinstance(pattern, Dense):
        return every
    if isinstance(pattern, Neighborhood):
        return [[natten_keys(i, n, w, s, d) for i in range(n)]
                for n, w, s, d in zip(grid, pattern.window, pattern.stride, pattern.dilation)]
    if isinstance(pattern, Spatial):
        return [[natten_keys(i, grid[0], pattern.frames) for i in range(grid[0])]] + every[1:]
    if isinstance(pattern, Temporal):
        return every[:1] + [[natten_keys(i, n, w) for i in range(n)] for n, w in zip(grid[1:], pattern.window)]
    if isinstance(pattern, Stripes):
        every[pattern.dim] = [set(pattern.at) & set(range(grid[pattern.dim]))] * grid[pattern.dim]
        return every
    raise TypeError(pattern)


def model_order_mask(pattern, tokens: TokenGeometry) -> torch.Tensor:
    """Bool ``[S, S]`` in the model's order: the pattern's token rule on grid pairs, text dense."""
    if isinstance(pattern, Union):
        return torch.stack([model_order_mask(member, tokens) for member in pattern.of]).any(0)
    allowed = allowed_keys(pattern, tokens.grid)
    coords = list(itertools.product(*(range(n) for n in tokens.grid)))
    grid_mask = torch.tensor([[all(kc in allowed[d][qc] for d, (qc, kc) in enumerate(zip(q, k))) for k in coords]
                              for q in coords])
    mask = torch.ones(tokens.length, tokens.length, dtype=torch.bool)
    grid = torch.tensor(model_positions(tokens)[0])
    mask[grid[:, None], grid[None, :]] = grid_mask
    return mask


def block_closure(mask: torch.Tensor, q_block: int, kv_block: int) -> torch.Tensor:
    """Every pair of a block that holds an attended pair: what a block-sparse kernel computes."""
    out = torch.zeros_like(mask)
    for q0, k0 in itertools.product(range(0, mask.shape[0], q_block), range(0, mask.shape[1], kv_block)):
        out[q0 : q0 + q_block, k0 : k0 + kv_block] = mask[q0 : q0 + q_block, k0 : k0 + kv_block].any()
    return out


def expected_kernel_mask(pattern, g: BlockGeometry) -> torch.Tensor:
    """The model-order token mask moved into kernel order (``brute_permutation``), then block closed."""
    model = model_order_mask(pattern, g.tokens)
    perm = brute_permutation(g.tokens)
    kernel = model if perm is None else model[perm][:, perm]
    return block_closure(kernel, g.q_block, g.kv_block)


GEOMETRIES_3D = [
    geometry(TokenGeometry((3, 5, 7), prefix=5, suffix=3, tile=(2, 2, 4)), 16, 32),
    geometry(TokenGeometry((3, 5, 7)), 16, 16),  # raster order, no text
    geometry(TokenGeometry((4, 6, 5), suffix=9, tile=(2, 4, 4)), 32, 16),
    geometry(TokenGeometry((3, 5, 7), frame_prefix=5), 16, 32),  # VGGT-like: specials per frame, raster
    geometry(TokenGeometry((3, 5, 7), prefix=2, tile=(2, 2, 4), frame_prefix=3), 16, 16),
]
GEOMETRIES_2D = [
    geometry(TokenGeometry((9, 13), prefix=7, tile=(4, 8)), 16, 32),
    geometry(TokenGeometry((9, 13), suffix=4, tile=(3, 5)), 8, 16),
    geometry(TokenGeometry((9, 13), suffix=2, tile=(4, 8), frame_prefix=1), 16, 16),
]
PATTERNS_3D = [
    Neighborhood((3, 3, 3)),
    Neighborhood((2, 4, 8)),  # even windows, wider than W = 7 (and than H = 5 on the second grid)
    Neighborhood((3, 3, 5), stride=(2, 2, 3)),
    Neighborhood((2, 3, 3), dilation=(1, 2, 3)),
    Neighborhood((3, 2, 4), stride=(2, 1, 2), dilation=(1, 2, 2)),
    Spatial(),
    Spatial(2),
    Temporal(),
    Temporal((3, 5)),
    Stripes(),
    Stripes(2, (1, 6, 40)),
    Union((Neighborhood((1, 3, 3)), Stripes(0, (0,)))),
]
PATTERNS_2D = [
    Neighborhood((3, 5)),
    Neighborhood((4, 4), stride=(4, 4)),
    Neighborhood((5, 3), stride=(1, 2), dilation=(2, 3)),
    Neighborhood((20, 20)),  # the whole grid
    Stripes(1, (0, 12)),
    Union((Neighborhood((3, 3), dilation=(2, 2)), Stripes(0, (4,)))),
]
CASES = ([(p, g) for p in PATTERNS_3D for g in GEOMETRIES_3D] + [(p, g) for p in PATTERNS_2D for g in GEOMETRIES_2D])


def case_id(case) -> str:
    pattern, g = case
    frames = f"-f{g.tokens.frame_prefix}" if g.tokens.frame_prefix else ""
    return f"{pattern.short_str()}-{g.tokens.grid}-p{g.tokens.prefix}s{g.tokens.suffix}-t{g.tokens.tile}{frames}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_layout_matches_token_definition(case):
    pattern, g = case
    layout = BlockLayout.from_patterns([pattern], g)
    expected = expected_kernel_mask(pattern, g)
    assert torch.equal(layout.to_dense()[0], expected)
    perm = brute_permutation(g.tokens)  # back to the model's order by the brute-force map
    inverse = None if perm is None else torch.argsort(torch.tensor(perm))
    model = expected if inverse is None else expected[inverse][:, inverse]
    assert torch.equal(layout.to_dense_model_order()[0], model)


def test_windows_keep_natten_size_at_the_borders():
    """Token-exact layouts (blocks of one token): every query sees exactly min(w, L) keys per dim."""
    tokens = TokenGeometry((5, 7, 4))
    g = geometry(tokens, 1, 1)
    for window, stride in (((3, 9, 2), (1, 1, 1)), ((4, 3, 4), (2, 3, 1)), ((1, 7, 3), (5, 2, 4))):
        counts = BlockLayout.from_patterns([Neighborhood(window, stride)], g).kv_counts[0, 0]
        assert counts.tolist() == [math.prod(min(w, n) for w, n in zip(window, tokens.grid))] * tokens.length
    for length, window, stride, dilation in itertools.product((1, 6, 7, 11), (1, 2, 3, 5, 12), (1, 2, 3), (1, 2, 3)):
        mask = window_mask(length, window, stride, dilation)
        group_len = torch.tensor([len(range(i % dilation, length, dilation)) for i in range(length)])
        assert torch.equal(mask.sum(1), group_len.clamp(max=window))


@pytest.mark.parametrize(
    "length, pattern, rows",
    [
        (5, Neighborhood((3,)), [{0, 1, 2}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {2, 3, 4}]),
        # stride 2: pairs of queries share the window centred on the pair's right query
        (8, Neighborhood((3,), stride=(2,)), [{0, 1, 2}] * 2 + [{2, 3, 4}] * 2 + [{4, 5, 6}] * 2 + [{5, 6, 7}] * 2),
        (8, Neighborhood((3,), stride=(3,)), [{0, 1, 2}] * 3 + [{3, 4, 5}] * 3 + [{5, 6, 7}] * 2),
        # dilation 2: even and odd coordinates are separate grids of 4 and 3 tokens
        (7, Neighborhood((2,), dilation=(2,)), [{0, 2}, {1, 3}, {0, 2}, {1, 3}, {2, 4}, {3, 5}, {4, 6}]),
        (7, Neighborhood((5,), dilation=(2,)), [{0, 2, 4, 6}, {1, 3, 5}] * 3 + [{0, 2, 4, 6}]),
    ],
)
def test_hand_checked_windows(length, pattern, rows):
    dense = BlockLayout.from_patterns([pattern], geometry(TokenGeometry((length,)), 1, 1)).to_dense()[0]
    assert [set(torch.nonzero(row).flatten().tolist()) for row in dense] == rows


def test_text_is_dense_for_every_head_and_one_dimensional_patterns():
    """With text, a 1-D pattern's layout is that of Global around it (in kernel order: with a tile
    all text follows the grid); dense heads stay dense."""
    tokens = TokenGeometry((4, 6, 5), prefix=37, suffix=11, tile=(2, 4, 4))
    g = geometry(tokens, 32, 16)
    plain = BlockGeometry(g.q_len, g.kv_len, 32, 16, causal=False)
    layout = BlockLayout.from_patterns([Window(20), Dense(), Union((Window(8), Stripes()))], g)
    around = BlockLayout.from_patterns([Global(Window(20), prefix=0, suffix=37 + 11)], plain)
    assert torch.equal(layout.to_dense()[0], around.to_dense()[0])
    raster = geometry(tokens.with_tile(None), 32, 16)  # no tile: text stays where the model has it
    around = BlockLayout.from_patterns([Global(Window(20), prefix=37, suffix=11)], plain)
    assert torch.equal(BlockLayout.from_patterns([Window(20)], raster).to_dense()[0], around.to_dense()[0])
    assert layout.head_density[1] == 1.0
    union = torch.stack([Window(8).block_mask(g), Stripes().block_mask(g), g.text_block_mask()]).any(0)
    assert torch.equal(layout.to_dense()[2], BlockLayout.from_block_mask(union[None], g).to_dense()[0])
    assert g.text_block_mask().shape == (g.num_q_blocks, g.num_kv_blocks)
    assert geometry(TokenGeometry((4, 6, 5)), 32, 16).text_block_mask() is None
    assert plain.text_block_mask() is None


# --------------------------------------------------------------------------------------------------
# block density: raster vs tiled
# --------------------------------------------------------------------------------------------------
def rule_density(pattern: Neighborhood, grid: tuple[int, ...]) -> float:
    """Token density of a separable rule: the product over dims of the allowed fraction."""
    return math.prod(sum(len(natten_keys(i, n, w, s)) for i in range(n)) / n**2
                     for n, w, s in zip(grid, pattern.window, pattern.stride))


def test_tiles_make_neighbourhoods_denser_blocks():
    tokens = TokenGeometry((4, 32, 64))
    tile = default_tile(3, 128)  # (2, 8, 8): a key block is one tile, a query block half of one
    raster, tiled = geometry(tokens, 64, 128), geometry(tokens.with_tile(tile), 64, 128)
    for local, measured in ((Neighborhood((3, 15, 15)), (0.375, 0.215)),
                            (Neighborhood((4, 16, 16), stride=tile), (0.5, 0.215))):
        densities = [BlockLayout.from_patterns([local], g).density() for g in (raster, tiled)]
        assert densities == pytest.approx(measured, abs=1e-3)
    # stride = tile and windows odd multiples of it: every window is whole tiles, blocks are full
    blocked = Neighborhood((2, 8, 24), stride=tile)
    assert BlockLayout.from_patterns([blocked], tiled).density() == pytest.approx(rule_density(blocked, tokens.grid))
    assert BlockLayout.from_patterns([blocked], raster).density() > 2 * rule_density(blocked, tokens.grid)


@pytest.mark.parametrize(
    "grid, window, blocks, tile, prefix, suffix, measured",
    [
        # measured: no text raster 0.160 / tiled 0.111; prefix 7 was raster 0.193 / tiled 0.199 with
        # the text left in front of the grid (every tile straddling two blocks)
        ((2, 16, 48), (1, 5, 5), (16, 32), (1, 4, 8), 7, 0, (0.160, 0.111, 0.193, 0.138)),
        # CogVideoX-like: 226 text tokens before the video, 64x128 blocks (text in front: tiled 0.699)
        ((2, 16, 48), (1, 16, 16), (64, 128), (2, 8, 8), 226, 0, (0.500, 0.444, 0.679, 0.592)),
        ((2, 16, 48), (1, 16, 16), (64, 128), (2, 8, 8), 200, 37, None),
    ],
)
def test_text_does_not_misalign_tiles(grid, window, blocks, tile, prefix, suffix, measured):
    """With a tile the grid sits block aligned at kernel position 0 whatever the text: the grid part
    of the layout is the no-text tiled layout, text rows and columns are dense, and tile order keeps
    its gain over raster order."""
    pattern = Neighborhood(window)
    plain, text = TokenGeometry(grid), TokenGeometry(grid, prefix, suffix)

    def layout(tokens):
        return BlockLayout.from_patterns([pattern], geometry(tokens, *blocks))

    no_text_tiled, tiled = layout(plain.with_tile(tile)), layout(text.with_tile(tile))
    densities = [layout(plain).density(), no_text_tiled.density(), layout(text).density(), tiled.density()]
    if measured is not None:
        assert densities == pytest.approx(measured, abs=1e-3)
    assert densities[3] < densities[2]
    q_grid, k_grid = plain.grid_tokens // blocks[0], plain.grid_tokens // blocks[1]  # the grid is whole blocks
    mask = tiled.to_dense()[0]
    n = plain.grid_tokens
    assert torch.equal(mask[:n, :n], no_text_tiled.to_dense()[0])
    assert mask[n:].all() and mask[:, n:].all()
    # per grid query block: the no-text key blocks plus every text key block; text query blocks: all
    counts, text_blocks = tiled.kv_counts[0, 0], tiled.geometry.num_kv_blocks - k_grid
    assert (counts[:q_grid] - text_blocks).tolist() == no_text_tiled.kv_counts[0, 0].tolist()
    assert (counts[q_grid:] == tiled.geometry.num_kv_blocks).all()


# --------------------------------------------------------------------------------------------------
# the kernel on a tiled layout, against two oracles
# --------------------------------------------------------------------------------------------------
KERNEL_GEOMETRY = geometry(TokenGeometry((3, 5, 7), prefix=5, suffix=3, tile=(2, 2, 4)), 16, 32)
KERNEL_HEADS = [Neighborhood((3, 3, 5), stride=(1, 2, 3)), Union((Spatial(), Stripes())), Temporal((3, 3)), Dense()]


def kernel_inputs(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Fresh random q, k, v in the model's order, ``[2, heads, S, 32]``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, len(KERNEL_HEADS), KERNEL_GEOMETRY.q_len, 32)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))


def run_in_kernel_order(kernel, q, k, v) -> torch.Tensor:
    """What the op does: permute q/k/v into tile order, run the kernel into a NaN-poisoned output on
    the layout, permute the output back."""
    tokens, g = KERNEL_GEOMETRY.tokens, KERNEL_GEOMETRY
    layout = BlockLayout.from_patterns(KERNEL_HEADS, g)
    perm, inverse = tokens.permutation(), tokens.inverse_permutation()
    out = torch.full_like(q, float("nan"))
    kernel(q.index_select(2, perm), k.index_select(2, perm), v.index_select(2, perm), layout.kv_indices,
           layout.kv_counts, q_block=g.q_block, kv_block=g.kv_block, causal=False, out=out)
    assert not out.isnan().any(), "output not fully written"
    return out.index_select(2, inverse)


def dense_oracle(q, k, v) -> torch.Tensor:
    """float64 dense attention on the brute-force token masks, in the model's order."""
    masks = torch.stack([expected_kernel_mask(p, KERNEL_GEOMETRY) for p in KERNEL_HEADS])
    return attention(q, k, v, in_model_order(masks, KERNEL_GEOMETRY.tokens)[None])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_kernel_on_tiled_layout_matches_dense_and_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    g = KERNEL_GEOMETRY
    q, k, v = kernel_inputs(torch.float64, seed=11)
    out = run_in_kernel_order(block_sparse_attention_torch, q, k, v)
    torch.testing.assert_close(out, dense_oracle(q, k, v), rtol=1e-10, atol=1e-10)

    # FlexAttention in the model's order, its mask_mod reading the layout's block lists
    layout = BlockLayout.from_patterns(KERNEL_HEADS, g)
    blocks = torch.zeros(len(KERNEL_HEADS), g.num_q_blocks, g.num_kv_blocks, dtype=torch.bool)
    for h, i in itertools.product(range(len(KERNEL_HEADS)), range(g.num_q_blocks)):
        blocks[h, i, layout.kv_indices[0, h, i, : layout.kv_counts[0, h, i]].long()] = True
    inverse = g.tokens.inverse_permutation()

    def mask_mod(b, h, q_idx, kv_idx):
        return blocks[h, inverse[q_idx] // g.q_block, inverse[kv_idx] // g.kv_block]

    block_mask = flex.create_block_mask(mask_mod, None, len(KERNEL_HEADS), g.q_len, g.kv_len, device="cpu")
    torch.testing.assert_close(out, flex.flex_attention(q, k, v, block_mask=block_mask), rtol=1e-10, atol=1e-10)


def test_triton_kernel_on_tiled_layout(tmp_path):
    """The Triton kernel under its interpreter (float32), in a worker process: TRITON_INTERPRET must
    be set before Triton is first imported (see tests/test_kernels.py)."""
    pytest.importorskip("triton")
    out = run_interpreted(__file__, tmp_path / "out.pt", timeout=300)
    q, k, v = kernel_inputs(torch.float32, seed=12)
    torch.testing.assert_close(out.double(), dense_oracle(q, k, v), rtol=2e-5, atol=2e-5)


if __name__ == "__main__" and sys.argv[1:2] == ["--interpret-worker"]:
    from autosparse.kernels import block_sparse_attention

    torch.save(run_in_kernel_order(block_sparse_attention, *kernel_inputs(torch.float32, seed=12)), sys.argv[2])


# --------------------------------------------------------------------------------------------------
# specs and errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", PATTERNS_3D + PATTERNS_2D + [Union((Window(8), Neighborhood((3,))))],
                         ids=lambda p: p.short_str())
def test_spec_round_trip(pattern):
    again = pattern_from_spec(json.loads(json.dumps(pattern.to_spec())))
    assert again == pattern and hash(again) == hash(pattern) and again.to_spec() == pattern.to_spec()


def test_spec_forms():
    spec = {"kind": "neighborhood", "window": [4, 16, 16], "stride": None, "dilation": [1, 2, 2]}
    pattern = pattern_from_spec(spec)
    assert pattern == Neighborhood((4, 16, 16), (1, 1, 1), (1, 2, 2)) == Neighborhood([4, 16, 16], None, [1, 2, 2])
    assert pattern.to_spec() == {**spec, "stride": [1, 1, 1]}
    assert pattern_from_spec({"kind": "neighborhood", "window": [4, 16, 16], "dilation": [1, 2, 2]}) == pattern
    union = Union([Spatial(2), Stripes(0, (3, 0, 3))])
    assert union.of == (Spatial(2), Stripes(0, (0, 3)))
    assert union.to_spec() == {"kind": "union", "of": [{"kind": "spatial", "frames": 2},
                                                      {"kind": "stripes", "dim": 0, "at": [0, 3]}]}
    assert union.short_str() == "union(spatial(frames=2)|stripes(dim=0,at=[0, 3]))"
    assert not union.is_dense and Union((Window(4), Dense())).is_dense
    assert union.needs_grid and Union((Window(4), Stripes())).needs_grid and not Union((Window(4),)).needs_grid


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "neighborhood", "window": [3, 0], "stride": None, "dilation": None},
         "neighborhood.window[1] must be an int >= 1, got 0"),
        ({"kind": "neighborhood", "window": [], "stride": None, "dilation": None},
         "neighborhood.window must be a non-empty"),
        ({"kind": "neighborhood", "window": [3, 3], "stride": [1, -2], "dilation": None},
         "neighborhood.stride[1] must be an int >= 1, got -2"),
        ({"kind": "neighborhood", "window": [3, 3], "stride": None, "dilation": [1, 1, 1]},
         "neighborhood.dilation [1, 1, 1] must have one entry per window dim [3, 3]"),
        ({"kind": "neighborhood", "stride": None, "dilation": None}, "missing ['window']"),
        ({"kind": "spatial"}, "missing ['frames']"),
        ({"kind": "spatial", "frames": 0}, "spatial.frames must be an int >= 1, got 0"),
        ({"kind": "temporal", "window": [3]}, "temporal.window must be [h, w], got [3]"),
        ({"kind": "stripes", "dim": -1, "at": [0]}, "stripes.dim must be an int >= 0, got -1"),
        ({"kind": "stripes", "dim": 0, "at": []}, "stripes.at must be a non-empty list"),
        ({"kind": "union", "of": []}, "heads[2].of: expected a non-empty list of patterns"),
        ({"kind": "union", "of": [{"kind": "spatial", "frames": 1}, {"kind": "nope"}]},
         "heads[2].of[1].kind: expected one of"),
        ({"kind": "union", "of": [{"kind": "dense"}, {"kind": "neighborhood", "window": [2, 0], "stride": None,
                                                      "dilation": None}]},
         "heads[2].of[1]: neighborhood.window[1] must be an int >= 1, got 0"),
    ],
)
def test_spec_errors_name_the_field(spec, message):
    with pytest.raises(ValueError) as err:
        pattern_from_spec(spec, "layers['a'].heads[2]")
    assert message in str(err.value) and str(err.value).startswith("layers['a'].heads[2]")


@pytest.mark.parametrize(
    "pattern, g, message",
    [
        (Neighborhood((3,)), BlockGeometry(64, 64, 16, 16, causal=False), "neighborhood needs a token grid"),
        (Spatial(), BlockGeometry(64, 64, 16, 16, causal=True), "spatial needs a token grid"),
        (Neighborhood((3, 3, 3)), GEOMETRIES_2D[0],
         "neighborhood.window [3, 3, 3] is 3-D, but BlockGeometry.tokens.grid (9, 13) is 2-D"),
        (Temporal(), GEOMETRIES_2D[0], "temporal (a (T, H, W) rule) is 3-D, but BlockGeometry.tokens.grid (9, 13)"),
        (Stripes(3), GEOMETRIES_3D[0], "stripes.dim 3 is out of range for the 3-D BlockGeometry.tokens.grid"),
    ],
)
def test_grid_patterns_need_a_matching_grid(pattern, g, message):
    with pytest.raises(ValueError) as err:
        BlockLayout.from_patterns([Union((Dense(), pattern))], g)
    assert message in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_block_mask_on_gpu_matches_cpu():
    for pattern, g in CASES[::5]:
        assert torch.equal(pattern.block_mask(g, "cuda").cpu(), pattern.block_mask(g, "cpu"))
