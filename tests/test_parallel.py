"""Context parallelism in one process: what each rank's call holds (a Ulysses rank's heads, the
gathered token order, a ring step's query chunk x key chunk) served against float64 attention on
the layout's token mask; the diffusers backend's registration; balanced heads. The processes
themselves (gloo) are in tests/test_context_parallel.py.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

import autosparse
from autosparse.balance import balance_heads, balanced_order, rank_loads
from autosparse.capture import BACKEND, autosparse_attention, register_diffusers
from autosparse.layout import BlockLayout, grid_order
from autosparse.models.parallel import ContextParallel, gathered_positions
from autosparse.patterns import BlockGeometry, TokenGeometry, pattern_from_spec
from autosparse.profile import LayerProfile, Profile
from autosparse.runtime import HeadSet, LayerPlan, PatchState, serve
from autosparse.runtime.classify import Call
from autosparse.runtime.ring import DIAGONAL_REASON, RingStep, step_plan
from autosparse.testing.dits import build_dit
from autosparse.testing.reference import attention, in_model_order

BLOCKS = (16, 16)
HEAD_DIM = 16
SPECS = ({"kind": "neighborhood", "window": [3, 5]}, {"kind": "window", "window": 24}, {"kind": "dense"},
         {"kind": "neighborhood", "window": [5, 3]})
PATTERNS = tuple(pattern_from_spec(spec) for spec in SPECS)
# FLUX-like: 8 text tokens, then an 8x12 grid; HunyuanVideo-like: a 2x6x8 grid, then 8 text tokens.
GEOMETRIES = {"text first": TokenGeometry((8, 12), prefix=8), "text last": TokenGeometry((2, 6, 8), suffix=8)}
VIDEO = ({"kind": "neighborhood", "window": [1, 3, 5]}, {"kind": "window", "window": 24}, {"kind": "dense"},
         {"kind": "neighborhood", "window": [2, 5, 3]})


def _patterns(tokens: TokenGeometry) -> tuple:
    return PATTERNS if len(tokens.grid) == 2 else tuple(pattern_from_spec(spec) for spec in VIDEO)


def _profile(patterns: tuple) -> Profile:
    return Profile(model={}, layers={"attn": LayerProfile(0, len(patterns), patterns)}, block_size=BLOCKS,
                   token_order="tile")


def _allowed(patterns: tuple, tokens: TokenGeometry) -> torch.Tensor:
    """Bool ``[H, S, S]`` in the model's order: the token pairs the whole layer's layout attends."""
    ordered = grid_order(patterns, tokens, *BLOCKS, order="tile")
    layout = BlockLayout.from_patterns(patterns, BlockGeometry(tokens.length, tokens.length, *BLOCKS, False, ordered))
    return in_model_order(layout.to_dense(), ordered)


def _module(ulysses: int = 1, rank: int = 0, ring: int = 1, ring_rank: int = 0) -> torch.nn.Module:
    """An attention module whose processor carries diffusers' context-parallel config fields."""
    config = types.SimpleNamespace(ulysses_degree=ulysses, _ulysses_local_rank=rank, ring_degree=ring,
                                   _ring_local_rank=ring_rank, ulysses_anything=False, ring_anything=False)
    module = torch.nn.Module()
    module.processor = types.SimpleNamespace(_parallel_config=types.SimpleNamespace(context_parallel_config=config))
    return module


def _gathered(tokens: TokenGeometry, pieces: int) -> torch.Tensor:
    """Long ``[S]``: the model position of each position of the gathered sequence."""
    positions = gathered_positions(tokens, pieces)
    if positions is None:
        return torch.arange(tokens.length)
    inverse = torch.empty_like(positions)
    inverse[positions] = torch.arange(tokens.length)
    return inverse


def _qkv(heads: int, length: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, length, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(3)]


