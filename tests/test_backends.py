"""The kernel-backend seam on the CPU: FA4's layout format means the same token mask as ours, the
choice is measured once, never picks a wrong or failing backend, and is kept on disk; the runtime
serves through it. The backends' numerics on the GPU: benchmarks/backends.py (bf16 vs float32)."""

import math

import pytest
import torch

import autosparse
from autosparse import Profile
from autosparse.kernels import KernelCall, backends, layout_mask
from autosparse.layout import BlockLayout
from autosparse.patterns import BlockGeometry
from autosparse.runtime import plan as plans
from conftest import tiny_llama


def _call(heads: int, q_len: int, kv_len: int, q_block: int, kv_block: int, causal: bool, density: float,
          seed: int, pairs: bool = False, q_rows: bool = False) -> tuple[KernelCall, BlockLayout]:
    gen = torch.Generator().manual_seed(seed)
    geometry = BlockGeometry(q_len, kv_len, q_block, kv_block, causal)
    nq, nk = geometry.num_q_blocks, geometry.num_kv_blocks
    mask = torch.rand(heads, nq, nk, generator=gen) < density
    if pairs:  # query blocks agree in pairs: FA4 can take them as 128-row blocks
        mask = mask[:, ::2].repeat_interleave(2, dim=1)[:, :nq]
    mask[:, :, 0] = True
    layout = BlockLayout.from_block_mask(mask, geometry)
    q = torch.randn(1, heads, q_len, 16, generator=gen)
    k, v = (torch.randn(1, heads, kv_len, 16, generator=gen) for _ in range(2))
    rows = torch.randperm(q_len, generator=gen).to(torch.int32) if q_rows else None
    call = KernelCall.prepare(q, k, v, layout.kv_indices, layout.kv_counts, q_block=q_block, kv_block=kv_block,
                              causal=causal, q_rows=rows)
    return call, layout


def _fa4_token_mask(counts: torch.Tensor, indices: torch.Tensor, block_size: tuple[int, int], q_len: int,
                    kv_len: int, causal: bool) -> torch.Tensor:
    """The token pairs FA4 computes for its block-sparse tensors, as its sm_90 forward reads them:
    per query tile the first ``count`` key blocks of the row, the causal rule bottom-right, keys
    past ``kv_len`` masked."""
    q_rows, kv_block = block_size
    heads = counts.shape[1]
    mask = torch.zeros(heads, q_len, kv_len, dtype=torch.bool)
    for h in range(heads):
        for m in range(counts.shape[2]):
            for n in indices[0, h, m, :counts[0, h, m]].tolist():
                mask[h, m * q_rows:(m + 1) * q_rows, n * kv_block:(n + 1) * kv_block] = True
    if causal:
        allowed = torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + (kv_len - q_len)
        mask &= allowed
    return mask


@pytest.mark.parametrize("q_len,kv_len,q_block,kv_block,causal,pairs,merged", [
    (1000, 1000, 64, 128, True, True, True),  # ragged end, re-blocked to 128 rows
    (1000, 1000, 64, 128, True, False, False),  # pairs differ: stays at 64 rows
    (777, 1300, 64, 64, False, True, True),
    (640, 640, 128, 128, False, False, False),
    (512, 900, 128, 64, True, False, False),  # bottom-right causal with more keys than queries
])
def test_fa4_format_means_the_same_token_mask(q_len, kv_len, q_block, kv_block, causal, pairs, merged):
    call, layout = _call(3, q_len, kv_len, q_block, kv_block, causal, 0.3, seed=q_len + kv_len, pairs=pairs)
    counts, indices, block_size = backends.fa4_block_sparse(call)
    assert block_size == ((128 if merged else q_block), kv_block)
    nk = math.ceil(kv_len / kv_block)
    assert indices.shape == (1, 3, math.ceil(q_len / block_size[0]), nk) and indices.dtype == torch.int32
    assert counts.dtype == torch.int32 and counts.shape == indices.shape[:3]
    live = torch.arange(nk) < counts[..., None]
    listed = torch.where(live, indices, -1)
    assert bool((listed[..., 1:] > listed[..., :-1])[live[..., 1:]].all()), "indices ascending per row"
    want = layout_mask(layout.kv_indices, layout.kv_counts, q_block=q_block, kv_block=kv_block, seq_q=q_len,
                       seq_k=kv_len, causal=causal)[0]
    assert torch.equal(_fa4_token_mask(counts, indices, block_size, q_len, kv_len, causal), want)


class _Fake:
    """A backend that returns a given answer after a given time."""

    def __init__(self, name: str, ms: float, answer=None, reason: str | None = None, error: bool = False):
        self.name, self.ms, self.answer, self.reason, self.error, self.runs = name, ms, answer, reason, error, 0

    def can_run(self, call, key_padding=False):
        return self.reason

    def run(self, q, k, v, call, kv_valid=None):
        self.runs += 1
        if self.error:
            raise RuntimeError("compile failed")
        return backends.TORCH.run(q, k, v, call) if self.answer is None else self.answer(q)


def _time(fn):
    return fn.func.__self__.ms  # the fake's own time: functools.partial(backend.run, ...)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AUTOSPARSE_BACKEND", raising=False)
    backends.forget_choices()
    yield tmp_path
    backends.forget_choices()


