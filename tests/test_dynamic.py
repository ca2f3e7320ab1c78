"""Dynamic patterns: the estimates find planted structure, their block conversions are exact, and a
model patched with them equals dense attention on the layout each call estimates."""

import math

import pytest
import torch

import autosparse
from autosparse import BlockCdf, BlockGeometry, BlockLayout, BlockTopK, VerticalSlash
from autosparse.kernels.last_rows_op import _sum_by_offset
from autosparse.patterns.dynamic import _column_blocks, _diagonal_blocks, always_kept
from autosparse.patterns import pattern_from_spec
from autosparse.testing.reference import attention, attention_function

from conftest import tiny_llama


def test_specs_round_trip_and_are_checked():
    for spec in ({"kind": "vertical_slash", "vertical": 1000, "slash": 6096}, {"kind": "block_topk", "k": 16},
                 {"kind": "block_cdf", "mass": 0.95}):
        pattern = pattern_from_spec(spec)
        assert pattern.is_dynamic and pattern.to_spec() == spec
    with pytest.raises(ValueError, match="block_cdf.mass"):
        pattern_from_spec({"kind": "block_cdf", "mass": 1.5})
    with pytest.raises(ValueError, match="block_topk.k"):
        pattern_from_spec({"kind": "block_topk", "k": 0})
    with pytest.raises(TypeError, match="estimate"):
        BlockTopK(4).block_mask(BlockGeometry(256, 256, 64, 64, True))


def planted_blocks(geometry, picks, seed=0):
    """q/k whose pooled scores single out ``picks[b]`` key blocks for query block ``b``: key block c
    carries a strong one-hot feature c, query block b carries the features of its picks."""
    gen = torch.Generator().manual_seed(seed)
    d = geometry.num_kv_blocks + 8
    q = torch.randn(1, 1, geometry.q_len, d, generator=gen) * 0.1
    k = torch.randn(1, 1, geometry.kv_len, d, generator=gen) * 0.1
    for c in range(geometry.num_kv_blocks):
        k[..., c * geometry.kv_block:(c + 1) * geometry.kv_block, c] += 6.0
    for b, chosen in picks.items():
        for c in chosen:
            q[..., b * geometry.q_block:(b + 1) * geometry.q_block, c] += 6.0
    return q, k


@pytest.mark.parametrize("causal", [True, False])
def test_pooled_selection_finds_the_planted_blocks(causal):
    geometry = BlockGeometry(1024, 1024, 64, 128, causal)
    # Two earlier key blocks per query block (causal: reachable, not its own), or two anywhere.
    picks = ({b: [b // 2 - 1, b // 2 - 2] for b in range(4, geometry.num_q_blocks)} if causal
             else {b: [(b + 3) % 8, (b + 5) % 8] for b in range(geometry.num_q_blocks)})
    q, k = planted_blocks(geometry, picks)
    reachable, kept = geometry.reachable(), always_kept(geometry, "cpu")
    for pattern in (BlockTopK(2), BlockCdf(0.9)):
        mask = pattern.estimate(q, k, geometry, 0.125)[0, 0]
        for b, chosen in picks.items():
            assert mask[b, chosen].all(), (pattern, b, chosen)
            extra = mask[b] & ~kept[b]
            extra[chosen] = False
            assert not extra.any(), (pattern, b)  # nothing beyond the picks, own blocks and the sink
        assert not (mask & ~reachable).any()


def test_vertical_slash_finds_planted_columns_and_diagonals():
    """Keys 37 and 300 are attended by every query; otherwise each query attends the key 5 back."""
    length, dim = 640, 64
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freqs = 2 * math.pi / torch.logspace(math.log10(8), math.log10(2000), dim // 2 - 1, dtype=torch.float64)
    feats = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs), torch.zeros(length, 2)], dim=-1)
    q, k = feats.clone(), torch.roll(feats, shifts=5, dims=0)  # k_j looks like position j - 5
    q[:, -1], k[[37, 300], -1] = 1.0, 40.0
    q, k = q[None, None].float(), k[None, None].float()
    geometry = BlockGeometry(length, length, 64, 64, True)
    mask = VerticalSlash(vertical=2, slash=3).estimate(q, k, geometry, dim ** -0.5)[0, 0]
    token = torch.zeros(length, length, dtype=torch.bool)
    token[:, [37, 300]] = True
    i = torch.arange(length)
    token[i[5:], i[5:] - 5] = True
    expected = token.tril().unflatten(0, (10, 64)).unflatten(2, (10, 64)).any(-1).any(1)
    assert (mask | ~expected).all()  # every block holding a planted pair is kept
    # What the kernel visits: the diagonal as blocks, the keys as columns while that is cheaper than
    # their blocks. Here key 37 lies in the always visited first block; key 300 alone costs a key
    # tile either way, so it is visited as its block.
    blocks, columns = VerticalSlash(vertical=2, slash=3).select(q, k, geometry, dim ** -0.5)
    assert not columns.any() and torch.equal(blocks, mask[None, None])