def test_a_ulysses_rank_holds_its_contiguous_heads():
    assert ContextParallel(1, 0, 2, 1).heads(4, 4) == (0, 4)  # ring only: every head
    assert [ContextParallel(4, r, 1, 0).heads(8, 2) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert ContextParallel(2, 1, 2, 0).heads(6, 3) == (3, 6)  # unified: the Ulysses rank counts
    assert ContextParallel(2, 1, 1, 0).heads(6, 2) is None  # neither all heads nor the rank's slice


def test_the_gathered_order_deals_each_stream_out_piece_by_piece():
    """Two ranks, 4 text tokens then 6 image tokens: rank r holds text piece r, then image piece r."""
    tokens = TokenGeometry((2, 3), prefix=4)
    assert _gathered(tokens, 2).tolist() == [0, 1, 4, 5, 6, 2, 3, 7, 8, 9]
    assert gathered_positions(TokenGeometry((4, 6)), 2) is None  # one stream: the model's order
    assert gathered_positions(tokens, 1) is None


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("ulysses", [2, 4])
def test_a_ulysses_rank_serves_its_heads_over_the_gathered_sequence(geometry, ulysses):
    tokens = GEOMETRIES[geometry]
    patterns = _patterns(tokens)
    q, k, v = _qkv(len(patterns), tokens.length)
    expected = attention(q, k, v, _allowed(patterns, tokens)[None])
    order = _gathered(tokens, ulysses)
    per = len(patterns) // ulysses
    for rank in range(ulysses):
        state = PatchState(strict=True)
        state.context.tokens = tokens
        plan = LayerPlan("attn", 0, len(patterns), _profile(patterns), state)
        module = _module(ulysses, rank)  # held: a plan keeps its module weakly
        plan.bind(module)
        held = slice(rank * per, (rank + 1) * per)
        got = serve(plan, *(x[:, held].index_select(2, order).float() for x in (q, k, v)), None, False, None)
        torch.testing.assert_close(got.double(), expected[:, held].index_select(2, order), rtol=0, atol=2e-6)
        assert state.stats.sparse + state.stats.dense["dense in profile"] == 1 and not state.stats.fallback


def test_a_head_count_neither_whole_nor_the_slice_is_a_counted_fallback():
    tokens = GEOMETRIES["text first"]
    state = PatchState(strict=False)
    state.context.tokens = tokens
    plan = LayerPlan("attn", 0, 4, _profile(PATTERNS), state)
    module = _module(ulysses=2, rank=0)
    plan.bind(module)
    q, k, v = (x[:, :3].float() for x in _qkv(4, tokens.length))
    torch.testing.assert_close(serve(plan, q, k, v, None, False, None), F.scaled_dot_product_attention(q, k, v))
    assert dict(state.stats.fallback) == {"3 query heads, profile has 4 (nor its 2-way Ulysses slice)": 1}


def _step(tokens: TokenGeometry, patterns: tuple, pieces: int, step: RingStep, q, k, v):
    chunk = tokens.length // step.chunks
    call = Call(keys=chunk, scale=HEAD_DIM ** -0.5, tokens=tokens, pieces=pieces)
    local = [x[:, :, step.query * chunk:(step.query + 1) * chunk] for x in (q,)]
    local += [x[:, :, step.key * chunk:(step.key + 1) * chunk] for x in (k, v)]
    return step_plan(HeadSet.of(patterns), _profile(patterns), call, *local, step), local


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("chunks, pieces", [(2, 2), (4, 4), (2, 4)], ids=["ring2", "ring4", "ring2xulysses2"])
def test_a_ring_step_is_the_layout_restricted_to_its_key_chunk(geometry, chunks, pieces):
    """Every query chunk x key chunk step equals float64 attention over the whole layout's token
    mask restricted to that key chunk; diffusers' lse merge of the steps is the whole call."""
    tokens = GEOMETRIES[geometry]
    patterns = _patterns(tokens)
    q, k, v = _qkv(len(patterns), tokens.length)
    allowed = _allowed(patterns, tokens)
    order = _gathered(tokens, pieces)  # gathered position -> model position
    gathered = [x.index_select(2, order).float() for x in (q, k, v)]
    chunk = tokens.length // chunks
    for i in range(chunks):
        rows = order[i * chunk:(i + 1) * chunk]
        merged = lse_merged = None
        for t in range(chunks):
            j = (i + t) % chunks
            planned, local = _step(tokens, patterns, pieces, RingStep(chunks, i, j), *gathered)
            assert planned.fallback is None
            out, lse = planned.run(*local)
            cols = order[j * chunk:(j + 1) * chunk]
            expected = attention(q[:, :, rows], k[:, :, cols], v[:, :, cols], allowed[:, rows][:, :, cols][None])
            torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
            out, lse = out.transpose(1, 2), lse.transpose(1, 2)[..., None]  # diffusers' layout and merge
            if merged is not None:
                out = merged - torch.sigmoid(lse - lse_merged) * (merged - out)
                lse = lse_merged - F.logsigmoid(lse_merged - lse)
            merged, lse_merged = out, lse
        whole = attention(q[:, :, rows], k, v, allowed[:, rows][None])
        torch.testing.assert_close(merged.transpose(1, 2).double(), whole, rtol=0, atol=2e-6)


def test_a_step_that_touches_no_block_is_skipped():
    tokens = TokenGeometry((16, 16))  # a narrow window: the first and last of 4 chunks never meet
    patterns = (pattern_from_spec({"kind": "window", "window": 16}),) * 2
    q, k, v = (x.float() for x in _qkv(2, tokens.length))
    planned, local = _step(tokens, patterns, 4, RingStep(4, 0, 3), q, k, v)
    assert planned.fallback is None and planned.kernel is None
    out, lse = planned.run(*local)
    assert not out.any() and bool((lse == float("-inf")).all())


def test_a_query_without_keys_in_its_own_chunk_runs_every_step_dense():
    """diffusers' merge needs every query to attend a key at the first step (its own chunk)."""
    tokens = TokenGeometry((4, 16))
    patterns = (pattern_from_spec({"kind": "blocks", "kv_blocks": [0]}),)  # every query: the first key block only
    q, k, v = (x.float() for x in _qkv(1, tokens.length))
    for j in (1, 0):
        planned, _ = _step(tokens, patterns, 2, RingStep(2, 1, j), q, k, v)
        assert planned.fallback == DIAGONAL_REASON


def test_the_backend_is_a_registered_diffusers_backend():
    """Every place diffusers reads a backend name knows "autosparse": the enum, the registry, the
    context-parallel set, set_attention_backend, the dispatcher. A change in diffusers (or in
    Python's Enum) that breaks the registration fails here."""
    from diffusers.models.attention_dispatch import (AttentionBackendName, _AttentionBackendRegistry,
                                                     dispatch_attention_fn)

    register_diffusers()
    register_diffusers()  # once per process
    name = AttentionBackendName(BACKEND)
    assert name.value == BACKEND and name in list(AttentionBackendName)
    assert BACKEND in {member.value for member in AttentionBackendName.__members__.values()}
    assert _AttentionBackendRegistry._backends[name] is autosparse_attention
    assert _AttentionBackendRegistry._is_context_parallel_available(name)
    dit = build_dit("wan", "tiny")
    dit.model.set_attention_backend(BACKEND)
    try:
        assert {m.processor._attention_backend for m in dit.model.modules() if hasattr(m, "processor")} == {name}
        q, k, v = (torch.randn(1, 24, 2, HEAD_DIM) for _ in range(3))  # diffusers' [B, S, H, D], no layer served
        expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        torch.testing.assert_close(dispatch_attention_fn(q, k, v, backend=name), expected)
        out, lse = autosparse_attention(q, k, v, return_lse=True)
        torch.testing.assert_close(out, expected)
        scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) * HEAD_DIM ** -0.5
        torch.testing.assert_close(lse, scores.logsumexp(-1).transpose(1, 2))
    finally:
        dit.model.set_attention_backend("native")


