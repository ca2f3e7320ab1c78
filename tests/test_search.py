"""The search: on synthetic heads with known structure it picks the right patterns, and the errors it
reports are the errors the chosen layouts really have."""

import math

import pytest
import torch

from autosparse import BlockGeometry, BlockLayout, Dense, Profile, Window, SinkLocal
from autosparse.models import AttentionLayer, attention_layers
from autosparse.search.calibration import SearchConfig, _Calibrator, calibrate, search_profile
from autosparse.testing.reference import attention


def positional_qkv(length: int, seed: int):
    """Head 0: q·k peaks at equal positions (local attention). Head 1: tiny random q/k (near
    uniform attention, nothing to drop). Head 2: local plus a strong sink on key 0."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freqs = 2 * math.pi / torch.logspace(math.log10(40), math.log10(1500), 31, dtype=torch.float64)
    feats = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs), torch.zeros(length, 2)], dim=-1)
    local = 1.2 * feats  # most of the mass within a few tokens, a long thin tail
    uniform = torch.randn(length, 64, generator=gen, dtype=torch.float64) * 0.05
    sink_q, sink_k = 1.5 * feats, 1.5 * feats
    sink_q[:, 62], sink_k[0, 62] = 4.0, 18.0  # every query scores key 0 like its own position
    q = torch.stack([local, uniform, sink_q])[None].float()
    k = torch.stack([local, uniform, sink_k])[None].float()
    v = torch.randn(1, 3, length, 64, generator=gen)
    return q, k, v


def exact_error(pattern, q, k, v, geometry) -> float:
    """Relative output error of one head's pattern over ALL rows, from the dense reference."""
    dense = attention(q, k, v, BlockLayout.from_patterns([Dense()], geometry).to_dense()[None])
    approx = attention(q, k, v, BlockLayout.from_patterns([pattern], geometry).to_dense()[None])
    return float((approx - dense).norm() / dense.norm())


def test_picks_cheapest_pattern_within_budget():
    length, budget = 1024, 0.05
    q, k, v = positional_qkv(length, seed=0)
    config = SearchConfig(budget=budget, block_size=(64, 32), windows=(64, 128, 256, 512), query_rows=512)
    layer = AttentionLayer("attn", 0, 3, 3, 64, module=None)
    calibrator = _Calibrator(config, [layer], progress=None)
    calibrator.observe("attn", q, k, v, causal=True, scale=1 / 8)
    chosen = calibrator.choose(layer)
    local, uniform, sink = chosen.heads
    assert isinstance(local, (Window, SinkLocal)) and local.window > 64, local
    assert uniform == Dense()
    assert isinstance(sink, SinkLocal), sink
    geometry = BlockGeometry(length, length, 64, 32, causal=True)
    for h, pattern in enumerate(chosen.heads):
        measured = chosen.measured[h]
        if pattern.is_dense:
            assert measured == {"error": 0.0, "density": 1.0, "cost": 1.0}
            continue
        true_error = exact_error(pattern, q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], geometry)
        assert true_error <= 1.5 * budget
        assert measured["error"] == pytest.approx(true_error, rel=0.5, abs=5e-3)
        assert measured["density"] == pytest.approx(BlockLayout.from_patterns([pattern], geometry).density(), rel=1e-6)
    # A cheaper candidate than the one chosen must have been over budget.
    errors = calibrator.scores["attn"].relative_error()
    blocks = calibrator.scores["attn"].blocks[0]  # head 0: static candidates cost the same in every head
    picked = calibrator.candidates.index(local)
    cheaper = [c for c in range(len(blocks)) if blocks[c] < blocks[picked]]
    assert cheaper and all(errors[0, c] > budget for c in cheaper)


def test_search_profile_on_a_model(llama, tmp_path):
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(0))
    config = SearchConfig(budget=0.3, block_size=(32, 16), windows=(32, 64, 128), query_rows=64)
    profile = search_profile(llama, [ids, ids[:, :200]], config, progress=False)
    assert [layer.name for layer in attention_layers(llama)] == list(profile.layers)
    assert llama.config._attn_implementation == "sdpa"
    for layer in profile.layers.values():
        for pattern, measured in zip(layer.heads, layer.measured):
            assert measured["error"] <= 0.3
            assert (measured["density"] == 1.0) == pattern.is_dense
    assert profile.search["calibration"]["tokens"] == 500
    path = tmp_path / "p.json"
    profile.save(path)
    assert Profile.load(path).to_dict() == profile.to_dict()
    # Reproducible: same inputs and seed give the same profile.
    again = search_profile(llama, [ids, ids[:, :200]], config, progress=False)
    assert {n: l.heads for n, l in again.layers.items()} == {n: l.heads for n, l in profile.layers.items()}


