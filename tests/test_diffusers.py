"""diffusers transformers (Wan, HunyuanVideo, CogVideoX, FLUX; tiny random-weight configs on CPU):
capture, token geometry, grid patterns, schedules, torch.compile.

The reference for a sparse profile is the unpatched model with every served attention call replaced
by float64 dense attention on the token mask the layout claims (mapped back from the kernel's tile
order to the model's order, plus HunyuanVideo's text padding): it checks capture, layer identity,
geometry, permutation, text handling and head routing end to end.
"""

import pytest
import torch
import torch.nn.functional as F

import autosparse
from autosparse.testing.dits import build_dit
from autosparse.models.families import family_of
from autosparse.layout import BlockLayout, grid_order
from autosparse.models import attention_layers
from autosparse.patterns import BlockGeometry, pattern_from_spec
from autosparse.patterns.geometry import default_tile
from autosparse.testing.reference import layout_mask, sdpa_attention, sdpa_per_layer

BLOCKS = (16, 32)
# Token shapes wide enough that tile order beats raster order (so the whole permutation path runs),
# with grid dims that are not multiples of the tiles and text that is not a multiple of the blocks.
SHAPES = {
    "wan": dict(frames=2, height=32, width=98),                  # grid 2x16x49, no text
    "hunyuan_video": dict(frames=2, height=32, width=98, text=9),  # + 9 text tokens after, 3 padded
    "cogvideox": dict(frames=4, height=32, width=98),            # grid 2x16x49, 7 text tokens before
    "flux": dict(height=17, width=48, text=5),                   # grid 17x48, 5 text tokens before
}
NEIGHBORHOOD = {"wan": [1, 5, 5], "hunyuan_video": [1, 5, 5], "cogvideox": [1, 5, 5], "flux": [5, 5]}
SERVED = {"wan": 2, "hunyuan_video": 2, "cogvideox": 2, "flux": 2}  # self/joint attention calls per forward


def _dit(family):
    return build_dit(family, "tiny", **SHAPES[family])


def _profile(model, spec):
    return autosparse.Profile.uniform(model, spec, block_size=BLOCKS)


