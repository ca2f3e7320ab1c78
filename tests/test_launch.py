"""The prepared launch (``KernelCall``) and the direct relaunch of a compiled kernel (``Relauncher``):
the same answer as ``block_sparse_attention``, and on the GPU the very kernel Triton would pick."""

import math

import pytest
import torch

from autosparse.kernels import KernelCall, block_sparse_attention, dense_attention
from autosparse.kernels.launch import Relauncher

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (compiled Triton kernel)")


def _layout(heads: int, nq: int, nk: int, keep: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.stack([torch.randperm(nk, generator=g)[:keep].sort().values for _ in range(nq)])
                       for _ in range(heads)])[None].to(torch.int32)
    counts = torch.randint(1, keep + 1, (1, heads, nq), generator=g, dtype=torch.int32)
    return idx.contiguous().to(device), counts.to(device)


def _block_mask(idx: torch.Tensor, counts: torch.Tensor, nk: int) -> torch.Tensor:
    """Bool ``[H, NQ, NK]`` of the listed blocks (an oracle independent of the kernel's reading)."""
    _, h, nq, keep = idx.shape
    listed = torch.arange(keep, device=idx.device) < counts[0, ..., None]
    mask = torch.zeros(h, nq, nk, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, idx[0].long(), listed)
    return mask


def _oracle(q, k, v, idx, counts, q_block, kv_block, kv_valid=None, causal=False):
    nk = math.ceil(k.shape[2] / kv_block)
    blocks = _block_mask(idx, counts, nk)
    tokens = blocks.repeat_interleave(q_block, 1)[:, :q.shape[2]].repeat_interleave(kv_block, 2)[..., :k.shape[2]]
    if causal:
        tokens = tokens & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    mask = tokens[None].expand(q.shape[0], -1, -1, -1)
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, None, :]
    return dense_attention(q.double(), k.double(), v.double(), mask)


def _inputs(b, hq, hkv, s, d, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, device=device, dtype=dtype) for h in (hq, hkv, hkv)]


def test_prepared_call_equals_the_checked_call_and_refuses_another_shape():
    q, k, v = _inputs(2, 4, 2, 96, 16, torch.float32, "cpu", seed=0)
    idx, counts = _layout(4, 3, 3, 2, seed=1, device="cpu")
    call = KernelCall.prepare(q, k, v, idx, counts, q_block=32, kv_block=32, causal=False)
    for seed in (2, 3):  # fresh inputs of the prepared shape
        q, k, v = _inputs(2, 4, 2, 96, 16, torch.float32, "cpu", seed=seed)
        expected = block_sparse_attention(q, k, v, idx, counts, q_block=32, kv_block=32, causal=False)
        torch.testing.assert_close(call.run(q, k, v), expected, rtol=0, atol=0)
        torch.testing.assert_close(call.run(q, k, v), _oracle(q, k, v, idx, counts, 32, 32).float(), rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="prepared for q"):
        call.run(*_inputs(1, 4, 2, 96, 16, torch.float32, "cpu", seed=4))
    with pytest.raises(ValueError, match="kv_valid must be bool"):
        call.run(q, k, v, kv_valid=torch.ones(2, 95, dtype=torch.bool))


@needs_gpu
def test_relaunch_runs_the_kernel_triton_picks_and_its_answer(monkeypatch):
    """Every direct relaunch uses the compiled kernel Triton's own dispatch selects for those
    arguments (``warmup``: bind, specialise, look up), over shapes, dtypes, strides, misaligned
    bases, GQA, key padding and causality; and every output equals the float64 oracle."""
    picks = []
    relaunch = Relauncher.__call__

    def checked(self, grid, args, meta, device, key=None):
        compiled = relaunch(self, grid, args, meta, device, key)
        picks.append(self.kernel.warmup(*args, grid=grid, **meta) is compiled)
        return compiled

    monkeypatch.setattr(Relauncher, "__call__", checked)
    device = torch.device("cuda")
    variants = [  # b, hq, hkv, s, d, dtype, causal, padded, layout of q (contiguous / bshd / offset)
        (1, 4, 4, 512, 64, torch.bfloat16, False, False, "contiguous"),
        (2, 8, 2, 384, 128, torch.float16, True, False, "bshd"),
        (1, 4, 2, 520, 64, torch.bfloat16, False, True, "offset"),
        (3, 2, 1, 256, 32, torch.float32, True, True, "contiguous"),
    ]
    for i, (b, hq, hkv, s, d, dtype, causal, padded, memory) in enumerate(variants):
        q_block, kv_block = 64, 64
        nq, nk = math.ceil(s / q_block), math.ceil(s / kv_block)
        idx, counts = _layout(hq, nq, nk, min(3, nk), seed=i, device=device)
        if causal:  # the kernel's causal rule drops blocks after the diagonal: keep the oracle's equal
            keep = torch.arange(nk, device=device) <= torch.arange(nq, device=device)[:, None]
            idx, counts = _causal_layout(_block_mask(idx, counts, nk) & keep)
        for repeat in range(3):  # the first call compiles, the later ones relaunch
            q, k, v = _inputs(b, hq, hkv, s, d, dtype, device, seed=10 * i + repeat)
            if memory == "bshd":
                q = q.transpose(1, 2).contiguous().transpose(1, 2)
            elif memory == "offset":  # a base 2 bytes off 16-byte alignment: another specialisation
                buf = torch.randn(b, hq, s, d + 1, device=device, dtype=dtype)
                buf[..., 1:] = q
                q = buf[..., 1:]
            kv_valid = (torch.rand(b, s, device=device) > 0.2) if padded else None
            out = torch.full_like(q, float("nan"))
            block_sparse_attention(q, k, v, idx, counts, q_block=q_block, kv_block=kv_block, causal=causal,
                                   kv_valid=kv_valid, out=out)
            expected = _oracle(q, k, v, idx, counts, q_block, kv_block, kv_valid, causal)
            torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
            if repeat == 0:  # one prepared call for this layout; its key is the caller's (KernelCall.launch_key)
                prepared = KernelCall.prepare(q, k, v, idx, counts, q_block=q_block, kv_block=kv_block, causal=causal)
            torch.testing.assert_close(prepared.run(q, k, v, kv_valid).double(), expected, rtol=2e-2, atol=2e-2)
    assert len(picks) == 2 * 3 * len(variants) and all(picks)
    from autosparse.kernels.block_sparse_op import _RELAUNCHERS

    assert _RELAUNCHERS["cuda"].relaunched >= 4 * len(variants)  # the later calls skipped Triton's binding


def _causal_layout(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :max(int(counts.max()), 1)]
    return order.to(torch.int32)[None].contiguous(), counts[None].contiguous()

