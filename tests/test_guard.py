"""The run-time accuracy guard (``autosparse.guard``): exact attention on sampled rows vs a served output.

1. a correct output passes (error ~0): causal / not, GQA, key padding, fp32 / bf16, strided views;
2. a too-sparse layout on inputs whose attention mass is far away fails and names exactly its heads;
3. rows without an allowed key are never flagged, whatever the output holds there;
4. GuardConfig / parse validation names the field;
5. statistical catch: an error on 10 % of one head's rows is caught in >= 95 % of calls at rows=64;
6. the Triton path (interpreted, in a TRITON_INTERPRET=1 subprocess) agrees with the PyTorch path;
6b. the Triton merge-and-compare pass (interpreted) gives the PyTorch path's per-row sums, on
   every head and on rotating head windows, NaN outputs and rows without keys included;
6c. ``GuardConfig.heads``: the rotation covers every KV head in any ceil(Hkv / heads) consecutive
   checked calls (proved exhaustively for small Hkv), per layer and only on checked calls; a sampled
   check gives the full check's errors on its heads; a bad head is caught within ceil(Hkv / heads)
   calls; the stratified rows are sorted, distinct, one per stratum, uniform within it;
7. end to end on a tiny Wan DiT, through ``patch_model(..., guard=...)`` (``every`` 1 and 2) and the
   compile backend's ``options={"guard": ...}``: every checked call of a too-sparse profile is
   recomputed dense and counted, an exact-enough profile stays sparse.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import autosparse
from autosparse import guard
from autosparse.guard import (Guard, GuardConfig, GuardVerdict, check, compare_rows, exact_rows, hashed_rows,
                              kv_heads_for, log_line, rows_key, sample_rows)
from autosparse.kernels import block_sparse_attention
from autosparse.layout import BlockLayout
from autosparse.patterns import BlockGeometry, Dense, SinkLocal, Window
from autosparse.testing.reference import attention, causal_mask
from autosparse.testing.interpreter import run_interpreted



def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qkv(b, hq, hkv, s, d, dtype=torch.float32, seed=0, dv=None):
    g = _gen(seed)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, dv or d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _allowed(b, sq, sk, causal, kv_valid):
    """bool [B, 1, Sq, Sk]: the kernel's token rule (bottom-right causal, key padding)."""
    mask = torch.ones(b, 1, sq, sk, dtype=torch.bool)
    if causal:
        mask &= causal_mask(sq, sk)
    if kv_valid is not None:
        mask &= kv_valid[:, None, None, :]
    return mask


def _exact(q, k, v, causal, scale, kv_valid=None):
    """float64 dense attention with the kernel's rule (empty rows: 0), in q's dtype."""
    mask = _allowed(q.shape[0], q.shape[2], k.shape[2], causal, kv_valid)
    return attention(q, k, v, mask, scale=scale).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# 1. correct outputs pass
# --------------------------------------------------------------------------------------------------
CORRECT = [  # (name, b, hq, hkv, s, d, causal, padding, dtype)
    ("noncausal", 2, 4, 4, 200, 32, False, False, torch.float32),
    ("causal", 2, 4, 4, 200, 32, True, False, torch.float32),
    ("gqa_causal", 1, 8, 2, 257, 64, True, False, torch.float32),
    ("gqa_noncausal_padding", 2, 6, 3, 190, 32, False, True, torch.float32),
    ("causal_padding", 3, 4, 2, 160, 16, True, True, torch.float32),
    ("bf16_causal_gqa", 2, 8, 4, 300, 64, True, False, torch.bfloat16),
    ("bf16_noncausal_padding", 2, 4, 4, 220, 32, False, True, torch.bfloat16),
]


@pytest.mark.parametrize("case", CORRECT, ids=[c[0] for c in CORRECT])
@pytest.mark.parametrize("via", ["sdpa", "reference"])
def test_correct_output_passes(case, via):
    name, b, hq, hkv, s, d, causal, padding, dtype = case
    q, k, v = _qkv(b, hq, hkv, s, d, dtype, seed=len(name))
    scale = d ** -0.5
    kv_valid = None
    if padding:  # left padding of a different length per batch element (the first one unpadded)
        kv_valid = torch.arange(s)[None, :] >= torch.tensor([0, 37, 90][:b])[:, None]
    if via == "sdpa":
        mask = _allowed(b, s, s, causal, kv_valid) if padding else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and not padding, scale=scale,
                                             enable_gqa=hq != hkv)
        if padding:
            out = torch.nan_to_num(out)  # SDPA's empty rows (causal + left padding) are NaN: excluded anyway
    else:
        out = _exact(q, k, v, causal, scale, kv_valid)
    # the kernel's output layout: [B, H, S, Dv] backed by [B, S, H, Dv] memory
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    verdict = check(GuardConfig(rows=64), q, k, v, out, causal=causal, scale=scale, kv_valid=kv_valid,
                    generator=_gen(1))
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    assert verdict.ok and verdict.heads == () and verdict.error < limit, verdict
    assert 0 < verdict.rows <= 64 * b


