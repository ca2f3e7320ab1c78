"""Every pattern's layout against its definition, computed independently token by token."""

import json

import pytest
import torch

from autosparse import BlockGeometry, BlockLayout, Blocks, Dense, SinkLocal, Window, pattern_from_spec
from autosparse.patterns import Global


def token_rule(pattern, q_pos: int, k: int, g: BlockGeometry) -> bool:
    """The pattern's rule for one (absolute query position, key) pair, causality excluded."""
    if isinstance(pattern, Dense):
        return True
    if isinstance(pattern, Window):
        gap = q_pos - k
        return 0 <= gap < pattern.window if g.causal else abs(gap) < pattern.window
    if isinstance(pattern, SinkLocal):
        return k < pattern.sinks or token_rule(Window(pattern.window), q_pos, k, g)
    if isinstance(pattern, Blocks):
        return k // g.kv_block in pattern.kv_blocks
    if isinstance(pattern, Global):
        # Queries are the last q_len tokens when causal, the first q_len otherwise.
        last_q = g.kv_len - 1 if g.causal else g.q_len - 1
        global_key = k < pattern.prefix or k >= g.kv_len - pattern.suffix
        global_query = q_pos < pattern.prefix or q_pos > last_q - pattern.suffix
        return global_key or global_query or token_rule(pattern.inner, q_pos, k, g)
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
            if any(allowed[q, k] and token_rule(pattern, q + offset, k, g) for q in qs for k in ks):
                mask[qs.start : qs.stop, ks.start : ks.stop] = allowed[qs.start : qs.stop, ks.start : ks.stop]
    return mask


PATTERNS = [
    Dense(), Window(1), Window(40), SinkLocal(4, 16), SinkLocal(40, 33), SinkLocal(0, 100), Blocks((0, 3, 9)),
    Global(Window(8), prefix=10), Global(SinkLocal(4, 16), suffix=7), Global(Blocks((2,)), prefix=5, suffix=3),
    Global(Dense(), prefix=1),
]
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
        ({"kind": "global", "prefix": -1, "suffix": 0, "inner": {"kind": "dense"}}, "global.prefix must be an int >= 0"),
        ({"kind": "global", "prefix": 0, "suffix": 0, "inner": {"kind": "dense"}}, "at least one must be > 0"),
        ({"kind": "global", "prefix": 8, "inner": {"kind": "dense"}}, "missing ['suffix']"),
        ({"kind": "global", "prefix": 8, "suffix": 0, "inner": "dense"}, "heads[2].inner: expected a dict"),
        ({"kind": "global", "prefix": 8, "suffix": 0, "inner": {"kind": "window", "window": 0}},
         "heads[2].inner: window.window must be an int >= 1, got 0"),
        ({"kind": "global", "prefix": 8, "suffix": 0, "inner": {"kind": "nope"}}, "heads[2].inner.kind: expected one of"),
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


# Text tokens not a multiple of the block (CogVideoX: 226), and a text suffix; ragged lengths.
TEXT_GEOMETRIES = [
    BlockGeometry(350, 350, 64, 64, causal=False),
    BlockGeometry(350, 350, 64, 64, causal=True),
    BlockGeometry(300, 350, 64, 128, causal=True),  # a later chunk: its rows start past the prefix
    BlockGeometry(350, 290, 128, 64, causal=False),
]


@pytest.mark.parametrize("geometry", TEXT_GEOMETRIES, ids=lambda g: f"{g.q_len}x{g.kv_len}-{g.q_block}x{g.kv_block}-c{int(g.causal)}")
@pytest.mark.parametrize("pattern", [Global(Window(64), prefix=226), Global(Window(32), suffix=77),
                                     Global(SinkLocal(0, 40), prefix=100, suffix=30)], ids=lambda p: p.short_str())
def test_global_tokens_match_token_definition(pattern, geometry):
    dense = BlockLayout.from_patterns([pattern], geometry).to_dense()[0]
    torch.testing.assert_close(dense, expected_mask(pattern, geometry))
    if not geometry.causal:  # what the diffusion transformers need, stated directly
        assert dense[:, : pattern.prefix].all() and dense[:, geometry.kv_len - pattern.suffix :].all()
        assert dense[: pattern.prefix].all() and dense[geometry.q_len - pattern.suffix :].all()


def test_global_spec_form():
    spec = {"kind": "global", "prefix": 226, "suffix": 0, "inner": {"kind": "window", "window": 4096}}
    pattern = pattern_from_spec(json.loads(json.dumps(spec)))
    assert pattern == Global(Window(4096), prefix=226) and hash(pattern) == hash(Global(Window(4096), prefix=226))
    assert pattern.to_spec() == spec
    assert pattern.short_str() == "global(prefix=226,inner=window(window=4096))"
    assert Global(Blocks((1, 0)), suffix=3).short_str() == "global(suffix=3,inner=blocks(kv_blocks=[0, 1]))"
    assert not pattern.is_dense and Global(Dense(), prefix=1).is_dense
    assert Global(Window(8), prefix=4) != Global(Window(8), suffix=4)


def test_layout_mixes_global_and_plain_heads():
    g = BlockGeometry(550, 550, 64, 64, causal=False)
    text = Global(Window(64), prefix=226)
    heads = [text, Window(64), Dense(), text, Global(Window(64), suffix=30)]
    layout = BlockLayout.from_patterns(heads, g)
    assert layout.num_heads == 5
    for h, pattern in enumerate(heads):
        torch.testing.assert_close(layout.to_dense()[h], expected_mask(pattern, g))
    density = layout.head_density.tolist()
    assert density[1] < density[4] < density[0] == density[3] < density[2] == 1.0


def test_global_layout_through_the_kernel_matches_the_dense_mask():
    """A FLUX/CogVideoX-like call (226 text tokens first, then image tokens; 4 heads with different
    inner patterns) through the block-sparse op equals dense attention on the layout's token mask."""
    from autosparse.kernels import block_sparse_attention, dense_attention

    g = BlockGeometry(226 + 300, 226 + 300, 64, 128, causal=False)
    heads = [Global(Window(64), prefix=226, suffix=0), Global(SinkLocal(0, 128), prefix=226, suffix=0),
             Global(Window(32), prefix=0, suffix=40), Dense()]
    layout = BlockLayout.from_patterns(heads, g)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, g.q_len, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    out = block_sparse_attention(q, k, v, layout.kv_indices, layout.kv_counts, q_block=64, kv_block=128,
                                 causal=False, schedule=layout.schedule())
    ref = dense_attention(q, k, v, layout.to_dense()[None])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    text_rows = layout.to_dense()[0, :226]
    assert text_rows.all()  # the text queries attend every key
