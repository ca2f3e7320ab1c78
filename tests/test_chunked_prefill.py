"""Chunked prefill: a chunk of Sq queries after a KV-cache prefix (Sk > Sq keys) is served sparse,
bottom-right aligned (query i is absolute position Sk - Sq + i), exactly as the profile's patterns
mean those positions in a full prefill.

Op level (classify -> call plan -> kernel, on the CPU's PyTorch path, the kernel's output
NaN-poisoned before it runs): against float64 dense attention on the token mask the patterns define
at those absolute positions (a full prefill's layout rows where the prefix is a multiple of the
query block) and FlexAttention with that mask as its mask_mod; dynamic patterns against the full
prefill's own estimate. What is not exact falls back, counted. End to end: a tiny Llama's chunked
prefill (DynamicCache, StaticCache) gives the full prefill's logits, every chunk call sparse. And
benchmarks/chunked_prefill.py runs in --quick mode."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

import autosparse
from autosparse import (BlockGeometry, BlockLayout, Blocks, Dense, Global, LayerProfile, Profile, SinkLocal, Union,
                        Window)
from autosparse.kernels import reference as kernel_reference
from autosparse.patterns.dynamic import BlockCdf, BlockTopK, VerticalSlash
from autosparse.runtime.classify import classify
from autosparse.runtime.heads import HeadSet
from autosparse.runtime.plan import LayerPlan
from autosparse.runtime.serve import serve
from autosparse.runtime.state import PatchState
from autosparse.testing.reference import attention, causal_mask, flex_attention, transformers_reference

from conftest import tiny_llama

HEADS = (SinkLocal(8, 24), Window(40), Blocks((0, 3)), Global(Window(16), prefix=5),
         Union((Window(16), Blocks((1,)))), SinkLocal(0, 100))
HKV = 2
D = 16


# -- helpers ---------------------------------------------------------------------------------------------


@pytest.fixture
def poisoned(monkeypatch):
    """The kernel's PyTorch path writes into a NaN-filled output; returns the list of its calls."""
    original, calls = kernel_reference.block_sparse_attention_torch, []

    def run(q, k, v, *args, out=None, **kwargs):
        assert out is None
        b, h, s, _ = q.shape
        out = torch.full((b, s, h, v.shape[-1]), float("nan"), dtype=q.dtype).transpose(1, 2)
        calls.append((tuple(q.shape), tuple(k.shape)))
        result = original(q, k, v, *args, out=out, **kwargs)
        assert result.data_ptr() == out.data_ptr()
        return result

    monkeypatch.setattr(kernel_reference, "block_sparse_attention_torch", run)
    return calls


def layer(patterns, blocks, strict=True) -> LayerPlan:
    profile = Profile(model={}, layers={"attn": LayerProfile(0, len(patterns), tuple(patterns))}, block_size=blocks)
    return LayerPlan("attn", 0, len(patterns), profile, PatchState(strict=strict))