def test_vertical_slash_mass_keeps_only_the_lines_that_carry_the_attention():
    """Every query attends the key 5 back and nothing else much: with ``mass`` the estimate keeps
    that diagonal and drops the other 49 a fixed count picks by chance."""
    length, dim = 1024, 64
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freqs = 2 * math.pi / torch.logspace(math.log10(8), math.log10(4000), dim // 2, dtype=torch.float64)
    feats = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], dim=-1) * 2.0
    gen = torch.Generator().manual_seed(6)
    q = feats[None, None].float() + torch.randn(1, 1, length, dim, generator=gen)
    k = torch.roll(feats, shifts=5, dims=0)[None, None].float() + torch.randn(1, 1, length, dim, generator=gen)
    geometry = BlockGeometry(length, length, 64, 64, True)
    fixed = VerticalSlash(vertical=50, slash=50)
    thrifty = VerticalSlash(vertical=50, slash=50, mass=0.5)
    assert thrifty.to_spec() == {"kind": "vertical_slash", "vertical": 50, "slash": 50, "mass": 0.5}
    assert "mass" not in fixed.to_spec() and pattern_from_spec(thrifty.to_spec()) == thrifty
    with pytest.raises(ValueError, match="vertical_slash.mass"):
        VerticalSlash(mass=0.0)
    loose = fixed.estimate(q, k, geometry, dim ** -0.5)[0, 0]
    tight = thrifty.estimate(q, k, geometry, dim ** -0.5)[0, 0]
    i = torch.arange(5, length)
    token = torch.zeros(length, length, dtype=torch.bool)
    token[i, i - 5] = True
    assert (BlockLayout.from_block_mask(tight[None], geometry).to_dense()[0] | ~token).all()
    assert not (tight & ~loose).any() and tight.sum() < loose.sum()


def test_vertical_slash_gathers_scattered_columns():
    """Columns spread over many key blocks are visited token by token: the layout attends every
    planted pair, far fewer tokens than the blocks they touch, at a lower cost."""
    length, dim, planted = 1024, 32, torch.arange(70, 1024, 29)  # 33 keys in 15 of 16 blocks
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, length, dim, generator=gen) * 0.05, torch.randn(1, 1, length, dim, generator=gen) * 0.05
    q[..., 0], k[..., planted, 0] = 1.0, 30.0
    geometry = BlockGeometry(length, length, 64, 64, True)
    pattern = VerticalSlash(vertical=len(planted), slash=1)
    blocks, columns = pattern.select(q, k, geometry, dim ** -0.5)
    assert torch.equal(columns[0, 0].nonzero().flatten(), planted)
    gathered = BlockLayout.from_block_mask(blocks[0], geometry, columns[0])
    as_blocks = BlockLayout.from_block_mask(pattern.estimate(q, k, geometry, dim ** -0.5)[0], geometry)
    token = torch.zeros(length, length, dtype=torch.bool)
    token[:, planted] = True
    visited = gathered.to_dense()[0]
    assert (visited | ~token.tril()).all()
    assert visited.sum() < 0.5 * as_blocks.to_dense()[0].sum()
    assert gathered.density() < as_blocks.density()


@pytest.mark.parametrize("q_len, kv_len, q_block, kv_block", [(700, 700, 64, 128), (300, 1000, 32, 64)])
def test_column_and_diagonal_blocks_are_exact(q_len, kv_len, q_block, kv_block):
    """The block conversions equal brute force on the token mask (random kept columns/offsets)."""
    geometry = BlockGeometry(q_len, kv_len, q_block, kv_block, True)
    gen = torch.Generator().manual_seed(1)
    columns = torch.rand(1, 2, kv_len, generator=gen) < 0.02
    diagonals = torch.rand(1, 2, kv_len, generator=gen) < 0.01
    rows = torch.arange(q_len)[:, None] + (kv_len - q_len)
    keys = torch.arange(kv_len)[None, :]
    causal = keys <= rows
    offsets = (rows - keys).clamp(min=0)
    for h in range(2):
        token_columns = columns[0, h][None, :].expand(q_len, kv_len) & causal
        token_diagonals = diagonals[0, h][offsets] & causal

        def blocks(token):
            pad = (0, geometry.num_kv_blocks * kv_block - kv_len, 0, geometry.num_q_blocks * q_block - q_len)
            padded = torch.nn.functional.pad(token, pad)
            return padded.unflatten(0, (geometry.num_q_blocks, q_block)).unflatten(2, (geometry.num_kv_blocks,
                                                                                        kv_block)).any(-1).any(1)

        reachable = geometry.reachable()
        assert torch.equal(_column_blocks(columns, geometry)[0, h] & reachable, blocks(token_columns))
        assert torch.equal(_diagonal_blocks(diagonals, geometry)[0, h] & reachable, blocks(token_diagonals))


