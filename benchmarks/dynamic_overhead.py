"""How much a dynamic pattern's per-call estimate costs next to the attention it sparsifies.

    PYTHONUNBUFFERED=1 python3 benchmarks/dynamic_overhead.py        # H200, bf16, Llama-3.1-8B-shaped layer

One causal prefill layer (32 query / 8 KV heads, head_dim 128, B=1) at each ``--lengths``: dense SDPA
(cuDNN/flash), the estimate alone (``pattern.estimate``), the estimate + the layout
(``BlockLayout.from_block_mask`` + the kernel's schedule: what the runtime adds per call), and the
block-sparse kernel on that layout. GPU time per call (``gpu_ms``, calls queued back to back).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from autosparse import BlockGeometry, BlockLayout, BlockTopK, VerticalSlash  # noqa: E402
from autosparse.runtime import ORIGINAL_SDPA  # noqa: E402
from autosparse.timing import gpu_ms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| S | pattern | dense SDPA ms | estimate ms | estimate + layout ms | share of dense | block density | kernel ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        q = torch.randn(1, 32, length, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        geometry = BlockGeometry(length, length, 64, 128, True)
        dense = gpu_ms(lambda: ORIGINAL_SDPA(q, k, v, is_causal=True, enable_gqa=True))
        for pattern in (VerticalSlash(1000, 6096), BlockTopK(64)):
            estimate = lambda: pattern.estimate(q, k, geometry, 128 ** -0.5).any(0)  # noqa: E731

            def layout() -> BlockLayout:
                built = BlockLayout.from_block_mask(estimate(), geometry)
                built.schedule(4)
                return built

            built = layout()
            kernel = gpu_ms(lambda: torch.ops.autosparse.block_sparse_attention(
                q, k, v, built.kv_indices, built.kv_counts, None, built.schedule(4), 64, 128, True, 128 ** -0.5, None))
            est_ms, total_ms = gpu_ms(estimate), gpu_ms(layout)
            print(f"| {length} | {pattern.short_str()} | {dense:.2f} | {est_ms:.2f} | {total_ms:.2f} | "
                  f"{total_ms / dense:.1%} | {built.density():.3f} | {kernel:.2f} |", flush=True)


if __name__ == "__main__":
    main()
