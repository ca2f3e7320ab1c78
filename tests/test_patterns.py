"""Every pattern's layout against its definition, computed independently token by token."""

import pytest
import torch

from autosparse import BlockGeometry, BlockLayout, Blocks, Dense, SinkLocal, Window, pattern_from_spec


def token_rule(pattern, q_pos: int, k: int, causal: bool) -> bool:
    """The pattern's rule for one (absolute query position, key) pair, causality excluded."""
    if isinstance(pattern, Dense):
        return True
    if isinstance(pattern, Window):
        gap = q_pos - k
        return 0 <= gap < pattern.window if causal else abs(gap) < pattern.window
    if isinstance(pattern, SinkLocal):
        return k < pattern.sinks or token_rule(Window(pattern.window), q_pos, k, causal)
    raise TypeError(pattern)


def expected_mask(pattern, g: BlockGeometry) -> torch.Tensor:
    """Brute force: a block pair is attended iff the rule touches an allowed pair in it; then every
    allowed pair of it is attended."""
    offset = g.kv_len - g.q_len if g.causal else 0
    allowed = torch.tensor([[not g.causal or k <= q + offset for k in range(g.kv_len)] for q in range(g.q_len)])
    mask = torch.zeros(g.q_len, g.kv_len, dtype=torch.bool)
    for qb in range(g.num_q_blocks):
        qs = range(qb * g.q_block, min((qb + 1) * g.q_block, g.q_len))
        for kb in range(g.num_kv_blocks):
            ks = range(kb * g.kv_block, min((kb + 1) * g.kv_block, g.kv_len))
            if isinstance(pattern, Blocks):
                hit = kb in pattern.kv_blocks and any(allowed[q, k] for q in qs for k in ks)
            else:
                hit = any(allowed[q, k] and token_rule(pattern, q + offset, k, g.causal) for q in qs for k in ks)
            if hit:
                mask[qs.start : qs.stop, ks.start : ks.stop] = allowed[qs.start : qs.stop, ks.start : ks.stop]
    return mask


PATTERNS = [Dense(), Window(1), Window(40), SinkLocal(4, 16), SinkLocal(40, 33), SinkLocal(0, 100), Blocks((0, 3, 9))]
GEOMETRIES = [
    BlockGeometry(100, 100, 16, 16, causal=True),
    BlockGeometry(100, 100, 32, 16, causal=True),
    BlockGeometry(77, 130, 16, 32, causal=True),  # fewer queries than keys: bottom-right causal
    BlockGeometry(90, 70, 32, 16, causal=False),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g.q_len}x{g.kv_len}-{g.q_block}x{g.kv_block}-c{int(g.causal)}")
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.short_str())
def test_layout_matches_token_definition(pattern, geometry):
    layout = BlockLayout.from_patterns([pattern], geometry)
    torch.testing.assert_close(layout.to_dense()[0], expected_mask(pattern, geometry))
    # Listed blocks are ascending and within range; counts match the block mask.
    counts = layout.kv_counts[0, 0]
    for i, n in enumerate(counts.tolist()):
        row = layout.kv_indices[0, 0, i, :n].tolist()
        assert row == sorted(set(row)) and all(0 <= b < geometry.num_kv_blocks for b in row)
    assert 0.0 < layout.density() <= 1.0


def test_heterogeneous_heads_and_density():
    g = BlockGeometry(256, 256, 32, 32, causal=True)
    heads = [Dense(), Window(32), SinkLocal(4, 32), Dense()]
    layout = BlockLayout.from_patterns(heads, g)
    assert layout.num_heads == 4 and layout.kv_indices.shape[:3] == (1, 4, 8)
    for h, pattern in enumerate(heads):
        torch.testing.assert_close(layout.to_dense()[h], expected_mask(pattern, g))
        torch.testing.assert_close(layout[h].to_dense()[0], expected_mask(pattern, g))
    # 8 query blocks, causal: dense computes 36 blocks; window(32) computes 1 + 7*2 = 15.
    assert layout.head_density.tolist() == pytest.approx([1.0, 15 / 36, (15 + 6) / 36, 1.0])
    assert "heads=4" in repr(layout) and "density=" in repr(layout)


def test_layouts_are_cached_per_shape_and_device():
    g = BlockGeometry(128, 128, 32, 32, causal=True)
    a = BlockLayout.from_patterns([Window(64)] * 3, g)
    assert BlockLayout.from_patterns((Window(64),) * 3, g) is a
    assert BlockLayout.from_patterns([Window(64)] * 3, BlockGeometry(160, 160, 32, 32, True)) is not a


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "nope"}, "kind: expected one of"),
        ({"kind": "window"}, "missing ['window']"),
        ({"kind": "window", "window": 8, "extra": 1}, "unknown ['extra']"),
        ({"kind": "window", "window": 0}, "window.window must be an int >= 1, got 0"),
        ({"kind": "sink_local", "sinks": -1, "window": 8}, "sinks must be an int >= 0"),
        ({"kind": "blocks", "kv_blocks": []}, "non-empty list"),
        ("dense", "expected a dict with a 'kind' key"),
    ],
)
def test_spec_errors_name_the_field(spec, message):
    with pytest.raises(ValueError) as err:
        pattern_from_spec(spec, "layers['a'].heads[2]")
    assert message in str(err.value) and str(err.value).startswith("layers['a'].heads[2]")


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.short_str())
def test_spec_round_trip(pattern):
    assert pattern_from_spec(pattern.to_spec()) == pattern
    assert hash(pattern_from_spec(pattern.to_spec())) == hash(pattern)