def _reference(dit, profile, inputs):
    """The unpatched model, each served call run as float64 attention on the layout's token mask."""
    model = dit.model
    tokens = family_of(model).geometry(model, inputs)
    layers = {layer.module: layer for layer in attention_layers(model)}

    def masked(layer, original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        if layer is None:
            return original(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        patterns = profile.patterns(layer.name, layer.num_heads)
        claimed = layout_mask(patterns, tokens, query.shape[2], key.shape[2], BLOCKS)[None]
        # attn_mask: HunyuanVideo's text padding, [B, 1, 1, S]
        return sdpa_attention(query, key, value, attn_mask, is_causal, scale, allowed=claimed)

    with sdpa_per_layer(layers, masked), torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("family", list(SHAPES))
def test_dense_profile_equals_unpatched(family):
    dit = _dit(family)
    inputs = dit.inputs()
    with torch.no_grad():
        expected = dit.model(**inputs).sample
        autosparse.patch_model(dit.model, _profile(dit.model, {"kind": "dense"}))
        got = dit.model(**inputs).sample
    calls = autosparse.stats(dit.model)
    autosparse.unpatch_model(dit.model)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert calls.dense["dense in profile"] == SERVED[family] and calls.sparse == 0 and not calls.fallback


@pytest.mark.parametrize("family", list(SHAPES))
def test_neighborhood_profile_equals_masked_reference(family):
    dit = _dit(family)
    profile = _profile(dit.model, {"kind": "neighborhood", "window": NEIGHBORHOOD[family]})
    inputs = dit.inputs()
    expected = _reference(dit, profile, inputs)
    autosparse.patch_model(dit.model, profile, strict=True)
    with torch.no_grad():
        got = dit.model(**inputs).sample
    calls = autosparse.stats(dit.model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert calls.sparse == SERVED[family] and not calls.fallback and not calls.dense
    autosparse.unpatch_model(dit.model)
    assert F.scaled_dot_product_attention is autosparse.runtime.ORIGINAL_SDPA


def test_test_shapes_run_sparse_in_tile_order():
    """The reference comparison above means something only if the layouts skip blocks and the
    runtime permutes the tokens into tiles (text moved after the grid)."""
    for family in SHAPES:
        dit = _dit(family)
        tokens = family_of(dit.model).geometry(dit.model, dit.inputs())
        pattern = pattern_from_spec({"kind": "neighborhood", "window": NEIGHBORHOOD[family]})
        order = grid_order([pattern], tokens, *BLOCKS)
        assert order.tile == default_tile(len(tokens.grid), BLOCKS[1]), family
        layout = BlockLayout.from_patterns([pattern], BlockGeometry(tokens.length, tokens.length, *BLOCKS, False, order))
        assert layout.density() < 0.5, (family, layout.density())


def test_mixed_heads_and_layers():
    """Per-layer, per-head patterns: a dense head next to grid and 1-D heads, a dense layer."""
    dit = _dit("wan")
    model = dit.model
    profile = _profile(model, {"kind": "dense"})
    name = "blocks.1.attn1"
    heads = (pattern_from_spec({"kind": "spatial", "frames": 1}), pattern_from_spec({"kind": "window", "window": 40}))
    profile.layers[name] = autosparse.LayerProfile(profile.layers[name].index, 2, heads)
    inputs = dit.inputs()
    expected = _reference(dit, profile, inputs)
    autosparse.patch_model(model, profile, strict=True)
    with torch.no_grad():
        got = model(**inputs).sample
    calls = autosparse.stats(model)
    autosparse.unpatch_model(model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert calls.sparse == 1 and calls.dense["dense in profile"] == 1


def test_cross_attention_and_text_only_attention_are_not_served():
    wan = _dit("wan")
    assert [layer.name for layer in attention_layers(wan.model)] == ["blocks.0.attn1", "blocks.1.attn1"]
    hunyuan = _dit("hunyuan_video")
    names = [layer.name for layer in attention_layers(hunyuan.model)]
    assert names == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]


def test_step_schedule_dense_first_steps():
    dit = _dit("flux")
    profile = _profile(dit.model, {"kind": "neighborhood", "window": [3, 5]}).with_dense_steps(2)
    autosparse.patch_model(dit.model, profile)
    with torch.no_grad():
        for timestep in (1000.0, 1000.0, 750.0, 500.0, 250.0, 1000.0):  # CFG repeat, then a new run
            dit.model(**dit.inputs(timestep=timestep))
    calls = autosparse.stats(dit.model)
    autosparse.unpatch_model(dit.model)
    # steps 0, 0, 1 dense; 2, 3 sparse; the rise back to 1000 starts a new run at step 0 (dense)
    assert calls.dense["dense in profile"] == 4 * SERVED["flux"] and calls.sparse == 2 * SERVED["flux"]


def test_grid_pattern_without_geometry_is_refused_at_patch_time():
    """A model family without an adapter: 1-D patterns run; a grid pattern, which can never run
    there, is refused when patching, naming the head and the reason."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 6, 32),
                  pooled_projections=torch.randn(1, 16), timestep=torch.tensor([500]))
    with pytest.raises(ValueError, match=r"heads\[0\]: neighborhood.*no token grid"):
        autosparse.patch_model(model, _profile(model, {"kind": "neighborhood", "window": [3, 3]}))
    assert autosparse.patch.patch_of(model) is None
    with torch.no_grad():
        autosparse.patch_model(model, _profile(model, {"kind": "window", "window": 32}))
        model(**inputs)
        window_calls = autosparse.stats(model)
        autosparse.unpatch_model(model)
    assert window_calls.sparse == 1


def test_refuses_a_plain_module():
    with pytest.raises(TypeError, match="autosparse patches transformers models .* diffusers models .* and modules "
                                        "of a known structure"):
        autosparse.Profile.uniform(torch.nn.Linear(2, 2), {"kind": "dense"})


def test_profile_of_another_family_is_refused():
    wan, flux = _dit("wan"), _dit("flux")
    with pytest.raises(ValueError, match="model.class"):
        autosparse.patch_model(flux.model, _profile(wan.model, {"kind": "dense"}))


def test_resolution_change_just_works():
    dit = build_dit("wan", "tiny", frames=3, height=12, width=20)
    autosparse.patch_model(dit.model, _profile(dit.model, {"kind": "neighborhood", "window": [1, 3, 3]}), strict=True)
    with torch.no_grad():
        for frames, height, width in ((3, 12, 20), (2, 16, 8), (3, 12, 20)):
            args = dit.inputs()
            args["hidden_states"] = torch.randn(1, 4, frames, height, width)
            out = dit.model(**args).sample
            assert out.shape[-3:] == (frames, height, width) and torch.isfinite(out).all()
    assert autosparse.stats(dit.model).sparse == 6
    autosparse.unpatch_model(dit.model)


def _count_graphs():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    return graphs, backend


@pytest.mark.parametrize("family", list(SHAPES))
def test_compiled_model_matches_eager(family):
    dit = _dit(family)
    profile = _profile(dit.model, {"kind": "neighborhood", "window": NEIGHBORHOOD[family]})
    inputs = dit.inputs()
    autosparse.patch_model(dit.model, profile, strict=True)
    with torch.no_grad():
        eager = dit.model(**inputs).sample
        compiled = torch.compile(dit.model, backend="aot_eager", fullgraph=False)
        got = compiled(**inputs).sample
    assert autosparse.stats(dit.model).sparse == 2 * SERVED[family]
    autosparse.unpatch_model(dit.model)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_compile_repeated_blocks_keeps_layer_identity():
    """One graph serves both Wan blocks, yet block 0 runs its dense profile and block 1 its sparse one."""
    torch._dynamo.reset()
    dit = _dit("wan")
    model = dit.model
    profile = _profile(model, {"kind": "dense"})
    name = "blocks.1.attn1"
    spatial = pattern_from_spec({"kind": "neighborhood", "window": [1, 3, 3]})
    profile.layers[name] = autosparse.LayerProfile(profile.layers[name].index, 2, (spatial, spatial))
    inputs = dit.inputs()
    expected = _reference(dit, profile, inputs)
    autosparse.patch_model(model, profile, strict=True)
    graphs, backend = _count_graphs()
    model.compile_repeated_blocks(backend=backend)
    with torch.no_grad():
        got = model(**inputs).sample
    calls = autosparse.stats(model)
    autosparse.unpatch_model(model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(graphs) == 1
    assert calls.sparse == 1 and calls.dense["dense in profile"] == 1


def test_patch_and_unpatch_after_compiling():
    """A model compiled first (repeated blocks) picks the patch up (Dynamo re-traces the hooked
    blocks) and is exactly dense again after unpatching."""
    torch._dynamo.reset()
    dit = _dit("wan")
    model, inputs = dit.model, dit.inputs()
    profile = _profile(model, {"kind": "neighborhood", "window": NEIGHBORHOOD["wan"]})
    expected = _reference(dit, profile, inputs)
    with torch.no_grad():
        dense = model(**inputs).sample
        model.compile_repeated_blocks(backend="aot_eager")
        torch.testing.assert_close(model(**inputs).sample, dense, rtol=0, atol=0)
        autosparse.patch_model(model, profile, strict=True)
        sparse = model(**inputs).sample
        calls = autosparse.stats(model)
        autosparse.unpatch_model(model)
        again = model(**inputs).sample
    torch.testing.assert_close(sparse, expected, rtol=1e-4, atol=1e-4)
    assert calls.sparse == SERVED["wan"]
    torch.testing.assert_close(again, dense, rtol=0, atol=0)


def test_an_attention_backend_that_bypasses_sdpa_is_counted():
    """diffusers' set_attention_backend can route attention past F.scaled_dot_product_attention:
    those calls run as the backend says and are counted, never silently taken for served."""
    from diffusers.models.attention_dispatch import attention_backend

    dit = _dit("wan")
    autosparse.patch_model(dit.model, _profile(dit.model, {"kind": "neighborhood", "window": NEIGHBORHOOD["wan"]}))
    with torch.no_grad(), attention_backend("flex"):
        dit.model(**dit.inputs())
    calls = autosparse.stats(dit.model)
    autosparse.unpatch_model(dit.model)
    assert calls.sparse == 0
    (reason, count), = calls.fallback.items()
    assert count == 2 and reason.startswith("WanAttnProcessor") and "did not call F.scaled_dot_product_attention" in reason


def test_batch_with_different_text_padding_per_sample():
    """Classifier-free guidance batches prompts of different lengths: HunyuanVideo's padding mask
    then differs per sample, and the kernel applies each sample's key padding."""
    dit = _dit("hunyuan_video")
    profile = _profile(dit.model, {"kind": "neighborhood", "window": NEIGHBORHOOD["hunyuan_video"]})
    inputs = dit.inputs(batch=2)
    inputs["encoder_attention_mask"][1] = torch.tensor([1] * 4 + [0] * 5)
    expected = _reference(dit, profile, inputs)
    autosparse.patch_model(dit.model, profile, strict=True)
    with torch.no_grad():
        got = dit.model(**inputs).sample
    calls = autosparse.stats(dit.model)
    autosparse.unpatch_model(dit.model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert calls.sparse == SERVED["hunyuan_video"] and not calls.fallback
