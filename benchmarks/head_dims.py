"""head_dim 80 / 96 / 128 / 256 on the block-sparse kernel: correctness and speed against dense SDPA.

    PYTHONUNBUFFERED=1 python3 benchmarks/head_dims.py --out $OUT      # GPU (the H200 table)
    python3 benchmarks/head_dims.py --cpu                               # tiny CPU smoke test

1. the table (bf16, B=1, H=16, S in {8192, 32768}, layout blocks 64x128 and 128x128): a causal layout
   listing every block (the kernel masks the diagonal; the same work as causal dense attention) and
   a random non-causal layout of block density 0.25; each output checked against float32 dense
   attention on the same token mask (max abs error, on sampled query rows); timed with
   ``triton.testing.do_bench`` (median) against ``F.scaled_dot_product_attention`` dense (default
   backend choice, and cuDNN) on the same inputs, as ratios (sparse: the time ratio next to 1/density);
2. ``--sweep``: the load path at 80/96 (tensor descriptors vs pointer loads over the padded width) and
   tile configs at 256 (query tile, key tile, warps), on the random layout at S=32768;
3. ``--grid``: head_dim 256 with every layout block pair (16..128 x 16..128), 80 in fp16, 96 and 256
   in fp32, checked on a small ragged causal problem.

Prints a markdown table last and writes it (and JSON with every number) under ``--out``.
``--cpu`` runs the same code on tiny shapes with the PyTorch CPU path (wall-clock timing, no meaning).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from autosparse.kernels import TileConfig, block_sparse_attention, layout_mask  # noqa: E402
from autosparse.kernels import block_sparse_op as bso  # noqa: E402
from autosparse.layout import BlockLayout  # noqa: E402
from autosparse.patterns.basic import BlockGeometry  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    seq_lens: tuple[int, ...] = (8192, 32768)
    head_dims: tuple[int, ...] = (80, 96, 128, 256)
    blocks: tuple[tuple[int, int], ...] = ((64, 128), (128, 128))
    heads: int = 16
    density: float = 0.25
    check_rows: int = 512  # query rows per head checked against float32 dense attention
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"


CPU = ExperimentConfig(seq_lens=(300,), head_dims=(80, 256), blocks=((16, 32),), heads=2, check_rows=64,
                       device="cpu")


def log(*a) -> None:
    print(*a, flush=True)


def timer(device: str):
    """Median ms of a callable: do_bench on the GPU, a few wall-clock runs on the CPU."""
    if device == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))

    def wall(fn):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    return wall


def make_layout(kind: str, s: int, qb: int, kb: int, heads: int, density: float, gen, device) -> BlockLayout:
    """``causal``: every block the causal rule reaches; ``random``: non-causal, round(density * NK)
    random key blocks per query block."""
    geometry = BlockGeometry(s, s, qb, kb, kind == "causal")
    nq, nk = geometry.num_q_blocks, geometry.num_kv_blocks
    if kind == "causal":
        mask = geometry.reachable(device).expand(heads, nq, nk).clone()
    else:
        keep = max(1, round(density * nk))
        top = torch.rand(heads, nq, nk, generator=gen, device=device).topk(keep, dim=-1).indices
        mask = torch.zeros(heads, nq, nk, dtype=torch.bool, device=device).scatter_(-1, top, True)
    return BlockLayout.from_block_mask(mask, geometry)


def max_error(out, q, k, v, layout: BlockLayout, rows: int, gen) -> float:
    """Max abs error of ``out`` against float32 dense attention on the layout's token mask, on
    ``rows`` random query rows of every head (all rows when fewer)."""
    g = layout.geometry
    sel = torch.randperm(g.q_len, generator=gen, device=q.device)[:rows].sort().values
    blocks = layout_mask(layout.kv_indices, layout.kv_counts, q_block=1, kv_block=1, seq_q=g.num_q_blocks,
                         seq_k=g.num_kv_blocks)[0]  # [H, NQ, NK]: the listed blocks
    keys = torch.arange(g.kv_len, device=q.device)
    mask = blocks[:, sel // g.q_block][..., keys // g.kv_block]  # [H, rows, Sk]
    if g.causal:
        mask &= keys[None, None, :] <= (sel + g.kv_len - g.q_len)[None, :, None]
    worst = 0.0
    for h in range(q.shape[1]):
        scores = (q[0, h, sel].float() @ k[0, h].float().T) / math.sqrt(q.shape[-1])
        p = torch.softmax(scores.masked_fill(~mask[h], float("-inf")), dim=-1)
        ref = p @ v[0, h].float()
        worst = max(worst, float((out[0, h, sel].float() - ref).abs().nan_to_num(math.inf).max()))  # NaN fails
    return worst


def run_sparse(q, k, v, layout: BlockLayout, config: TileConfig | None = None):
    """The kernel on a NaN-poisoned output; returns (out, a callable that reruns it into out, the
    compiled kernel's registers / spills / shared memory on the GPU)."""
    g = layout.geometry
    out = torch.full_like(q, float("nan"))
    schedule = layout.schedule()

    def call():
        return block_sparse_attention(q, k, v, layout.kv_indices, layout.kv_counts, q_block=g.q_block,
                                      kv_block=g.kv_block, causal=g.causal, schedule=schedule, out=out, config=config)
    resources = {}
    if q.is_cuda:  # the checked entry's own launch, for the compiled kernel it returns
        compiled = bso._launch(q, k, v, layout.kv_indices, layout.kv_counts, None, schedule, out, None, g.q_block,
                               g.kv_block, g.causal, 1.0 / math.sqrt(q.shape[-1]), config)
        resources = dict(regs=compiled.n_regs, spills=compiled.n_spills, smem=compiled.metadata.shared)
    else:
        call()
    if out.isnan().any():
        raise AssertionError("NaN in the output (poison left or produced)")
    return out, call, resources


def dense_times(q, k, v, causal: bool, time_fn, device: str) -> dict:
    """SDPA dense with the default backend choice, and with cuDNN on the GPU."""
    times = {"sdpa": time_fn(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))}
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                times["cudnn"] = time_fn(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        except RuntimeError as err:  # cuDNN refuses the shape: recorded, not fatal
            times["cudnn"] = f"{type(err).__name__}: {str(err)[:80]}"
    return times


def inputs(s: int, d: int, heads: int, cfg: ExperimentConfig, gen):
    return tuple(torch.randn(1, heads, s, d, generator=gen, device=cfg.device).to(cfg.dtype) for _ in range(3))


def table(cfg: ExperimentConfig, time_fn, gen) -> list[dict]:
    rows = []
    for s in cfg.seq_lens:
        for d in cfg.head_dims:
            q, k, v = inputs(s, d, cfg.heads, cfg, gen)
            dense = {c: dense_times(q, k, v, c, time_fn, cfg.device) for c in (True, False)}
            for qb, kb in cfg.blocks:
                for kind in ("causal", "random"):
                    layout = make_layout(kind, s, qb, kb, cfg.heads, cfg.density, gen, cfg.device)
                    out, call, resources = run_sparse(q, k, v, layout)
                    err = max_error(out, q, k, v, layout, cfg.check_rows, gen)
                    ms = time_fn(call)
                    ref = dense[kind == "causal"]
                    best = min(t for t in ref.values() if isinstance(t, float))
                    row = dict(S=s, d=d, blocks=f"{qb}x{kb}", layout=kind, density=layout.density(), ms=ms,
                               max_abs_err=err, dense_ms=ref, speedup=best / ms, **resources)
                    rows.append(row)
                    log(json.dumps(row))
            del q, k, v
    return rows


def sweep(cfg: ExperimentConfig, time_fn, gen) -> list[dict]:
    """Load path at 80/96, tile configs at 256: random layout 64x128, the longest sequence."""
    s, qb, kb = cfg.seq_lens[-1], 64, 128
    variants = {80: [("tma", TileConfig(4, 1, 64, True)), ("pointer", TileConfig(4, 1, 64, False)),
                     ("pointer 8w 3st", TileConfig(8, 3, 64, False))],
                96: [("tma", TileConfig(4, 1, 64, True)), ("pointer", TileConfig(4, 1, 64, False))],
                256: [(f"m{m} n{n} w{w} s{st}", TileConfig(w, st, m, None, n))
                      for m, n, w, st in ((64, 64, 8, 1), (64, 128, 8, 1), (64, 64, 4, 1), (64, 32, 4, 1), (32, 64, 4, 1),
                                          (64, 64, 4, 2), (64, 128, 4, 1))]}
    rows = []
    for d, configs in variants.items():
        if d not in cfg.head_dims:
            continue
        q, k, v = inputs(s, d, cfg.heads, cfg, gen)
        layout = make_layout("random", s, qb, kb, cfg.heads, cfg.density, gen, cfg.device)
        for name, config in configs:
            try:
                out, call, resources = run_sparse(q, k, v, layout, config)
                row = dict(S=s, d=d, variant=name, ms=time_fn(call),
                           max_abs_err=max_error(out, q, k, v, layout, cfg.check_rows // 4, gen), **resources)
            except Exception as err:  # noqa: BLE001 - a config that does not compile is a result
                row = dict(S=s, d=d, variant=name, error=f"{type(err).__name__}: {str(err)[:160]}")
            rows.append(row)
            log(json.dumps(row))
    return rows


def grid(cfg: ExperimentConfig, gen) -> list[dict]:
    """Small ragged causal problems: 256 at every layout block pair; 80 fp16, 96 and 256 fp32."""
    cases = [(256, cfg.dtype, qb, kb) for qb in (16, 32, 64, 128) for kb in (16, 32, 64, 128)]
    cases += [(80, torch.float16, 64, 128), (96, torch.float32, 32, 64), (256, torch.float32, 64, 128)]
    rows = []
    for d, dtype, qb, kb in cases:
        s = 1000
        q, k, v = (torch.randn(1, 2, s, d, generator=gen, device=cfg.device).to(dtype) for _ in range(3))
        layout = make_layout("causal", s, qb, kb, 2, 1.0, gen, cfg.device)
        out, _, _ = run_sparse(q, k, v, layout)
        row = dict(d=d, dtype=str(dtype).replace("torch.", ""), blocks=f"{qb}x{kb}",
                   max_abs_err=max_error(out, q, k, v, layout, s, gen))
        rows.append(row)
        log(json.dumps(row))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| S | head_dim | blocks | layout (density) | sparse ms | SDPA default ms | cuDNN ms | dense/sparse "
             "| 1/density | max abs err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = r["dense_ms"]
        cudnn = dense.get("cudnn", "-")
        cudnn = f"{cudnn:.3f}" if isinstance(cudnn, float) else cudnn if cudnn == "-" else "refused"
        lines.append(f"| {r['S']} | {r['d']} | {r['blocks']} | {r['layout']} ({r['density']:.3f}) | {r['ms']:.3f} | "
                     f"{dense['sdpa']:.3f} | {cudnn} | {r['speedup']:.2f}x | {1 / r['density']:.2f} | "
                     f"{r['max_abs_err']:.2e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (PyTorch path): a smoke test")
    ap.add_argument("--sweep", action="store_true", help="load paths at 80/96 and tile configs at 256")
    ap.add_argument("--grid", action="store_true", help="every layout block pair at 256; 80/96 in fp16/fp32")
    ap.add_argument("--head-dims", type=int, nargs="+", default=None, help="only these head dims")
    ap.add_argument("--out", type=Path, default=None, help="folder for table.md and results.json")
    args = ap.parse_args()
    cfg = CPU if args.cpu else ExperimentConfig()
    if args.head_dims:
        cfg = dataclasses.replace(cfg, head_dims=tuple(args.head_dims))
    gen = torch.Generator(device=cfg.device).manual_seed(0)
    time_fn = timer(cfg.device)
    if cfg.device == "cuda":
        import triton

        log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    results = {}

    def save(section: str, rows: list[dict]) -> None:  # after every section: a killed run keeps the rest
        results[section] = rows
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))

    save("table", table(cfg, time_fn, gen))
    text = markdown(results["table"])
    if args.out is not None:
        (args.out / "table.md").write_text(text + "\n")
    log(text)
    if args.sweep:
        save("sweep", sweep(cfg, time_fn, gen))
    if args.grid:
        save("grid", grid(cfg, gen))


if __name__ == "__main__":
    main()
