"""The search: on synthetic heads with known structure it picks the right patterns, and the errors it
reports are the errors the chosen layouts really have."""

import math

import pytest
import torch

from autosparse import BlockGeometry, BlockLayout, Dense, Profile, Window, SinkLocal
from autosparse.kernels.reference import dense_attention
from autosparse.models import AttentionLayer, attention_layers
from autosparse.search import SearchConfig, _Calibrator, search_profile


def positional_qkv(length: int, seed: int):
    """Head 0: q·k peaks at equal positions (local attention). Head 1: tiny random q/k (near
    uniform attention, nothing to drop). Head 2: local plus a strong sink on key 0."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freqs = 2 * math.pi / torch.logspace(math.log10(40), math.log10(1500), 31, dtype=torch.float64)
    feats = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs), torch.zeros(length, 2)], dim=-1)
    local = 1.2 * feats  # most of the mass within a few tokens, a long thin tail
    uniform = torch.randn(length, 64, generator=gen, dtype=torch.float64) * 0.05
    sink_q, sink_k = 1.5 * feats, 1.5 * feats
    sink_q[:, 62], sink_k[0, 62] = 4.0, 18.0  # every query scores key 0 like its own position
    q = torch.stack([local, uniform, sink_q])[None].float()
    k = torch.stack([local, uniform, sink_k])[None].float()
    v = torch.randn(1, 3, length, 64, generator=gen)
    return q, k, v


def exact_error(pattern, q, k, v, geometry) -> float:
    """Relative output error of one head's pattern over ALL rows, from the dense reference."""
    dense = dense_attention(q.double(), k.double(), v.double(), mask=BlockLayout.from_patterns([Dense()], geometry).to_dense()[None])
    mask = BlockLayout.from_patterns([pattern], geometry).to_dense()[None]
    approx = dense_attention(q.double(), k.double(), v.double(), mask=mask)
    return float((approx - dense).norm() / dense.norm())


def test_picks_cheapest_pattern_within_budget():
    length, budget = 1024, 0.05
    q, k, v = positional_qkv(length, seed=0)
    config = SearchConfig(budget=budget, block_size=(64, 32), windows=(64, 128, 256, 512), query_rows=512)
    layer = AttentionLayer("attn", 0, 3, 3, 64, module=None)
    calibrator = _Calibrator(config, [layer], progress=None)
    calibrator.observe("attn", q, k, v, causal=True, scale=1 / 8)
    chosen = calibrator.choose(layer)
    local, uniform, sink = chosen.heads
    assert isinstance(local, (Window, SinkLocal)) and local.window > 64, local
    assert uniform == Dense()
    assert isinstance(sink, SinkLocal), sink
    geometry = BlockGeometry(length, length, 64, 32, causal=True)
    for h, pattern in enumerate(chosen.heads):
        measured = chosen.measured[h]
        if pattern.is_dense:
            assert measured == {"error": 0.0, "density": 1.0}
            continue
        true_error = exact_error(pattern, q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], geometry)
        assert true_error <= 1.5 * budget
        assert measured["error"] == pytest.approx(true_error, rel=0.5, abs=5e-3)
        assert measured["density"] == pytest.approx(BlockLayout.from_patterns([pattern], geometry).density(), rel=1e-6)
    # A cheaper candidate than the one chosen must have been over budget.
    errors = calibrator.scores["attn"].relative_error()
    blocks = calibrator.scores["attn"].blocks
    picked = calibrator.candidates.index(local)
    cheaper = [c for c in range(len(blocks)) if blocks[c] < blocks[picked]]
    assert cheaper and all(errors[0, c] > budget for c in cheaper)


def test_search_profile_on_a_model(llama, tmp_path):
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(0))
    config = SearchConfig(budget=0.3, block_size=(32, 16), windows=(32, 64, 128), query_rows=64)
    profile = search_profile(llama, [ids, ids[:, :200]], config, progress=False)
    assert [layer.name for layer in attention_layers(llama)] == list(profile.layers)
    assert llama.config._attn_implementation == "sdpa"
    for layer in profile.layers.values():
        for pattern, measured in zip(layer.heads, layer.measured):
            assert measured["error"] <= 0.3
            assert (measured["density"] == 1.0) == pattern.is_dense
    assert profile.search["calibration"]["tokens"] == 500
    path = tmp_path / "p.json"
    profile.save(path)
    assert Profile.load(path).to_dict() == profile.to_dict()
    # Reproducible: same inputs and seed give the same profile.
    again = search_profile(llama, [ids, ids[:, :200]], config, progress=False)
    assert {n: l.heads for n, l in again.layers.items()} == {n: l.heads for n, l in profile.layers.items()}


def test_budget_is_validated():
    with pytest.raises(ValueError, match="budget must be in"):
        SearchConfig(budget=0.0)