def inputs(sq, sk, heads=len(HEADS), batch=2, dtype=torch.float64, seed=0):
    """Fresh q [B, H, Sq, D] (the last Sq of Sk positions' queries: ``q_full`` holds all Sk), k, v."""
    g = torch.Generator().manual_seed(seed)
    q_full = torch.randn(batch, heads, sk, D, generator=g, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(batch, HKV, sk, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    return q_full[:, :, sk - sq:], k, v, q_full


def chunk_mask(sq, sk, kv_valid=None, batch=2):
    """What transformers passes a chunk after a cache prefix: bool [B, 1, Sq, Sk], bottom-right causal
    and key padding."""
    mask = causal_mask(sq, sk)[None, None].expand(batch, 1, sq, sk)
    return mask if kv_valid is None else mask & kv_valid[:, None, None, :]


def layout_rows(patterns, q_len, kv_len, blocks):
    """bool [H, q_len, kv_len]: the layout's token mask of a causal call of these lengths."""
    return BlockLayout.from_patterns(patterns, BlockGeometry(q_len, kv_len, *blocks, True)).to_dense()


def token_rule(pattern, sq, sk):
    """bool [Sq, Sk] or None: the token rule of a 1-D pattern at the chunk's absolute positions."""
    p = torch.arange(sk - sq, sk)[:, None]
    key = torch.arange(sk)[None, :]
    if isinstance(pattern, SinkLocal):
        return ((key < pattern.sinks) | ((p - key >= 0) & (p - key < pattern.window))) & (key <= p)
    if isinstance(pattern, Window):
        return (p - key >= 0) & (p - key < pattern.window)
    return None


def expanded(k, heads):
    return k.repeat_interleave(heads // k.shape[1], 1)


def check_against_oracles(out, q, k, v, allowed):
    """out vs float64 dense attention and FlexAttention on ``allowed`` (bool [B or 1, H, Sq, Sk])."""
    assert not out.isnan().any(), "output not fully written (NaN poison left)"
    tol = 1e-10 if q.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), attention(q, k, v, allowed), rtol=tol, atol=tol)
    allowed = allowed.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    flex = flex_attention(q.double(), expanded(k, q.shape[1]).double(), expanded(v, q.shape[1]).double(), allowed)
    torch.testing.assert_close(out.double(), flex, rtol=tol, atol=tol)


# -- the kernel takes Sq != Sk bottom-right (read in kernels/reference.py and block_sparse.py) ----------------


def test_kernel_torch_path_is_bottom_right_with_fewer_queries():
    q, k, v, _ = inputs(24, 90, heads=2)
    nq, nk = 3, 6  # blocks (8, 16)
    indices = torch.arange(nk, dtype=torch.int32).expand(1, 2, nq, nk).contiguous()
    counts = torch.full((1, 2, nq), nk, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    kernel_reference.block_sparse_attention_torch(q, k, v, indices, counts, q_block=8, kv_block=16, causal=True,
                                                  out=out)
    check_against_oracles(out, q, k, v, causal_mask(24, 90)[None, None])
    top_left = attention(q, k, v, causal_mask(24, 90, top_left=True)[None, None])
    assert (out - top_left).abs().max() > 1e-3  # the two alignments differ here


# -- static patterns -----------------------------------------------------------------------------------------


ALIGNED = [(64, 160, (32, 16)), (48, 208, (16, 32)), (33, 161, (32, 16))]  # prefixes 96, 160, 128
UNALIGNED = [(50, 170, (32, 16)), (40, 231, (16, 32))]  # prefixes 120 (of 32), 191 (of 16)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sq,sk,blocks", ALIGNED)
def test_aligned_chunk_equals_full_prefill_rows(poisoned, sq, sk, blocks, dtype):
    """A prefix that is a multiple of the query block: the chunk's rows are exactly the full
    prefill's rows at those positions (same token mask, same output), served sparse."""
    q, k, v, q_full = inputs(sq, sk, dtype=dtype, seed=sq)
    plan = layer(HEADS, blocks)
    out = serve(plan, q, k, v, chunk_mask(sq, sk), False, None)
    assert plan.state.stats.sparse == 1 and not plan.state.stats.fallback and poisoned[-1][1][2] == sk
    full_rows = layout_rows(HEADS, sk, sk, blocks)[:, sk - sq:]
    assert torch.equal(layout_rows(HEADS, sq, sk, blocks), full_rows)
    for h, pattern in enumerate(HEADS):  # the token rule at the absolute positions is kept, nothing after
        rule = token_rule(pattern, sq, sk)
        if rule is not None:
            assert not (rule & ~full_rows[h]).any()
    assert not (full_rows & ~causal_mask(sq, sk)).any()
    check_against_oracles(out, q, k, v, full_rows[None])
    full = serve(layer(HEADS, blocks), q_full, k, v, chunk_mask(sk, sk), False, None)
    torch.testing.assert_close(out, full[:, :, sk - sq:], rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("sq,sk,blocks", UNALIGNED)
def test_unaligned_chunk_keeps_the_rule_at_absolute_positions(poisoned, sq, sk, blocks):
    """A prefix inside a query block: the chunk's own blocks (they straddle the full prefill's), each
    still holding the pattern's token rule at the absolute positions; exact to that layout."""
    q, k, v, _ = inputs(sq, sk, seed=sk)
    plan = layer(HEADS, blocks)
    out = serve(plan, q, k, v, chunk_mask(sq, sk), False, None)
    assert plan.state.stats.sparse == 1 and poisoned
    claimed = layout_rows(HEADS, sq, sk, blocks)
    for h, pattern in enumerate(HEADS):
        rule = token_rule(pattern, sq, sk)
        if rule is not None:
            assert not (rule & ~claimed[h]).any()
    assert not (claimed & ~causal_mask(sq, sk)).any()
    assert claimed[3, :, :5].all()  # global(prefix=5): every query sees the first 5 keys
    check_against_oracles(out, q, k, v, claimed[None])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_key_padding_in_the_prefix(poisoned):
    sq, sk, blocks = 64, 192, (32, 16)
    q, k, v, _ = inputs(sq, sk, seed=5)
    kv_valid = torch.rand(2, sk, generator=torch.Generator().manual_seed(1)) > 0.3
    kv_valid[:, 0] = True  # not left padding: the first token is real
    kv_valid[:, sk - sq:] = True
    plan = layer(HEADS, blocks)
    out = serve(plan, q, k, v, chunk_mask(sq, sk, kv_valid), False, None)
    assert plan.state.stats.sparse == 1
    allowed = layout_rows(HEADS, sk, sk, blocks)[None, :, sk - sq:] & kv_valid[:, None, None, :]
    check_against_oracles(out, q, k, v, allowed)


def test_dense_heads_of_a_mixed_layer_are_bottom_right(poisoned):
    """Dense heads go to SDPA, whose is_causal is top-left: with a prefix they get the explicit mask."""
    sq, sk, blocks = 32, 128, (32, 16)
    heads = (SinkLocal(4, 16), Dense(), Window(24), Dense())
    q, k, v, _ = inputs(sq, sk, heads=4, seed=9)
    plan = layer(heads, blocks)
    out = serve(plan, q, k, v, chunk_mask(sq, sk), False, None)
    assert plan.state.stats.sparse == 1
    check_against_oracles(out, q, k, v, layout_rows(heads, sk, sk, blocks)[None, :, sk - sq:])


def test_never_slower_times_a_bottom_right_dense_chunk(tmp_path, monkeypatch):
    """The never-slower rule (GPU) times the call plan against dense SDPA on the same call: for a
    chunk that is the bottom-right causal answer (top-left would skip most of the prefix's keys)."""
    from autosparse.kernels import tuning
    from autosparse.runtime import plan as plans
    from autosparse.runtime import speed

    monkeypatch.setenv("AUTOSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(speed, "measuring", lambda device: True)
    timed = []

    def timer(fn):
        timed.append(fn())
        return 1.0 if len(timed) % 2 else 2.0  # sparse first, then dense: sparse wins

    monkeypatch.setattr(tuning, "gpu_ms", timer)
    speed.forget_verdicts()
    plans.clear_call_plans()
    try:
        sq, sk, blocks = 32, 128, (32, 16)
        q, k, v, _ = inputs(sq, sk, heads=2, seed=12)
        plan = layer((SinkLocal(4, 16), Window(24)), blocks)
        out = serve(plan, q, k, v, chunk_mask(sq, sk), False, None)
        assert plan.state.stats.sparse == 1 and len(timed) == 2
        torch.testing.assert_close(timed[0], out, rtol=0, atol=0)
        torch.testing.assert_close(timed[1].double(), attention(q, k, v, causal_mask(sq, sk)[None, None]),
                                   rtol=1e-10, atol=1e-10)
    finally:
        speed.forget_verdicts()
        plans.clear_call_plans()


# -- dynamic patterns ----------------------------------------------------------------------------------------


DYNAMIC = [BlockTopK(3), BlockCdf(0.9), VerticalSlash(vertical=8, slash=12)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("pattern", DYNAMIC, ids=lambda p: p.kind)
def test_dynamic_chunk_estimates_as_the_full_prefill(poisoned, pattern):
    """An aligned chunk at the sequence's end: each query block pools the same rows (vertical_slash
    reads the same last rows), so its estimate and output are the full prefill's rows."""
    sq, sk, blocks = 64, 224, (16, 32)
    heads = (pattern, SinkLocal(8, 24), pattern, Window(40))
    q, k, v, q_full = inputs(sq, sk, heads=4, seed=3)
    plan = layer(heads, blocks)
    out = serve(plan, q, k, v, chunk_mask(sq, sk), False, None)
    assert plan.state.stats.sparse == 1 and poisoned
    full = serve(layer(heads, blocks), q_full, k, v, chunk_mask(sk, sk), False, None)
    torch.testing.assert_close(out, full[:, :, sk - sq:], rtol=0, atol=1e-12)
    # The token mask the full prefill's estimate claims for these rows, as the oracles' mask.
    geometry = BlockGeometry(sk, sk, *blocks, True)
    scale = D ** -0.5
    masks = []
    for h, p in enumerate(heads):
        if p.is_dynamic:
            chosen, columns = p.select(q_full[:, h:h + 1], k[:, h // 2:h // 2 + 1], geometry, scale)
            per_batch = [BlockLayout.from_block_mask(chosen[b], geometry, None if columns is None else columns[b])
                         .to_dense()[0] for b in range(2)]
            masks.append(torch.stack(per_batch).any(0))  # the layout is the batch's union
        else:
            masks.append(BlockLayout.from_patterns([p], geometry).to_dense()[0])
    check_against_oracles(out, q, k, v, torch.stack(masks)[None, :, sk - sq:])


def test_dynamic_unaligned_chunk_is_exact_to_its_estimate(poisoned):
    sq, sk, blocks = 40, 200, (16, 32)
    q, k, v, _ = inputs(sq, sk, heads=2, seed=4)
    pattern = BlockTopK(2)
    plan = layer((pattern, pattern), blocks)
    out = serve(plan, q, k, v, chunk_mask(sq, sk), False, None)
    assert plan.state.stats.sparse == 1 and poisoned
    geometry = BlockGeometry(sq, sk, *blocks, True)
    chosen, _ = pattern.select(q, k, geometry, D ** -0.5)
    mask = BlockLayout.from_block_mask(chosen.any(0), geometry).to_dense()
    assert mask[:, :, :32].all() and not (mask & ~causal_mask(sq, sk)).any()  # sinks kept, nothing in the future
    check_against_oracles(out, q, k, v, mask[None])


# -- what is served, what falls back -------------------------------------------------------------------------


def classified(mask, sq, sk, is_causal=False, patterns=HEADS, batch=2):
    q, k, v, _ = inputs(sq, sk, heads=len(patterns), batch=batch)
    return classify(PatchState(strict=False).context, 0, HeadSet.of(tuple(patterns)), q, k, v, mask, is_causal, None)


def test_classify_reads_chunks_and_cache_tails():
    call = classified(chunk_mask(64, 160), 64, 160)
    assert call.fallback is None and call.dense is None and call.causal and call.keys == 160
    # A StaticCache: keys after the last position written are seen by no query and dropped.
    tail = torch.zeros(2, 1, 64, 256, dtype=torch.bool)
    tail[..., :160] = chunk_mask(64, 160)
    call = classified(tail, 64, 256)
    assert call.fallback is None and call.causal and call.keys == 160 and call.kv_valid is None
    # torch's is_causal is top-left: only the first Sq keys are seen, the call is square.
    call = classified(None, 64, 160, is_causal=True)
    assert call.fallback is None and call.causal and call.keys == 64
    # A top-left boolean mask: the keys after the first Sq are seen by none, the call is square.
    top_left = causal_mask(64, 160, top_left=True)[None, None].expand(2, 1, 64, 160)
    call = classified(top_left, 64, 160)
    assert call.fallback is None and call.causal and call.keys == 64
    # One diagonal more than bottom-right causal (a query sees its next token) is not servable.
    ahead = torch.ones(64, 160, dtype=torch.bool).tril(97)[None, None]
    assert classified(ahead, 64, 160).fallback == "attention mask is not key padding (causal or not)"
    # Decode stays dense; key padding alone over more keys is cross-attention.
    assert classified(chunk_mask(1, 160), 1, 160).dense == "decode (query length 1)"
    assert classified(torch.ones(2, 1, 1, 160, dtype=torch.bool), 64, 160).dense == \
        "cross-attention (query length != key length)"


def test_left_padding_with_a_prefix_falls_back_counted():
    sq, sk = 32, 96
    kv_valid = torch.ones(2, sk, dtype=torch.bool)
    kv_valid[1, :7] = False
    mask = chunk_mask(sq, sk, kv_valid)
    assert classified(mask, sq, sk).fallback == "left padding with a KV-cache prefix"
    q, k, v, _ = inputs(sq, sk)
    plan = layer(HEADS, (16, 16), strict=False)
    out = serve(plan, q, k, v, mask, False, None)
    assert plan.state.stats.fallback["left padding with a KV-cache prefix"] == 1 and plan.state.stats.sparse == 0
    expected = F.scaled_dot_product_attention(q, expanded(k, 6), expanded(v, 6), attn_mask=mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_suffix_after_a_prefix_falls_back_counted():
    """global(suffix): the sequence's last tokens; a chunk's last ones are not (its rows would
    differ from a full prefill's)."""
    heads = (Global(Window(16), suffix=4), Window(16))
    q, k, v, _ = inputs(32, 96, heads=2)
    plan = layer(heads, (16, 16), strict=False)
    serve(plan, q, k, v, chunk_mask(32, 96), False, None)
    assert plan.state.stats.fallback[
        "global.suffix counts from the sequence's end, unknown to a chunk after a KV-cache prefix"] == 1
    q_full = inputs(96, 96, heads=2)[0]
    serve(plan, q_full, k, v, chunk_mask(96, 96), False, None)  # a full prefill: served
    assert plan.state.stats.sparse == 1


# -- end to end: a tiny Llama's chunked prefill ----------------------------------------------------------------


BLOCKS = (32, 16)


def llama_and_profile():
    model = tiny_llama()
    return model, Profile.uniform(model, SinkLocal(16, 40), block_size=BLOCKS)


def chunked_logits(model, ids, cuts, cache):
    """Logits of each chunk ``ids[:, a:b]`` run after the earlier ones through ``cache``."""
    out, edges = [], (0, *cuts, ids.shape[1])
    with torch.no_grad():
        for a, b in zip(edges, edges[1:]):
            out.append(model(input_ids=ids[:, a:b], cache=cache, use_cache=True,
                             cache_position=torch.arange(a, b)).logits)
    return out


def make_cache(kind, model):
    return DynamicCache(config=model.config) if kind == "dynamic" else StaticCache(config=model.config,
                                                                                  max_cache_len=320)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_chunked_prefill_equals_full_prefill(kind):
    model, profile = llama_and_profile()
    ids = torch.randint(0, 512, (1, 256), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    autosparse.patch_model(model, profile, strict=True)
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert (full - dense).abs().max() > 1e-3  # the pattern changes the attention at this length
    autosparse.stats(model, reset=True)
    chunks = chunked_logits(model, ids, (96, 160), make_cache(kind, model))  # prefixes 96, 160: multiples of 32
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-4)
    assert (chunks[2] - dense[:, 160:]).abs().max() > 1e-3
    calls = autosparse.stats(model)
    assert calls.sparse == 2 * 3 and not calls.fallback and not calls.dense


def test_unaligned_chunks_equal_the_masked_reference():
    """Chunks whose prefix is not a multiple of the query block: each chunk's layout is the patterns
    on its own blocks, as the reference lays them out (geometry Sq x Sk, bottom-right)."""
    model, profile = llama_and_profile()
    ids = torch.randint(0, 512, (1, 230), generator=torch.Generator().manual_seed(8))
    with transformers_reference(model, profile):
        expected = chunked_logits(model, ids, (70, 150), DynamicCache(config=model.config))
    autosparse.patch_model(model, profile, strict=True)
    got = chunked_logits(model, ids, (70, 150), DynamicCache(config=model.config))
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(expected, 1), rtol=1e-4, atol=1e-4)
    assert autosparse.stats(model).sparse == 2 * 3


def test_left_padded_chunks_fall_back_counted_and_decode_stays_dense():
    model, profile = llama_and_profile()
    ids = torch.randint(0, 512, (2, 160), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    autosparse.patch_model(model, profile)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :96], attention_mask=mask[:, :96], cache=cache, use_cache=True)
        model(input_ids=ids[:, 96:], attention_mask=mask, cache=cache, use_cache=True)
        step = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        model(input_ids=ids[:, -1:], attention_mask=step, cache=cache, use_cache=True)
    calls = autosparse.stats(model)
    assert calls.sparse == 2  # the first chunk (square, left padding rolled)
    assert calls.fallback["left padding with a KV-cache prefix"] == 2
    assert calls.dense["decode (query length 1)"] == 2


# -- the benchmark script, tiny and on the CPU ----------------------------------------------------------------


def test_benchmark_quick_run(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "chunked_prefill.py"
    spec = importlib.util.spec_from_file_location("chunked_prefill", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["chunked_prefill"] = module
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and "ms" not in line and "---" not in line]
    assert len(rows) == 2 * 2 * 2, text  # 2 totals x 2 chunk sizes x 2 profiles
    assert all("| ok |" in row for row in rows), text
    # The gate FA4 dense passes before it is timed: bottom-right causal rows pass, top-left ones fail.
    shape = module.Shape(4, 2, 32, torch.float32, "cpu", (32, 32))
    q, k, v = (torch.randn(1, h, s, 32) for h, s in ((4, 64), (2, 256), (2, 256)))
    layout = module.chunk_layout((Window(32),) * 4, shape, 64, 256)
    k4, v4 = expanded(k, 4), expanded(v, 4)
    bottom_right = F.scaled_dot_product_attention(q, k4, v4, attn_mask=causal_mask(64, 256))
    top_left = F.scaled_dot_product_attention(q, k4, v4, is_causal=True)
    assert module.check(bottom_right, q, k, v, layout, shape, dense=True) < 1e-5
    assert module.check(top_left, q, k, v, layout, shape, dense=True) > 1e-2


def test_the_guard_checks_chunks_bottom_right():
    """The run-time guard recomputes sampled rows of every chunk call exactly (dense, at the chunk's
    absolute positions): a window wider than the context agrees with it, nothing falls back; the
    sink+local profile on a random-weight model is far from dense, and every later chunk is caught."""
    ids = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(10))
    model = tiny_llama()
    autosparse.patch_model(model, Profile.uniform(model, Window(4096), block_size=BLOCKS), strict=True,
                           guard={"rows": 32, "tol": 1e-4})
    chunked_logits(model, ids, (64, 128), DynamicCache(config=model.config))
    calls = autosparse.stats(model)
    assert calls.sparse == 2 * 3 and not calls.fallback
    model, profile = llama_and_profile()
    autosparse.patch_model(model, profile, guard={"rows": 32, "tol": 1e-4})
    chunked_logits(model, ids, (64, 128), DynamicCache(config=model.config))
    calls = autosparse.stats(model)  # the first chunk: 64 tokens, every block within sinks + window
    assert calls.sparse == 2 and calls.fallback["accuracy guard: sampled rows over tolerance"] == 2 * 2


def test_bottom_right_dense_stays_exact_while_a_hooked_model_replaces_sdpa():
    """A diffusers model patched through hooks replaces F.scaled_dot_product_attention; torch's
    CausalBias (lower-right) then no longer dispatches and would be read as a plain tensor. The
    bottom-right dense answer of a chunk (a mixed layer's dense heads) must stay exact meanwhile."""
    import autosparse
    from autosparse import Profile
    from autosparse.runtime.dense import dense_heads, empty_output
    from autosparse.testing.dits import build_dit

    dit = build_dit("wan", "tiny")
    autosparse.patch_model(dit.model, Profile.uniform(dit.model, {"kind": "window", "window": 4}, block_size=(16, 16)))
    try:
        assert torch.nn.functional.scaled_dot_product_attention is not torch._C._nn.scaled_dot_product_attention
        gen = torch.Generator().manual_seed(3)
        q = torch.randn(1, 4, 16, 8, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(1, 2, 48, 8, generator=gen, dtype=torch.float64) for _ in range(2))
        out = empty_output(q, v).fill_(float("nan"))
        heads, kv_heads = torch.arange(4), torch.arange(4) // 2
        dense_heads(out, q, k, v, heads, kv_heads, True, 0.3)
        allowed = torch.ones(16, 48, dtype=torch.bool).tril_(48 - 16)
        scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
        want = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.repeat_interleave(2, 1)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    finally:
        autosparse.unpatch_model(dit.model)
