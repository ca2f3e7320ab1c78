"""patch_model on a transformers LLM: equal to an independent masked-attention reference, padding
honoured, unservable calls counted as dense fallbacks, unpatch restores the model exactly."""

import pytest
import torch

import autosparse
from autosparse import BlockLayout, Dense, LayerProfile, Profile, SinkLocal, Window
from autosparse.models import attention_layers
from autosparse.testing.reference import transformers_reference

BLOCKS = (32, 16)


def mixed_profile(model) -> Profile:
    """Different patterns per head and per layer, one layer fully dense."""
    profile = Profile.uniform(model, Dense(), block_size=BLOCKS)
    heads = (SinkLocal(4, 32), Window(48), Dense(), SinkLocal(20, 16))
    name = "model.layers.0.self_attn"
    profile.layers[name] = LayerProfile(0, 4, heads)
    return profile


def reference_logits(model, profile: Profile, input_ids, attention_mask=None) -> torch.Tensor:
    """The model run with float64 dense attention on (pattern mask AND the model's own mask); with
    left padding, a row's pattern counts from its first real token."""
    with transformers_reference(model, profile, attention_mask):
        return logits(model, input_ids, attention_mask)


def logits(model, input_ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_all_dense_profile_equals_unpatched(llama):
    ids = random_ids(1, 150, seed=1)
    expected = logits(llama, ids)
    autosparse.patch_model(llama, Profile.uniform(llama, Dense(), block_size=BLOCKS))
    torch.testing.assert_close(logits(llama, ids), expected, rtol=0, atol=0)
    calls = autosparse.stats(llama)
    assert calls.sparse == 0 and calls.dense["dense in profile"] == 2 and not calls.fallback


def test_sparse_profile_equals_masked_reference(llama):
    profile = mixed_profile(llama)
    ids = random_ids(2, 203, seed=2)  # ragged: not a multiple of either block size
    expected = reference_logits(llama, profile, ids)
    dense = logits(llama, ids)
    autosparse.patch_model(llama, profile)
    got = logits(llama, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - dense).abs().max() > 1e-3  # the pattern really changed the attention
    calls = autosparse.stats(llama)
    assert calls.sparse == 1 and calls.dense["dense in profile"] == 1 and not calls.fallback


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_honoured(llama, side):
    profile = mixed_profile(llama)
    ids = random_ids(2, 180, seed=3)
    mask = torch.ones_like(ids)
    pad = slice(0, 37) if side == "left" else slice(180 - 37, 180)
    mask[1, pad] = 0
    expected = reference_logits(llama, profile, ids, mask)
    autosparse.patch_model(llama, profile)
    got = logits(llama, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-4)
    calls = autosparse.stats(llama)
    assert calls.sparse == 1 and not calls.fallback


def test_unservable_calls_fall_back_and_are_counted(llama):
    profile = mixed_profile(llama)
    ids = random_ids(1, 96, seed=4)
    autosparse.patch_model(llama, profile)
    # Gradients: the kernel has no backward, so this forward runs dense (and matches dense).
    llama.requires_grad_(True)
    out = llama(input_ids=ids).logits
    assert autosparse.stats(llama, reset=True).fallback["autograd (the kernel has no backward)"] == 1
    out.sum().backward()
    llama.requires_grad_(False)
    # Packed sequences (position_ids restart) give a block-diagonal mask: not causal + padding.
    position_ids = torch.cat([torch.arange(48), torch.arange(48)])[None]
    with torch.no_grad():
        llama(input_ids=ids, position_ids=position_ids, use_cache=False)
    assert autosparse.stats(llama).fallback["attention mask is not key padding (causal or not)"] == 1


def test_strict_raises_instead_of_falling_back(llama):
    autosparse.patch_model(llama, mixed_profile(llama), strict=True)
    position_ids = torch.cat([torch.arange(48), torch.arange(48)])[None]
    with pytest.raises(RuntimeError, match="model.layers.0.self_attn: attention mask is not key padding"):
        with torch.no_grad():
            llama(input_ids=random_ids(1, 96, seed=5), position_ids=position_ids, use_cache=False)


def test_generate_prefill_sparse_decode_dense(llama):
    profile = mixed_profile(llama)
    ids = random_ids(1, 120, seed=6)
    autosparse.patch_model(llama, profile)
    with torch.no_grad():
        out = llama.generate(ids, max_new_tokens=4, do_sample=False)
    calls = autosparse.stats(llama)
    assert out.shape == (1, 124)
    assert calls.sparse == 1 and calls.dense["decode (query length 1)"] == 3


def test_unpatch_restores_exactly(llama):
    ids = random_ids(1, 100, seed=7)
    before = logits(llama, ids)
    implementation = llama.config._attn_implementation
    autosparse.patch_model(llama, mixed_profile(llama))
    with pytest.raises(RuntimeError, match="already patched"):
        autosparse.patch_model(llama, mixed_profile(llama))
    autosparse.unpatch_model(llama)
    assert llama.config._attn_implementation == implementation
    assert not any(hasattr(m, "_autosparse_layer") for m in llama.modules())
    torch.testing.assert_close(logits(llama, ids), before, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="not patched by autosparse; no calls counted"):
        assert autosparse.stats(llama) == autosparse.AttentionStats()
    with pytest.warns(UserWarning, match="not patched by autosparse; nothing to undo"):
        assert autosparse.unpatch_model(llama) is llama
    torch.testing.assert_close(logits(llama, ids), before, rtol=0, atol=0)


def test_patch_from_path_checks_the_model(llama, tmp_path):
    from conftest import tiny_llama

    path = tmp_path / "p.json"
    mixed_profile(llama).save(path)
    assert autosparse.patch_model(llama, str(path)) is llama
    with pytest.raises(ValueError, match="num_hidden_layers"):
        autosparse.patch_model(tiny_llama(layers=3), path)


def test_layouts_are_built_once_per_shape_and_bounded(llama, monkeypatch):
    from autosparse import runtime
    from autosparse.runtime import plan as plans

    built = []
    original = BlockLayout.from_patterns.__func__

    def counting(cls, patterns, geometry, device="cpu"):
        built.append(geometry.q_len)
        return original(cls, patterns, geometry, device)

    monkeypatch.setattr(BlockLayout, "from_patterns", classmethod(counting))
    monkeypatch.setattr(plans, "MAX_CALL_PLANS", 3)
    runtime.clear_call_plans()
    autosparse.patch_model(llama, mixed_profile(llama))
    for length in (40, 40, 41, 42, 43, 40):
        logits(llama, random_ids(1, length, seed=length))
    # one sparse layer: a call plan (and layout) per new length; 40 was forgotten (bound 3) and rebuilt at the end
    assert built == [40, 41, 42, 43, 40]
    plan = runtime.plan_of(next(layer.module for layer in attention_layers(llama) if layer.index == 0)._autosparse_layer)
    heads = plan.heads_at(None)
    assert [key[1][2] for key in plans._CALL_PLANS if key[0] is heads] == [42, 43, 40]
    assert autosparse.stats(llama).sparse == 6


def test_call_plans_are_bounded_by_their_bytes(llama, monkeypatch):
    """The plan cache also keeps at most MAX_CALL_PLAN_BYTES of device tensors, oldest out first, and
    its byte count stays the sum of the plans it holds."""
    from autosparse import runtime
    from autosparse.runtime import plan as plans

    runtime.clear_call_plans()
    autosparse.patch_model(llama, mixed_profile(llama))
    logits(llama, random_ids(1, 40, seed=1))
    one = max(p.nbytes() for p in plans._CALL_PLANS.values())
    assert one > 0
    runtime.clear_call_plans()
    monkeypatch.setattr(plans, "MAX_CALL_PLAN_BYTES", int(2.5 * one))
    for length in (40, 41, 42, 43):
        logits(llama, random_ids(1, length, seed=length))
        kept = list(plans._CALL_PLANS.values())
        assert sum(p.nbytes() for p in kept) == plans._CALL_PLAN_BYTES[0] <= plans.MAX_CALL_PLAN_BYTES
    assert [key[1][2] for key in plans._CALL_PLANS][-1] == 43 and len(plans._CALL_PLANS) <= 2
    assert autosparse.stats(llama).sparse == 5  # the first forward and the four after it


def test_layers_with_the_same_patterns_share_one_call_plan(llama, monkeypatch):
    """One layout per (patterns, shape): every layer of a uniform profile runs on the same call plan."""
    from autosparse import runtime

    built = []
    original = BlockLayout.from_patterns.__func__
    monkeypatch.setattr(BlockLayout, "from_patterns",
                        classmethod(lambda cls, *a, **k: built.append(a[1].q_len) or original(cls, *a, **k)))
    runtime.clear_call_plans()
    autosparse.patch_model(llama, Profile.uniform(llama, {"kind": "sink_local", "sinks": 4, "window": 16},
                                                  block_size=(16, 16)))
    logits(llama, random_ids(1, 48, seed=1))
    logits(llama, random_ids(1, 48, seed=2))
    assert built == [48] and autosparse.stats(llama).sparse == 2 * len(attention_layers(llama))


def test_dense_heads_of_a_mixed_layer_run_through_sdpa(llama, monkeypatch):
    """Layer 0 of the mixed profile has one dense head (2 of 4, KV head 1): it is served by SDPA on
    that head alone, the sparse heads by the kernel, and the result matches the reference."""
    from autosparse import runtime

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1]))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(runtime.dense, "ORIGINAL_SDPA", spy)
    profile = mixed_profile(llama)
    ids = random_ids(1, 97, seed=5)
    expected = reference_logits(llama, profile, ids)
    autosparse.patch_model(llama, profile)
    seen.clear()
    torch.testing.assert_close(logits(llama, ids), expected, rtol=1e-4, atol=1e-4)
    # layer 0: its one dense head alone; layer 1 (all dense): SDPA on all heads
    assert seen == [(1, 1), (4, 2)]