def test_diagonal_sums_equal_a_scatter_by_offset():
    """The skewed sum of the last rows' attention along diagonals equals scattering every entry to
    its offset (query - key)."""
    rows, keys = 7, 40
    attention = torch.rand(2, 3, rows, keys, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    offsets = torch.arange(keys - rows, keys)[:, None] - torch.arange(keys)[None, :]
    attention = attention.masked_fill(offsets < 0, 0.0)  # keys after their query: no attention
    expected = torch.zeros(2, 3, keys, dtype=torch.float64).scatter_add_(
        -1, offsets.clamp(min=0).expand_as(attention).flatten(2), attention.flatten(2))
    torch.testing.assert_close(_sum_by_offset(attention).double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", [{"kind": "vertical_slash", "vertical": 40, "slash": 60},
                                  {"kind": "block_topk", "k": 3}, {"kind": "block_cdf", "mass": 0.8}],
                         ids=lambda s: s["kind"])
def test_patched_model_equals_dense_attention_on_the_estimated_layout(spec):
    """Batch of 2 (the layout is the union of both samples' estimates), GQA (2 query heads per KV
    head), every other head dynamic and the rest a static window: the patched logits equal the
    model run with float64 dense attention on the token mask of the layout each call estimates."""
    model = tiny_llama()
    geometry_for = lambda s: BlockGeometry(s, s, 32, 64, True)  # noqa: E731
    dynamic, static = pattern_from_spec(spec), autosparse.Window(128)
    profile = autosparse.Profile.uniform(model, {"kind": "dense"}, block_size=(32, 64))
    heads = tuple(dynamic if h % 2 == 0 else static for h in range(4))
    for name, entry in profile.layers.items():
        profile.layers[name] = autosparse.LayerProfile(entry.index, 4, heads)

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        geometry = geometry_for(query.shape[2])
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        masks, columns = [], torch.zeros(len(heads), key.shape[2], dtype=torch.bool)
        for h, pattern in enumerate(heads):
            if pattern.is_dynamic:
                block, cols = pattern.select(query[:, h:h + 1], key[:, h:h + 1], geometry, scaling)
                block = block.any(0)[0]
                if cols is not None:
                    columns[h] = cols.any(0)[0]
            else:
                block = pattern.block_mask(geometry)
            masks.append(block)
        token = BlockLayout.from_block_mask(torch.stack(masks), geometry, columns).to_dense()[None]
        return attention(query, key, value, token, scale=scaling).to(query.dtype).transpose(1, 2), None

    ids = torch.randint(0, 512, (2, 600), generator=torch.Generator().manual_seed(3))
    with attention_function(model, reference), torch.no_grad():
        expected = model(ids, use_cache=False).logits
    autosparse.patch_model(model, profile, strict=True)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    calls = autosparse.stats(model)
    autosparse.unpatch_model(model)
    assert calls.sparse == 2 and not calls.fallback
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_grouped_keys_give_the_same_estimate_as_expanded_ones():
    """GQA: k is passed with its KV heads (never expanded); the estimate equals the one on keys
    repeated per query head."""
    geometry = BlockGeometry(500, 500, 32, 64, True)
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 4, 500, 16, generator=gen), torch.randn(2, 2, 500, 16, generator=gen)
    for pattern in (VerticalSlash(20, 40), BlockTopK(3), BlockCdf(0.7)):
        grouped = pattern.estimate(q, k, geometry, 0.25)
        expanded = pattern.estimate(q, k.repeat_interleave(2, 1), geometry, 0.25)
        assert torch.equal(grouped, expanded), pattern


def test_generation_prefills_sparse_and_decodes_dense():
    """model.generate with a dynamic profile: the prefill is estimated and served sparse, every
    decode step (query length 1, KV cache) runs dense and is counted, nothing falls back."""
    model = tiny_llama()
    profile = autosparse.Profile.uniform(model, {"kind": "block_topk", "k": 2}, block_size=(32, 64))
    ids = torch.randint(0, 512, (1, 400), generator=torch.Generator().manual_seed(5))
    autosparse.patch_model(model, profile, strict=True)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    calls = autosparse.stats(model)
    autosparse.unpatch_model(model)
    assert out.shape == (1, 405)
    assert calls.sparse == 2 and calls.dense["decode (query length 1)"] == 2 * 4 and not calls.fallback
