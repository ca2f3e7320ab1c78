"""Profile format v1: round trip, and every validation error names its field."""

import json
import re

import pytest

from autosparse import Dense, Profile, SinkLocal, Window
from autosparse.profile import SCHEMA_VERSION, StepRange

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
        (lambda d: d["layers"][LAYER].update(num_heads="4"), "num_heads: expected int, found '4'"),
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
    "layers, message",
    [
        ({"model.layers.7.self_attn": DENSE_HEADS},
         "profile steps[1].layers['model.layers.7.self_attn']: no such attention layer in the model"),
        ({LAYER: {**DENSE_HEADS, "num_heads": 2, "heads": [{"kind": "dense"}] * 2}},
         f"profile steps[1].layers[{LAYER!r}].num_heads: expected 4 (the model), found 2"),
        ({LAYER: {**DENSE_HEADS, "index": 1}},
         f"profile steps[1].layers[{LAYER!r}].index: expected 0 (the model), found 1"),
    ],
)
def test_check_model_checks_step_layers(llama, layers, message):
    data = Profile.uniform(llama, Dense()).to_dict()
    data["steps"] = [{"start": 0, "end": 3, "dense": True}, {"start": 3, "end": None, "layers": layers}]
    profile = Profile.from_dict(data)
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