def test_strided_inputs_and_cross_lengths():
    """q/k/v as views of [B, S, H, D] memory, Sq != Sk (bottom-right causal), and all rows when
    ``rows`` exceeds the sequence."""
    b, hq, hkv, sq, sk, d = 2, 4, 2, 48, 80, 32
    g = _gen(3)
    q = torch.randn(b, sq, hq, d, generator=g).transpose(1, 2)
    k = torch.randn(b, sk, hkv, d, generator=g).transpose(1, 2)
    v = torch.randn(b, sk, hkv, d, generator=g).transpose(1, 2)
    for causal in (False, True):
        out = _exact(q, k, v, causal, 0.3)
        verdict = check(GuardConfig(rows=100), q, k, v, out, causal=causal, scale=0.3)
        assert verdict.ok and verdict.error < 1e-5 and verdict.rows == b * sq


def test_exact_rows_at_long_length_use_no_s_by_s_memory():
    """S = 65536: an S x S float32 temporary would be 17 GB. The sampled rows still match dense
    attention computed on those rows alone."""
    s, d = 65536, 16
    q, k, v = _qkv(1, 2, 1, s, d, seed=5)
    pos = torch.randint(0, s, (1, 8), generator=_gen(6)).sort(dim=1).values
    got = exact_rows(q, k, v, pos, causal=True, scale=0.25, impl="torch")
    rows = q.gather(2, pos[:, None, :, None].expand(1, 2, 8, d))
    allowed = (torch.arange(s)[None, :] <= pos[0, :, None])[None, None]  # [1, 1, R, S]
    ref = attention(rows, k, v, allowed, scale=0.25)
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 2. a too-sparse layout fails, on the heads it is too sparse for
# --------------------------------------------------------------------------------------------------
def structured_qkv(b, hq, hkv, s, d, target, seed=0, strength=2.0, dtype=torch.float32):
    """Keys random; query i of head h is ``strength`` x key ``target(h, i)`` of its KV head: almost all
    of its attention mass is on that one key (score strength * sqrt(d) vs N(0, strength^2))."""
    g = _gen(seed)
    k = torch.randn(b, hkv, s, d, generator=g)
    k = k * (d ** 0.5 / k.norm(dim=-1, keepdim=True))  # |k|^2 = d: every target scores strength * sqrt(d)
    v = torch.randn(b, hkv, s, d, generator=g)
    group = hq // hkv
    idx = torch.stack([target(h, torch.arange(s)) for h in range(hq)])  # [Hq, S]
    idx = idx.view(hkv, group * s)[None, :, :, None].expand(b, hkv, group * s, d)
    q = strength * k.gather(2, idx).view(b, hq, s, d)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _served(q, k, v, patterns, causal, blocks=(32, 32), scale=None):
    """What the runtime serves: the block-sparse op on the patterns' layout (CPU: PyTorch path)."""
    geometry = BlockGeometry(q.shape[2], k.shape[2], *blocks, causal)
    layout = BlockLayout.from_patterns(patterns, geometry)
    return block_sparse_attention(q, k, v, layout.kv_indices, layout.kv_counts, q_block=blocks[0],
                                  kv_block=blocks[1], causal=causal, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
def test_too_sparse_heads_are_named(causal):
    b, hq, hkv, s, d = 2, 6, 3, 512, 32
    if causal:  # mass on a key ~3/4 of the way back: out of a 64-token window past the first ~90 rows
        def target(h, i):
            return i // 4
    else:  # mass half a sequence away
        def target(h, i):
            return (i + s // 2) % s
    q, k, v = structured_qkv(b, hq, hkv, s, d, target, seed=int(causal))
    bad = (1, 4)
    patterns = [Window(64) if h in bad else Dense() for h in range(hq)]
    out = _served(q, k, v, patterns, causal)
    verdict = check(GuardConfig(rows=64, tol=0.05), q, k, v, out, causal=causal, scale=d ** -0.5, generator=_gen(2))
    assert verdict.heads == bad and not verdict.ok
    assert verdict.error > 0.5
    # the exact heads alone: a pass
    exact_heads = [h for h in range(hq) if h not in bad]
    sub = check(GuardConfig(rows=64), q[:, exact_heads], k.repeat_interleave(2, 1)[:, exact_heads],
                v.repeat_interleave(2, 1)[:, exact_heads], out[:, exact_heads], causal=causal, scale=d ** -0.5)
    assert sub.ok and sub.error < 1e-5
    # a window that holds the mass (sinks + local reaching each target) passes on every head
    near = structured_qkv(b, hq, hkv, s, d, lambda h, i: (i - 40).clamp(min=0) if causal else (i + 20) % s, seed=7,
                          strength=3.0)
    out = _served(*near, [SinkLocal(32, 128)] * hq, causal)
    verdict = check(GuardConfig(rows=64), *near, out, causal=causal, scale=d ** -0.5, generator=_gen(3))
    assert verdict.ok, verdict


def test_log_line_names_layer_heads_and_error():
    line = log_line("transformer.blocks.3.attn1", GuardVerdict(0.8312, (1, 4), 0.05, 128))
    assert "transformer.blocks.3.attn1" in line and "heads 1, 4" in line and "0.831" in line and "0.05" in line
    ok = log_line("model.layers.0.self_attn", GuardVerdict(0.001, (), 0.05, 64))
    assert "model.layers.0.self_attn" in ok and "ok" in ok
    assert "head 2 " in log_line("x", GuardVerdict(math.nan, (2,), 0.05, 64))


def test_non_finite_output_is_flagged():
    q, k, v = _qkv(1, 3, 3, 64, 16, seed=9)
    out = _exact(q, k, v, False, 0.25)
    out[0, 1, :, 0] = float("nan")
    verdict = check(GuardConfig(rows=64), q, k, v, out, causal=False, scale=0.25)
    assert verdict.heads == (1,) and math.isnan(verdict.error)


# --------------------------------------------------------------------------------------------------
# 3. rows without an allowed key
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill", [0.0, float("nan"), 1e4])
def test_fully_masked_rows_are_never_flagged(fill):
    """Causal + left padding: rows before a batch element's first real key have no key (the kernel
    writes 0 there, SDPA NaN); a batch element without any real key (non-causal) has none at all.
    Whatever out holds on them, they are left out."""
    b, h, s, d = 3, 4, 96, 16
    q, k, v = _qkv(b, h, h, s, d, seed=11)
    for causal, starts in ((True, [0, 40, 95]), (False, [0, 30, s])):
        kv_valid = torch.arange(s)[None, :] >= torch.tensor(starts)[:, None]
        ref = _exact(q, k, v, causal, 0.25, kv_valid)
        # the kernel (here its PyTorch path, a dense layout) writes 0 on exactly those rows
        dense = BlockLayout.from_patterns([Dense()] * h, BlockGeometry(s, s, 32, 32, causal))
        kernel = block_sparse_attention(q, k, v, dense.kv_indices, dense.kv_counts, q_block=32, kv_block=32,
                                        causal=causal, scale=0.25, kv_valid=kv_valid)
        empty = ~_allowed(b, s, s, causal, kv_valid).any(-1)[:, 0]  # [B, S]
        assert empty.any()
        assert (kernel.transpose(1, 2)[empty] == 0).all()
        torch.testing.assert_close(kernel, ref, rtol=1e-5, atol=1e-5)
        # the guard's exact rows agree with the kernel there (0)
        pos = torch.arange(s).expand(b, s)
        for impl in ("torch",):
            rows = exact_rows(q, k, v, pos, causal=causal, scale=0.25, kv_valid=kv_valid, impl=impl)
            assert (rows.transpose(1, 2)[empty] == 0).all()
        out = ref.clone()
        out.transpose(1, 2)[empty] = fill
        verdict = check(GuardConfig(rows=s), q, k, v, out, causal=causal, scale=0.25, kv_valid=kv_valid)
        assert verdict.ok and verdict.error < 1e-5, verdict
        assert verdict.rows == int((~empty).sum())
        # ... and with only empty rows in the whole call: nothing compared, nothing flagged
        none = torch.zeros(b, s, dtype=torch.bool)
        verdict = check(GuardConfig(rows=16), q, k, v, torch.full_like(out, fill), causal=causal, scale=0.25,
                        kv_valid=none)
        assert verdict.ok and verdict.rows == 0 and verdict.error == 0


# --------------------------------------------------------------------------------------------------
# 4. configuration
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,expected", [
    ("rows", 0, "int >= 1"), ("rows", -3, "int >= 1"), ("rows", 1.5, "int >= 1"), ("rows", True, "int >= 1"),
    ("tol", 0, "> 0"), ("tol", -0.1, "> 0"), ("tol", math.nan, "finite"), ("tol", math.inf, "finite"),
    ("tol", "0.05", "number"), ("every", 0, "int >= 1"), ("every", 2.0, "int >= 1"), ("seed", -1, "int >= 0"),
])
def test_config_validation_names_the_field(field, value, expected):
    with pytest.raises(ValueError, match=rf"GuardConfig\.{field} must be .*{expected}.*got {value!r}"):
        GuardConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"GuardConfig\.{field}"):
        GuardConfig.parse({field: value})


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_config_heads_validation(value):
    with pytest.raises(ValueError, match=rf"GuardConfig\.heads must be None \(every head\) or an int >= 1, "
                                         rf"got {value!r}"):
        GuardConfig(heads=value)
    with pytest.raises(ValueError, match=r"GuardConfig\.heads"):
        GuardConfig.parse({"heads": value})


