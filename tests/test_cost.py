"""Cost of a candidate: key blocks on a CPU, measured time on a GPU; the search keeps a head dense
where its cheapest admissible pattern is not faster than dense attention."""

import pytest
import torch

import autosparse.search.calibration as search
from autosparse import BlockGeometry, BlockLayout, Dense, SinkLocal, Window
from autosparse.search.cost import LayerShape, relative_costs
from autosparse.models import AttentionLayer

from test_search import positional_qkv


def test_cpu_cost_is_the_block_density():
    geometry = BlockGeometry(1024, 1024, 64, 32, causal=True)
    shape = LayerShape(geometry, 4, 2, 64, torch.float32)
    patterns = [Window(128), SinkLocal(4, 256), Dense()]
    costs = relative_costs(patterns, shape, torch.device("cpu"))
    expected = [BlockLayout.from_patterns([p], geometry).density() for p in patterns]
    assert costs == pytest.approx(expected, rel=1e-6) and costs[-1] == 1.0  # layouts keep float32 densities


def test_timed_cost_is_relative_to_dense_sdpa():
    geometry = BlockGeometry(256, 256, 64, 32, causal=True)
    shape = LayerShape(geometry, 2, 2, 32, torch.float32)
    times = iter([4.0, 1.0, 5.0])  # dense SDPA first, then each candidate once
    costs = relative_costs([Window(64), Window(128)], shape, torch.device("cpu"), time_fn=lambda fn: next(times))
    assert costs == [0.25, 1.25]


def test_a_pattern_slower_than_dense_is_not_chosen(monkeypatch):
    """Same calibration, two cost tables: with key blocks the smallest admissible window wins; if
    the GPU says that window is slower than dense, the head takes the next candidate that is
    faster, or dense."""
    q, k, v = positional_qkv(1024, seed=0)
    layer = AttentionLayer("attn", 0, 3, 3, 64, module=None)
    config = search.SearchConfig(budget=0.05, block_size=(64, 32), windows=(64, 128, 256, 512), query_rows=512)

    def chosen(costs):
        if costs is not None:
            monkeypatch.setattr(search, "relative_costs", lambda candidates, shape, device: costs(candidates))
        calibrator = search._Calibrator(config, [layer], progress=None)
        calibrator.observe("attn", q, k, v, causal=True, scale=1 / 8)
        return calibrator, calibrator.choose(layer).heads

    calibrator, by_blocks = chosen(None)
    local = by_blocks[0]
    assert not local.is_dense
    # The window chosen by blocks becomes slower than dense; everything else keeps its block cost.
    blocks = calibrator.scores["attn"].blocks[0] / calibrator.scores["attn"].blocks[0, -1]
    slow = calibrator.candidates.index(local)
    _, by_time = chosen(lambda candidates: [1.3 if c == slow else float(blocks[c]) for c in range(len(candidates))])
    assert by_time[0] != local
    _, all_slow = chosen(lambda candidates: [1.1] * (len(candidates) - 1) + [1.0])
    assert all(p == Dense() for p in all_slow)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (measured kernel time)")
def test_measured_costs_are_cached_per_device_and_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSPARSE_CACHE_DIR", str(tmp_path))
    geometry = BlockGeometry(8192, 8192, 64, 128, causal=True)
    shape = LayerShape(geometry, 8, 2, 128, torch.bfloat16)
    patterns = [SinkLocal(64, 1024), Dense()]
    costs = relative_costs(patterns, shape, torch.device("cuda"))
    assert 0.0 < costs[0] < 0.6 and costs[1] == 1.0, costs  # ~1/4 of the blocks: much faster than dense
    assert (tmp_path / "layout_costs.json").exists()
    calls = []
    again = relative_costs(patterns, shape, torch.device("cuda"), time_fn=lambda fn: calls.append(fn) or 1.0)
    assert again == costs and not calls  # read from the cache, nothing timed
