"""Profile format v1: round trip, and every validation error names its field."""

import json
import re

import pytest

import autosparse
import autosparse.models
from autosparse import (BlockCdf, BlockGeometry, BlockLayout, BlockTopK, Dense, Global, Neighborhood, Profile,
                        SinkLocal, Spatial, Stripes, Temporal, TokenGeometry, Union, VerticalSlash, Window,
                        pattern_from_spec)
from autosparse.profile import SCHEMA_VERSION, LayerProfile, StepRange

from conftest import tiny_llama


def test_uniform_round_trip(llama, tmp_path):
    profile = Profile.uniform(llama, {"kind": "sink_local", "sinks": 4, "window": 256}, block_size=(64, 32))
    assert list(profile.layers) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert profile.layers["model.layers.1.self_attn"].heads == (SinkLocal(4, 256),) * 4
    assert profile.model["class"] == "LlamaForCausalLM" and profile.model["config"]["num_key_value_heads"] == 2
    assert {"device", "torch", "triton", "date"} <= set(profile.created)
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.to_dict() == profile.to_dict()
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    loaded.check_model(llama)


def _edit(profile: Profile, tmp_path, edit) -> str:
    data = profile.to_dict()
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return str(path)


LAYER = "model.layers.0.self_attn"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(schema_version=2), "schema_version: expected 1, found 2"),
        (lambda d: d.pop("layers"), "layers: missing"),
        (lambda d: d["model"].pop("fingerprint"), "model.fingerprint: missing"),
        (lambda d: d.update(block_size=[100, 64]), "block_size: expected [q_block, kv_block]"),
        (lambda d: d.pop("block_size"), "block_size: missing"),
        (lambda d: d["layers"][LAYER]["heads"].pop(), "heads: expected 4 patterns (num_heads), found 3"),
        (lambda d: d["layers"][LAYER]["heads"].__setitem__(1, {"kind": "magic"}), "heads[1].kind: expected one of"),
        (lambda d: d["layers"][LAYER].update(num_heads="4"), "num_heads: expected int >= 1, found '4'"),
        (lambda d: d["layers"][LAYER].update(measured=[{"error": 0.1}]), "measured: expected 4 entries"),
    ],
)
def test_load_errors_name_the_field(llama, tmp_path, edit, message):
    path = _edit(Profile.uniform(llama, Dense()), tmp_path, edit)
    with pytest.raises(ValueError) as err:
        Profile.load(path)
    assert message in str(err.value)
    if message.startswith(("heads", "num_heads", "measured")):
        assert f"layers[{LAYER!r}]" in str(err.value)