def test_budget_is_validated():
    with pytest.raises(ValueError, match="budget must be in"):
        SearchConfig(budget=0.0)


# -- diffusion transformers: grid candidates in tile order --------------------------------------


def grid_qkv(tokens, seed: int):
    """Model order: ``prefix`` text, the grid in raster order, ``suffix`` text. Head 0 attends by
    3-D distance on the grid (local), head 1 near-uniformly; text tokens get random features."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in tokens.grid], indexing="ij"),
                       -1).reshape(-1, len(tokens.grid))
    freqs = 2 * math.pi / torch.tensor([6.0, 9.0, 14.0, 22.0], dtype=torch.float64)
    feats = torch.cat([f(grid[:, :, None] * freqs).flatten(1) for f in (torch.cos, torch.sin)], dim=-1)
    feats = torch.nn.functional.pad(feats, (0, 32 - feats.shape[-1])) * 5.0
    text = lambda n: torch.randn(n, 32, generator=gen, dtype=torch.float64) * 0.3  # noqa: E731
    local = torch.cat([text(tokens.prefix), feats, text(tokens.suffix)])
    uniform = torch.randn(tokens.length, 32, generator=gen, dtype=torch.float64) * 0.05
    q = k = torch.stack([local, uniform])[None].float()
    v = torch.randn(1, 2, tokens.length, 32, generator=gen)
    return q, k, v


def test_grid_candidates_scored_in_tile_order():
    """The error reported for a chosen neighborhood is the error that layout has when the kernel
    runs it (tile order, text dense), measured over all grid rows with dense masked attention."""
    from autosparse import TokenGeometry
    from autosparse.patterns.grid import Neighborhood

    tokens = TokenGeometry((4, 16, 32), prefix=5)
    budget = 0.15
    config = SearchConfig(budget=budget, block_size=(32, 64), densities=(0.1, 0.2, 0.3, 0.5), query_rows=1024)
    q, k, v = grid_qkv(tokens, seed=0)
    layer = AttentionLayer("attn", 0, 2, 2, 32, module=None)
    calibrator = _Calibrator(config, [layer], progress=None)
    calibrator.observe("attn", q, k, v, causal=False, scale=32 ** -0.5, tokens=tokens)
    from autosparse import Union
    from autosparse.patterns.grid import Spatial, Stripes, Temporal

    *neighborhoods, spatial, temporal, first_frame, dense = calibrator.candidates  # video: 3 head types more
    assert all(isinstance(c, Neighborhood) for c in neighborhoods) and len(neighborhoods) > 1
    assert (spatial, temporal, dense) == (Spatial(1), Temporal((1, 1)), Dense())
    assert first_frame == Union((neighborhoods[0], Stripes(0, (0,))))
    chosen = calibrator.choose(layer)
    local, uniform = chosen.heads
    assert isinstance(local, Neighborhood) and uniform == Dense()
    from autosparse.patterns.geometry import default_tile

    tiled = tokens.with_tile(default_tile(3, 64))
    geometry = BlockGeometry(tokens.length, tokens.length, 32, 64, False, tiled)
    mask = BlockLayout.from_patterns([local], geometry).to_dense_model_order()[None]  # [1, 1, S, S]
    dense = attention(q[:, :1], k[:, :1], v[:, :1])
    approx = attention(q[:, :1], k[:, :1], v[:, :1], mask)
    rows = slice(tokens.prefix, tokens.prefix + tokens.grid_tokens)
    true_error = float((approx - dense)[:, :, rows].norm() / dense[:, :, rows].norm())
    assert true_error <= 1.5 * budget
    assert chosen.measured[0]["error"] == pytest.approx(true_error, rel=0.25, abs=5e-3)
    assert chosen.measured[0]["density"] == pytest.approx(BlockLayout.from_patterns([local], geometry).density(),
                                                          abs=1e-6)  # stored rounded to 6 decimals
    with pytest.raises(ValueError, match="one token geometry"):
        calibrator.observe("attn", q, k, v, causal=False, scale=0.2, tokens=TokenGeometry((4, 16, 32), prefix=6))


def _generation_stats(model, profile, steps):
    """Attention call counts of one patched generation over ``steps``."""
    import autosparse

    autosparse.patch_model(model, profile, strict=True)
    with torch.no_grad():
        for inputs in steps:
            model(**inputs)
    calls = autosparse.stats(model)
    autosparse.unpatch_model(model)
    return calls


def test_search_profile_on_a_diffusion_transformer():
    """A tiny Wan calibrated over three denoising steps through the patch_model capture: grid
    candidates, dense first step (not calibrated), a profile that patches the model."""
    import autosparse
    from autosparse.testing.dits import build_dit

    dit = build_dit("wan", frames=2, height=32, width=96)
    steps = [dit.inputs(timestep=t) for t in (900.0, 700.0, 500.0)]
    config = SearchConfig(budget=0.5, block_size=(16, 32), densities=(0.2, 0.4), dense_steps=1, query_rows=64)
    profile = search_profile(dit.model, steps, config, progress=False)
    calibration = profile.search["calibration"]
    assert calibration["grid"] == [2, 16, 48] and calibration["dense_steps"] == 1
    assert profile.token_order == "tile"  # the order it was scored in, hence the one that runs
    assert profile.steps[0].dense and (profile.steps[0].start, profile.steps[0].end) == (0, 1)
    assert any("neighborhood" in c for c in profile.search["candidates"])
    for entry in profile.layers.values():
        assert all(m["error"] <= 0.5 for m in entry.measured)
    assert autosparse.patch.patch_of(dit.model) is None  # unpatched after calibrating
    calls = _generation_stats(dit.model, profile, steps)
    sparse_layers = sum(any(not p.is_dense for p in entry.heads) for entry in profile.layers.values())
    assert sparse_layers > 0
    assert calls.sparse == 2 * sparse_layers and calls.dense["dense in profile"] == 6 - 2 * sparse_layers


def test_step_ranges_get_their_own_patterns():
    """Calls are scored per step range; each range but the last becomes a StepRange of the profile
    (dense if nothing there is sparse), the last is the default, the first steps stay dense."""
    import autosparse
    from autosparse.testing.dits import build_dit

    dit = build_dit("wan", frames=2, height=32, width=96)
    steps = [dit.inputs(timestep=t) for t in (900.0, 800.0, 700.0, 600.0, 500.0)]
    config = SearchConfig(budget=0.5, block_size=(16, 32), densities=(0.2, 0.4), dense_steps=1, step_ranges=(3,),
                          query_rows=64)
    calibration = calibrate(dit.model, steps, config, progress=False)
    assert len(calibration.calibrator.ranges) == 2
    profile = calibration.profile()
    dense_first, middle = profile.steps
    assert dense_first.dense and (dense_first.start, dense_first.end) == (0, 1)
    assert (middle.start, middle.end) == (1, 3) and not middle.dense
    # The middle range's choice is made on steps 1-2 only: it matches choosing from those scores.
    calibrator = calibration.calibrator
    for name, layer in calibrator.layers.items():
        assert middle.layers[name].heads == calibrator.choose(layer, 0.5, 0).heads
        assert profile.layers[name].heads == calibrator.choose(layer, 0.5, 1).heads
    # Nothing sparse at a tiny budget: the middle range becomes dense, the default layers dense too.
    tight = calibration.profile(1e-6)
    assert tight.steps[1].dense and all(p.is_dense for e in tight.layers.values() for p in e.heads)
    calls = _generation_stats(dit.model, profile, steps)
    assert calls.total == 10 and calls.dense["dense in profile"] >= 2  # step 0 at least
    with pytest.raises(ValueError, match="step_ranges must rise"):
        SearchConfig(dense_steps=4, step_ranges=(3,))


def test_record_inputs_of_a_pipeline_then_calibrate():
    """A pipeline-like loop calls the transformer positionally and with keywords (CFG: twice per
    step); the recorded calls replay exactly and calibrate like hand-made inputs."""
    from autosparse.testing.dits import build_dit
    from autosparse.search.calibration import record_inputs

    dit = build_dit("wan", frames=2, height=32, width=96)
    steps = [dit.inputs(timestep=t) for t in (900.0, 600.0)]

    def pipeline():
        with torch.no_grad():
            for inputs in steps:
                for _ in range(2):  # conditional and unconditional
                    dit.model(inputs["hidden_states"], **{k: v for k, v in inputs.items() if k != "hidden_states"})

    recorded = record_inputs(dit.model, pipeline)
    assert len(recorded) == 4 and torch.equal(recorded[2]["hidden_states"], steps[1]["hidden_states"])
    assert record_inputs(dit.model, pipeline, calls=3)[-1]["timestep"] is steps[1]["timestep"]
    config = SearchConfig(budget=0.5, block_size=(16, 32), densities=(0.2, 0.4), query_rows=64)
    from_recorded = search_profile(dit.model, recorded, config, progress=False)
    by_hand = search_profile(dit.model, [x for x in steps for _ in range(2)], config, progress=False)
    assert {n: e.heads for n, e in from_recorded.layers.items()} == {n: e.heads for n, e in by_hand.layers.items()}


def test_an_interrupted_calibration_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Stopped after 2 of 4 denoising steps, started again with the same checkpoint: it skips the
    steps done, keeps counting steps where it left off, and ends exactly where one run ends."""
    import autosparse
    import autosparse.search.calibration as search
    from autosparse.testing.dits import build_dit

    dit = build_dit("wan", frames=2, height=32, width=96)
    steps = [dit.inputs(timestep=t) for t in (900.0, 800.0, 700.0, 600.0)]
    config = SearchConfig(budget=0.5, block_size=(16, 32), densities=(0.2, 0.4), dense_steps=1, step_ranges=(3,),
                          query_rows=64)
    whole = calibrate(dit.model, steps, config, progress=False)
    checkpoint = tmp_path / "calib.pt"
    real_run, seen = search.run_model, []

    def stop_at_third(model, x):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(x)
        return real_run(model, x)

    monkeypatch.setattr(search, "run_model", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        calibrate(dit.model, steps, config, progress=False, checkpoint=checkpoint)
    monkeypatch.setattr(search, "run_model", lambda model, x: seen.append(x) or real_run(model, x))
    resumed = calibrate(dit.model, steps, config, progress=False, checkpoint=checkpoint)
    assert [s["timestep"] for s in seen] == [s["timestep"] for s in steps]  # each step run once in all
    for a, b in zip(whole.calibrator.ranges, resumed.calibrator.ranges):
        for name in a:
            assert torch.equal(a[name].err_sq, b[name].err_sq) and torch.equal(a[name].blocks, b[name].blocks)
    assert whole.profile().to_dict()["layers"] == resumed.profile().to_dict()["layers"]
    assert whole.profile().steps == resumed.profile().steps
    with pytest.raises(ValueError, match="checkpoint .*: inputs is 4"):
        calibrate(dit.model, steps[:3], config, progress=False, checkpoint=checkpoint)
    assert autosparse.patch.patch_of(dit.model) is None  # a refused checkpoint leaves the model unpatched


def test_dynamic_candidates_win_where_attention_follows_content():
    """Head 0 attends two far-away key blocks chosen by content (no window reaches them cheaply):
    with dynamic candidates the search takes block_topk for it, and its reported error is the
    error its own estimated layout has."""
    from autosparse import BlockTopK
    from autosparse.patterns.dynamic import DynamicPattern

    from test_dynamic import planted_blocks

    geometry = BlockGeometry(1024, 1024, 64, 128, causal=False)
    picks = {b: [(b + 3) % 8, (b + 5) % 8] for b in range(geometry.num_q_blocks)}
    q, k = planted_blocks(geometry, picks)
    v = torch.randn(1, 1, 1024, q.shape[-1], generator=torch.Generator().manual_seed(2))
    layer = AttentionLayer("attn", 0, 1, 1, q.shape[-1], module=None)
    config = SearchConfig(budget=0.1, block_size=(64, 128), windows=(128, 256, 512), query_rows=1024,
                          dynamic=True)
    calibrator = _Calibrator(config, [layer], progress=None)
    calibrator.observe("attn", q, k, v, causal=False, scale=0.125)
    chosen = calibrator.choose(layer).heads[0]
    assert isinstance(chosen, DynamicPattern), chosen
    without = _Calibrator(SearchConfig(budget=0.1, block_size=(64, 128), windows=(128, 256, 512),
                                       query_rows=1024), [layer], progress=None)
    without.observe("attn", q, k, v, causal=False, scale=0.125)
    assert without.choose(layer).measured[0]["density"] > calibrator.choose(layer).measured[0]["density"]
    mask = chosen.estimate(q, k, geometry, 0.125)[0]
    token = BlockLayout.from_block_mask(mask, geometry).to_dense()[None]
    dense = attention(q, k, v, scale=0.125)
    approx = attention(q, k, v, token, scale=0.125)
    true_error = float((approx - dense).norm() / dense.norm())
    assert calibrator.choose(layer).measured[0]["error"] == pytest.approx(true_error, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("order", ["tile", "raster"])
def test_the_runtime_lays_grids_out_in_the_profiles_token_order(tmp_path, order):
    """One owner of the token order (layout.grid_order): what a profile records is what runs,
    whichever order would need fewer blocks."""
    import autosparse
    from autosparse import runtime
    from autosparse.testing.dits import build_dit

    dit = build_dit("wan", frames=2, height=32, width=96)
    profile = Profile.uniform(dit.model, {"kind": "neighborhood", "window": [1, 3, 3]}, block_size=(16, 32))
    profile.token_order = order
    profile.save(tmp_path / "p.json")
    loaded = Profile.load(tmp_path / "p.json")
    assert loaded.token_order == order
    autosparse.patch_model(dit.model, loaded)
    with torch.no_grad():
        dit.model(**dit.inputs())
    heads = {runtime.plan_of(m._autosparse_layer).heads_at(None) for m in autosparse.patch.patch_of(dit.model).modules}
    orders = [plan.geometry.tokens for key, plan in runtime.plan._CALL_PLANS.items() if key[0] in heads and key[-1] == order]
    autosparse.unpatch_model(dit.model)
    assert orders and all((tokens.tile is not None) == (order == "tile") for tokens in orders)


def _vertical_heads(length: int, dim: int = 32, seed: int = 0):
    """One causal head (softmax scale 1) that reads mostly itself (q_i . k_i = |x_i|^2, the main
    diagonal: ~90 % of the last rows' attention) and 24 scattered "heavy" keys every query reads
    (columns): no window or block top-k holds that cheaply."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, length, dim, generator=gen)
    q, k = x.clone(), x.clone()
    heavy = torch.randperm(length - 256, generator=gen)[:24] + 128
    q[..., 0], k[..., 0] = 3.5, 0.0
    k[..., heavy, 0] = 3.5
    return q, k, torch.randn(1, 1, length, dim, generator=gen)


def test_vertical_slash_is_scored_as_the_kernel_runs_it():
    """With dynamic candidates the search takes vertical_slash for a head of columns + diagonal;
    its reported error is the error of its own layout (key blocks plus gathered columns, token by
    token) and its density counts the gathered columns' tiles."""
    from autosparse import VerticalSlash
    from autosparse.patterns.dynamic import key_tiles

    length = 2048
    geometry = BlockGeometry(length, length, 64, 128, causal=True)
    q, k, v = _vertical_heads(length)
    layer = AttentionLayer("attn", 0, 1, 1, q.shape[-1], module=None)
    config = SearchConfig(budget=0.2, block_size=(64, 128), windows=(128, 256, 512, 1024), query_rows=length,
                          dynamic=True)
    calibrator = _Calibrator(config, [layer], progress=None)
    calibrator.observe("attn", q, k, v, causal=True, scale=1.0)
    chosen = calibrator.choose(layer)
    pattern = chosen.heads[0]
    assert isinstance(pattern, VerticalSlash), chosen.measured
    blocks, columns = pattern.select(q, k, geometry, 1.0)
    assert columns is not None and columns.any(), "expected gathered columns"
    token = BlockLayout.from_block_mask(blocks[0], geometry, columns[0]).to_dense()[None]
    dense = attention(q, k, v, torch.ones(length, length, dtype=torch.bool).tril(), scale=1.0)
    approx = attention(q, k, v, token, scale=1.0)
    true_error = float((approx - dense).norm() / dense.norm())
    assert chosen.measured[0]["error"] == pytest.approx(true_error, rel=1e-3, abs=1e-6)
    expected_density = float(key_tiles(blocks, columns, geometry)[0, 0]) / float(geometry.reachable().sum())
    assert chosen.measured[0]["density"] == pytest.approx(expected_density, abs=1e-6)


def test_vertical_slash_is_never_chosen_for_attention_that_is_not_causal():
    from autosparse.patterns.dynamic import VerticalSlash

    q, k, v = _vertical_heads(1024)
    layer = AttentionLayer("attn", 0, 1, 1, q.shape[-1], module=None)
    calibrator = _Calibrator(SearchConfig(budget=0.05, block_size=(64, 128), windows=(128, 256), query_rows=256,
                                          dynamic=True), [layer], progress=None)
    calibrator.observe("attn", q, k, v, causal=False, scale=1.0)
    assert not isinstance(calibrator.choose(layer).heads[0], VerticalSlash)
