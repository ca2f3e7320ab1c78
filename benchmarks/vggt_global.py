"""VGGT global attention, dense SDPA vs autosparse's dynamic patterns (block_topk, block_cdf).

    PYTHONUNBUFFERED=1 python3 benchmarks/vggt_global.py --out $OUT                 # H200, bf16, 100 frames
    python3 benchmarks/vggt_global.py --frames 2 --size 56 --rounds 2 --out /tmp/vggt  # CPU smoke, float32

VGGT-1B's global attention attends all frames at once: per frame 1 camera + 4 register tokens, then
(size/14)² patches (518 px: 37x37 = 1369, 1374 tokens a frame; 100 frames: 137,400 tokens), 16 heads
of 64. The VGGT-architecture model is ``examples/vggt_model.py`` (random weights), served by its
structure (``autosparse.models.families``: global attention only, frame specials dense).

1. Attention alone, one global call: q/k with cross-view matches (``structured_qkv``: every frame
   sees one smooth scene of feature vectors shifted by its own offset, q and k with independent
   noise, so patch p of frame f matches the patches near p + offset_f - offset_g of every frame g
   as well as its own; special tokens random).
   Dense = ``F.scaled_dot_product_attention`` (default backend) on the same tensors; autosparse =
   ``torch.ops.autosparse.attention`` for the global attention layer of a 1-round aggregator patched
   with ``Profile.uniform(model, spec)``: what a patched model runs per call (the estimate from q/k,
   the layout, K/V permuted into the kernel's order, the block-sparse kernel). Reported: ms of both,
   speedup = dense / autosparse, the block density of the layout, the output's relative L2 error.
2. The whole aggregator (``--rounds`` of frame + global attention, default all 24) on ``--frames``
   images, dense vs patched, with each global block's key projection set equal to its query
   projection (a documented choice: random weights have no cross-view structure; q = k makes global
   attention a similarity search, so the pooled estimate has something to select) and ``--qk-gain``
   on the q/k norms (sharper attention), and LayerScale ``--init-values`` 1 (VGGT initialises 0.01;
   at 0.01 random weights leave the residual stream almost untouched by attention, so the output
   error would say nothing). Images: one smooth random scene, every frame a crop at its own offset
   (multiples of the patch size) plus noise. Reported: ms, speedup, relative L2 error of
   the last round's tokens, and that every global call ran sparse.

Timing: ``autosparse.tools.timing.median_ms`` (CUDA events around each call, then a synchronize: host
work such as building the layout counts), warm-up calls first. On a CPU the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import autosparse  # noqa: E402
from autosparse import capture  # noqa: E402
from autosparse.patch import patch_of  # noqa: E402
from autosparse.patterns import pattern_from_spec  # noqa: E402
from autosparse.runtime import ORIGINAL_SDPA, plan_of  # noqa: E402
from autosparse.tools.timing import median_ms  # noqa: E402
from examples.vggt_model import Aggregator  # noqa: E402

SPECIALS = 5  # 1 camera + 4 register tokens per frame
PATCH = 14


def log(*parts: Any) -> None:
    print(*parts, flush=True)


def specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    return ([{"kind": "block_topk", "k": k} for k in args.topk]
            + [{"kind": "block_cdf", "mass": m} for m in args.mass])


def label(spec: dict[str, Any]) -> str:
    return pattern_from_spec(spec).short_str()


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


# -- inputs --------------------------------------------------------------------------------------------


def structured_qkv(frames: int, side: int, heads: int, head_dim: int, *, shift: int, noise: float,
                   sharpness: float, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """q, k, v ``[1, H, S, D]`` (views of ``[1, S, H, D]`` memory, as VGGT's attention makes them) in
    VGGT's global order, S = frames x (5 + side²).

    Per head a smooth random scene of ``(side + shift)²`` unit feature vectors; frame f's patch
    (r, c) sees the scene at (r, c) + offset_f (offsets uniform in ``[0, shift]²``). q and k add
    independent noise of norm about ``noise`` to it, are normalised and scaled so that a pair seeing
    the same scene point scores about ``sharpness / (1 + noise²)`` (softmax logits) and unrelated
    pairs about 0: a patch's own key is no better than its matches in the other frames, so the
    attention mass is spread over every frame. Special tokens and v are random."""
    gen = torch.Generator(device).manual_seed(seed)
    scene = torch.randn(heads, head_dim, side + shift, side + shift, generator=gen, device=device)
    scene = F.normalize(F.avg_pool2d(scene, 3, stride=1, padding=1), dim=1)  # neighbours look alike
    offsets = torch.randint(0, shift + 1, (frames, 2), generator=gen, device=device)
    rows = torch.arange(side, device=device)[None, :, None] + offsets[:, 0, None, None]  # [S, side, 1]
    cols = torch.arange(side, device=device)[None, None, :] + offsets[:, 1, None, None]  # [S, 1, side]
    seen = scene[:, :, rows, cols].permute(2, 3, 4, 0, 1).reshape(frames, side * side, heads, head_dim)
    gain = math.sqrt(sharpness * math.sqrt(head_dim))

    def features() -> torch.Tensor:
        patches = seen + noise / math.sqrt(head_dim) * torch.randn(seen.shape, generator=gen, device=device)
        specials = torch.randn(frames, SPECIALS, heads, head_dim, generator=gen, device=device)
        tokens = torch.cat([specials, patches], dim=1).reshape(1, -1, heads, head_dim)
        return F.normalize(tokens, dim=-1) * gain

    q, k = features(), features()
    v = torch.randn(q.shape, generator=gen, device=device)
    return tuple(x.to(dtype).transpose(1, 2) for x in (q, k, v))


def scene_images(frames: int, size: int, *, shift: int, noise: float, device: torch.device, seed: int = 0):
    """``[1, frames, 3, size, size]`` in [0, 1]: crops of one smooth random scene at per-frame offsets
    (multiples of the patch size, up to ``shift`` patches), plus noise."""
    gen = torch.Generator(device).manual_seed(seed)
    extent = size + shift * PATCH
    scene = F.avg_pool2d(torch.randn(1, 3, extent, extent, generator=gen, device=device), 9, stride=1, padding=4)
    offsets = torch.randint(0, shift + 1, (frames, 2), generator=gen, device=device).tolist()
    crops = torch.stack([scene[0, :, y * PATCH:y * PATCH + size, x * PATCH:x * PATCH + size] for y, x in offsets])
    crops = crops + noise * torch.randn(crops.shape, generator=gen, device=device)
    return torch.sigmoid(3 * crops)[None]


def aggregator(rounds: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
               qk_gain: float | None = None, init_values: float = 0.01) -> Aggregator:
    """VGGT's aggregator at ``rounds`` rounds (random weights). With ``qk_gain``, every global block's
    key projection equals its query projection and both q/k norms are scaled by ``qk_gain``."""
    torch.manual_seed(0)
    model = Aggregator(embed_dim=heads * head_dim, depth=rounds, num_heads=heads, init_values=init_values)
    if qk_gain is not None:
        with torch.no_grad():
            for block in model.global_blocks:
                attn, dim = block.attn, heads * head_dim
                attn.qkv.weight[dim:2 * dim] = attn.qkv.weight[:dim]
                attn.qkv.bias[dim:2 * dim] = attn.qkv.bias[:dim]
                for norm in (attn.q_norm, attn.k_norm):
                    norm.weight.fill_(qk_gain)
                    norm.bias.zero_()
    return model.to(device=device, dtype=dtype).eval()


# -- 1. one global attention call ------------------------------------------------------------------------


def attention_alone(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    side = args.size // PATCH
    q, k, v = structured_qkv(args.frames, side, args.heads, args.head_dim, shift=args.shift, noise=args.noise,
                             sharpness=args.sharpness, device=device, dtype=dtype)
    log(f"attention alone: [B, H, S, D] = {list(q.shape)}, {dtype}")
    dense_out = ORIGINAL_SDPA(q, k, v)
    dense_ms = median_ms(lambda: ORIGINAL_SDPA(q, k, v), args.reps, device)
    log(f"  dense SDPA: {dense_ms:.2f} ms")
    model = aggregator(1, args.heads, args.head_dim, device, dtype)
    layer_module = model.global_blocks[0].attn
    images = torch.empty(1, args.frames, 3, args.size, args.size, device="meta")  # the geometry reads its shape
    rows = []
    for spec in specs(args):
        autosparse.patch_model(model, autosparse.Profile.uniform(model, spec), strict=True)
        try:
            state = patch_of(model).state
            capture.CallReader(model, state)(model, (images,), {})  # this call's geometry, as a forward sets it
            layer = getattr(layer_module, capture.LAYER_ATTR)

            def op() -> torch.Tensor:
                return torch.ops.autosparse.attention(q, k, v, layer, None, False, None)

            out = op()
            ms = median_ms(op, args.reps, device)
            density = served_density(layer, op)
            calls = autosparse.stats(model)
        finally:
            autosparse.unpatch_model(model)
        all_sparse = calls.sparse == calls.total
        row = {"spec": spec, "pattern": label(spec), "ms": ms, "speedup": dense_ms / ms, "block_density": density,
               "rel_l2": rel_l2(out, dense_out), "all_sparse": all_sparse, "stats": str(calls)}
        log(f"  {row['pattern']}: {ms:.2f} ms ({row['speedup']:.2f}x), density {density:.3f}, "
            f"rel L2 {row['rel_l2']:.3g}{'' if all_sparse else ' !!! NOT ALL SPARSE: ' + row['stats']}")
        rows.append(row)
    return {"shape_bhsd": list(q.shape), "tokens_per_frame": SPECIALS + side * side, "dense_ms": dense_ms,
            "rows": rows}


def served_density(layer: torch.Tensor, op) -> float:
    """Block density of the layout one more call of ``op`` is served with (the plan's per-call layout,
    recorded by wrapping it on this plan instance for that call)."""
    plan, layouts = plan_of(layer), []
    estimate = plan.dynamic_layout
    plan.dynamic_layout = lambda *a, **kw: layouts.append(estimate(*a, **kw)) or layouts[-1]
    try:
        op()
    finally:
        del plan.dynamic_layout  # back to the class's method
    return layouts[-1].density()


# -- 2. the whole aggregator -----------------------------------------------------------------------------


def whole_aggregator(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    model = aggregator(args.rounds, args.heads, args.head_dim, device, dtype, qk_gain=args.qk_gain,
                       init_values=args.init_values)
    images = scene_images(args.frames, args.size, shift=args.shift, noise=args.image_noise, device=device).to(dtype)
    log(f"aggregator: {args.rounds} rounds, {args.frames} frames of {args.size} px, {dtype}")

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(images)[0][-1]

    dense_out = forward()
    dense_ms = median_ms(forward, args.e2e_reps, device, warmup=1)
    log(f"  dense: {dense_ms:.1f} ms")
    rows = []
    for spec in specs(args):
        autosparse.patch_model(model, autosparse.Profile.uniform(model, spec), strict=True)
        try:
            out = forward()
            ms = median_ms(forward, args.e2e_reps, device, warmup=1)
            calls = autosparse.stats(model)
        finally:
            autosparse.unpatch_model(model)
        all_sparse = calls.sparse == calls.total == (2 + args.e2e_reps) * args.rounds
        row = {"spec": spec, "pattern": label(spec), "ms": ms, "speedup": dense_ms / ms,
               "rel_l2_last_round": rel_l2(out, dense_out), "all_sparse": all_sparse, "stats": str(calls)}
        log(f"  {row['pattern']}: {ms:.1f} ms ({row['speedup']:.2f}x), rel L2 {row['rel_l2_last_round']:.3g}"
            f"{'' if all_sparse else ' !!! NOT ALL SPARSE: ' + row['stats']}")
        rows.append(row)
    return {"rounds": args.rounds, "frames": args.frames, "tokens": args.frames * (SPECIALS + (args.size // PATCH) ** 2),
            "dense_ms": dense_ms, "rows": rows}


def compiled_aggregator(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``--compile-rounds`` rounds under ``torch.compile``: inductor (dense) vs ``backend="autosparse"``
    with the first ``--topk`` block_topk profile."""
    model = aggregator(args.compile_rounds, args.heads, args.head_dim, device, dtype, qk_gain=args.qk_gain,
                       init_values=args.init_values)
    images = scene_images(args.frames, args.size, shift=args.shift, noise=args.image_noise, device=device).to(dtype)
    spec = {"kind": "block_topk", "k": args.topk[0]}
    times, outputs = {}, {}
    for name, options in (("inductor", None), ("autosparse", {"profile": autosparse.Profile.uniform(model, spec)})):
        torch._dynamo.reset()
        compiled = torch.compile(model) if options is None else torch.compile(model, backend="autosparse",
                                                                               options=options)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return compiled(images)[0][-1]

        outputs[name] = forward()
        times[name] = median_ms(forward, args.e2e_reps, device, warmup=1)
    calls = autosparse.stats(model)
    autosparse.unpatch_model(model)
    torch._dynamo.reset()
    row = {"rounds": args.compile_rounds, "pattern": label(spec), "inductor_ms": times["inductor"],
           "autosparse_ms": times["autosparse"], "speedup": times["inductor"] / times["autosparse"],
           "rel_l2_last_round": rel_l2(outputs["autosparse"], outputs["inductor"]), "stats": str(calls)}
    log(f"  compiled, {args.compile_rounds} rounds: inductor {row['inductor_ms']:.1f} ms, backend='autosparse' "
        f"{row['autosparse_ms']:.1f} ms ({row['speedup']:.2f}x), rel L2 {row['rel_l2_last_round']:.3g}, {calls}")
    return row


# -- report ----------------------------------------------------------------------------------------------


def tables(attention: dict[str, Any], whole: dict[str, Any] | None) -> str:
    lines = [f"Global attention alone, [B, H, S, D] = {attention['shape_bhsd']} "
             f"({attention['tokens_per_frame']} tokens a frame): dense SDPA {attention['dense_ms']:.2f} ms",
             "", "| pattern | autosparse ms | speedup | block density | rel L2 error | all sparse |",
             "|---|---:|---:|---:|---:|---|"]
    for r in attention["rows"]:
        lines.append(f"| {r['pattern']} | {r['ms']:.2f} | {r['speedup']:.2f}x | {r['block_density']:.3f} "
                     f"| {r['rel_l2']:.3g} | {'yes' if r['all_sparse'] else 'NO'} |")
    if whole is not None:
        lines += ["", f"Whole aggregator, {whole['rounds']} rounds, {whole['frames']} frames ({whole['tokens']} tokens "
                  f"in global attention): dense {whole['dense_ms']:.1f} ms", "",
                  "| pattern | patched ms | speedup | rel L2 error (last round) | all global calls sparse |",
                  "|---|---:|---:|---:|---|"]
        for r in whole["rows"]:
            lines.append(f"| {r['pattern']} | {r['ms']:.1f} | {r['speedup']:.2f}x | {r['rel_l2_last_round']:.3g} "
                         f"| {'yes' if r['all_sparse'] else 'NO: ' + r['stats']} |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    return {"date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)",
            "torch": torch.__version__, "command": shlex.join(["python3", *sys.argv])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=518, help="image side in px (a multiple of 14)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--compile-rounds", type=int, default=0,
                        help="part 3: this many rounds under torch.compile, inductor vs backend='autosparse' (0: skip)")
    parser.add_argument("--rounds", type=int, default=24, help="aggregator rounds in part 2 (VGGT-1B: 24; 0: skip)")
    parser.add_argument("--topk", type=int, nargs="*", default=[128, 256], help="block_topk k values")
    parser.add_argument("--mass", type=float, nargs="*", default=[0.3, 0.5, 0.9], help="block_cdf mass values")
    parser.add_argument("--shift", type=int, default=8, help="largest per-frame offset, in patches")
    parser.add_argument("--noise", type=float, default=0.5, help="part 1: q/k noise norm (scene vectors: unit)")
    parser.add_argument("--sharpness", type=float, default=30.0, help="part 1: logit of a matching pair")
    parser.add_argument("--qk-gain", type=float, default=2.0, help="part 2: q/k norm weight of global blocks")
    parser.add_argument("--image-noise", type=float, default=0.1, help="part 2: pixel noise per frame")
    parser.add_argument("--init-values", type=float, default=1.0, help="part 2: LayerScale init (VGGT: 0.01)")
    parser.add_argument("--reps", type=int, default=None, help="part 1 timed calls (default 10; CPU 1)")
    parser.add_argument("--e2e-reps", type=int, default=None, help="part 2 timed forwards (default 3; CPU 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for vggt_global.json and vggt_global.md")
    args = parser.parse_args()
    if args.size % PATCH:
        parser.error(f"--size must be a multiple of {PATCH}, got {args.size}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.reps = args.reps or (10 if device.type == "cuda" else 1)
    args.e2e_reps = args.e2e_reps or (3 if device.type == "cuda" else 1)
    env = environment(device)
    log(json.dumps(env))
    begin = time.perf_counter()
    attention = attention_alone(args, device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    whole = whole_aggregator(args, device, dtype) if args.rounds > 0 else None
    compiled = compiled_aggregator(args, device, dtype) if args.compile_rounds > 0 else None
    env["seconds"] = round(time.perf_counter() - begin, 1)
    if device.type == "cuda":
        env["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    markdown = "\n".join(f"- {key}: {value}" for key, value in env.items()) + "\n\n" + tables(attention, whole) + "\n"
    if compiled is not None:
        markdown += (f"\nUnder torch.compile, {compiled['rounds']} rounds, {compiled['pattern']}: inductor (dense) "
                     f"{compiled['inductor_ms']:.1f} ms, backend='autosparse' {compiled['autosparse_ms']:.1f} ms "
                     f"({compiled['speedup']:.2f}x), rel L2 {compiled['rel_l2_last_round']:.3g}, {compiled['stats']}\n")
    log(markdown)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vggt_global.md").write_text(markdown)
        (args.out / "vggt_global.json").write_text(json.dumps(
            {"environment": env, "arguments": {k: v for k, v in vars(args).items() if k != "out"},
             "attention": attention, "aggregator": whole, "compiled": compiled}, indent=1))


if __name__ == "__main__":
    main()
