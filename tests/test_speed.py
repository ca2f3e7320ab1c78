"""Never slower (``autosparse.runtime.speed``): a sparse call plan runs only where it measured faster
than dense SDPA, per length bucket, measured once and kept on disk. The GPU timer is replaced by a
scripted one (the CPU has none), so which side wins is the test's choice and the counts are exact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autosparse
from autosparse import Profile
from autosparse.kernels import tuning
from autosparse.runtime import plan as plans
from autosparse.runtime import speed
from conftest import tiny_llama


class _Timer:
    """A stand-in for ``gpu_ms``: runs the function once (it must work) and returns the scripted
    time of the side it is: sparse is measured first, then dense."""

    def __init__(self, sparse_ms: float, dense_ms: float) -> None:
        self.sparse_ms, self.dense_ms, self.calls = sparse_ms, dense_ms, 0

    def __call__(self, fn) -> float:
        fn()
        self.calls += 1
        return self.sparse_ms if self.calls % 2 else self.dense_ms


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """Measurement on, as on a GPU, with a fresh disk cache; yields a function installing a timer."""
    monkeypatch.setenv("AUTOSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(speed, "measuring", lambda device: True)
    speed.forget_verdicts()
    plans.clear_call_plans()

    def install(sparse_ms: float, dense_ms: float) -> _Timer:
        timer = _Timer(sparse_ms, dense_ms)
        monkeypatch.setattr(tuning, "gpu_ms", timer)
        return timer

    yield install
    speed.forget_verdicts()
    plans.clear_call_plans()


def _patched(length: int = 96):
    model = tiny_llama()
    autosparse.patch_model(model, Profile.uniform(model, {"kind": "window", "window": 32}, block_size=(16, 16)))
    return model


def _forward(model, length: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_slower_sparse_runs_dense_counted_and_equal_to_the_dense_model(measured):
    timer = measured(sparse_ms=2.0, dense_ms=1.0)
    model = _patched()
    got = _forward(model, 96)
    stats = autosparse.stats(model, reset=True)
    assert stats.sparse == 0 and stats.dense == {speed.DENSE_REASON: 2} and not stats.fallback
    autosparse.unpatch_model(model)
    torch.testing.assert_close(got, _forward(model, 96), rtol=0, atol=0)  # exactly the dense model
    assert timer.calls == 2, "both layers share one verdict: one sparse and one dense timing"


def test_a_dense_verdict_runs_sdpa_causal_not_the_mask(measured, monkeypatch):
    """Dense by verdict, a square causal call without padding runs SDPA's is_causal (its fused
    kernels), not the boolean mask transformers built for autosparse's attention function."""
    from autosparse.runtime import dense as dense_module

    seen = []
    real = dense_module.ORIGINAL_SDPA

    def recording(*args, attn_mask=None, is_causal=False, **kwargs):
        seen.append((attn_mask is None, is_causal))
        return real(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    from autosparse import runtime
    from autosparse.capture import LAYER_ATTR
    from autosparse.models import attention_layers

    measured(sparse_ms=2.0, dense_ms=1.0)
    model = _patched()
    plan = runtime.plan_of(getattr(attention_layers(model)[0].module, LAYER_ATTR))
    q, k, v = (torch.randn(1, 4, 96, 64), torch.randn(1, 2, 96, 64), torch.randn(1, 2, 96, 64))
    causal = torch.ones(96, 96, dtype=torch.bool).tril()[None, None]  # what a caller may pass instead of is_causal
    want = real(q, k, v, attn_mask=causal, enable_gqa=True)
    runtime.serve(plan, q, k, v, causal, False, None)  # the plan is built and judged here
    monkeypatch.setattr(dense_module, "ORIGINAL_SDPA", recording)
    got = runtime.serve(plan, q, k, v, causal, False, None)
    assert seen == [(True, True)] and autosparse.stats(model).dense[speed.DENSE_REASON] == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_faster_sparse_is_served_and_the_verdict_is_kept_per_length_bucket(measured):
    timer = measured(sparse_ms=1.0, dense_ms=2.0)
    model = _patched()
    _forward(model, 96)
    assert autosparse.stats(model, reset=True).sparse == 2 and timer.calls == 2
    _forward(model, 95)  # same bucket (90-127) and block layout: a new plan, no new measurement
    assert autosparse.stats(model, reset=True).sparse == 2 and timer.calls == 2
    _forward(model, 160)  # the next bucket: measured again
    assert autosparse.stats(model, reset=True).sparse == 2 and timer.calls == 4
    speed.forget_verdicts()  # a new process: the disk cache answers
    plans.clear_call_plans()
    _forward(model, 96)
    assert autosparse.stats(model).sparse == 2 and timer.calls == 4
    entries = speed.cache.entries(speed.CACHE)
    assert len(entries) == 2 and all(e == {"sparse": True, "sparse_ms": 1.0, "dense_ms": 2.0} for e in entries.values())


def test_nothing_is_measured_off_the_gpu_or_when_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSPARSE_CACHE_DIR", str(tmp_path))
    assert not speed.measuring(torch.device("cpu"))
    monkeypatch.setenv("AUTOSPARSE_NEVER_SLOWER", "0")
    assert not speed.measuring(torch.device("cuda"))
    plans.clear_call_plans()
    model = _patched()
    _forward(model, 96)
    assert autosparse.stats(model).sparse == 2  # the CPU path serves what the profile says
    assert not (tmp_path / speed.CACHE).exists()


def test_length_buckets_and_keys():
    assert [speed.length_bucket(n) for n in (1, 1000, 1024, 1448, 1449, 2047, 2048, 131072)] == [
        1, 724, 1024, 1024, 1448, 1448, 2048, 131072]
    def qk(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty(1, 8, length, 64), torch.empty(1, 2, length, 64)

    q, k = qk(4096)
    base = speed.verdict_key(q, k, True, False, (64, 128), "density 0.30", False)
    assert base == speed.verdict_key(*qk(5000), True, False, (64, 128), "density 0.30", False)
    others = {speed.verdict_key(q, k, c, p, b, d, g) for c, p, b, d, g in (
        (False, False, (64, 128), "density 0.30", False), (True, True, (64, 128), "density 0.30", False),
        (True, False, (128, 128), "density 0.30", False), (True, False, (64, 128), "density 0.35", False),
        (True, False, (64, 128), "density 0.30", True))}
    assert base not in others and len(others) == 5
    assert base != speed.verdict_key(*qk(6000), True, False, (64, 128), "density 0.30", False)


def test_the_length_sweep_benchmark_runs_on_the_cpu(tmp_path):
    """``benchmarks/length_sweep.py --quick``: every variant runs and the table says how each was served."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, AUTOSPARSE_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "length_sweep.py"), "--quick", "--lengths", "128",
                           "512", "--reps", "1", "--out", str(tmp_path)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "length_sweep.md").read_text()
    assert "| 128 |" in table and "| 512 |" in table and "Break-even" in table
    assert (tmp_path / "cache" / speed.CACHE).exists(), "the rule measured (with the CPU stand-in timer)"
