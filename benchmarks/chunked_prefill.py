"""Chunked prefill: one chunk of queries after a KV-cache prefix, dense SDPA vs autosparse's op.

Llama-3.1-8B attention shape (32 query / 8 KV heads, head_dim 128, bf16, B=1). A chunk of C queries
at the end of T tokens of context (prefix T - C in the cache; also the chunk in the middle of the
context) is timed as a serving engine runs it, per layer:

- dense: ``F.scaled_dot_product_attention`` with ``causal_lower_right`` (bottom-right causal,
  ``is_causal`` would be top-left) on K/V expanded to the query heads once, outside the timing, so
  that it runs on the flash kernel (with GQA heads torch may fall back to a materialised mask);
  on Hopper also FA4 dense (``flash_attn.cute``, causal bottom-right, where it imports and its
  sampled rows match exact attention: "-" otherwise), and the speedup against the faster of the two;
- autosparse: ``autosparse.runtime.attention`` (the op every capture route calls) with the boolean
  mask transformers passes such a chunk (``[1, 1, C, T]``, bottom-right causal), served sparse.
  ``--layers`` served layers (32, as Llama-3.1-8B) are called in order with the same mask, as one
  forward does: the mask is classified once per forward, its cost spread over the layers as in
  the model.

Profiles: ``sink_local`` (sinks + a local window) and ``blocks`` (each head its own random key
blocks at about ``--density`` of the keys, plus its diagonal window). Every row of the table is
checked first: the op's output on sampled query rows against float32 attention on the layout's
token mask (``ok`` / ``WRONG``). "first call ms": wall time of the first call of the shape (the
call plan built, the kernel backend measured and chosen): a chunk of a new context length pays it
once per distinct set of head patterns. Prints a markdown table.

    python benchmarks/chunked_prefill.py                     # H200: chunks 4K/8K over 32K/128K
    python benchmarks/chunked_prefill.py --quick             # tiny shapes on the CPU (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autosparse import BlockGeometry, BlockLayout, Blocks, LayerProfile, Profile, SinkLocal, Union, Window  # noqa: E402
from autosparse.kernels import backends  # noqa: E402
from autosparse.runtime import LayerPlan, PatchState, attention, register, unregister  # noqa: E402
from autosparse.tools.timing import median_ms  # noqa: E402

CHECK_ROWS = 64
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: str
    blocks: tuple[int, int]


def patterns(kind: str, shape: Shape, total: int, args, seed: int) -> tuple:
    """One pattern per head."""
    if kind == "sink_local":
        return (SinkLocal(args.sinks, args.window),) * shape.heads
    g = torch.Generator().manual_seed(seed)
    kv_block = shape.blocks[1]
    n = -(-total // kv_block)
    keep = max(1, round(args.density * n))
    return tuple(Union((Blocks(tuple(sorted(torch.randperm(n, generator=g)[:keep].tolist()))), Window(kv_block)))
                 for _ in range(shape.heads))


def served_layers(heads: tuple, shape: Shape, count: int) -> list[torch.Tensor]:
    """``count`` registered layer plans with these patterns, in one patch state (one forward)."""
    profile = Profile(model={}, layers={f"l{i}": LayerProfile(i, shape.heads, heads) for i in range(count)},
                      block_size=shape.blocks)
    state = PatchState(strict=True)
    return [register(LayerPlan(f"l{i}", i, shape.heads, profile, state)) for i in range(count)]


def chunk_layout(heads: tuple, shape: Shape, chunk: int, total: int) -> BlockLayout:
    """The layout of a chunk of ``chunk`` queries over ``total`` keys (bottom-right causal)."""
    return BlockLayout.from_patterns(heads, BlockGeometry(chunk, total, *shape.blocks, True), shape.device)


def token_rows(layout: BlockLayout, shape: Shape, rows: torch.Tensor) -> torch.Tensor:
    """bool [H, R, T]: the layout's token mask at the sampled query rows of the chunk."""
    geometry = layout.geometry
    chunk, total = geometry.q_len, geometry.kv_len
    q_block, kv_block = shape.blocks
    blocks = torch.zeros(shape.heads, len(rows), geometry.num_kv_blocks + 1, dtype=torch.bool, device=shape.device)
    idx = layout.kv_indices[0][:, rows // q_block].long()  # [H, R, MAXK]
    live = torch.arange(idx.shape[-1], device=shape.device) < layout.kv_counts[0][:, rows // q_block, None]
    blocks.scatter_(2, torch.where(live, idx, geometry.num_kv_blocks), True)
    tokens = blocks[..., :-1].repeat_interleave(kv_block, -1)[..., :total]
    causal = torch.arange(total, device=shape.device) <= (rows + total - chunk)[:, None]
    return tokens & causal


def check(out: torch.Tensor, q, k, v, layout: BlockLayout, shape: Shape, dense: bool = False) -> float:
    """Largest error of sampled rows (relative to the rows' scale) against float32 attention on the
    layout's token mask (``dense``: on the bottom-right causal mask alone)."""
    chunk, total = layout.geometry.q_len, layout.geometry.kv_len
    rows = torch.linspace(0, chunk - 1, min(CHECK_ROWS, chunk), device=shape.device).long().unique()
    if dense:
        allowed = torch.arange(total, device=shape.device) <= (rows + total - chunk)[:, None]
    else:
        allowed = token_rows(layout, shape, rows)
    group = shape.heads // shape.kv_heads
    kk = k.float().repeat_interleave(group, 1)
    vv = v.float().repeat_interleave(group, 1)
    s = (q[:, :, rows].float() @ kk.transpose(-1, -2)) * shape.head_dim ** -0.5
    ref = torch.softmax(s.masked_fill(~allowed[None], float("-inf")), -1) @ vv
    return float((out[:, :, rows].float() - ref).abs().max() / ref.abs().max().clamp_min(1.0))


def measure(kind: str, shape: Shape, chunk: int, total: int, where: str, args) -> dict:
    g = torch.Generator(device=shape.device).manual_seed(chunk + total)
    prefix = total - chunk if where == "end" else (total // 2 // chunk) * chunk
    context = prefix + chunk  # keys this chunk sees
    q = torch.randn(1, shape.heads, chunk, shape.head_dim, generator=g, device=shape.device, dtype=shape.dtype)
    k, v = (torch.randn(1, shape.kv_heads, context, shape.head_dim, generator=g, device=shape.device,
                        dtype=shape.dtype) for _ in range(2))
    heads = patterns(kind, shape, context, args, seed=context)
    layers = served_layers(heads, shape, args.layers)
    mask = torch.ones(chunk, context, dtype=torch.bool, device=shape.device).tril_(prefix)[None, None]
    try:
        start = time.perf_counter()
        out = attention(q, k, v, layers[0], mask, False, None)  # builds the call plan, chooses the backend
        if shape.device == "cuda":
            torch.cuda.synchronize()
        first_ms = (time.perf_counter() - start) * 1e3
        layout = chunk_layout(heads, shape, chunk, context)
        error, density = check(out, q, k, v, layout, shape), layout.density()
        bias = causal_lower_right(chunk, context)
        group = shape.heads // shape.kv_heads
        k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

        def dense():
            for _ in layers:
                F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=bias)

        def sparse():
            for layer in layers:
                attention(q, k, v, layer, mask, False, None)

        fa4_ms, fa4 = None, backends._fa4() if shape.device == "cuda" else ImportError("CPU")
        if not isinstance(fa4, Exception):  # FA4 dense, bottom-right causal, GQA heads as they are
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

            def fa4_dense():
                for _ in layers:
                    fa4[0](qt, kt, vt, causal=True)

            try:
                answer = fa4[0](qt, kt, vt, causal=True)
            except Exception as err:  # noqa: BLE001 - a shape FA4 does not take: no FA4 column
                print(f"FA4 dense at {chunk} x {context}: {type(err).__name__}: {err}", file=sys.stderr)
            else:
                answer = (answer[0] if isinstance(answer, tuple) else answer).transpose(1, 2)
                if check(answer, q, k, v, layout, shape, dense=True) <= TOLERANCE[shape.dtype]:
                    fa4_ms = median_ms(fa4_dense, args.reps, shape.device) / len(layers)
        dense_ms = median_ms(dense, args.reps, shape.device) / len(layers)
        sparse_ms = median_ms(sparse, args.reps, shape.device) / len(layers)
    finally:
        for layer in layers:
            unregister(layer)
    return dict(kind=kind, total=total, chunk=chunk, prefix=prefix, density=density, dense=dense_ms,
                sparse=sparse_ms, fa4=fa4_ms, first=first_ms, ok="ok" if error <= TOLERANCE[shape.dtype] else f"WRONG ({error:.2e})")


def table(rows: list[dict], shape: Shape) -> str:
    lines = [f"Chunked prefill attention, {shape.heads} q / {shape.kv_heads} kv heads, d={shape.head_dim}, "
             f"{str(shape.dtype).replace('torch.', '')}, blocks {shape.blocks[0]}x{shape.blocks[1]}, "
             f"{shape.device}; per layer, median of the calls",
             "",
             "| profile | context | chunk | prefix | block density | dense SDPA ms | dense FA4 ms | autosparse ms "
             "| speedup vs SDPA | vs the fastest dense | ideal 1/d | first call ms | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fastest = min(r["dense"], r["fa4"] or r["dense"])
        fa4 = "-" if r["fa4"] is None else f"{r['fa4']:.3f}"
        lines.append(f"| {r['kind']} | {r['prefix'] + r['chunk']} | {r['chunk']} | {r['prefix']} | {r['density']:.3f} "
                     f"| {r['dense']:.3f} | {fa4} | {r['sparse']:.3f} | {r['dense'] / r['sparse']:.2f} "
                     f"| {fastest / r['sparse']:.2f} "
                     f"| {1 / r['density']:.2f} | {r['first']:.1f} | {r['ok']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (exercises the code only)")
    parser.add_argument("--totals", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--profiles", nargs="+", default=["sink_local", "blocks"], choices=["sink_local", "blocks"])
    parser.add_argument("--where", nargs="+", default=["end"], choices=["end", "middle"],
                        help="the chunk at the end of the context, or in its middle")
    parser.add_argument("--sinks", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--density", type=float, default=0.1, help="blocks profile: key blocks kept per head")
    parser.add_argument("--blocks", type=int, nargs=2, default=[64, 128])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=32, help="served layers per timed forward")
    args = parser.parse_args(argv)
    if args.quick:
        shape = Shape(4, 2, 32, torch.float32, "cpu", (32, 32))
        args.totals, args.chunks, args.sinks, args.window, args.reps = [256, 512], [64, 128], 16, 64, 1
        args.layers = 2
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --quick)")
        shape = Shape(32, 8, 128, torch.bfloat16, "cuda", tuple(args.blocks))
    rows = [measure(kind, shape, chunk, total, where, args)
            for kind in args.profiles for total in args.totals for chunk in args.chunks if chunk < total
            for where in args.where]
    print(table(rows, shape))
    return 0 if all(r["ok"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
