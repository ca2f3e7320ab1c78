"""Does the program order of a launch matter for 3-D neighborhood layouts? (L2 reuse of K/V tiles)

    python3 benchmarks/schedule_order.py        # H200: kernel ms per schedule, Wan/HunyuanVideo/FLUX shapes

Times the block-sparse kernel alone on one layer's layout (random bf16 q/k/v already in tile order)
with three program orders: rows sorted by work across all heads (the order before 2026-11-29),
natural (head, query block) order, and ``row_schedule`` (head by head, coarse work levels, natural
order inside a level).
"""

import statistics

import torch

from autosparse import BlockGeometry, BlockLayout, Dense, Neighborhood, TokenGeometry, default_tile
from autosparse.kernels import row_schedule

CASES = [  # name, heads, head_dim, token geometry, window
    ("wan 480p", 12, 128, TokenGeometry((21, 30, 52)), (4, 16, 16)),
    ("hunyuan 720p", 24, 128, TokenGeometry((33, 45, 80), suffix=256), (6, 40, 32)),
    ("flux 2048", 24, 128, TokenGeometry((128, 128), prefix=512), (16, 32)),
]


def by_work_across_heads(counts: torch.Tensor) -> torch.Tensor:
    """Heaviest rows first over all heads, ties in (head, query block) order."""
    work = counts.amax(0).to(torch.int64)
    hq, nq = work.shape
    key = (work.max() - work) * (hq * nq) + torch.arange(hq * nq, device=work.device).view(hq, nq)
    return torch.argsort(key.flatten()).to(torch.int32)


def head_groups(counts: torch.Tensor, together: int) -> torch.Tensor:
    """row_schedule's rule with ``together`` heads treated as one (interleaved by query block)."""
    _, hq, nq = counts.shape
    merged = counts[0].view(hq // together, together, nq).permute(0, 2, 1).reshape(1, hq // together, nq * together)
    order = row_schedule(merged.contiguous(), 1).long()  # rows of the merged layout: g * (nq*t) + i*t + j
    g, rest = order // (nq * together), order % (nq * together)
    head = g * together + rest % together
    return (head * nq + rest // together).to(torch.int32)


def ms(fn, reps=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


for name, heads, dim, tokens, window in CASES:
    tokens = tokens.with_tile(default_tile(len(tokens.grid), 128))
    geometry = BlockGeometry(tokens.length, tokens.length, 64, 128, False, tokens)
    layout = BlockLayout.from_patterns([Neighborhood(window)] * heads, geometry, "cuda")
    q, k, v = (torch.randn(1, tokens.length, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    sdpa = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    schedules = {
        "work, all heads": by_work_across_heads(layout.kv_counts),
        "natural": torch.arange(heads * layout.kv_counts.shape[-1], device="cuda", dtype=torch.int32),
        "row_schedule": row_schedule(layout.kv_counts, 1),
        **{f"{t} heads together": head_groups(layout.kv_counts, t) for t in (2, 4, 6) if heads % t == 0},
    }
    counts = layout.kv_counts.float()
    print(f"{name}: S={tokens.length} d={layout.density():.4f} row blocks min/mean/max "
          f"{counts.min():.0f}/{counts.mean():.1f}/{counts.max():.0f}; SDPA {sdpa:.3f} ms, ideal {sdpa * layout.density():.3f}")
    for label, schedule in schedules.items():
        t = ms(lambda: torch.ops.autosparse.block_sparse_attention(
            q, k, v, layout.kv_indices, layout.kv_counts, None, schedule, 64, 128, False, dim ** -0.5))
        print(f"  {label:18s} {t:.3f} ms  fraction of ideal {sdpa * layout.density() / t:.2f}")


# GQA causal (Llama-3.1-8B-shaped, 32 query / 8 KV heads, 32K): a ramp of row lengths, where
# heavy-first order matters for the tail and the group's query heads share K/V.
geometry = BlockGeometry(32768, 32768, 64, 128, True)
layout = BlockLayout.from_patterns([Dense()] * 32, geometry, "cuda")
q = torch.randn(1, 32, 32768, 128, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(1, 8, 32768, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
sdpa = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
print(f"llama gqa causal 32K: SDPA {sdpa:.3f} ms")
for label, schedule in {"previous (work, then kv head, block, head)": None, "row_schedule": row_schedule(layout.kv_counts, 4)}.items():
    if schedule is None:
        work = layout.kv_counts[0].to(torch.int64)
        h = torch.arange(32, device="cuda")[:, None]
        i = torch.arange(work.shape[1], device="cuda")[None, :]
        key = (work.max() - work) * work.numel() + ((h // 4) * work.shape[1] + i) * 4 + h % 4
        schedule = torch.argsort(key.flatten()).to(torch.int32)
    t = ms(lambda: torch.ops.autosparse.block_sparse_attention(
        q, k, v, layout.kv_indices, layout.kv_counts, None, schedule, 64, 128, True, 128 ** -0.5))
    print(f"  {label:45s} {t:.3f} ms  vs SDPA {sdpa / t:.2f}")
