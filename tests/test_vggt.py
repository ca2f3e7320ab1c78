"""VGGT, served by its structure (examples/vggt_model.py: VGGT's architecture and names, random
weights, CPU): recognition, global attention served with every frame's special tokens dense, frame
attention untouched, ``torch.compile``, and profiles that refuse another VGGT size.

The reference for a sparse profile is the unpatched model with every global attention call run as
float64 dense attention on the token mask of that call's layout (the model's order; dynamic kinds
estimated from the call's own q and k in the kernel's order), every other call (frame attention)
left to torch. ``init_values=1.0`` (VGGT: 0.01) so that attention, not the residual, shapes the
output and a wrong mask cannot hide under the tolerance.
"""

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import autosparse
from autosparse.models.families import family_of
from autosparse.layout import BlockLayout, block_mask, grid_order
from autosparse.models import ModelKind, attention_layers, model_kind, model_signature
from autosparse.patterns import BlockGeometry, Dense, pattern_from_spec
from autosparse.runtime import CallPlan
from autosparse.patterns.geometry import TokenGeometry
from autosparse.testing.reference import in_model_order, sdpa_attention, sdpa_per_layer
from test_backend import ATTENTION, Inner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ importable
from examples.vggt_model import VGGT  # noqa: E402

BLOCKS = (16, 16)
FRAMES, HEIGHT, WIDTH = 3, 112, 84  # 8x6 patches of 14 px: 5 + 48 = 53 tokens per frame, 159 in all
TOKENS = TokenGeometry((FRAMES, 8, 6), frame_prefix=5)
PER_FRAME = 53
SPECIALS = [f * PER_FRAME + j for f in range(FRAMES) for j in range(5)]  # model positions, written out
GLOBAL = ["aggregator.global_blocks.0.attn", "aggregator.global_blocks.1.attn"]
SDPA = torch._C._nn.scaled_dot_product_attention
MIXED = "mixed"  # per head: block_topk, block_cdf, a neighborhood (grid order), dense (SDPA)
SPECS = [{"kind": "block_topk", "k": 2}, {"kind": "block_cdf", "mass": 0.5}, {"kind": "window", "window": 32},
         {"kind": "neighborhood", "window": [1, 3, 3]}, MIXED]


def tiny_vggt(depth: int = 2, num_heads: int = 4, seed: int = 0) -> VGGT:
    torch.manual_seed(seed)
    return VGGT(embed_dim=64, depth=depth, num_heads=num_heads, init_values=1.0).eval()


def images(seed: int, batch: int | None = None) -> torch.Tensor:
    shape = (FRAMES, 3, HEIGHT, WIDTH) if batch is None else (batch, FRAMES, 3, HEIGHT, WIDTH)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def make_profile(model: nn.Module, spec) -> autosparse.Profile:
    if spec != MIXED:
        return autosparse.Profile.uniform(model, spec, block_size=BLOCKS)
    profile = autosparse.Profile.uniform(model, Dense(), block_size=BLOCKS)
    heads = tuple(pattern_from_spec(s) for s in ({"kind": "block_topk", "k": 3}, {"kind": "block_cdf", "mass": 0.8},
                                                 {"kind": "neighborhood", "window": [1, 3, 3]}, {"kind": "dense"}))
    for name, entry in profile.layers.items():
        profile.layers[name] = autosparse.LayerProfile(entry.index, 4, heads)
    return profile


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return {name: value for name, value in out.items() if name != "images"}


def reference_layout(patterns, tokens: TokenGeometry, query: torch.Tensor, key: torch.Tensor) -> BlockLayout:
    """The layout of one global attention call (q/k ``[B, H, S, D]`` in the model's order): grid
    patterns in the order ``grid_order`` picks, dynamic heads estimated on q/k in kernel order (union
    over the batch), text and frame specials dense."""
    if any(p.needs_grid for p in patterns):
        tokens = grid_order(patterns, tokens, *BLOCKS)
    geometry = BlockGeometry(tokens.length, tokens.length, *BLOCKS, False, tokens)
    perm = tokens.permutation()
    q, k = query.index_select(2, perm), key.index_select(2, perm)
    text = geometry.text_block_mask()
    blocks = [p.estimate(q[:, h:h + 1], k[:, h:h + 1], geometry, query.shape[-1] ** -0.5).any(0)[0] | text
              if p.is_dynamic else block_mask(p, geometry) for h, p in enumerate(patterns)]
    return BlockLayout.from_block_mask(torch.stack(blocks), geometry)


def reference(model: nn.Module, profile: autosparse.Profile, x: torch.Tensor):
    """The unpatched model, each global attention call run as float64 attention on its layout's token
    mask; returns the outputs, the layouts (call order) and the number of other SDPA calls."""
    tokens = family_of(model).geometry(model, {"images": x})
    layers = {layer.module: layer for layer in attention_layers(model)}
    layouts, others = [], [0]

    def masked(layer, original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        if layer is None:
            others[0] += 1
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale)
        layout = reference_layout(profile.patterns(layer.name, layer.num_heads), tokens, query, key)
        layouts.append(layout)
        claimed = in_model_order(layout.to_dense(), layout.geometry.tokens)[None]
        return sdpa_attention(query, key, value, attn_mask, is_causal, scale, allowed=claimed)

    with sdpa_per_layer(layers, masked):
        return outputs(model, x), layouts, others[0]


@pytest.fixture
def served_layouts(monkeypatch):
    """Every layout the runtime serves a call with, in call order."""
    seen = []
    method = CallPlan.layout_for

    @functools.wraps(method)
    def recorded(*args, **kwargs):
        layout = method(*args, **kwargs)
        seen.append(layout)
        return layout

    monkeypatch.setattr(CallPlan, "layout_for", recorded)
    return seen


