"""Per-GPU tile tuning of the block-sparse kernel, cached on disk.

``tune(...)`` times a handful of candidate :class:`TileConfig` on this GPU for one
(head_dim, dtype, layout block, load path) and stores the fastest in a JSON file
(``$AUTOSPARSE_CACHE_DIR/tile_configs.json``, default ``~/.cache/autosparse``); ``lookup(...)``
returns it, and ``default_config`` consults it before its built-in rule. Keys carry the GPU name,
compute capability and Triton version, so a cache never leaks across machines or compilers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence

import torch

from . import block_sparse_op as bso
from . import cache
from .tile_config import CACHE, TileConfig, cache_path, config_key, default_config, lookup

log = logging.getLogger(__name__)

__all__ = ["CANDIDATES", "cache_path", "gpu_ms", "lookup", "tune"]

# Candidates measured on the H200 (benchmarks/NOTES.md, runs 4-7): 64-row tiles with 4 warps and one
# stage (3-4 programs per SM) lead; the deeper-pipelined 128-row tiles stay as alternatives for
# other GPUs and shapes.
CANDIDATES: tuple[tuple[int, int, int], ...] = (  # (block_m, num_warps, num_stages)
    (64, 4, 1), (64, 4, 2), (64, 4, 3), (128, 4, 1), (128, 4, 3), (128, 8, 2), (128, 8, 3), (128, 8, 4),
)


def gpu_ms(fn: Callable[[], object]) -> float:
    """GPU time of ``fn`` in ms, calls queued back to back so the host's launch cost hides behind the
    GPU (the steady state inside a model's forward): Triton's ``do_bench``, median."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def tune(head_dim: int, dtype: torch.dtype = torch.bfloat16, q_block: int = 64, kv_block: int = 128, *,
         device: torch.device | str = "cuda", seq_len: int = 16384, heads: int = 8, density: float = 0.25,
         candidates: Sequence[tuple[int, int, int]] = CANDIDATES,
         time_fn: Callable[[Callable[[], object]], float] = gpu_ms, save: bool = True) -> dict:
    """Time every candidate (block_m, num_warps, num_stages) on a random layout of ``density`` and
    store the fastest; returns ``{"best": TileConfig, "times_ms": {candidate: ms or error}}``.

    Candidates that do not compile (shared memory, registers) are skipped and reported. The result
    is checked against the first candidate's output, so a config that computes garbage never wins.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
    nq, nk = math.ceil(seq_len / q_block), math.ceil(seq_len / kv_block)
    keep = max(1, round(density * nk))
    scores = torch.rand(1, heads, nq, nk, device=device, generator=gen)
    idx = torch.sort(torch.topk(scores, keep, dim=-1).indices, dim=-1).values.to(torch.int32).contiguous()
    cnt = torch.full((1, heads, nq), keep, dtype=torch.int32, device=device)
    tma = bso._tma_ok(q, k, v)
    times: dict[str, float | str] = {}
    best, best_ms, reference = None, math.inf, None
    for block_m, num_warps, num_stages in candidates:
        name = f"m{block_m} w{num_warps} s{num_stages}"
        if block_m > q_block:
            continue
        config = TileConfig(num_warps=num_warps, num_stages=num_stages, block_m=block_m, use_tma=tma)
        run = functools.partial(bso.block_sparse_attention, q, k, v, idx, cnt, q_block=q_block, kv_block=kv_block,
                                causal=False, config=config)
        try:
            out = run()
        except Exception as err:  # noqa: BLE001 - out of shared memory / registers: not a candidate here
            times[name] = f"{type(err).__name__}: {str(err)[:120]}"
            continue
        if reference is None:
            reference = out
        elif not torch.allclose(out.float(), reference.float(), atol=2e-2, rtol=2e-2):
            times[name] = "wrong result"
            continue
        ms = time_fn(run)
        times[name] = ms
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise RuntimeError(f"no tile config ran for head_dim {head_dim} {dtype} {q_block}x{kv_block}: {times}")
    if save:
        entry = dict(block_m=best.block_m, num_warps=best.num_warps, num_stages=best.num_stages, ms=best_ms,
                     shape=dict(seq_len=seq_len, heads=heads, density=density), times_ms=times)
        cache.store(CACHE, config_key(device, q_block, kv_block, head_dim, dtype, tma), entry)
        default_config.cache_clear()
    return {"best": dataclasses.replace(best), "times_ms": times}