@pytest.mark.parametrize("family", ["wan", "flux", "hunyuan_video"])
def test_the_backend_serves_as_the_hook_route_does(family):
    dit = build_dit(family, "tiny")
    inputs = dit.inputs()
    profile = Profile.uniform(dit.model, {"kind": "window", "window": 24}, block_size=BLOCKS)
    autosparse.patch_model(dit.model, profile, strict=True)
    with torch.no_grad():
        hooked = dit.model(**inputs).sample
        dit.model.set_attention_backend(BACKEND)
        try:
            backend = dit.model(**inputs).sample
        finally:
            dit.model.set_attention_backend("native")
    calls = autosparse.stats(dit.model)
    autosparse.unpatch_model(dit.model)
    torch.testing.assert_close(backend, hooked, rtol=0, atol=1e-6)
    assert calls.sparse == 4 and not calls.fallback


def test_balanced_order_deals_heads_to_equal_groups():
    costs = [1.0, 1.0, 0.1, 0.1, 0.5, 0.5]
    order = balanced_order(costs, 2)
    assert sorted(order) == list(range(6))
    assert rank_loads(costs, tuple(range(6)), 2) == [2.1, pytest.approx(1.1)]
    assert rank_loads(costs, order, 2) == [pytest.approx(1.6), pytest.approx(1.6)]
    with pytest.raises(ValueError, match="divisor of the 6 heads"):
        balanced_order(costs, 4)


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_balanced_heads_leave_the_model_and_its_patched_output_unchanged(family):
    shape = {"height": 8, "width": 12} if family == "flux" else {}
    dit = build_dit(family, "tiny", config={"num_attention_heads": 4}, **shape)
    inputs = dit.inputs()
    tokens = autosparse.models.family_of(dit.model).geometry(dit.model, inputs)
    profile = Profile.uniform(dit.model, {"kind": "dense"}, block_size=BLOCKS)
    heads = _patterns(tokens)
    profile = dataclasses.replace(profile, layers={n: dataclasses.replace(e, heads=heads)
                                                   for n, e in profile.layers.items()}, token_order="tile")
    with torch.no_grad():
        plain = dit.model(**inputs).sample
        autosparse.patch_model(dit.model, profile, strict=True)
        patched = dit.model(**inputs).sample
        autosparse.unpatch_model(dit.model)
        balanced, report = balance_heads(dit.model, profile, 2, tokens)
        torch.testing.assert_close(dit.model(**inputs).sample, plain, rtol=0, atol=2e-6)
        autosparse.patch_model(dit.model, balanced, strict=True)
        torch.testing.assert_close(dit.model(**inputs).sample, patched, rtol=0, atol=2e-6)
    autosparse.unpatch_model(dit.model)
    assert report.after < report.before
    # FLUX's single-stream blocks have no output projection of their own: kept in their order
    assert report.kept == (("single_transformer_blocks.0.attn",) if family == "flux" else ())
