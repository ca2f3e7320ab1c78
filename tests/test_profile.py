"""Profile format v1: round trip, and every validation error names its field."""

import json

import pytest

from autosparse import Dense, Profile, SinkLocal
from autosparse.profile import SCHEMA_VERSION

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