def test_config_defaults_and_parse():
    assert GuardConfig() == GuardConfig(rows=64, tol=0.05, every=1, seed=0, heads=None)
    assert GuardConfig.parse({"heads": 3}) == GuardConfig(heads=3)
    assert GuardConfig(tol=1).tol == 1.0 and isinstance(GuardConfig(tol=1).tol, float)
    config = GuardConfig(rows=8)
    assert GuardConfig.parse(None) is None and GuardConfig.parse(config) is config
    assert GuardConfig.parse({"rows": 32, "tol": 0.1, "every": 4}) == GuardConfig(32, 0.1, 4)
    assert GuardConfig.parse({}) == GuardConfig()
    with pytest.raises(ValueError, match=r"'rowz'.*unknown.*rows"):
        GuardConfig.parse({"rowz": 3})
    for bad in (True, 0.05, [64], "rows=64"):
        with pytest.raises(TypeError, match="guard: expected None, a GuardConfig or a dict"):
            GuardConfig.parse(bad)
    with pytest.raises(Exception):
        config.rows = 3  # frozen


def test_guard_state_every_and_generators():
    g = Guard(GuardConfig(rows=4, every=3, seed=5))
    assert [g.due("a") for _ in range(7)] == [True, False, False, True, False, False, True]
    assert [g.due("b") for _ in range(2)] == [True, False]  # per layer
    assert all(Guard(GuardConfig()).due("x") for _ in range(3))
    # rows from the guard's own generator: fresh per call, reproducible per seed, global RNG untouched
    q, k, v = _qkv(1, 2, 2, 1000, 8, seed=4)
    out = _exact(q, k, v, False, 0.3)
    state = torch.random.get_rng_state()
    first = g.check(q, k, v, out, causal=False, scale=0.3)
    assert first.ok and first.rows == 4
    assert torch.equal(torch.random.get_rng_state(), state)
    a = torch.randint(0, 10**6, (4,), generator=Guard(GuardConfig(seed=5)).generator("cpu"))
    b = torch.randint(0, 10**6, (4,), generator=Guard(GuardConfig(seed=5)).generator("cpu"))
    c = torch.randint(0, 10**6, (4,), generator=Guard(GuardConfig(seed=6)).generator("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # no generator: the guard's own for (seed, device), drawn from on every call
    own = guard._default_generator(0, torch.device("cpu"))
    before = own.get_state()
    check(GuardConfig(rows=4), q, k, v, out, causal=False, scale=0.3)
    middle = own.get_state()
    check(GuardConfig(rows=4), q, k, v, out, causal=False, scale=0.3)
    assert not torch.equal(before, middle) and not torch.equal(middle, own.get_state())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_bad_shapes_are_refused():
    q, k, v = _qkv(1, 3, 2, 16, 8)
    with pytest.raises(ValueError, match="multiple"):
        check(GuardConfig(), q, k, v, torch.zeros(1, 3, 16, 8), causal=False, scale=1.0)
    q, k, v = _qkv(1, 4, 2, 16, 8)
    with pytest.raises(ValueError, match="out is"):
        check(GuardConfig(), q, k, v, torch.zeros(1, 4, 15, 8), causal=False, scale=1.0)
    with pytest.raises(ValueError, match="kv_valid"):
        check(GuardConfig(), q, k, v, torch.zeros(1, 4, 16, 8), causal=False, scale=1.0,
              kv_valid=torch.ones(1, 15, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# 5. statistical catch
# --------------------------------------------------------------------------------------------------
def test_statistical_catch_rate():
    """200 calls, fresh inputs each: one head's output is wrong on a random band of 10 % of its rows
    (rows of another head: per-row error ~1.4). At rows=64 a call is missed only if no sampled row
    falls in the band (0.9^64 ~ 0.1 %): >= 95 % must be caught, always naming only that head; the
    same calls without the error raise no alarm."""
    b, h, s, d, calls = 1, 4, 320, 16, 200
    config = GuardConfig(rows=64, tol=0.05)
    gen = _gen(123)
    caught = alarms = 0
    for call in range(calls):
        q, k, v = (torch.randn(b, h, s, d, generator=gen) for _ in range(3))
        out = _exact(q, k, v, False, d ** -0.5)
        if not check(config, q, k, v, out, causal=False, scale=d ** -0.5, generator=gen).ok:
            alarms += 1
        wrong = out.clone()
        start = int(torch.randint(0, s - s // 10, (1,), generator=gen))
        band = slice(start, start + s // 10)
        wrong[:, 2, band] = out[:, 0, band]
        verdict = check(config, q, k, v, wrong, causal=False, scale=d ** -0.5, generator=gen)
        if not verdict.ok:
            assert verdict.heads == (2,)
            caught += 1
    assert alarms == 0
    assert caught / calls >= 0.95, caught


# --------------------------------------------------------------------------------------------------
# 6. Triton path (interpreted) vs PyTorch path
# --------------------------------------------------------------------------------------------------
TRITON_CASES = {  # name: (b, hq, hkv, sq, sk, d, dv, causal, padding, dtype, transposed, rows)
    "fp32_noncausal": (2, 2, 2, 130, 130, 32, 32, False, False, torch.float32, False, 16),
    "fp32_gqa_causal_padding": (2, 4, 2, 200, 200, 16, 16, True, True, torch.float32, True, 12),
    "fp32_causal_cross_len_d40_dv24": (1, 2, 1, 70, 150, 40, 24, True, False, torch.float32, False, 20),
    "fp16_gqa_noncausal_padding": (2, 4, 1, 160, 160, 32, 32, False, True, torch.float16, True, 8),
    "fp32_many_splits": (1, 1, 1, 1100, 1100, 16, 16, True, False, torch.float32, False, 24),
    "fp16_gqa_causal_d64": (1, 4, 2, 300, 300, 64, 64, True, False, torch.float16, True, 16),
    # no bf16 case: Triton's interpreter computes tl.dot on bf16 wrongly (1e10 off on a plain 16x16
    # dot); benchmarks/guard.py checks the bf16 kernel against the PyTorch path on the GPU.
}


def _triton_inputs(name):
    b, hq, hkv, sq, sk, d, dv, causal, padding, dtype, transposed, rows = TRITON_CASES[name]
    g = _gen(sum(map(ord, name)))
    shape = (lambda h, s, e: (b, s, h, e)) if transposed else (lambda h, s, e: (b, h, s, e))
    def make(h, s, e):
        x = torch.randn(shape(h, s, e), generator=g).to(dtype)
        return x.transpose(1, 2) if transposed else x
    q, k, v = make(hq, sq, d), make(hkv, sk, d), make(hkv, sk, dv)
    kv_valid = None
    if padding:
        kv_valid = torch.rand(b, sk, generator=g) > 0.3
        kv_valid[-1, : sk // 2] = False
    pos = torch.randint(0, sq, (b, rows), generator=g).sort(dim=1).values
    return q, k, v, pos, causal, kv_valid


def _compare_inputs(name):
    """A TRITON_CASES case, an output to compare (exact rows + noise on some heads, NaN on one row of
    the last head) and the KV-head windows to compare on (all; a rotating one that wraps)."""
    q, k, v, pos, causal, kv_valid = _triton_inputs(name)
    g = _gen(sum(map(ord, name)) + 1)
    b, hq, sq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    out = _exact(q, k, v, causal, 0.2, kv_valid).float()
    out = out + 0.05 * torch.randn(out.shape, generator=g) * (torch.arange(hq) % 2)[None, :, None, None]
    out[:, -1, int(pos[0, 0])] = float("nan")
    out = out.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    windows = [(0, hkv)] + ([(hkv - 1, min(2, hkv))] if hkv > 1 else [])
    return q, k, v, out, pos, causal, kv_valid, windows


def _interpret_worker(path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("needs TRITON_INTERPRET=1 before triton is imported")
    results = {}
    for name in TRITON_CASES:
        q, k, v, pos, causal, kv_valid = _triton_inputs(name)
        results[name] = exact_rows(q, k, v, pos, causal=causal, scale=0.2, kv_valid=kv_valid, impl="triton")
        q, k, v, out, pos, causal, kv_valid, windows = _compare_inputs(name)
        for window in windows:
            results[name, window] = compare_rows(q, k, v, out, pos, causal=causal, scale=0.2, kv_valid=kv_valid,
                                                 kv_heads=window, impl="triton")
    assert guard._triton_serves(q, k, v)
    # the whole check through the Triton path: a verdict
    q, k, v, out, pos, causal, kv_valid, _ = _compare_inputs("fp32_gqa_causal_padding")
    verdict = check(GuardConfig(rows=12, heads=1), q, k, v, out, causal=causal, scale=0.2, kv_valid=kv_valid,
                    generator=_gen(4), call=1, impl="triton")
    results["verdict"] = dict(checked=list(verdict.checked), heads=list(verdict.heads), rows=verdict.rows,
                              errors=list(verdict.errors))
    # rows hashed inside the kernels (rows_key): the rows of hashed_rows, the PyTorch path's verdict
    for name in ("fp32_gqa_causal_padding", "fp32_causal_cross_len_d40_dv24", "fp32_many_splits"):
        q, k, v, out, pos, causal, kv_valid, _ = _compare_inputs(name)
        for heads, rows in ((None, 12), (1, 7), (None, 4000)):
            verdict = check(GuardConfig(rows=rows, heads=heads), q, k, v, out, causal=causal, scale=0.2,
                            kv_valid=kv_valid, rows_key=rows_key(3, 9), call=1, impl="triton")
            results["hashed", name, heads, rows] = dict(checked=list(verdict.checked), heads=list(verdict.heads),
                                                        rows=verdict.rows, errors=list(verdict.errors))
    torch.save(results, path)


def test_triton_path_matches_torch_path(tmp_path):
    pytest.importorskip("triton")
    results = run_interpreted(__file__, tmp_path / "guard_triton.pt", timeout=600)
    for name in TRITON_CASES:
        q, k, v, pos, causal, kv_valid = _triton_inputs(name)
        ref = exact_rows(q, k, v, pos, causal=causal, scale=0.2, kv_valid=kv_valid, impl="torch")
        tol = 1e-5 if q.dtype == torch.float32 else 1e-2  # half inputs: P rounded for P @ V, as flash kernels do
        torch.testing.assert_close(results[name], ref, rtol=tol, atol=tol, msg=name)
        # merge and compare: the per-row sums (|diff|^2, |exact|^2, has-a-key) of the PyTorch path
        q, k, v, out, pos, causal, kv_valid, windows = _compare_inputs(name)
        for window in windows:
            ref = compare_rows(q, k, v, out, pos, causal=causal, scale=0.2, kv_valid=kv_valid, kv_heads=window,
                               impl="torch")
            got = results[name, window]
            assert got.shape == ref.shape
            assert torch.equal(got[..., 2], ref[..., 2]), (name, window)  # the same rows have keys
            assert torch.isnan(got[..., 0]).equal(torch.isnan(ref[..., 0])) and torch.isnan(ref[..., 0]).any()
            tol = 1e-4 if q.dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref[..., 1].nanmean()), equal_nan=True,
                                       msg=f"{name} {window}")
    q, k, v, out, pos, causal, kv_valid, _ = _compare_inputs("fp32_gqa_causal_padding")
    want = check(GuardConfig(rows=12, heads=1), q, k, v, out, causal=causal, scale=0.2, kv_valid=kv_valid,
                 generator=_gen(4), call=1, impl="torch")
    got = results["verdict"]
    assert tuple(got["checked"]) == want.checked == (2, 3) and tuple(got["heads"]) == want.heads
    assert got["rows"] == want.rows > 0
    torch.testing.assert_close(torch.tensor(got["errors"]), torch.tensor(want.errors), rtol=1e-4, atol=1e-6,
                               equal_nan=True)
    for name in ("fp32_gqa_causal_padding", "fp32_causal_cross_len_d40_dv24", "fp32_many_splits"):
        q, k, v, out, pos, causal, kv_valid, _ = _compare_inputs(name)
        for heads, rows in ((None, 12), (1, 7), (None, 4000)):
            want = check(GuardConfig(rows=rows, heads=heads), q, k, v, out, causal=causal, scale=0.2,
                         kv_valid=kv_valid, rows_key=rows_key(3, 9), call=1, impl="torch")
            got = results["hashed", name, heads, rows]
            assert tuple(got["checked"]) == want.checked and tuple(got["heads"]) == want.heads, (name, heads, rows)
            assert got["rows"] == want.rows > 0
            torch.testing.assert_close(torch.tensor(got["errors"]), torch.tensor(want.errors), rtol=1e-4, atol=1e-6,
                                       equal_nan=True, msg=f"{name} {heads} {rows}")


# --------------------------------------------------------------------------------------------------
# 6c. sampled heads (GuardConfig.heads) and stratified rows
# --------------------------------------------------------------------------------------------------
def test_rotation_covers_every_head_within_ceil_h_over_n_calls():
    """Exhaustive for Hkv <= 16: each checked call compares min(n, Hkv) distinct KV heads, and every
    window of ceil(Hkv / n) consecutive checked calls (any start) covers all of them."""
    for hkv in range(1, 17):
        assert kv_heads_for(5, hkv, None) == tuple(range(hkv))
        for n in range(1, hkv + 2):
            period = math.ceil(hkv / n)
            sets = [kv_heads_for(c, hkv, n) for c in range(3 * hkv + period)]
            for c, heads in enumerate(sets):
                assert len(set(heads)) == len(heads) == min(n, hkv) and all(0 <= h < hkv for h in heads)
            for start in range(3 * hkv):
                covered = set().union(*sets[start:start + period])
                assert covered == set(range(hkv)), (hkv, n, start)
            if period > 1:  # and not in fewer calls (from call 0): the bound is tight
                assert set().union(*sets[:period - 1]) != set(range(hkv))


def test_guard_rotates_per_layer_on_checked_calls():
    b, hq, hkv, s, d = 1, 6, 3, 64, 8  # 2 query heads per KV head
    q, k, v = _qkv(b, hq, hkv, s, d, seed=21)
    out = _exact(q, k, v, False, 0.3)
    g = Guard(GuardConfig(rows=8, heads=2, every=2))
    seen = {"a": [], "b": []}
    for layer in ("a", "b", "a", "a", "b", "a", "a", "a"):
        if g.due(layer):
            verdict = g.check(q, k, v, out, causal=False, scale=0.3)
            assert verdict.ok and len(verdict.errors) == len(verdict.checked) == 4
            seen[layer].append(verdict.checked)
    # "a": served 6 times -> checked calls 0, 1, 2 (served 1, 3, 5); "b": served twice -> checked once
    assert seen["a"] == [(0, 1, 2, 3), (0, 1, 4, 5), (2, 3, 4, 5)]
    assert seen["b"] == [(0, 1, 2, 3)]
    # an explicit layer, and a copied guard starts over
    assert g.check(q, k, v, out, causal=False, scale=0.3, layer="b").checked == (0, 1, 4, 5)
    import copy
    assert copy.deepcopy(g).check(q, k, v, out, causal=False, scale=0.3, layer="b").checked == (0, 1, 2, 3)
    # default: every head
    assert Guard(GuardConfig(rows=8)).check(q, k, v, out, causal=False, scale=0.3).checked == tuple(range(hq))


def test_sampled_heads_give_the_full_checks_errors():
    b, hq, hkv, s, d = 2, 8, 4, 150, 16
    for causal in (False, True):
        q, k, v = _qkv(b, hq, hkv, s, d, seed=30 + causal)
        kv_valid = torch.arange(s)[None, :] >= torch.tensor([0, 20])[:, None]
        out = _exact(q, k, v, causal, 0.25, kv_valid)
        out = out + 0.03 * torch.randn(out.shape, generator=_gen(9)) * torch.arange(hq)[None, :, None, None]
        full = check(GuardConfig(rows=32), q, k, v, out, causal=causal, scale=0.25, kv_valid=kv_valid,
                     generator=_gen(5))
        errors = dict(zip(full.checked, full.errors))
        assert full.checked == tuple(range(hq)) and full.heads  # the noisier heads fail
        for call in range(5):
            part = check(GuardConfig(rows=32, heads=3), q, k, v, out, causal=causal, scale=0.25, kv_valid=kv_valid,
                         generator=_gen(5), call=call)
            kv = kv_heads_for(call, hkv, 3)
            assert part.checked == tuple(sorted(h * 2 + g for h in kv for g in range(2)))
            for h, e in zip(part.checked, part.errors):
                assert e == pytest.approx(errors[h], rel=1e-5, abs=1e-7)
            assert part.heads == tuple(h for h in full.heads if h in part.checked)
            assert part.rows == full.rows


def test_bad_head_is_caught_within_the_rotation_period():
    """A layer too sparse on one head (fresh inputs every call, a random head each trial): with
    heads=n it is flagged on the first checked call whose window holds its KV head, always within
    ceil(Hkv / n) checked calls, naming only that head."""
    b, hq, hkv, s, d = 1, 8, 4, 256, 16
    gen = _gen(77)
    for n in (1, 2, 3):
        period = math.ceil(hkv / n)
        for trial in range(6):
            bad = int(torch.randint(0, hq, (1,), generator=gen))
            g = Guard(GuardConfig(rows=32, heads=n, seed=trial))
            for call in range(period):
                q, k, v = (torch.randn(b, hq if i == 0 else hkv, s, d, generator=gen) for i in range(3))
                out = _exact(q, k, v, False, d ** -0.5)
                out[:, bad] = out[:, bad].flip(1)  # every row of the bad head wrong
                assert g.due("layer")
                verdict = g.check(q, k, v, out, causal=False, scale=d ** -0.5)
                if bad in verdict.checked:
                    assert verdict.heads == (bad,)
                    break
                assert verdict.ok
            else:
                raise AssertionError(f"head {bad} not caught within {period} calls (heads={n})")


def test_stratified_rows():
    g = _gen(8)
    for sq, rows in ((1000, 64), (65, 64), (64, 64), (10, 64), (7, 3)):
        pos = sample_rows(3, sq, rows, "cpu", g)
        if rows >= sq:
            assert torch.equal(pos, torch.arange(sq).expand(3, sq))
            continue
        assert pos.shape == (3, rows) and pos.dtype == torch.long
        edges = torch.arange(rows + 1) * sq // rows
        assert ((pos >= edges[:-1]) & (pos < edges[1:])).all()  # one per stratum: sorted, distinct
    # uniform within each stratum: 20,000 draws of 4 rows of 10 positions (strata 2, 3, 2, 3 wide)
    counts = torch.bincount(sample_rows(20000, 10, 4, "cpu", g).flatten(), minlength=10).float()
    expected = 20000 / torch.tensor([2, 2, 3, 3, 3, 2, 2, 3, 3, 3.0])
    assert ((counts - expected).abs() < 5 * expected.sqrt()).all(), counts
    # a band longer than two strata is always hit
    for _ in range(50):
        pos = sample_rows(1, 640, 64, "cpu", g)[0]
        start = int(torch.randint(0, 640 - 21, (1,), generator=g))
        assert ((pos >= start) & (pos < start + 21)).any()


def test_hashed_rows():
    """Rows drawn from a key (what Guard.check and the Triton kernels use): stratified, sorted,
    distinct, a function of (seed, draw) only, fresh per draw, about uniform within each stratum."""
    for sq, rows in ((1000, 64), (65, 64), (64, 64), (10, 64), (7, 3), (32768, 64)):
        pos = hashed_rows(3, sq, rows, rows_key(0, 1))
        if rows >= sq:
            assert torch.equal(pos, torch.arange(sq).expand(3, sq))
            continue
        assert pos.shape == (3, rows) and pos.dtype == torch.long
        edges = torch.arange(rows + 1) * sq // rows
        assert ((pos >= edges[:-1]) & (pos < edges[1:])).all()
        assert not torch.equal(pos[0], pos[1])  # batch elements draw apart
    assert rows_key(5, 3) == rows_key(5, 3) and rows_key(5, 3) != rows_key(6, 3) != rows_key(5, 4)
    assert all(0 <= rows_key(s, n) < 2 ** 31 for s in (0, 2 ** 40 + 1) for n in (0, 2 ** 33))
    assert torch.equal(hashed_rows(2, 500, 8, 77), hashed_rows(2, 500, 8, 77))
    counts = torch.bincount(torch.cat([hashed_rows(200, 10, 4, rows_key(1, n)).flatten() for n in range(100)]),
                            minlength=10).float()
    expected = 20000 / torch.tensor([2, 2, 3, 3, 3, 2, 2, 3, 3, 3.0])
    assert ((counts - expected).abs() < 5 * expected.sqrt()).all(), counts
    hit = 0
    for n in range(50):  # a band longer than two strata is always hit
        pos = hashed_rows(1, 640, 64, rows_key(2, n))[0]
        start = (n * 97) % (640 - 21)
        hit += bool(((pos >= start) & (pos < start + 21)).any())
    assert hit == 50
    # Guard.check draws from (seed, n-th check on the device): the same rows in every run
    q, k, v = _qkv(1, 2, 2, 1000, 8, seed=4)
    out = _exact(q, k, v, False, 0.3)
    out[:, :, 500:] += 1.0  # only rows >= 500 wrong: the estimate depends on which rows were drawn
    runs = [[Guard(GuardConfig(rows=3, seed=s)).check(q, k, v, out, causal=False, scale=0.3).error for _ in range(3)]
            for s in (1, 1)]
    assert runs[0] == runs[1]


# --------------------------------------------------------------------------------------------------
# 7. end to end: a tiny Wan DiT
# --------------------------------------------------------------------------------------------------
WAN_SHAPE = dict(frames=2, height=32, width=98)  # grid 2 x 16 x 49 = 1568 tokens (as tests/test_diffusers.py)
WAN_SERVED = 2  # self-attention calls per forward
TOO_SPARSE = {"kind": "window", "window": 16}  # ~5 % of the keys; random weights attend nearly uniformly
EXACT_ENOUGH = {"kind": "window", "window": 4096}  # every key (served sparse at density 1)


def _wan():
    from autosparse.testing.dits import build_dit

    return build_dit("wan", "tiny", **WAN_SHAPE)


def _guard_reasons(calls) -> int:
    return sum(n for reason, n in calls.fallback.items() if "guard" in reason)


def _e2e(patch, forwards: int = 2, every: int = 1):
    """Unpatched output vs patched with the too-sparse profile + guard (every checked call densified:
    equal outputs, one guard fallback each), and with the exact-enough one (served sparse).
    ``patch(model, profile, config)`` patches and returns what to call (the model, or its compiled form)."""
    dit = _wan()
    inputs = [dit.inputs() for _ in range(forwards)]
    with torch.no_grad():
        expected = [dit.model(**x).sample for x in inputs]
    config = GuardConfig(rows=64, tol=0.05, every=every)

    def patched(spec):
        run = patch(dit.model, autosparse.Profile.uniform(dit.model, spec, block_size=(16, 32)), config)
        with torch.no_grad():
            outputs = [run(**x).sample for x in inputs]
        calls = autosparse.stats(dit.model)
        autosparse.unpatch_model(dit.model)
        return outputs, calls

    got, calls = patched(TOO_SPARSE)
    checked = WAN_SERVED * len(range(0, forwards, every))
    assert _guard_reasons(calls) == checked and calls.sparse == WAN_SERVED * forwards - checked, calls
    for f in range(0, forwards, every):  # the checked forwards: every call recomputed dense
        torch.testing.assert_close(got[f], expected[f], rtol=0, atol=1e-6)
    if every > 1:  # an unchecked forward keeps the too-sparse output
        assert (got[1] - expected[1]).norm() > 1e-2 * expected[1].norm()

    got, calls = patched(EXACT_ENOUGH)
    assert calls.sparse == WAN_SERVED * forwards and _guard_reasons(calls) == 0, calls
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("every", [1, 2])
def test_patch_model_guard_densifies_what_it_checks(every):
    _e2e(lambda model, profile, config: autosparse.patch_model(model, profile, guard=config), every=every)


def test_patch_model_guard_from_a_dict():
    _e2e(lambda model, profile, config: autosparse.patch_model(
        model, profile, guard={"rows": config.rows, "tol": config.tol, "every": config.every}))


def test_compile_backend_guard_option():
    """The compile route: options={"guard": {...}} (inner compiler "eager": no inductor on 2 cores)."""
    def patch(model, profile, config):
        torch._dynamo.reset()
        return torch.compile(model, backend="autosparse", options={
            "profile": profile, "inner": "eager",
            "guard": {"rows": config.rows, "tol": config.tol, "every": config.every}})

    torch._dynamo.reset()
    try:
        _e2e(patch)
    finally:
        torch._dynamo.reset()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--interpret-worker":
    _interpret_worker(sys.argv[2])
