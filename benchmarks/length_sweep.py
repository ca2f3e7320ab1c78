"""Never slower, measured: prefill forward time dense vs patched from 1K to 128K tokens.

    python3 benchmarks/length_sweep.py --out $OUT          # H200: Llama-3.1-8B-shaped, 2 layers, bf16
    python3 benchmarks/length_sweep.py --quick             # CPU: tiny model, the code paths only

Per length (B=1, causal prefill, a uniform sink+local profile): the dense forward (SDPA); the
patched forward as users get it (``runtime.speed`` measures sparse vs dense once per length bucket
and runs the faster; the first patched forward, which pays that measurement, is reported apart);
and the patched forward with the rule off (``AUTOSPARSE_NEVER_SLOWER=0``: sparse wherever the
profile says). Break-even = the shortest length where forced sparse beats dense. Times are medians
of ``--reps`` forwards between CUDA events (``tools.timing.median_ms``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import autosparse
from autosparse import BlockGeometry, BlockLayout, Profile
from autosparse.kernels import tuning
from autosparse.models import attention_layers
from autosparse.runtime import plan as plans
from autosparse.runtime import speed
from autosparse.testing.llms import llama
from autosparse.tools.timing import median_ms

GPU_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
QUICK_LENGTHS = [128, 256, 512, 1024]


def _cpu_ms(fn) -> float:
    """A wall-clock stand-in for ``gpu_ms`` on the CPU (--quick: the measurement path runs)."""
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def sweep(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu" if args.quick else "cuda")
    if args.quick:  # no GPU: measure anyway, with the wall clock, so the rule's code runs
        speed.measuring = lambda _device: os.environ.get("AUTOSPARSE_NEVER_SLOWER", "1") != "0"
        tuning.gpu_ms = _cpu_ms
    model = llama(args.layers, tiny=args.quick, device=device)
    profile = Profile.uniform(model, {"kind": "sink_local", "sinks": args.sinks, "window": args.window})
    layer = attention_layers(model)[0]
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=device, generator=gen)

        def forward():
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        geometry = BlockGeometry(length, length, *profile.block_size, causal=True)
        density = BlockLayout.from_patterns(profile.layers[layer.name].heads, geometry, device).density()
        dense_ms = median_ms(forward, args.reps, device, 1)
        row = dict(length=length, density=density, dense_ms=dense_ms)
        for name, rule in (("patched", "1"), ("forced_sparse", "0")):
            os.environ["AUTOSPARSE_NEVER_SLOWER"] = rule
            speed.forget_verdicts()
            plans.clear_call_plans()
            autosparse.patch_model(model, profile)
            start = time.perf_counter()
            forward()  # builds the plans; with the rule on, measures sparse vs dense once
            if device.type == "cuda":
                torch.cuda.synchronize()
            row[f"{name}_first_s"] = time.perf_counter() - start
            row[f"{name}_ms"] = median_ms(forward, args.reps, device, 0)
            stats = autosparse.stats(model)
            row[f"{name}_calls"] = dict(sparse=stats.sparse, dense=dict(stats.dense), fallback=dict(stats.fallback))
            autosparse.unpatch_model(model)
        os.environ.pop("AUTOSPARSE_NEVER_SLOWER", None)
        row["patched_speedup"] = dense_ms / row["patched_ms"]
        row["forced_speedup"] = dense_ms / row["forced_sparse_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    shape = "tiny Llama (4 q / 2 kv heads, d=32), fp32, CPU" if args.quick else \
        "Llama-3.1-8B-shaped (32 q / 8 kv heads, d=128), bf16"
    lines = [f"{args.layers}-layer {shape}, sink_local(sinks={args.sinks}, window={args.window}), B=1 causal prefill",
             "", "| S | block density | dense ms | patched ms (never slower) | speedup | served as | first patched "
             "forward s | forced sparse ms | forced speedup |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        calls = r["patched_calls"]
        served = f"sparse {calls['sparse']}" if calls["sparse"] else ""
        served += "".join(f" dense {n} ({reason})" for reason, n in calls["dense"].items())
        lines.append(f"| {r['length']} | {r['density']:.3f} | {r['dense_ms']:.2f} | {r['patched_ms']:.2f} | "
                     f"{r['patched_speedup']:.2f}x | {served.strip()} | {r['patched_first_s']:.2f} | "
                     f"{r['forced_sparse_ms']:.2f} | {r['forced_speedup']:.2f}x |")
    faster = [r["length"] for r in rows if r["forced_speedup"] > 1.0]
    lines.append("")
    lines.append(f"Break-even (shortest length where forced sparse beats dense): {min(faster) if faster else 'none'}; "
                 f"slowest patched / dense: {min(r['patched_speedup'] for r in rows):.2f}x.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--sinks", type=int, default=64)
    parser.add_argument("--window", type=int, default=None, help="default: 2048 (GPU), 128 (--quick)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.lengths = args.lengths or (QUICK_LENGTHS if args.quick else GPU_LENGTHS)
    args.window = args.window or (128 if args.quick else 2048)
    if args.quick:
        args.sinks = min(args.sinks, 16)
    if not args.quick:
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    rows = sweep(args)
    text = markdown(rows, args)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "length_sweep.md").write_text(text)
        (args.out / "length_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
