"""The promise on common paths: the same answer as the unpatched model (or torch's SDPA), served or
dense and counted, never silently different. One test per defect found by trying the product as
users do (../shared/repros/reliability-2026-12-03)."""

import copy
import io
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import tiny_llama

import autosparse
from autosparse.models import ModelKind
from autosparse import Profile, capture, runtime
from autosparse.testing.dits import build_dit

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention
BLOCKS = (16, 16)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).logits


def _small(config_class, model_class, **fields):
    torch.manual_seed(0)
    config = config_class(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, **fields)
    config._attn_implementation = "eager"
    return model_class(config).eval()


# -- transformers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [{"kind": "dense"}, {"kind": "window", "window": 32}])
def test_static_cache_prefill_equals_a_dynamic_cache(llama, spec):
    """An empty StaticCache gives the prefill 128 keys for 40 queries with is_causal (top-left):
    the unwritten keys are seen by no query, so the call is the square causal one, served."""
    ids = _ids(1, 40)
    expected = _logits(llama, input_ids=ids, use_cache=False)
    autosparse.patch_model(llama, Profile.uniform(llama, spec, block_size=BLOCKS))
    want = _logits(llama, input_ids=ids, use_cache=False)
    cache = transformers.StaticCache(config=llama.config, max_cache_len=128)
    got = _logits(llama, input_ids=ids, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if spec["kind"] == "dense":
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert autosparse.stats(llama).sparse == 4 and not autosparse.stats(llama).fallback


def test_learned_sinks_run_the_models_own_attention():
    """GPT-OSS adds a learned sink logit per head: calls carrying it run the model's eager attention."""
    model = _small(transformers.GptOssConfig, transformers.GptOssForCausalLM, num_local_experts=2,
                   num_experts_per_tok=1, layer_types=["full_attention"] * 2)
    for module in model.modules():
        if hasattr(module, "sinks"):
            torch.nn.init.normal_(module.sinks, 0, 2.0)
    ids = _ids(2, 40)
    expected = _logits(model, input_ids=ids)
    autosparse.patch_model(model, Profile.uniform(model, {"kind": "window", "window": 16}, block_size=BLOCKS))
    torch.testing.assert_close(_logits(model, input_ids=ids), expected, rtol=1e-5, atol=1e-5)
    assert autosparse.stats(model).fallback["argument s_aux"] == 2


def test_softcapping_runs_the_models_own_attention():
    model = _small(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, attn_logit_softcapping=5.0)
    ids = _ids(1, 20)
    expected = _logits(model, input_ids=ids)
    autosparse.patch_model(model, Profile.uniform(model, {"kind": "dense"}, block_size=BLOCKS))
    torch.testing.assert_close(_logits(model, input_ids=ids), expected, rtol=1e-5, atol=1e-5)
    assert autosparse.stats(model).dense["dense in profile"] == 2


def test_output_attentions_returns_the_maps():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    ids = _ids(1, 20)
    with torch.no_grad():
        expected = model(input_ids=ids, output_attentions=True).attentions
        autosparse.patch_model(model, Profile.uniform(model, {"kind": "window", "window": 8}, block_size=BLOCKS))
        got = model(input_ids=ids, output_attentions=True).attentions
    assert len(got) == len(expected) == 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert autosparse.stats(model).fallback["output_attentions (attention weights requested)"] == 2


def test_causality_is_read_at_call_time(llama):
    """A module switched to bidirectional after patching (LLM2Vec-style) is served bidirectional."""
    ids = _ids(1, 48)
    autosparse.patch_model(llama, Profile.uniform(llama, {"kind": "dense"}, block_size=BLOCKS))
    for layer in llama.model.layers:
        layer.self_attn.is_causal = False
    got = _logits(llama, input_ids=ids)
    autosparse.unpatch_model(llama)
    expected = _logits(llama, input_ids=ids)  # transformers' SDPA path reads the module too
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    causal = _logits(tiny_llama(), input_ids=ids)
    assert (expected - causal).abs().max() > 1e-3


@pytest.mark.parametrize("window", [64, 24])
def test_sliding_window_models(window):
    """Mistral-style layers: a window longer than the keys changes nothing (served sparse); a
    shorter one runs the model's own attention, counted."""
    model = _small(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=window)
    ids = _ids(1, 40)
    expected = _logits(model, input_ids=ids)
    autosparse.patch_model(model, Profile.uniform(model, {"kind": "window", "window": 64}, block_size=BLOCKS))
    torch.testing.assert_close(_logits(model, input_ids=ids), expected, rtol=1e-5, atol=1e-5)
    calls = autosparse.stats(model)
    if window > 40:
        assert calls.sparse == 2 and not calls.fallback
    else:
        assert calls.fallback[f"sliding window {window} shorter than the keys (40)"] == 2


def test_left_padding_counts_sinks_from_the_first_real_token(llama):
    """A prompt alone and the same prompt left-padded in a batch give the same logits."""
    autosparse.patch_model(llama, Profile.uniform(llama, {"kind": "sink_local", "sinks": 4, "window": 16},
                                                  block_size=BLOCKS))
    prompt, other = _ids(1, 50, seed=1), _ids(1, 70, seed=2)
    alone = _logits(llama, input_ids=prompt)
    batch = torch.cat([torch.cat([torch.zeros(1, 20, dtype=torch.long), prompt], 1), other])
    mask = torch.ones_like(batch)
    mask[0, :20] = 0
    padded = _logits(llama, input_ids=batch, attention_mask=mask)
    torch.testing.assert_close(padded[0, 20:], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[1], _logits(llama, input_ids=other)[0], rtol=1e-4, atol=1e-4)
    assert autosparse.stats(llama).sparse == 6 and not autosparse.stats(llama).fallback


def test_a_mask_refilled_in_place_is_classified_again(llama):
    """A serving loop with static buffers refills the same mask tensor (inference tensors carry no
    version counter): the verdict lives for one forward, not for the buffer."""
    autosparse.patch_model(llama, Profile.uniform(llama, {"kind": "window", "window": 64}, block_size=BLOCKS))
    layer = llama.model.layers[0].self_attn._autosparse_layer
    q, k, v = torch.randn(2, 4, 40, 64), torch.randn(2, 2, 40, 64), torch.randn(2, 2, 40, 64)
    with torch.inference_mode():
        mask = (torch.ones(40, 40, dtype=torch.bool).tril()[None] & torch.ones(2, 1, 40, dtype=torch.bool))[:, None]
        mask = mask.contiguous()
        torch.ops.autosparse.attention(q, k, v, layer, mask, False, None)
        mask[1, :, :, :20] = False
        got = torch.ops.autosparse.attention(q, k, v, layer, mask, False, None)
        want = TORCH_SDPA(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got[1, :, 20:], want[1, :, 20:], rtol=1e-5, atol=1e-5)
    assert autosparse.stats(llama).sparse == 2


def test_deepcopy_is_independent_and_save_load_round_trips(llama):
    ids, mask = _ids(2, 40), torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    autosparse.patch_model(llama, Profile.uniform(llama, {"kind": "window", "window": 16}, block_size=BLOCKS))
    expected = _logits(llama, input_ids=ids, attention_mask=mask)
    state_keys = set(tiny_llama().state_dict())
    assert set(llama.state_dict()) == state_keys
    twin = copy.deepcopy(llama)
    torch.testing.assert_close(_logits(twin, input_ids=ids, attention_mask=mask), expected, rtol=0, atol=0)
    assert autosparse.stats(twin).sparse == 4 and autosparse.stats(llama).sparse == 2
    autosparse.unpatch_model(twin)
    torch.testing.assert_close(_logits(llama, input_ids=ids, attention_mask=mask), expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(llama, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(_logits(loaded, input_ids=ids, attention_mask=mask), expected, rtol=0, atol=0)
    assert autosparse.stats(loaded).sparse == 6  # its own counts, carried on
    moved = loaded.to(torch.float64)
    got = _logits(moved, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-4)


def test_a_patched_model_saved_by_0_1_loads_patched(llama):
    """0.1 recorded the model kind as a string (``library``); loading such a save serves it as before."""
    ids = _ids(1, 40)
    autosparse.patch_model(llama, Profile.uniform(llama, {"kind": "window", "window": 16}, block_size=BLOCKS))
    expected = _logits(llama, input_ids=ids)
    patch = autosparse.patch.patch_of(llama)
    original = type(patch).__reduce_ex__

    def as_saved_by_0_1(self, protocol):
        reduced = original(self, protocol)
        state = dict(reduced[2])
        state["library"] = state.pop("kind").value
        return (*reduced[:2], state, *reduced[3:])

    type(patch).__reduce_ex__ = as_saved_by_0_1
    try:
        buffer = io.BytesIO()
        torch.save(llama, buffer)
    finally:
        type(patch).__reduce_ex__ = original
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert autosparse.patch.patch_of(loaded).kind is ModelKind.TRANSFORMERS
    torch.testing.assert_close(_logits(loaded, input_ids=ids), expected, rtol=0, atol=0)
    assert autosparse.stats(loaded).sparse == 2 + 2


def test_deepcopy_of_a_hooked_dit_is_independent():
    dit = build_dit("wan", "tiny")
    autosparse.patch_model(dit.model, Profile.uniform(dit.model, {"kind": "window", "window": 4}, block_size=BLOCKS))
    inputs = dit.inputs()
    with torch.no_grad():
        expected = dit.model(**inputs).sample
        twin = copy.deepcopy(dit.model)
        torch.testing.assert_close(twin(**inputs).sample, expected, rtol=0, atol=0)
        per_forward = autosparse.stats(twin).sparse // 2  # the original's forward, counted before copying, and its own
        autosparse.unpatch_model(twin)
        torch.testing.assert_close(dit.model(**inputs).sample, expected, rtol=0, atol=0)
        buffer = io.BytesIO()
        torch.save(dit.model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(**inputs).sample, expected, rtol=0, atol=0)
    assert per_forward > 0 and autosparse.stats(dit.model).sparse == 2 * per_forward
    assert autosparse.stats(loaded).sparse == 3 * per_forward
    autosparse.unpatch_model(loaded)
    autosparse.unpatch_model(dit.model)
    assert F.scaled_dot_product_attention is runtime.ORIGINAL_SDPA


# -- the hook route --------------------------------------------------------------------------------


def test_an_interrupted_forward_leaves_no_capture_state():
    dit = build_dit("wan", "tiny")
    autosparse.patch_model(dit.model, Profile.uniform(dit.model, {"kind": "window", "window": 4}, block_size=BLOCKS))

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = dit.model.blocks[0].attn1.to_out[0].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        dit.model(**dit.inputs())
    handle.remove()
    assert capture._current.layer is None and capture._current.outer == ()
    q, k, v = (torch.randn(1, 2, 72, 16) for _ in range(3))
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), TORCH_SDPA(q, k, v), rtol=0, atol=0)
    autosparse.unpatch_model(dit.model)
    other = build_dit("hunyuan_video", "tiny")
    autosparse.patch_model(other.model, Profile.uniform(other.model, {"kind": "neighborhood", "window": [1, 3, 3]}))
    with torch.no_grad():
        other.model(**other.inputs())
    assert autosparse.stats(other.model).sparse > 0
    autosparse.unpatch_model(other.model)  # the F.sdpa replacement goes with the last hooked model


def _inside(layer, *args, **kwargs):
    """F.sdpa as a served attention module's call reaches it."""
    capture._current.layer = layer
    try:
        return F.scaled_dot_product_attention(*args, **kwargs)
    finally:
        capture._current.layer = None


_G = torch.Generator().manual_seed(0)
_Q, _K = torch.randn(1, 2, 20, 16, generator=_G), torch.randn(1, 2, 30, 16, generator=_G)
_MASK = torch.ones(20, 20, dtype=torch.bool)
_MASK[:, :3] = False
HOOK_CASES = {  # torch accepts every one of these
    "is_causal, Sq < Sk": ((_Q, _K, _K), {"is_causal": True}),
    "is_causal, Sq > Sk": ((_K, _Q, _Q), {"is_causal": True}),
    "attn_mask with is_causal": ((_Q, _Q, _Q), {"attn_mask": _MASK, "is_causal": True}),
    "2-D mask": ((_Q, _Q, _Q), {"attn_mask": _MASK}),
    "3-D q/k/v": ((torch.randn(2, 20, 16, generator=_G),) * 3, {}),
    "5-D q/k/v": ((torch.randn(2, 1, 2, 20, 16, generator=_G),) * 3, {}),
    "k/v broadcast over the batch": ((torch.randn(3, 2, 20, 16, generator=_G), _Q, _Q), {}),
    "scale 0": ((_Q, _Q, _Q), {"scale": 0.0}),
    "negative scale": ((_Q, _Q, _Q), {"scale": -0.3}),
    "GQA with enable_gqa": ((_Q, _Q[:, :1], _Q[:, :1]), {"enable_gqa": True}),
    "non-contiguous": ((_Q.transpose(2, 3).contiguous().transpose(2, 3),) * 3, {}),
}


@pytest.mark.parametrize("name", list(HOOK_CASES))
def test_hook_route_answers_as_torch_sdpa(name):
    dit = build_dit("wan", "tiny")
    autosparse.patch_model(dit.model, Profile.uniform(dit.model, {"kind": "window", "window": 8}, block_size=BLOCKS))
    layer = dit.model.blocks[0].attn1._autosparse_layer
    args, kwargs = HOOK_CASES[name]
    with torch.no_grad():
        got = _inside(layer, *args, **kwargs)
        want = TORCH_SDPA(*args, **kwargs)
    calls = autosparse.stats(dit.model)
    autosparse.unpatch_model(dit.model)
    if calls.sparse:  # served: the window covers these short calls, so the answer is exact
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert sum(calls.fallback.values()) + sum(calls.dense.values()) == 1, calls
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hook_route_refuses_what_torch_refuses():
    dit = build_dit("wan", "tiny")
    autosparse.patch_model(dit.model, Profile.uniform(dit.model, {"kind": "window", "window": 8}, block_size=BLOCKS))
    layer = dit.model.blocks[0].attn1._autosparse_layer
    q, kv = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16)  # GQA without enable_gqa
    with pytest.raises(RuntimeError) as torch_error:
        TORCH_SDPA(q, kv, kv)
    with pytest.raises(RuntimeError) as ours:
        _inside(layer, q, kv, kv)
    assert str(ours.value) == str(torch_error.value)
    autosparse.unpatch_model(dit.model)


