"""Host-side cost of one block_sparse_attention call, split into its parts (GPU machine).

    python3 benchmarks/host_overhead.py

Times N calls of each part with no synchronisation inside the loop, on a problem small enough that
the GPU keeps up (so the loop measures host time), then prints a cProfile of the whole call.
"""

from __future__ import annotations

import cProfile
import math
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autosparse.kernels import block_sparse_op as bso  # noqa: E402

N = 300


def per_call_us(fn, n=N):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    dev = torch.device("cuda")
    B, H, S, D, qb, kb = 1, 4, 2048, 128, 64, 128  # GPU time well under the host time
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    nq, nk = S // qb, S // kb
    keep = 4
    idx = torch.sort(torch.topk(torch.rand(1, H, nq, nk, device=dev), keep, dim=-1).indices, -1).values
    idx = idx.to(torch.int32).contiguous()
    cnt = torch.full((1, H, nq), keep, dtype=torch.int32, device=dev)
    sched = bso.row_schedule(cnt)
    out = torch.empty_like(q)
    scale = 1 / math.sqrt(D)
    kw = dict(q_block=qb, kv_block=kb, causal=False)
    full = lambda: bso.block_sparse_attention(q, k, v, idx, cnt, schedule=sched, out=out, **kw)  # noqa: E731
    rows = {
        "block_sparse_attention (all)": full,
        "torch.ops custom op": lambda: torch.ops.autosparse.block_sparse_attention(q, k, v, idx, cnt, None, sched,
                                                                                  qb, kb, False, scale),
        "_check_args": lambda: bso._check_args(q, k, v, idx, cnt, qb, kb, False, None, None, sched, out),
        "_tma_ok": lambda: bso._tma_ok(q, k, v, out),
        "4 x _descriptor": lambda: [bso._descriptor(t, 64) for t in (q, k, v, out)],
        "default_config": lambda: bso.default_config(qb, kb, D, q.dtype, dev, True),
        "_launch": lambda: bso._launch(q, k, v, idx, cnt, None, sched, out, None, qb, kb, False, scale, None),
        "_launch, pointer path": lambda: bso._launch(q, k, v, idx, cnt, None, sched, out, None, qb, kb, False, scale,
                                                     bso.TileConfig(4, 1, block_m=64, use_tma=False)),
    }
    torch.cuda.synchronize()
    t_gpu = None
    import triton.testing

    t_gpu = triton.testing.do_bench(full, warmup=25, rep=100, return_mode="median")
    print(f"GPU time of the call (do_bench median): {t_gpu * 1e3:.1f} us")
    for name, fn in rows.items():
        print(f"{name:32s} {per_call_us(fn):8.1f} us per call (host)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(N):
        full()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
