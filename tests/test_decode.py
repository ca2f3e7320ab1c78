"""Sparse decode (``autosparse.runtime.decode``): a decode step attends exactly the kept keys.

Oracles: float64 softmax attention on the kept-token mask built without the decode code (static:
``BlockLayout.from_patterns(...).to_dense()`` of the query's row; page top-k: page bounds computed
from the whole K at once, then the top pages), and FlexAttention with the same mask as a mask_mod.
Fresh random inputs per case; the op's output buffer is poisoned first. End to end: greedy
``generate`` on a tiny Llama with DynamicCache and StaticCache.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import flex_attention as flex
from transformers import StaticCache

import autosparse
from autosparse import BlockGeometry, BlockLayout, PageTopK, Profile, StaticDecode
from autosparse.patterns import BlockTopK, Dense, SinkLocal, Window
from autosparse.runtime import decode
from autosparse.runtime.classify import DECODE
from autosparse.runtime.heads import HeadSet
from conftest import tiny_llama


def _inputs(b: int, hq: int, hkv: int, sk: int, d: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, sk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v


def _oracle(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of each query head over the keys ``mask`` [B, Hq, Sk] keeps."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2))[:, :, 0] * scale
    return (torch.softmax(scores.masked_fill(~mask, -math.inf), -1)[:, :, None] @ v)


def _flex(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    block = flex.create_block_mask(lambda b, h, qi, ki: mask[b, h, ki], q.shape[0], q.shape[1], 1, k.shape[2],
                                   device="cpu")
    return flex.flex_attention(q, k, v, block_mask=block, scale=scale)


STATIC_CASES = [
    # (patterns per query head, KV heads, keys, key padding)
    ((SinkLocal(sinks=16, window=64),) * 4, 2, 333, False),  # one pattern per group: gathered per KV head
    ((SinkLocal(sinks=16, window=64), Window(window=32), Dense(), BlockTopK(k=2)), 2, 300, False),  # per head
    ((Window(window=100),) * 4, 4, 1000, True),
    ((SinkLocal(sinks=1, window=16),) * 2, 1, 17, False),  # a cache shorter than two blocks
]


@pytest.mark.parametrize("patterns,hkv,sk,padded", STATIC_CASES)
def test_static_decode_attends_exactly_the_patterns_keys(patterns, hkv, sk, padded):
    b, hq, blocks, scale = 2, len(patterns), (16, 16), 0.3
    q, k, v = _inputs(b, hq, hkv, sk, seed=sk)
    kv_valid = None
    if padded:
        kv_valid = torch.ones(b, sk, dtype=torch.bool)
        kv_valid[1, :37] = False  # left padding in row 1
    heads = HeadSet.of(patterns)
    got = decode.attend(StaticDecode(), {}, "layer", heads, blocks, q, k, v, kv_valid, scale)
    geometry = BlockGeometry(1, sk, *blocks, causal=True)
    rows = [geometry.reachable() if p.is_dense or p.is_dynamic else BlockLayout.from_patterns([p], geometry)
            for p in patterns]
    kept = torch.stack([r.to_dense()[0, 0] if isinstance(r, BlockLayout) else
                        r[0].repeat_interleave(blocks[1])[:sk] for r in rows])  # [Hq, Sk]
    mask = kept.expand(b, -1, -1) & (kv_valid[:, None, :] if padded else True)
    want = _oracle(q, k, v, mask, scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, _flex(q, k, v, mask, scale), rtol=1e-10, atol=1e-10)


def _page_oracle(policy: PageTopK, q, k) -> torch.Tensor:
    """The kept-token mask [B, Hq, Sk] of page top-k, from the whole K at once."""
    b, hq, _, d = q.shape
    hkv, sk, ps = k.shape[1], k.shape[2], policy.page_size
    total, full = -(-sk // ps), sk // ps
    group = hq // hkv
    bound = torch.full((b, hkv, total), math.inf, dtype=torch.float64)
    for page in range(full):
        keys = k[:, :, page * ps:(page + 1) * ps]  # [B, Hkv, ps, D]
        high, low = keys.amax(2), keys.amin(2)
        qg = q[:, :, 0].view(b, hkv, group, d)
        per_head = torch.maximum(qg * low[:, :, None], qg * high[:, :, None]).sum(-1)  # [B, Hkv, G]
        bound[:, :, page] = per_head.amax(-1)
    forced = torch.zeros(total, dtype=torch.bool)
    forced[:policy.sinks] = True
    forced[max(total - policy.local, 0):] = True
    bound[:, :, forced] = math.inf
    chosen = torch.topk(bound, min(total, policy.pages + int(forced.sum())), dim=-1).indices
    pages = torch.zeros(b, hkv, total, dtype=torch.bool).scatter_(2, chosen, True)
    return pages.repeat_interleave(ps, dim=2)[:, :, :sk].repeat_interleave(group, 1)


@pytest.mark.parametrize("hq,hkv,sk,policy", [
    (4, 2, 1000, PageTopK(pages=4, sinks=1, local=1, page_size=32)),
    (2, 2, 257, PageTopK(pages=2, sinks=0, local=2, page_size=16)),
    (8, 1, 640, PageTopK(pages=100, sinks=1, local=1, page_size=64)),  # more pages than exist: all
])
def test_page_top_k_keeps_the_highest_bound_pages(hq, hkv, sk, policy):
    q, k, v = _inputs(2, hq, hkv, sk, seed=hq + sk)
    got = decode.attend(policy, {}, "layer", HeadSet.of((SinkLocal(sinks=16, window=64),) * hq), (16, 16), q, k, v,
                        None, 0.25)
    mask = _page_oracle(policy, q, k)
    torch.testing.assert_close(got, _oracle(q, k, v, mask, 0.25), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, _flex(q, k, v, mask, 0.25), rtol=1e-10, atol=1e-10)


def test_page_statistics_grow_with_the_cache_and_restart_with_a_new_sequence():
    policy = PageTopK(pages=3, sinks=1, local=1, page_size=16)
    heads = HeadSet.of((Window(window=64),) * 2)
    pages: dict = {}
    q, k, v = _inputs(1, 2, 1, 200, seed=3)
    for sk in range(100, 140):  # one token appended per step, pages completing on the way
        qs = torch.randn_like(q)
        got = decode.attend(policy, pages, "layer", heads, (16, 16), qs, k[:, :, :sk], v[:, :, :sk], None, 0.5)
        mask = _page_oracle(policy, qs, k[:, :, :sk])
        torch.testing.assert_close(got, _oracle(qs, k[:, :, :sk], v[:, :, :sk], mask, 0.5), rtol=1e-10, atol=1e-10)
        assert pages["layer"].centre.shape[2] == sk // 16 and pages["layer"].length == sk
    other = torch.randn_like(k)  # a new sequence, shorter than the last: statistics rebuilt
    got = decode.attend(policy, pages, "layer", heads, (16, 16), q, other[:, :, :90], v[:, :, :90], None, 0.5)
    mask = _page_oracle(policy, q, other[:, :, :90])
    torch.testing.assert_close(got, _oracle(q, other[:, :, :90], v[:, :, :90], mask, 0.5), rtol=1e-10, atol=1e-10)


def test_policies_are_checked():
    with pytest.raises(ValueError, match="PageTopK.pages must be an int >= 1"):
        PageTopK(pages=0)
    with pytest.raises(ValueError, match="page_size must be a multiple of 16"):
        PageTopK(page_size=24)
    model = tiny_llama()
    with pytest.raises(ValueError, match="decode must be None, 'static', 'page_topk'"):
        autosparse.patch_model(model, Profile.uniform(model, {"kind": "window", "window": 32}), decode="quest")


def _generate(model, ids, cache: str | None, new: int = 12) -> torch.Tensor:
    kwargs = {}
    if cache == "static":
        kwargs["past_key_values"] = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new + 3)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("policy", ["static", PageTopK(pages=64, page_size=16)])
def test_generate_with_everything_kept_equals_dense(cache, policy):
    """Patterns (or pages) that keep every key: the same tokens as the dense model, every decode step
    served by the decode path."""
    model = tiny_llama()
    ids = torch.randint(0, 512, (1, 150), generator=torch.Generator().manual_seed(0))
    want = _generate(model, ids, cache)
    profile = Profile.uniform(model, {"kind": "sink_local", "sinks": 16, "window": 1024}, block_size=(16, 16))
    autosparse.patch_model(model, profile, decode=policy)
    got = _generate(model, ids, cache)
    stats = autosparse.stats(model)
    autosparse.unpatch_model(model)
    assert torch.equal(got, want)
    assert stats.sparse >= 2 * 12 and not stats.fallback and DECODE not in stats.dense, stats


def test_generate_with_a_window_keeps_only_the_window():
    """A short window: decode steps are served sparse and the logits differ from dense (the window
    drops keys); with decode dense (the default), the steps stay dense and counted."""
    model = tiny_llama()
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(1))
    profile = Profile.uniform(model, {"kind": "sink_local", "sinks": 16, "window": 32}, block_size=(16, 16))
    autosparse.patch_model(model, profile)
    with torch.no_grad():
        _generate(model, ids, None, new=4)
    assert autosparse.stats(model).dense[DECODE] == 2 * 3
    autosparse.unpatch_model(model)
    autosparse.patch_model(model, profile, decode="static")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        step = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values).logits
    stats = autosparse.stats(model)
    autosparse.unpatch_model(model)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        dense_step = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values).logits
    assert stats.sparse == 2 * 2 and not stats.fallback
    assert not torch.allclose(step, dense_step, atol=1e-4)


def test_the_decode_benchmark_runs_on_the_cpu(tmp_path):
    """``benchmarks/decode.py --quick``: dense, static and page top-k decode steps all run and are counted."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "decode.py"), "--quick", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "decode_speed.md").read_text()
    assert "| 600 | 1 |" in table and "| 600 | 2 |" in table
    assert '"static_calls": "AttentionStats(sparse=10)"' in proc.stdout  # 2 layers x (2 warm-up + 3 timed)


@pytest.mark.parametrize("pattern,served", [({"kind": "sink_local", "sinks": 16, "window": 32}, True),
                                            ({"kind": "blocks", "kv_blocks": [0, 1]}, False)])
def test_static_decode_stays_within_the_profiles_validated_length(pattern, served):
    """Beyond the length a profile was validated at, static decode runs dense (counted, with the
    reason) unless the layer's patterns scale with length (sinks + window do)."""
    model = tiny_llama()
    profile = Profile.uniform(model, pattern, block_size=(16, 16))
    profile = Profile(model=profile.model, layers=profile.layers, block_size=(16, 16),
                      lengths={"validated": [64, 120]})
    ids = torch.randint(0, 512, (1, 100), generator=torch.Generator().manual_seed(2))
    autosparse.patch_model(model, profile, decode="static")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(30):  # keys 101 .. 130: the last ten beyond the validated 120
            token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    stats = autosparse.stats(model)
    autosparse.unpatch_model(model)
    beyond = stats.dense.get("beyond the profile's validated length 120", 0)
    assert (beyond, stats.sparse) == ((0, 2 + 2 * 30) if served else (2 * 10, 2 + 2 * 20)), stats