def test_two_models_in_two_threads():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        a = build_dit("wan", "tiny", seed=1, frames=2, height=16, width=24)
        b = build_dit("wan", "tiny", seed=2, frames=2, height=16, width=24)
        autosparse.patch_model(a.model, Profile.uniform(a.model, {"kind": "window", "window": 4}, block_size=BLOCKS))
        autosparse.patch_model(b.model, Profile.uniform(b.model, {"kind": "dense"}, block_size=BLOCKS))
        ia, ib = a.inputs(), b.inputs()
        with torch.no_grad():
            ra, rb = a.model(**ia).sample, b.model(**ib).sample
        wrong = {"a": 0, "b": 0}

        def loop(name, dit, inputs, reference):
            for _ in range(15):
                with torch.no_grad():
                    wrong[name] += int(not torch.equal(dit.model(**inputs).sample, reference))

        threads = [threading.Thread(target=loop, args=("a", a, ia, ra)), threading.Thread(target=loop, args=("b", b, ib, rb))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert wrong == {"a": 0, "b": 0}
    assert autosparse.stats(a.model).sparse == 32 and autosparse.stats(b.model).sparse == 0
    autosparse.unpatch_model(a.model)
    autosparse.unpatch_model(b.model)


def test_a_new_generation_starting_at_the_last_timestep_restarts_the_steps():
    dit = build_dit("wan", "tiny")
    profile = Profile.uniform(dit.model, {"kind": "neighborhood", "window": [1, 3, 3]}, block_size=BLOCKS)
    autosparse.patch_model(dit.model, profile.with_dense_steps(2))
    served = []
    for timesteps in ((300.0, 200.0, 100.0), (100.0, 50.0), (400.0, 400.0, 300.0, 300.0, 200.0, 200.0, 200.0)):
        for t in timesteps:
            before = autosparse.stats(dit.model).sparse
            with torch.no_grad():
                dit.model(**dit.inputs(timestep=t))
            served.append(autosparse.stats(dit.model).sparse > before)
    # gen 1: steps 0 1 2; gen 2 (100 again, once per step before): steps 0 1; gen 3 with
    # classifier-free guidance (2 calls per step): 0 0 1 1 2 2, then 200 a third time: a new generation.
    assert served == [False, False, True, False, False, False, False, False, False, True, True, False]
    autosparse.unpatch_model(dit.model)


def test_a_module_autosparse_does_not_serve_runs_its_own_attention():
    """A module of the model without a layer id (not among the served layers) that calls the
    registered function gets transformers' reference attention, not an error."""
    model = tiny_llama()
    q, k, v = torch.randn(1, 4, 10, 64), torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64)
    out, _ = capture.transformers_attention(model.model.layers[0].self_attn, q, k, v, None, scaling=0.125)
    want = TORCH_SDPA(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-5)