# -- recognition -------------------------------------------------------------------------------------


def test_recognised_by_structure_global_attention_only():
    model = tiny_vggt()
    assert model_kind(model) is ModelKind.MODULE and family_of(model).name == "vggt"
    layers = attention_layers(model)
    assert [layer.name for layer in layers] == GLOBAL  # frame attention is not served
    assert all((layer.num_heads, layer.num_kv_heads, layer.head_dim) == (4, 4, 16) for layer in layers)
    assert [layer.name for layer in attention_layers(model.aggregator)] == [f"global_blocks.{i}.attn" for i in (0, 1)]
    signature = model_signature(model)
    assert signature["class"] == "VGGT"
    assert {k: signature["config"][k] for k in ("depth", "embed_dim", "num_heads", "head_dim", "patch_size",
                                                "patch_start_idx")} == {"depth": 2, "embed_dim": 64, "num_heads": 4,
                                                                        "head_dim": 16, "patch_size": 14,
                                                                        "patch_start_idx": 5}
    with pytest.raises(TypeError, match="VGGT"):
        model_kind(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("batch", [None, 2], ids=["4-D", "5-D"])
def test_geometry_from_images_matches_the_global_sequence(batch):
    model = tiny_vggt()
    x = images(0, batch)
    tokens = family_of(model).geometry(model, {"images": x})
    assert tokens == TOKENS and tokens.length == FRAMES * PER_FRAME
    lengths = {}

    def record(module, args):
        lengths.setdefault(names[module], args[0].shape)

    names = {module: name for name, module in model.named_modules() if name.endswith(".attn")}
    hooks = [module.register_forward_pre_hook(record) for module in names]
    outputs(model, x)
    for hook in hooks:
        hook.remove()
    b = batch or 1
    assert lengths["aggregator.global_blocks.0.attn"] == (b, tokens.length, 64)
    assert lengths["aggregator.frame_blocks.0.attn"] == (b * FRAMES, PER_FRAME, 64)


# -- served eagerly ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s if s == MIXED else s["kind"])
def test_patched_equals_dense_attention_on_each_calls_layout(spec, served_layouts):
    model = tiny_vggt()
    profile = make_profile(model, spec)
    x = images(1)
    dense = outputs(model, x)
    expected, layouts, frame_calls = reference(model, profile, x)
    autosparse.patch_model(model, profile, strict=True)
    try:
        got = outputs(model, x)
        calls = autosparse.stats(model)
    finally:
        autosparse.unpatch_model(model)
    # frame attention untouched: two global calls served, nothing else counted
    assert calls.sparse == 2 and calls.total == 2 and frame_calls == 2
    assert len(served_layouts) == len(layouts) == 2
    kernel_heads = [h for h, p in enumerate(profile.patterns(GLOBAL[0], 4)) if not p.is_dense]  # dense: SDPA
    for served, ours in zip(served_layouts, layouts):
        mask = served.to_dense_model_order()[kernel_heads]  # [H, S, S], the model's order
        assert torch.equal(mask, ours.to_dense_model_order()[kernel_heads])
        assert mask[:, SPECIALS].all() and mask[:, :, SPECIALS].all()  # special tokens dense
        assert served[kernel_heads[0]:kernel_heads[-1] + 1].density() < 0.9
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)
    assert max((got[n] - dense[n]).abs().max() for n in dense) > 1e-3  # sparsity changed the answer


# -- torch.compile --------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_backend_matches_patch_model(fresh_dynamo):
    """Batch of 2 frame sets: the backend reads the geometry from the graph's ``images`` input, rewrites
    the global attention calls only (frame attention stays SDPA) and equals patch_model."""
    model = tiny_vggt()
    profile = make_profile(model, MIXED)
    x = images(2, batch=2)
    autosparse.patch_model(model, profile, strict=True)
    try:
        expected = outputs(model, x)
    finally:
        autosparse.unpatch_model(model)
    inner = Inner()
    compiled = torch.compile(model, backend="autosparse", options={"profile": profile, "inner": inner})
    try:
        got = outputs(compiled, x)
        calls = autosparse.stats(model)
        assert inner.count(ATTENTION) == 2 and inner.count(SDPA) == 2  # global served, frame left to SDPA
        assert calls.sparse == 2 and calls.total == 2
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
    finally:
        autosparse.unpatch_model(model)


# -- profiles --------------------------------------------------------------------------------------------


def test_profile_for_another_vggt_size_is_refused(tmp_path):
    model = tiny_vggt()
    path = tmp_path / "vggt.json"
    autosparse.Profile.uniform(model, {"kind": "block_cdf", "mass": 0.9}, block_size=BLOCKS).save(path)
    autosparse.Profile.load(path).check_model(model)  # the attribute signature survives JSON
    deeper = autosparse.Profile.uniform(tiny_vggt(depth=3), {"kind": "block_cdf", "mass": 0.9})
    with pytest.raises(ValueError, match=r"model\.config\.depth: expected 2 \(the model\), found 3"):
        autosparse.patch_model(model, deeper)
    fewer_heads = autosparse.Profile.uniform(tiny_vggt(num_heads=2), {"kind": "block_topk", "k": 2})
    with pytest.raises(ValueError, match=r"model\.config\.head_dim: expected 16 \(the model\), found 32"):
        fewer_heads.check_model(model)
    assert getattr(model, "_autosparse_state", None) is None  # nothing left patched
