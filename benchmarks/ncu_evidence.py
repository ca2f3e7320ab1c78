"""Kernels to read with Nsight Compute (GPU machine): where the time goes at d = 1, and why random
layouts at 128K run slower than windows of the same density.

    ncu --clock-control none -k regex:_attn_fwd --metrics <list> python3 benchmarks/ncu_evidence.py

Launches, in order: (1) H12 d128 S32K d=1, (2) H12 d128 S128K random d=0.25, (3) H12 d128 S128K window
of the same density. Each once, after a warm-up launch on a small problem (compilation).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

from autosparse.kernels import block_sparse_attention

_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernel_speed.py"))
bench = sys.modules["bench_kernels"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # the layout helpers of benchmarks/kernel_speed.py


def run(S, layout_kind, density, H=12, D=128, qb=64, kb=128):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(S)
    q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    nq, nk = math.ceil(S / qb), math.ceil(S / kb)
    allowed, partial = bench.allowed_blocks(nq, nk, qb, kb, S, S, False, dev)
    if layout_kind == "random":
        blocks = bench.random_layout(H, nq, nk, density, allowed, partial, gen)
    else:
        blocks = bench.structured_layout(H, nq, nk, qb, kb, False, allowed, 0, int(density * S))
    idx, cnt = bench.mask_to_layout(blocks[None])
    block_sparse_attention(q, k, v, idx, cnt, q_block=qb, kv_block=kb, causal=False)
    torch.cuda.synchronize()
    print(f"S={S} {layout_kind} density {float(cnt.sum()) / (H * nq * nk):.3f}", flush=True)


if __name__ == "__main__":
    run(1024, "random", 1.0)  # warm-up: compiles the kernel
    run(32768, "random", 1.0)
    run(131072, "random", 0.25)
    run(131072, "window", 0.25)
