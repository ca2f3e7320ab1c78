"""End-to-end DiT forward, dense SDPA vs autosparse with one neighbourhood window, in one command.

    PYTHONUNBUFFERED=1 python3 benchmarks/dit_e2e.py --out $OUT      # H200, bf16: wan hunyuan_video flux
    python3 benchmarks/dit_e2e.py --smoke --out /tmp/dit_smoke         # CPU, tiny models, float32, seconds

Per family (random-weight real-shaped diffusers transformers from ``autosparse.testing.dits``):

1. build the model on the GPU in bf16 (HunyuanVideo trimmed to ``--layers 6`` by default: per-layer
   shapes are what matter; Wan all 30 layers at 480p/81f; FLUX all 57 at 2048², 128x128 tokens);
2. choose the neighbourhood window whose block density is the largest not above ``--density``
   (``choose_window``), on the call's token geometry from the family adapter, in the kernel's tile
   order, with 64 x 128 blocks (the profile default); then report the density in the token order the
   runtime will run it in (``layout.grid_order``: tiles, or raster order when that is about as good);
3. time the whole transformer forward (``torch.no_grad()``, same inputs), unpatched (default SDPA:
   cuDNN on Hopper) vs patched with ``Profile.uniform(model, {"kind": "neighborhood", "window": w})``:
   2 warm-up calls, then the median of ``--reps`` calls, each between CUDA events and a synchronize;
   ``autosparse.stats(model)`` must show every served call sparse (a fallback is flagged loudly);
4. relative L2 difference of the two transformer outputs (random weights: meaningless for quality);
5. attention alone at the served layer shape: dense SDPA vs ``torch.ops.autosparse.attention`` (what
   the patched model runs per call: layout lookup, q/k/v permuted into tiles, the block-sparse
   kernel, the output permuted back) and the kernel alone, so the gap between the attention speedup
   and the end-to-end speedup is accounted for by the attention share of the dense forward.

Writes ``dit_e2e.json`` (every number) and ``dit_e2e.md`` (the tables) under ``--out`` after every
family; ``--budget-s`` skips the families not yet started once that many seconds have passed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import autosparse  # noqa: E402
from autosparse import BlockGeometry, BlockLayout, Neighborhood, Profile, TokenGeometry, default_tile  # noqa: E402
from autosparse.capture import LAYER_ATTR  # noqa: E402
from autosparse.kernels import backends  # noqa: E402
from autosparse.testing.dits import build_dit  # noqa: E402
from autosparse.models.families import family_of  # noqa: E402
from autosparse.layout import grid_order  # noqa: E402
from autosparse.models import AttentionLayer, attention_layers  # noqa: E402
from autosparse.runtime import ORIGINAL_SDPA  # noqa: E402
from autosparse.search.structural import tile_window  # noqa: E402
from autosparse.tools.timing import median_ms  # noqa: E402

Q_BLOCK, KV_BLOCK = 64, 128  # the profile's default layout blocks; the window search uses the same
WARMUP = 2
# One attention call is short next to a forward: more repeats for a stable median (--smoke: 1, CPU
# numbers mean nothing there, only the code paths count).
ATTENTION_REPS = 10

# family -> (shape overrides for build_dit, default depth); real runs and the CPU smoke.
REAL = {
    "wan": ({}, None),  # 480p/81f: latent 21x60x104 -> grid 21x30x52, 30 layers
    "hunyuan_video": ({}, 6),  # 720p/129f: latent 33x90x160 -> grid 33x45x80 (+256 text), 2 dual + 4 single
    "flux": ({"height": 128, "width": 128}, None),  # 2048²: 128x128 tokens (+512 text), 19 double + 38 single
    "flux_4k": ({"height": 256, "width": 256}, None),  # 4096²: 256x256 tokens (+512 text)
    "cogvideox": ({}, None),  # CogVideoX1.5-5B: latent 22x96x170 -> grid 11x48x85 (+226 text), 42 layers
}
SMOKE = {
    "wan": ({"frames": 16, "height": 32, "width": 64}, None),
    "hunyuan_video": ({"frames": 8, "height": 32, "width": 32}, None),
    "flux": ({"height": 48, "width": 48}, None),
    "flux_4k": ({"height": 64, "width": 64}, None),
    "cogvideox": ({"frames": 8, "height": 32, "width": 32}, None),
}
FULL_DEPTH = {"wan": 30, "hunyuan_video": 60, "flux": 57, "flux_4k": 57, "cogvideox": 42}  # served layers, full depth
BUILD = {"flux_4k": "flux"}  # benchmark rows that build another family's model at another shape


def log(*parts: Any) -> None:
    print(*parts, flush=True)


# -- timing ---------------------------------------------------------------------------------------------


# -- window choice -------------------------------------------------------------------------------------


def layout_density(pattern: Neighborhood | tuple[int, ...], tokens: TokenGeometry, device: torch.device) -> float:
    """Block density of a neighbourhood (or a stride-1 ``window``) on ``tokens`` (in its token order, text dense): the
    fraction of 64 x 128 blocks the kernel computes, i.e. its time relative to dense attention."""
    geometry = BlockGeometry(tokens.length, tokens.length, Q_BLOCK, KV_BLOCK, False, tokens)
    pattern = pattern if isinstance(pattern, Neighborhood) else Neighborhood(pattern)
    return BlockLayout.from_patterns([pattern], geometry, device).density()


def choose_window(tokens: TokenGeometry, target: float, device: torch.device) -> tuple[tuple[int, ...], float]:
    """The neighbourhood window with the largest block density not above ``target`` along a cubic path.

    ``tokens`` carries the kernel's tile. Candidates per dim are the multiples of the tile along it
    plus the full dim: a window edge between two multiples still pays for the tiles it touches.
    Starting from one tile per dim, grow the dim with the fewest tiles (ties: the last, spatial, dim
    first), so the window stays cubic in tile units, as sliding-tile attention's windows are; a dim
    whose next step passes ``target`` stops, for good: density only grows with the window. One
    layout per step (about 30 on HunyuanVideo's grid). If even one tile per dim passes ``target``,
    that smallest window is returned with its density.
    """
    choices = [sorted({*range(tile, length, tile), length}) for tile, length in zip(tokens.tile, tokens.grid)]
    index = [0] * len(choices)

    def window() -> tuple[int, ...]:
        return tuple(options[i] for options, i in zip(choices, index))

    density = layout_density(window(), tokens, device)
    growing = [dim for dim, options in enumerate(choices) if len(options) > 1]
    while growing:
        dim = min(growing, key=lambda d: (index[d], -d))
        index[dim] += 1
        trial = layout_density(window(), tokens, device)
        if trial <= target:
            density = trial
            if index[dim] == len(choices[dim]) - 1:
                growing.remove(dim)
        else:
            index[dim] -= 1
            growing.remove(dim)
    return window(), density


# -- one family ----------------------------------------------------------------------------------------


def forward(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def run_family(family: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build, choose the window, time dense vs patched, compare outputs, time attention alone."""
    shape, depth = (SMOKE if args.smoke else REAL)[family]
    layers = args.layers if args.layers is not None else depth
    dit = build_dit(BUILD.get(family, family), "tiny" if args.smoke else "real", device=device, dtype=dtype, layers=layers, **shape)
    model, inputs = dit.model, dit.inputs()
    served = attention_layers(model)
    if args.compile:  # what diffusers recommends: one compiled graph per repeated block (inductor)
        model.compile_repeated_blocks()
    model_order = family_of(model).geometry(model, inputs)
    log(f"  {dit.description}; grid {model_order.grid} + text {model_order.prefix + model_order.suffix} "
        f"= {model_order.length} tokens, {len(served)} served attention layers")
    search_begin = time.perf_counter()
    tiled = model_order.with_tile(default_tile(len(model_order.grid), KV_BLOCK))
    if args.pattern == "tile":  # stride = tile: full blocks (autosparse.search.structural)
        pattern, searched = tile_window(model_order, args.density, block_size=(Q_BLOCK, KV_BLOCK), device=device)
    else:
        window, searched = choose_window(tiled, args.density, device)
        pattern = Neighborhood(window)
    window = pattern.window
    search_s = time.perf_counter() - search_begin
    if searched > args.density:
        log(f"  (target not reachable in tile order: one tile per dim has density {searched:.4f}; timing it)")
    # The runtime lays the window out in tile order unless raster order needs about as few blocks.
    tokens = grid_order([pattern], model_order, Q_BLOCK, KV_BLOCK, device)
    density = layout_density(pattern, tokens, device)
    grid_density = layout_density(pattern, TokenGeometry(tokens.grid, tile=tokens.tile), device)
    order = f"tiles {'x'.join(map(str, tokens.tile))}" if tokens.tile else "raster"
    log(f"  window {list(window)} stride {list(pattern.stride)} ({order} order, as the runtime runs it): block density {density:.4f} "
        f"(grid tokens only {grid_density:.4f}), target <= {args.density} (search {search_s:.1f} s)")

    dense_ms = median_ms(lambda: forward(model, inputs), args.reps, device, WARMUP)
    dense_out = forward(model, inputs).float()
    log(f"  dense forward {dense_ms:.1f} ms")

    autosparse.patch_model(model, Profile.uniform(model, pattern, block_size=(Q_BLOCK, KV_BLOCK)))
    try:
        patched_ms = median_ms(lambda: forward(model, inputs), args.reps, device, WARMUP)
        sparse_out = forward(model, inputs).float()
        calls = autosparse.stats(model, reset=True)
        attention_reps = 1 if args.smoke else ATTENTION_REPS
        attention = time_attention(model, served[0], tokens, pattern, device, dtype, attention_reps)
    finally:
        autosparse.unpatch_model(model)
    rel_l2 = float((sparse_out - dense_out).norm() / dense_out.norm())
    expected = (WARMUP + args.reps + 1) * len(served)
    all_sparse = calls.sparse == expected and not calls.dense and not calls.fallback
    log(f"  patched forward {patched_ms:.1f} ms, speedup {dense_ms / patched_ms:.2f}x, rel L2 {rel_l2:.3f}; {calls}")
    if not all_sparse:
        log(f"  !!! NOT ALL SPARSE: expected sparse={expected} and nothing else, got {calls} !!!")

    share = len(served) * attention["sdpa_ms"] / dense_ms
    # The same dense model with the fastest dense attention (FA4 where installed), from the measured
    # per-call times: every served call saves SDPA - FA4 dense, nothing else changes.
    fastest = min(attention["sdpa_ms"], attention["fa4_dense_ms"] or attention["sdpa_ms"])
    fastest_dense_ms = dense_ms - len(served) * (attention["sdpa_ms"] - fastest)
    predicted_ms = dense_ms - len(served) * (attention["sdpa_ms"] - attention["op_ms"])
    log(f"  op vs kernel on permuted inputs: max abs {attention['op_vs_kernel_max_abs']:.2g}")
    log(f"  attention alone: SDPA {attention['sdpa_ms']:.3f} ms, op {attention['op_ms']:.3f} ms "
        f"(kernel {attention['kernel_ms']:.3f} ms), speedup {attention['speedup']:.2f}x of ideal {1 / density:.2f}x; "
        f"attention share of the dense forward {share:.2f}, predicted patched forward {predicted_ms:.1f} ms")
    return {
        "family": family, "description": dit.description, "grid": list(tokens.grid),
        "text_tokens": tokens.prefix + tokens.suffix, "tokens": tokens.length, "order": order,
        "layers": len(served), "full_depth": FULL_DEPTH[family], "window": list(window),
        "stride": list(pattern.stride),
        "block_density": density, "grid_block_density": grid_density, "tile_order_density": searched,
        "window_search_s": search_s,
        "dense_ms": dense_ms, "patched_ms": patched_ms, "speedup": dense_ms / patched_ms, "rel_l2": rel_l2,
        "stats": str(calls), "all_sparse": all_sparse, "attention": attention, "attention_share": share,
        "predicted_patched_ms": predicted_ms, "fastest_dense_ms": fastest_dense_ms,
        "speedup_vs_fastest_dense": fastest_dense_ms / patched_ms,
    }


def time_attention(model: torch.nn.Module, layer: AttentionLayer, tokens: TokenGeometry, pattern: Neighborhood,
                   device: torch.device, dtype: torch.dtype, reps: int) -> dict[str, Any]:
    """One attention call at the served layer shape, fresh random q/k/v ``[B, H, S, D]`` views of
    ``[B, S, H, D]`` memory (as diffusers passes them), no padding mask: dense SDPA, the op the
    patched model calls (its current token geometry is the last forward's), and the block-sparse
    kernel alone on inputs already in its token order (op - kernel = layout lookup, permutations,
    host time). ``tokens``: the order the runtime runs the window in."""
    shape = (1, tokens.length, layer.num_heads, layer.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
    layer_id = getattr(layer.module, LAYER_ATTR)
    geometry = BlockGeometry(tokens.length, tokens.length, Q_BLOCK, KV_BLOCK, False, tokens)
    layout = BlockLayout.from_patterns([pattern] * layer.num_heads, geometry, device)
    permutation = tokens.permutation(device)  # None in raster order
    qp, kp, vp = (x if permutation is None else x.transpose(1, 2).index_select(1, permutation).transpose(1, 2)
                  for x in (q, k, v))

    def kernel() -> torch.Tensor:
        return torch.ops.autosparse.block_sparse_attention(
            qp, kp, vp, layout.kv_indices, layout.kv_counts, None, layout.schedule(1), Q_BLOCK, KV_BLOCK, False,
            layer.head_dim ** -0.5)

    sdpa_ms = median_ms(lambda: ORIGINAL_SDPA(q, k, v), reps, device, WARMUP)
    fa4 = backends._fa4() if device.type == "cuda" else ImportError("CPU")
    fa4_ms = None  # FA4 dense, the fastest dense kernel on Hopper where it is installed
    if not isinstance(fa4, Exception):
        fa4_ms = median_ms(lambda: fa4[0](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), reps, device,
                           WARMUP)
    op_ms = median_ms(lambda: torch.ops.autosparse.attention(q, k, v, layer_id, None, False, None), reps, device,
                      WARMUP)
    kernel_ms = median_ms(kernel, reps, device, WARMUP)
    # The op reads q and writes the output in the model's order (q_rows); the kernel alone ran on
    # permuted q: both must give the same output once put in the same order.
    op_out = torch.ops.autosparse.attention(q, k, v, layer_id, None, False, None).float()
    kernel_out = kernel().float()
    if permutation is not None:
        kernel_out = kernel_out.transpose(1, 2).index_select(1, tokens.inverse_permutation(device)).transpose(1, 2)
    op_vs_kernel = float((op_out - kernel_out).abs().max())
    calls = autosparse.stats(model, reset=True)
    all_sparse = calls.sparse == WARMUP + reps + 1 and not calls.dense and not calls.fallback
    if not all_sparse:
        log(f"  !!! attention-only op calls NOT ALL SPARSE: {calls} !!!")
    if op_vs_kernel > 1e-2:
        log(f"  !!! op output differs from the kernel on permuted inputs: max abs {op_vs_kernel:.3g} !!!")
    return {"shape_bhsd": [1, layer.num_heads, tokens.length, layer.head_dim], "sdpa_ms": sdpa_ms,
            "fa4_dense_ms": fa4_ms, "op_ms": op_ms,
            "kernel_ms": kernel_ms, "speedup": sdpa_ms / op_ms, "kernel_speedup": sdpa_ms / kernel_ms,
            "ideal": 1 / layout.density(), "stats": str(calls), "all_sparse": all_sparse,
            "op_vs_kernel_max_abs": op_vs_kernel}


# -- report --------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import diffusers

    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)",
        "torch": torch.__version__, "triton": triton_version, "diffusers": diffusers.__version__,
        "command": shlex.join(["python3", *sys.argv]),
    }