def test_choice_is_the_fastest_exact_backend_measured_once_and_kept_on_disk(cache_dir):
    call, _ = _call(2, 256, 256, 64, 64, True, 0.5, seed=1)
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    slow, fast = _Fake("slow", 2.0), _Fake("fast", 1.0)
    refused = _Fake("refused", 0.01, reason="not here")
    candidates = (slow, refused, fast)
    chosen = backends.choose_backend(call, q, k, v, backends=candidates, time_fn=_time, measure=True)
    assert chosen is fast and refused.runs == 0
    entry = next(iter(backends.cache.entries(backends.CACHE).values()))
    assert entry == {"backend": "fast", "ms": {"slow": 2.0, "fast": 1.0}}
    runs = fast.runs
    assert backends.choose_backend(call, q, k, v, backends=candidates, time_fn=_time, measure=True) is fast
    backends.forget_choices()  # a new process: the disk says
    assert backends.choose_backend(call, q, k, v, backends=candidates, time_fn=_time, measure=True) is fast
    assert fast.runs == runs, "measured once"


def test_a_wrong_or_failing_backend_never_wins_and_the_choice_stays_off_disk(cache_dir):
    call, _ = _call(2, 256, 256, 64, 64, True, 0.5, seed=1)
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    slow = _Fake("slow", 2.0)
    wrong = _Fake("wrong", 0.1, answer=lambda q: torch.zeros_like(q))
    broken = _Fake("broken", 0.1, error=True)
    candidates = (slow, wrong, broken)
    assert backends.choose_backend(call, q, k, v, backends=candidates, time_fn=_time, measure=True) is slow
    assert not backends.cache.entries(backends.CACHE), "a failure (maybe an install fixed later) is not kept on disk"
    runs = slow.runs
    assert backends.choose_backend(call, q, k, v, backends=candidates, time_fn=_time, measure=True) is slow
    assert slow.runs == runs, "kept in memory for this process"
    backends.forget_choices()  # a new process measures again
    assert backends.choose_backend(call, q, k, v, backends=candidates, time_fn=_time, measure=True) is slow
    assert slow.runs > runs


def test_choice_keys_separate_what_changes_the_answer(cache_dir):
    causal, _ = _call(2, 256, 256, 64, 64, True, 0.5, seed=1)
    full, _ = _call(2, 256, 256, 64, 64, False, 0.5, seed=1)
    sparse, _ = _call(2, 256, 256, 64, 64, False, 0.1, seed=1)
    rows, _ = _call(2, 256, 256, 64, 64, False, 0.5, seed=1, q_rows=True)
    paired, _ = _call(2, 256, 256, 64, 64, False, 0.5, seed=1, pairs=True)  # FA4 re-blocks it: another speed
    assert backends.reblocks_to_128(paired) and not backends.reblocks_to_128(full)
    keys = {backends.choice_key(c, pad, (backends.TORCH,)) for c, pad in
            ((causal, False), (full, False), (sparse, False), (rows, False), (full, True), (paired, False))}
    assert len(keys) == 6


def test_no_measurement_off_the_gpu_and_a_forced_backend(cache_dir, monkeypatch):
    call, _ = _call(2, 256, 256, 64, 64, True, 0.5, seed=2)
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    first, second = _Fake("first", 5.0), _Fake("second", 1.0)
    assert backends.choose_backend(call, q, k, v, backends=(first, second)) is first  # CPU: preference order
    assert first.runs == second.runs == 0 and not backends.cache.entries(backends.CACHE)
    monkeypatch.setenv("AUTOSPARSE_BACKEND", "second")
    assert backends.choose_backend(call, q, k, v, backends=(first, second)) is second
    with pytest.raises(ValueError, match="no kernel backend can run this call: first: a; second: b"):
        backends.choose_backend(call, q, k, v, backends=(_Fake("first", 1, reason="a"), _Fake("second", 1, reason="b")))


def test_backend_reasons_on_this_machine():
    call, _ = _call(2, 256, 256, 64, 128, True, 0.5, seed=3)
    assert backends.TORCH.can_run(call) is None
    assert backends.FA4.can_run(call) == "needs CUDA, not cpu"
    assert backends.TRITON.can_run(call).startswith("runs on CUDA")
    assert [b.name for b in backends.BACKENDS] == ["triton", "fa4", "torch"]
    with pytest.raises(ValueError, match="unknown kernel backend 'cudnn'"):
        backends.backend("cudnn")


def test_torch_backend_equals_the_dense_oracle():
    call, layout = _call(2, 300, 300, 64, 64, False, 0.4, seed=4, q_rows=True)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    call = KernelCall.prepare(q, k, v, call.kv_indices, call.kv_counts, q_block=64, kv_block=64, causal=False,
                              q_rows=call.q_rows)
    got = backends.TORCH.run(q, k, v, call)
    mask = layout.to_dense()  # kernel order; q and out are in the caller's order through q_rows
    rows = call.q_rows.long()
    scores = (q[:, :, rows] @ k.transpose(-1, -2)) / math.sqrt(16)
    want = torch.softmax(scores.masked_fill(~mask, -math.inf), -1) @ v
    torch.testing.assert_close(got[:, :, rows], want)


def test_the_runtime_serves_through_the_chosen_backend():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    autosparse.patch_model(model, Profile.uniform(model, {"kind": "window", "window": 32}, block_size=(16, 16)))
    plans.clear_call_plans()
    with torch.no_grad():
        model(input_ids=ids)
    served = [p for p in plans._CALL_PLANS.values() if p.kernel is not None]
    assert served and all(p.backend is backends.TORCH for p in served)
    assert autosparse.stats(model).sparse == 2