def test_corrupt_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"schema_version": 1, "layers": {')
    with pytest.raises(ValueError, match="not valid JSON"):
        Profile.load(path)


@pytest.mark.parametrize(
    "other, message",
    [
        (lambda: tiny_llama(layers=3), "model.config.num_hidden_layers: expected 3 (the model), found 2"),
        (lambda: tiny_llama(heads=8, head_dim=32), "model.config.head_dim: expected 32 (the model), found 64"),
    ],
)
def test_wrong_model_is_refused(llama, other, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Profile.uniform(llama, Dense()).check_model(other())


def test_wrong_layers_are_refused(llama):
    profile = Profile.uniform(llama, Dense())
    profile.layers["model.layers.7.self_attn"] = profile.layers.pop(LAYER)
    with pytest.raises(ValueError, match=r"layers\['model.layers.7.self_attn'\]: no such attention layer"):
        profile.check_model(llama)
    profile = Profile.uniform(llama, Dense())
    profile.layers[LAYER] = type(profile.layers[LAYER])(0, 2, (Dense(), Dense()))
    with pytest.raises(ValueError, match=r"num_heads: expected 4 \(the model\), found 2"):
        profile.check_model(llama)


def test_non_transformers_model_is_refused():
    import torch

    with pytest.raises(TypeError, match="transformers models"):
        Profile.uniform(torch.nn.Linear(2, 2), Dense())


# -- denoising-step schedules ------------------------------------------------------------------

LAYER1 = "model.layers.1.self_attn"
WINDOW = {"kind": "window", "window": 128}


def _scheduled(llama) -> Profile:
    """Default sink_local; steps [0, 10) dense; [30, end) runs layer 0 with a window."""
    profile = Profile.uniform(llama, {"kind": "sink_local", "sinks": 4, "window": 256})
    data = profile.to_dict()
    data["steps"] = [
        {"start": 30, "end": None, "layers": {LAYER: {"index": 0, "num_heads": 4, "heads": [WINDOW] * 4}}},
        {"start": 0, "end": 10, "dense": True},
    ]
    return Profile.from_dict(data)


def test_steps_round_trip(llama, tmp_path):
    profile = _scheduled(llama)
    assert [(r.start, r.end, r.dense) for r in profile.steps] == [(0, 10, True), (30, None, False)]  # sorted
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded == profile and loaded.to_dict() == profile.to_dict()
    assert json.loads(path.read_text())["steps"][0] == {"start": 0, "end": 10, "dense": True}
    loaded.check_model(llama)


def test_profile_without_steps_loads_and_saves_without_steps(llama):
    data = Profile.uniform(llama, Dense()).to_dict()
    assert "steps" not in data
    profile = Profile.from_dict(data)
    assert profile.steps == () and "steps" not in profile.to_dict()
    assert profile.patterns(LAYER, 4, step=0) == (Dense(),) * 4


@pytest.mark.parametrize(
    "step, layer0, layer1",
    [
        (None, "sink", "sink"),  # schedule ignored
        (0, "dense", "dense"),  # start inclusive
        (9, "dense", "dense"),
        (10, "sink", "sink"),  # end exclusive
        (29, "sink", "sink"),  # between ranges: default layers
        (30, "window", "sink"),  # the range replaces only the layers it lists
        (10_000, "window", "sink"),  # open end
    ],
)
def test_patterns_by_step(llama, step, layer0, layer1):
    expected = {"sink": (SinkLocal(4, 256),) * 4, "dense": (Dense(),) * 4, "window": (Window(128),) * 4}
    profile = _scheduled(llama)
    assert profile.patterns(LAYER, 4, step) == expected[layer0]
    assert profile.patterns(LAYER1, 4, step) == expected[layer1]


def test_patterns_of_unlisted_layer_is_dense_and_checks_heads(llama):
    profile = _scheduled(llama)
    assert profile.patterns("model.layers.9.self_attn", 3, step=30) == (Dense(),) * 3
    with pytest.raises(ValueError, match=r"^profile steps\[1\]\.layers\['model.layers.0.self_attn'\]\.num_heads: "
                                         r"expected 8 \(the caller\), found 4$"):
        profile.patterns(LAYER, 8, step=30)
    with pytest.raises(ValueError, match=r"^step: expected int >= 0, found -1$"):
        profile.patterns(LAYER, 4, step=-1)


def test_with_dense_steps(llama):
    base = Profile.uniform(llama, {"kind": "sink_local", "sinks": 4, "window": 256})
    early = base.with_dense_steps(5)
    assert base.steps == () and [(r.start, r.end, r.dense) for r in early.steps] == [(0, 5, True)]
    assert early.patterns(LAYER, 4, step=4) == (Dense(),) * 4
    assert early.patterns(LAYER, 4, step=5) == (SinkLocal(4, 256),) * 4
    early.layers.clear()  # a copy: the original keeps its layers
    assert LAYER in base.layers
    scheduled = _scheduled(llama)
    assert [(r.start, r.end) for r in scheduled.with_dense_steps(20).steps] == [(0, 20), (30, None)]  # replaced
    overlap = "with_dense_steps(31): steps[1]: [30, inf) overlaps steps[0]: [0, 31)"
    with pytest.raises(ValueError, match=f"^{re.escape(overlap)}$"):
        scheduled.with_dense_steps(31)
    with pytest.raises(ValueError, match=r"^with_dense_steps\(0\): end: expected null or int > start \(0\), found 0$"):
        base.with_dense_steps(0)


def _step_edit(llama, tmp_path, steps) -> str:
    return _edit(Profile.uniform(llama, Dense()), tmp_path, lambda d: d.update(steps=steps))


DENSE_HEADS = {"index": 0, "num_heads": 4, "heads": [{"kind": "dense"}] * 4}


@pytest.mark.parametrize(
    "steps, message",
    [
        ({"start": 0}, "steps: expected list, found {'start': 0}"),
        ([{"start": 0, "end": 10, "dense": True}, {"start": 5, "end": 12, "dense": True}],
         "steps[1]: [5, 12) overlaps steps[0]: [0, 10)"),
        ([{"start": 5, "end": None, "dense": True}, {"start": 40, "end": 50, "dense": True}],
         "steps[1]: [40, 50) overlaps steps[0]: [5, inf)"),
        ([{"start": 0, "dense": True}], "steps[0].end: missing"),
        ([{"start": -1, "end": 3, "dense": True}], "steps[0].start: expected int >= 0, found -1"),
        ([{"start": 0, "end": 10, "dense": True}, {"start": 5, "end": 5, "dense": True}],
         "steps[1].end: expected null or int > start (5), found 5"),
        ([{"start": 0, "end": 10, "dense": "yes"}], "steps[0].dense: expected bool, found 'yes'"),
        ([{"start": 0, "end": 10}], "steps[0].layers: expected at least one layer (or dense=true), found none"),
        ([{"start": 0, "end": 10, "dense": True, "layers": {LAYER: DENSE_HEADS}}],
         f"steps[0].layers: expected none with dense=true, found [{LAYER!r}]"),
        ([{"start": 0, "end": 10, "layers": {"x": {**DENSE_HEADS, "heads": [{"kind": "dense"}] * 2 + [{"kind": "x"}] * 2}}}],
         "steps[0].layers['x'].heads[2].kind: expected one of"),
        ([{"start": 0, "end": 10, "layers": {"x": {"index": 0, "num_heads": 4}}}],
         "steps[0].layers['x'].heads: missing"),
    ],
)
def test_step_errors_name_the_field(llama, tmp_path, steps, message):
    path = _step_edit(llama, tmp_path, steps)
    with pytest.raises(ValueError, match=f"^{re.escape(path)}: {re.escape(message)}"):
        Profile.load(path)


@pytest.mark.parametrize(
    "layers, message, on_load",
    [
        ({"model.layers.7.self_attn": DENSE_HEADS},
         "profile steps[1].layers['model.layers.7.self_attn']: no such attention layer in the model",
         "steps[1].layers['model.layers.7.self_attn']: expected a layer of model.attention.names"),
        ({LAYER: {**DENSE_HEADS, "num_heads": 2, "heads": [{"kind": "dense"}] * 2}},
         f"profile steps[1].layers[{LAYER!r}].num_heads: expected 4 (the model), found 2",
         f"steps[1].layers[{LAYER!r}].num_heads: expected 4 (model.attention.heads[0]), found 2"),
        ({LAYER: {**DENSE_HEADS, "index": 1}},
         f"profile steps[1].layers[{LAYER!r}].index: expected 0 (the model), found 1",
         f"steps[1].layers[{LAYER!r}].index: expected 0 (its position in model.attention.names), found 1"),
    ],
)
def test_check_model_checks_step_layers(llama, layers, message, on_load):
    """A file whose step layers disagree with its own model record is refused at load; a profile
    built in Python is refused by check_model."""
    data = Profile.uniform(llama, Dense()).to_dict()
    data["steps"] = [{"start": 0, "end": 3, "dense": True}, {"start": 3, "end": None, "layers": layers}]
    with pytest.raises(ValueError, match=f"^profile: {re.escape(on_load)}"):
        Profile.from_dict(data)
    base = Profile.uniform(llama, Dense())
    entries = {name: LayerProfile.from_dict(entry, name) for name, entry in layers.items()}
    profile = Profile(model=base.model, layers=base.layers,
                      steps=(StepRange(0, 3, dense=True), StepRange(3, None, layers=entries)))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        profile.check_model(llama)


def test_step_ranges_from_python(llama):
    base = Profile.uniform(llama, Dense())
    window = type(base.layers[LAYER])(0, 4, (Window(128),) * 4)
    late, early = StepRange(30, None, layers={LAYER: window}), StepRange(0, 10, dense=True)
    profile = Profile(model=base.model, layers=base.layers, steps=(late, early))
    assert profile.steps == (early, late) and profile.step_range(10) is None and profile.step_range(31) is late
    with pytest.raises(ValueError, match=r"^steps\[0\]: \[40, 50\) overlaps steps\[1\]: \[5, inf\)$"):
        Profile(model=base.model, layers=base.layers,
                steps=(StepRange(40, 50, dense=True), StepRange(5, None, dense=True)))
    with pytest.raises(ValueError, match=r"^layers: expected at least one layer \(or dense=true\), found none$"):
        StepRange(0, 10)


def test_block_size_is_bounded_by_the_kernel(llama):
    from autosparse.kernels.block_sparse_op import BLOCK_SIZES

    for bad in ((2 ** 30, 64), (256, 128), (64, 8), (64.0, 128)):
        with pytest.raises(ValueError, match=rf"^block_size: expected \[q_block, kv_block\], each one of "
                                             rf"{re.escape(str(list(BLOCK_SIZES)))}"):
            Profile.uniform(llama, Dense(), block_size=bad)
    assert Profile.uniform(llama, Dense(), block_size=(BLOCK_SIZES[-1], BLOCK_SIZES[0])).block_size == (128, 16)


# -- the model a profile is for (issue 14: a GPT-2 profile fitted any GPT-2) ------------------------

def _gpt2(layers: int, width: int, heads: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=width, n_layer=layers, n_head=heads)).eval()


def test_gpt2_signature_reads_config_attributes():
    """GPT2Config names its fields n_layer/n_embd/n_head: the signature reads them through
    transformers' attribute_map, and records every served attention layer."""
    import random

    layers = random.randint(1, 3)
    signature = autosparse.models.model_signature(_gpt2(layers, 64))
    assert signature["config"] == {"model_type": "gpt2", "num_hidden_layers": layers, "hidden_size": 64,
                                   "num_attention_heads": 4}
    assert signature["attention"] == {"names": [f"transformer.h.{i}.attn" for i in range(layers)],
                                      "heads": [4] * layers, "kv_heads": [4] * layers, "head_dim": [16] * layers}


@pytest.mark.parametrize(
    "other, message",
    [
        (lambda: _gpt2(4, 128), "profile model.config.hidden_size: expected 128 (the model), found 64"),
        (lambda: _gpt2(4, 64), "profile model.config.num_hidden_layers: expected 4 (the model), found 2"),
        (lambda: _gpt2(2, 64, heads=8), "profile model.config.num_attention_heads: expected 8 (the model), found 4"),
    ],
)
def test_gpt2_profile_is_refused_by_another_gpt2(other, message):
    """The reproduction of issue 14 (r08): a 2-layer profile on a 4-layer, wider GPT-2 ran the extra
    layers dense, silently. Now patch_model refuses it, naming the field, and patches nothing."""
    profile = Profile.uniform(_gpt2(2, 64), Window(16))
    model = other()
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        autosparse.patch_model(model, profile)
    assert getattr(model, "_autosparse_state", None) is None
    Profile.uniform(_gpt2(2, 64), Window(16)).check_model(_gpt2(2, 64))  # another GPT-2 of that shape fits


def test_attention_structure_is_checked_beyond_the_config(llama):
    """Layers the config does not describe: one more attention layer (its entry absent from the
    profile, so it would run dense) and a layer of another head dim are named field by field."""
    import copy

    profile = Profile.uniform(llama, SinkLocal(4, 64))
    deeper = tiny_llama()
    extra = copy.deepcopy(deeper.model.layers[0])
    extra.self_attn.layer_idx = 2
    deeper.model.layers.append(extra)
    assert autosparse.models.model_signature(deeper)["config"] == profile.model["config"]
    with pytest.raises(ValueError, match=r"^profile model\.attention\.names: expected 3 attention layers "
                                         r"\(the model\), found 2$"):
        profile.check_model(deeper)
    other = tiny_llama()
    other.model.layers[1].self_attn.head_dim = 32
    with pytest.raises(ValueError, match=r"^profile model\.attention\.head_dim\[1\] \('model\.layers\.1\.self_attn'\): "
                                         r"expected 32 \(the model\), found 64$"):
        profile.check_model(other)
    same = tiny_llama(seed=7)  # other weights, same structure: the same fingerprint
    assert autosparse.models.model_signature(same)["fingerprint"] == profile.model["fingerprint"]
    assert autosparse.models.model_signature(deeper)["fingerprint"] != profile.model["fingerprint"]


def test_edited_model_record_is_refused_at_load(llama, tmp_path):
    path = _edit(Profile.uniform(llama, Dense()), tmp_path, lambda d: d["model"]["config"].update(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"model\.fingerprint: expected '[0-9a-f]{16}' \(the hash of model\.class, "
                                         r"model\.config and model\.attention as recorded\), found"):
        Profile.load(path)
    path = _edit(Profile.uniform(llama, Dense()), tmp_path, lambda d: d["model"].pop("attention"))
    with pytest.raises(ValueError, match=r"edited\.json: model\.attention: missing$"):
        Profile.load(path)


def test_shipped_smollm2_profile_fits_its_model():
    """The shipped profile matches SmolLM2-135M's structure (built on the meta device, no weights)."""
    import torch
    from pathlib import Path
    from transformers import LlamaConfig, LlamaForCausalLM

    def smollm2(layers=30):
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                             num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
        with torch.device("meta"):
            return LlamaForCausalLM(config)

    profile = Profile.load(Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m.json")
    profile.check_model(smollm2())
    with pytest.raises(ValueError, match=r"model\.config\.num_hidden_layers: expected 29 \(the model\), found 30"):
        profile.check_model(smollm2(29))


# -- patterns a profile may hold ----------------------------------------------------------------------

def test_dynamic_patterns_cannot_be_nested(llama, tmp_path):
    """The runtime estimates a dynamic pattern only as a head's own pattern: inside Global or Union
    it would never be asked (select), so such a pattern is refused when it is built."""
    with pytest.raises(ValueError, match=r"^global\.inner: dynamic pattern 'block_topk' cannot be nested"):
        Global(BlockTopK(4), prefix=2)
    with pytest.raises(ValueError, match=r"^union\.of\[1\]: dynamic pattern 'block_cdf' cannot be nested"):
        Union((Window(8), BlockCdf(0.9)))
    with pytest.raises(ValueError, match=r"^union\.of\[0\]: dynamic pattern 'vertical_slash' cannot be nested"):
        Union([VerticalSlash(8, 8)])
    inner = {"kind": "block_topk", "k": 2}
    spec = {"kind": "union", "of": [{"kind": "window", "window": 8},
                                    {"kind": "global", "prefix": 1, "suffix": 0, "inner": inner}]}
    path = _edit(Profile.uniform(llama, Dense()), tmp_path, lambda d: d["layers"][LAYER]["heads"].__setitem__(2, spec))
    with pytest.raises(ValueError, match=rf"edited\.json: layers\['{LAYER}'\]\.heads\[2\]\.of\[1\]: "
                                         r"global\.inner: dynamic pattern 'block_topk' cannot be nested"):
        Profile.load(path)


def test_composites_pass_on_needs_grid_and_is_dynamic():
    grid = Neighborhood((1, 3, 3))
    assert Global(grid, prefix=3).needs_grid and Global(Union((Window(4), grid)), suffix=1).needs_grid
    assert not Global(Window(4), prefix=3).needs_grid
    assert not Global(grid, prefix=3).is_dynamic and not Union((grid, Window(4))).is_dynamic


@pytest.mark.parametrize("tiled", [True, False])
def test_global_around_a_neighborhood_follows_the_token_rule(tiled):
    """Global(inner=neighborhood) on a token grid: the layout is exactly the blocks holding a pair
    of the token rule (neighbourhood between grid tokens; the Global tokens, at the model's first
    ``prefix`` and last ``suffix`` positions, and the text attend and are attended by all), in the
    kernel's order, whatever tile order the grid is permuted into. Fresh random geometries per run;
    the Global tokens reach past the text into the grid, where the kernel order differs."""
    import random

    import torch

    from autosparse.patterns.grid import window_mask

    seed = random.randrange(2 ** 32)
    rng = random.Random(seed)
    for _ in range(6):
        grid = tuple(rng.randint(2, 6) for _ in range(3))
        tile = (rng.choice((1, 2)), rng.choice((2, 4)), rng.choice((2, 4))) if tiled else None
        tokens = TokenGeometry(grid, prefix=rng.randint(0, 5), suffix=rng.randint(0, 5), tile=tile,
                               frame_prefix=0 if tiled else rng.choice((0, 2)))
        window = tuple(rng.choice((1, 3, 5)) for _ in grid)
        pattern = Global(Neighborhood(window), prefix=tokens.prefix + rng.randint(1, 9),
                         suffix=tokens.suffix + rng.randint(0, 9))
        q_block, kv_block = rng.choice((4, 8, 16)), rng.choice((4, 8, 16))
        geometry = BlockGeometry(tokens.length, tokens.length, q_block, kv_block, False, tokens)
        layout = BlockLayout.from_patterns([pattern], geometry)

        n, length, start = tokens.grid_tokens, tokens.length, tokens.grid_start
        model_position = tokens.permutation() if tokens.permuted else torch.arange(length)  # of each kernel position
        is_grid = torch.zeros(length, dtype=torch.bool)
        is_grid[start:start + n] = True
        is_global = (model_position < pattern.prefix) | (model_position >= length - pattern.suffix)
        coords = tokens.coords()  # grid position p (kernel position start + p) -> its (t, h, w)
        near = torch.ones(n, n, dtype=torch.bool)
        for d, (size, w) in enumerate(zip(grid, window)):
            near &= window_mask(size, w)[coords[:, d][:, None], coords[:, d][None, :]]
        rule = (~is_grid | is_global)[:, None] | (~is_grid | is_global)[None, :]
        rule[start:start + n, start:start + n] |= near
        # The rule's blocks: a block pair is attended iff it holds one pair of the rule.
        nq, nk = geometry.num_q_blocks, geometry.num_kv_blocks
        padded = torch.zeros(nq * q_block, nk * kv_block, dtype=torch.bool)
        padded[:length, :length] = rule
        blocks = padded.view(nq, q_block, nk, kv_block).any(3).any(1)
        expected = blocks.repeat_interleave(q_block, 0).repeat_interleave(kv_block, 1)[:length, :length]
        assert torch.equal(layout.to_dense()[0], expected), (f"seed {seed}: {tokens}, {pattern}, "
                                                             f"blocks {q_block}x{kv_block}")


def test_pattern_nesting_is_capped(llama, tmp_path):
    from autosparse.patterns import MAX_PATTERN_DEPTH

    def nested(depth):
        spec = {"kind": "window", "window": 4}
        for level in range(depth - 1):
            spec = {"kind": "union", "of": [spec]} if level % 2 else {"kind": "global", "prefix": 1, "suffix": 0,
                                                                      "inner": spec}
        return spec

    assert pattern_from_spec(nested(MAX_PATTERN_DEPTH)) is not None
    for depth in (MAX_PATTERN_DEPTH + 1, 600):
        with pytest.raises(ValueError, match=rf"^layers\['a'\]\.heads\[0\](\.inner|\.of\[0\])+: expected patterns "
                                             rf"nested at most {MAX_PATTERN_DEPTH} levels deep, found deeper$"):
            pattern_from_spec(nested(depth), "layers['a'].heads[0]")
    deep = Window(4)
    with pytest.raises(ValueError, match=rf"global\.inner: expected patterns nested at most {MAX_PATTERN_DEPTH} "
                                         rf"levels deep, found {MAX_PATTERN_DEPTH + 1}"):
        for _ in range(600):
            deep = Global(deep, prefix=1)
    path = _edit(Profile.uniform(llama, Dense()), tmp_path,
                 lambda d: d["layers"][LAYER]["heads"].__setitem__(1, nested(20)))
    with pytest.raises(ValueError, match=rf"edited\.json: layers\['{LAYER}'\]\.heads\[1\](\.inner|\.of\[0\])+: "
                                         rf"expected patterns nested at most {MAX_PATTERN_DEPTH} levels deep"):
        Profile.load(path)


def _grid_geometry(grid, causal=False):
    tokens = TokenGeometry(grid, prefix=3)
    return BlockGeometry(tokens.length, tokens.length, 16, 16, False, tokens)


UNFIT = [  # pattern, geometry, the reason (None: fits)
    (Neighborhood((3, 3)), BlockGeometry(64, 64, 16, 16, False), "neighborhood needs a token grid"),
    (Neighborhood((3, 3)), _grid_geometry((3, 4, 6)),
     "neighborhood.window [3, 3] is 2-D, but BlockGeometry.tokens.grid (3, 4, 6) is 3-D"),
    (Neighborhood((3, 3, 3)), _grid_geometry((3, 4, 6)), None),
    (Temporal(), _grid_geometry((9, 13)), "temporal (a (T, H, W) rule) is 3-D, but BlockGeometry.tokens.grid (9, 13)"),
    (Stripes(2), _grid_geometry((9, 13)), "stripes.dim 2 is out of range for the 2-D BlockGeometry.tokens.grid"),
    (Spatial(), BlockGeometry(64, 96, 16, 16, True), "spatial needs a token grid"),
    (Global(Spatial(), prefix=2), _grid_geometry((9, 13)), "global.inner: spatial (a (T, H, W) rule) is 3-D"),
    (Union((Window(8), Neighborhood((1, 1)))), BlockGeometry(64, 64, 16, 16, True),
     "union.of[1]: neighborhood needs a token grid"),
    (Union((Window(8), Global(Neighborhood((1, 1)), prefix=1))), _grid_geometry((9, 13)), None),
    (Window(8), _grid_geometry((9, 13)), None),
    (VerticalSlash(8, 8), BlockGeometry(64, 64, 16, 16, False),
     "vertical_slash is for causal attention (LLM prefill), this call is not causal"),
    (VerticalSlash(8, 8), BlockGeometry(32, 64, 16, 16, True), None),
    (BlockTopK(2), _grid_geometry((3, 4, 6)), None),
]


@pytest.mark.parametrize("pattern, geometry, reason", UNFIT, ids=lambda x: getattr(x, "kind", None))
def test_unfit_says_before_the_layout_whether_a_pattern_applies(pattern, geometry, reason):
    """``unfit`` is None exactly when the pattern can be laid out (a static pattern's block mask is
    built; a dynamic one selects on random q and k), else the reason the layout would raise."""
    import torch

    got = pattern.unfit(geometry)
    assert (got is None) if reason is None else (got is not None and reason in got), got
    if pattern.is_dynamic:
        q, k = torch.randn(1, 2, geometry.q_len, 8), torch.randn(1, 2, geometry.kv_len, 8)
        build = lambda: pattern.select(q, k, geometry, 8 ** -0.5)  # noqa: E731
    else:
        build = lambda: BlockLayout.from_patterns([pattern], geometry)  # noqa: E731
    if got is None:
        build()
    else:
        with pytest.raises(ValueError, match=re.escape(got.split(": ")[-1])):
            build()


def _family_model(family):
    from autosparse.testing.dits import build_dit

    return build_dit(family, "tiny").model


@pytest.mark.parametrize(
    "family, spec, reason",
    [
        ("wan", {"kind": "vertical_slash", "vertical": 8, "slash": 8},
         "(non-causal attention of the 'wan' family, a 3-D token grid): vertical_slash is for causal attention "
         "(LLM prefill), this model's attention is not causal"),
        ("wan", {"kind": "neighborhood", "window": [3, 3]},
         "neighborhood.window [3, 3] is 2-D, but the model's token grid is 3-D"),
        ("flux", {"kind": "temporal", "window": [3, 3]},
         "temporal (a (T, H, W) rule) is 3-D, but the model's token grid is 2-D"),
        ("flux", {"kind": "union", "of": [{"kind": "window", "window": 8}, {"kind": "stripes", "dim": 2, "at": [0]}]},
         "union.of[1]: stripes.dim 2 is out of range for the model's 2-D token grid"),
        ("llama", {"kind": "global", "prefix": 1, "suffix": 0, "inner": {"kind": "neighborhood", "window": [3]}},
         "(causal attention of a transformers model, no token grid): global.inner: neighborhood needs a token grid"),
        ("wan", {"kind": "neighborhood", "window": [1, 3, 3]}, None),
        ("flux", {"kind": "global", "prefix": 4, "suffix": 0, "inner": {"kind": "neighborhood", "window": [3, 3]}},
         None),
        ("llama", {"kind": "vertical_slash", "vertical": 8, "slash": 8}, None),
        ("llama", {"kind": "block_topk", "k": 2}, None),
    ],
)
def test_patch_refuses_a_pattern_no_call_can_run(family, spec, reason):
    """Issue 14 (r11): vertical_slash on a DiT and a 2-D neighbourhood on Wan were accepted and
    raised inside the forward. Knowable from the model, they are refused by patch_model, naming the
    layer and head, on the default layers and on a step range's alike."""
    model = tiny_llama() if family == "llama" else _family_model(family)
    profile = Profile.uniform(model, spec)
    first = next(iter(profile.layers))
    if reason is None:
        profile.check_model(model)
        return
    name = re.escape(pattern_from_spec(spec).short_str())
    with pytest.raises(ValueError, match=rf"^profile layers\['{re.escape(first)}'\]\.heads\[0\]: "
                                         rf"{name} can never run on this layer"):
        autosparse.patch_model(model, profile)
    assert getattr(model, "_autosparse_state", None) is None
    with pytest.raises(ValueError, match=re.escape(reason)):
        profile.check_model(model)
    dense = Profile.uniform(model, Dense())
    entry = profile.layers[first]
    scheduled = Profile(model=dense.model, layers=dense.layers, block_size=dense.block_size,
                        steps=(StepRange(0, 2, dense=True), StepRange(2, None, layers={first: entry})))
    with pytest.raises(ValueError, match=rf"^profile steps\[1\]\.layers\['{re.escape(first)}'\]\.heads\[0\]: "):
        scheduled.check_model(model)
