"""Tile tuning: the fastest candidate is stored per (GPU, triton, head_dim, dtype, blocks, load path),
found again by ``default_config``, and a broken cache never breaks a launch."""

import logging

import pytest
import torch

pytest.importorskip("triton")

from autosparse.kernels import block_sparse_op as bso  # noqa: E402
from autosparse.kernels import tuning  # noqa: E402


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bso.default_config.cache_clear()
    yield tmp_path
    bso.default_config.cache_clear()


def test_tune_stores_the_fastest_and_default_config_uses_it(cache_dir):
    cpu = torch.device("cpu")
    rule = bso.default_config(64, 128, 32, torch.float32, cpu)
    fake_ms = {(64, 4, 1): 3.0, (64, 4, 2): 1.5, (128, 8, 3): 2.0}
    order = iter(fake_ms)
    result = tuning.tune(32, torch.float32, q_block=128, kv_block=64, device=cpu, seq_len=512, heads=2,
                         candidates=list(fake_ms), time_fn=lambda fn: fake_ms[next(order)])
    assert result["best"] == bso.TileConfig(num_warps=4, num_stages=2, block_m=64, use_tma=False)
    assert result["times_ms"] == {"m64 w4 s1": 3.0, "m64 w4 s2": 1.5, "m128 w8 s3": 2.0}
    assert (cache_dir / "tile_configs.json").exists()
    assert bso.default_config(128, 64, 32, torch.float32, cpu) == result["best"]
    # other shape classes keep the rule
    assert bso.default_config(64, 128, 32, torch.float32, cpu) == rule
    assert tuning.lookup(cpu, 128, 64, 64, torch.float32, False) is None
    assert tuning.lookup(cpu, 128, 64, 32, torch.float16, False) is None
    assert tuning.lookup(cpu, 128, 64, 32, torch.float32, True) is None


def test_candidates_wider_than_the_layout_block_are_skipped():
    seen = []
    result = tuning.tune(32, torch.float32, q_block=64, kv_block=64, device="cpu", seq_len=256, heads=1,
                         candidates=[(128, 8, 3), (64, 4, 1)], time_fn=lambda fn: seen.append(fn) or 1.0, save=False)
    assert len(seen) == 1 and list(result["times_ms"]) == ["m64 w4 s1"]
    assert not tuning.cache_path().exists()


def test_a_broken_cache_is_ignored_with_a_warning(cache_dir, caplog):
    (cache_dir / "tile_configs.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert tuning.lookup(torch.device("cpu"), 128, 64, 32, torch.float32, False) is None
    assert "ignoring the cache" in caplog.text and "tile_configs.json" in caplog.text
    # tuning again replaces the broken file
    tuning.tune(32, torch.float32, q_block=64, kv_block=64, device="cpu", seq_len=256, heads=1,
                candidates=[(64, 4, 1)], time_fn=lambda fn: 1.0)
    assert tuning.lookup(torch.device("cpu"), 64, 64, 32, torch.float32, False).num_stages == 1


def test_row_schedule_is_heaviest_first_and_keeps_gqa_groups_together():
    counts = torch.tensor([[[1, 5, 5], [1, 5, 5], [9, 2, 2], [9, 2, 2]]], dtype=torch.int32)  # [1, Hq=4, NQ=3]
    order = bso.row_schedule(counts, group=2).tolist()
    assert sorted(order) == list(range(12))
    # Block 0 of KV head 1 (9 > 2x the mean row) leads; then KV head 1 (26 blocks) before KV head 0
    # (22); inside one, heavier levels first, then query blocks in order, the group's heads adjacent.
    assert order == [6, 9, 7, 10, 8, 11, 1, 4, 2, 5, 0, 3]


def test_row_schedule_runs_outlier_rows_first_over_all_heads():
    """Rows over twice the mean work (text rows, a much wider head) lead the launch, heaviest first;
    the rest go head by head in query-block order (neighbours share K/V through L2)."""
    counts = torch.tensor([[[2, 2, 2, 2], [2, 2, 2, 20], [3, 3, 3, 3]]], dtype=torch.int32)  # [1, Hq=3, NQ=4]
    order = bso.row_schedule(counts, group=1).tolist()
    assert order[0] == 7  # the outlier row (head 1, block 3)
    assert order[1:] == [4, 5, 6, 8, 9, 10, 11, 0, 1, 2, 3]  # head 1 (26 blocks), head 2 (12), head 0 (8)