def tables(rows: list[dict[str, Any]]) -> str:
    """The end-to-end table, then where the time goes (attention alone and its share)."""
    lines = [
        "| family | shape | tokens (grid + text) | layers | window / stride | block density (grid only) | dense ms "
        "| patched ms | speedup | attention-only speedup | 1/d | rel L2 diff | speedup vs the fastest dense attention |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        grid = "x".join(map(str, r["grid"]))
        lines.append(
            f"| {r['family']} | {r['description']} | {grid} + {r['text_tokens']} = {r['tokens']} "
            f"| {r['layers']} of {r['full_depth']} | {r['window']} / {r['stride']} ({r['order']}) | {r['block_density']:.3f} "
            f"({r['grid_block_density']:.3f}) | {r['dense_ms']:.1f} | {r['patched_ms']:.1f} | {r['speedup']:.2f}x "
            f"| {r['attention']['speedup']:.2f}x | {1 / r['block_density']:.2f}x | {r['rel_l2']:.3f} "
            f"| {r['speedup_vs_fastest_dense']:.2f}x |")
    lines += [
        "",
        "| family | attention [B,H,S,D] | SDPA ms | op ms | kernel ms | op speedup | kernel speedup | ideal 1/d "
        "| attention share of dense forward | predicted patched ms | measured patched ms | all calls sparse "
        "| family s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["attention"]
        lines.append(
            f"| {r['family']} | {a['shape_bhsd']} | {a['sdpa_ms']:.2f} | {a['op_ms']:.2f} | {a['kernel_ms']:.2f} "
            f"| {a['speedup']:.2f}x | {a['kernel_speedup']:.2f}x | {a['ideal']:.2f}x | {r['attention_share']:.2f} "
            f"| {r['predicted_patched_ms']:.1f} | {r['patched_ms']:.1f} "
            f"| {'yes' if r['all_sparse'] else 'NO: ' + r['stats']} | {r['elapsed_s']:.0f} | {r['peak_gib']} |")
    return "\n".join(lines)


NOTES = f"""\
- Random weights: attention is near-uniform, so the rel L2 difference of the transformer outputs
  (||out_sparse - out_dense|| / ||out_dense||) is large and says nothing about quality; that needs real
  weights and a searched profile.
- Block density d: computed 64 x 128 blocks over all blocks of the layout the model runs (text tokens
  dense in every head; grid tokens in tiles of `default_tile` unless raster order needs about as
  few blocks, `layout.grid_order`, as the runtime picks); in parentheses the grid tokens alone. The
  window (NATTEN neighbourhood, stride 1) is the largest on a cubic path in tile units with d <= the
  target in tile order.
- Forward: `torch.no_grad()`, batch 1, the same inputs dense and patched; {WARMUP} warm-up calls, then the
  median of the timed calls, each between CUDA events and a synchronize. Dense = diffusers' default
  `F.scaled_dot_product_attention` (cuDNN on Hopper). Layers trimmed below the full depth keep every
  per-layer shape (HunyuanVideo: 1/3 dual-stream, 2/3 single-stream blocks, all attending the same
  sequence); the full model repeats them. HunyuanVideo's forward passes a text-padding mask: dense
  SDPA then runs the backend that takes a mask, the patched op applies it as key padding.
- Attention alone: one call at the served layer shape on fresh random q/k/v `[B, H, S, D]` views of
  `[B, S, H, D]` memory, no padding mask; SDPA vs `torch.ops.autosparse.attention` (what the patched
  model runs per call: layout lookup, k/v permuted into tiles (tile order only), the block-sparse
  kernel reading q and writing the output in the model's order) vs the kernel alone on pre-permuted
  inputs (op - kernel: the k/v permutations, the q/out row gather, host time); the two outputs are
  checked equal (max abs difference reported). Median of {ATTENTION_REPS} after {WARMUP} warm-up calls.
- Predicted patched ms = dense forward - served calls x (SDPA ms - op ms): the rest of the forward
  (projections, MLPs, norms, RoPE) is unchanged, so the end-to-end speedup is bounded by the
  attention share of the dense forward (Amdahl), not by 1/d.
- Speedup vs the fastest dense attention: the dense forward with each served call's SDPA time
  replaced by FA4 dense's at the same shape (measured in the same run, attention alone; where FA4 is
  not installed, SDPA's), over the patched forward: computed from measured times, not a separate run."""


def write(out: Path | None, env: dict[str, Any], rows: list[dict[str, Any]], skipped: list[str]) -> str:
    header = "\n".join(f"- {key}: {value}" for key, value in env.items())
    skipped_line = f"\n\nSkipped (over --budget-s): {', '.join(skipped)}" if skipped else ""
    markdown = f"{header}\n\n{tables(rows)}{skipped_line}\n\n{NOTES}\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "dit_e2e.md").write_text(markdown)
        (out / "dit_e2e.json").write_text(json.dumps({"environment": env, "rows": rows, "skipped": skipped},
                                                     indent=1))
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["wan", "hunyuan_video", "flux"], choices=list(REAL))
    parser.add_argument("--pattern", choices=["neighborhood", "tile"], default="neighborhood",
                        help="neighborhood: stride-1 window (choose_window); tile: stride = tile, full blocks "
                             "(autosparse.search.structural.tile_window, as the shipped profiles)")
    parser.add_argument("--density", type=float, default=0.125, help="target block density (largest window <= it)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed forward calls per variant, median (default 3; --smoke: 1)")
    parser.add_argument("--layers", type=int, default=None, help="depth for every family (default: per family)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip families not started after this")
    parser.add_argument("--out", type=Path, default=None, help="folder for dit_e2e.json and dit_e2e.md")
    parser.add_argument("--compile", action="store_true",
                        help="compile_repeated_blocks() (inductor) before timing, dense and patched alike")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU in float32: exercise the code")
    args = parser.parse_args()
    if args.reps is None:
        args.reps = 1 if args.smoke else 3

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    env = environment(device)
    log(json.dumps(env))
    begin = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for family in args.families:
        if time.perf_counter() - begin > args.budget_s:
            skipped.append(family)
            log(f"{family}: skipped, {time.perf_counter() - begin:.0f} s > --budget-s {args.budget_s:.0f}")
            continue
        start = time.perf_counter()
        log(f"{family}:")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = run_family(family, args, device, dtype)
        row["elapsed_s"] = time.perf_counter() - start
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else "-"
        log(f"  {family}: {row['elapsed_s']:.1f} s, peak memory {row['peak_gib']} GiB")
        rows.append(row)
        gc.collect()  # the model went out of scope with run_family: free its memory before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(args.out, env, rows, skipped)
    log(write(args.out, env, rows, skipped))
    log(f"total {time.perf_counter() - begin:.1f} s")


if __name__ == "__main__":
    main()
