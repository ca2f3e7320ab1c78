"""``torch.compile(model, backend="autosparse")`` against the other ways to run the same model, in one command.

    PYTHONUNBUFFERED=1 python3 benchmarks/compile_backend.py --out $OUT      # H200, bf16, Wan2.1-1.3B 480p/81f
    python3 benchmarks/compile_backend.py --smoke                              # CPU, tiny Wan, float32: code paths only

One random-weight Wan2.1-T2V-1.3B-shaped transformer (``autosparse.testing.dits``, 30 layers, latent 21x60x104
-> 32,760 tokens) and one profile: the shipped ``wan2.1-t2v-1.3b-480p`` profile (a tile-stepped
neighborhood on every head, block density ~0.20) without its dense-first-steps schedule, so every
timed call is a sparse step. The transformer forward (``torch.no_grad()``, same inputs) is timed:

1. eager, dense (SDPA: cuDNN on Hopper);
2. ``torch.compile`` (inductor), dense;
3. eager, ``autosparse.patch_model``;
4. ``backend="autosparse"`` with the profile (inductor compiles the rest of each block);

each compiled one way, ``--compile regional`` (default: ``compile_repeated_blocks``, what diffusers
recommends; one block graph) or ``whole`` (the whole transformer, one graph). 2 warm-up calls, then
the median of ``--reps`` calls between CUDA events. ``autosparse.stats`` must show every served call
sparse; the outputs of 3 and 4 are compared (relative L2) and both against dense (random weights:
meaningless for quality). Writes ``compile_backend.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
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
from autosparse.testing.dits import build_dit  # noqa: E402
from autosparse.models import attention_layers  # noqa: E402
from autosparse.tools.timing import median_ms  # noqa: E402

WARMUP = 2
PROFILE = REPO_ROOT / "profiles" / "wan2.1-t2v-1.3b-480p.json"


def log(*parts: Any) -> None:
    print(*parts, flush=True)


def forward(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def compiled(model: torch.nn.Module, how: str, **kwargs: Any) -> torch.nn.Module:
    """``model`` compiled ``how`` ("regional": its repeated blocks, in place; "whole": one graph)."""
    if how == "regional":
        model.compile_repeated_blocks(**kwargs)
        return model
    return torch.compile(model, **kwargs)


def uncompile(model: torch.nn.Module) -> None:
    torch._dynamo.reset()
    for module in model.modules():
        module._compiled_call_impl = None


def profile_for(model: torch.nn.Module, smoke: bool) -> autosparse.Profile:
    """The shipped profile without its dense steps (smoke: the same kind of window on the tiny model)."""
    if smoke:
        return autosparse.Profile.uniform(model, {"kind": "neighborhood", "window": [1, 3, 3]}, block_size=(16, 32))
    return dataclasses.replace(autosparse.Profile.load(PROFILE), steps=())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", choices=["regional", "whole"], default="regional")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per mode (default 10; smoke 1)")
    parser.add_argument("--layers", type=int, default=None, help="depth (default: all 30)")
    parser.add_argument("--out", type=Path, default=None, help="folder for compile_backend.json and .md")
    parser.add_argument("--smoke", action="store_true", help="tiny Wan on the CPU in float32")
    parser.add_argument("--kernels", action="store_true",
                        help="also profile 2 calls of each compiled mode: GPU time per kernel, per call")
    args = parser.parse_args()
    reps = args.reps or (1 if args.smoke else 10)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    dit = build_dit("wan", "tiny" if args.smoke else "real", device=device, dtype=dtype, layers=args.layers,
                    **({"frames": 2, "height": 32, "width": 96} if args.smoke else {}))
    model, inputs = dit.model, dit.inputs()
    profile = profile_for(model, args.smoke)
    served = len(attention_layers(model))
    log(f"{dit.description}; {served} served attention layers; profile {profile.search.get('pattern')}, "
        f"block density {profile.search.get('block_density')}; compile: {args.compile}")

    rows: list[dict[str, Any]] = []
    outputs: dict[str, torch.Tensor] = {}

    def run(name: str, model_to_run: torch.nn.Module, patched: bool = False) -> None:
        begin = time.perf_counter()
        outputs[name] = forward(model_to_run, inputs).float()  # the first call compiles
        first_s = time.perf_counter() - begin
        if patched:
            autosparse.stats(model, reset=True)
        ms = median_ms(lambda: forward(model_to_run, inputs), reps, device, WARMUP)
        row = {"mode": name, "ms": ms, "first_call_s": first_s}
        if patched:
            calls = autosparse.stats(model, reset=True)
            expected = (WARMUP + reps) * served
            row["stats"] = str(calls)
            row["all_sparse"] = calls.sparse == expected and not calls.dense and not calls.fallback
            if not row["all_sparse"]:
                log(f"  !!! NOT ALL SPARSE: expected sparse={expected}, got {calls} !!!")
        rows.append(row)
        log(f"  {name}: {ms:.1f} ms (first call {first_s:.1f} s) {row.get('stats', '')}")

    run("eager dense (SDPA)", model)
    kernels: dict[str, list[tuple[str, float]]] = {}
    dense_compiled = compiled(model, args.compile)
    run("inductor dense", dense_compiled)
    if args.kernels:
        kernels["inductor dense"] = kernel_times(lambda: forward(dense_compiled, inputs))
    uncompile(model)
    model = dit.model
    autosparse.patch_model(model, profile)
    run("eager patch_model", model, patched=True)
    autosparse.unpatch_model(model)
    backend = compiled(model, args.compile, backend="autosparse", options={"profile": profile})
    run("backend=autosparse", backend, patched=True)
    if args.kernels:
        kernels["backend=autosparse"] = kernel_times(lambda: forward(backend, inputs))
    autosparse.unpatch_model(model)
    uncompile(model)

    base = {row["mode"]: row["ms"] for row in rows}
    dense_out = outputs["eager dense (SDPA)"]

    def rel(a: str, b: torch.Tensor) -> float:
        return float((outputs[a] - b).norm() / b.norm())

    for row in rows:
        row["speedup_vs_eager_dense"] = base["eager dense (SDPA)"] / row["ms"]
        row["speedup_vs_inductor_dense"] = base["inductor dense"] / row["ms"]
        row["rel_l2_vs_dense"] = rel(row["mode"], dense_out)
    backend_vs_patch = rel("backend=autosparse", outputs["eager patch_model"])
    log(f"  backend vs eager patch_model: rel L2 {backend_vs_patch:.2e}")

    env = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": _version("triton"), "diffusers": _version("diffusers"),
        "command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": dit.description, "served_layers": served, "compile": args.compile, "reps": reps,
        "profile": {"source": "tiny uniform" if args.smoke else PROFILE.name + " without dense steps",
                    "pattern": profile.search.get("pattern"), "block_density": profile.search.get("block_density")},
        "backend_vs_patch_model_rel_l2": backend_vs_patch,
        "kernels_ms_per_call": kernels,
    }
    table = ["| mode | forward ms | vs eager dense | vs inductor dense | first call s | rel L2 vs dense |",
             "|---|---:|---:|---:|---:|---:|"]
    table += [f"| {r['mode']} | {r['ms']:.1f} | {r['speedup_vs_eager_dense']:.2f}x | "
              f"{r['speedup_vs_inductor_dense']:.2f}x | {r['first_call_s']:.1f} | {r['rel_l2_vs_dense']:.3f} |"
              for r in rows]
    for mode, ranked in kernels.items():
        table += ["", f"| {mode}: kernel | ms per call |", "|---|---:|"]
        table += [f"| {name[:90]} | {ms:.2f} |" for name, ms in ranked]
    text = "\n".join(table)
    log(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compile_backend.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        (args.out / "compile_backend.md").write_text(f"{json.dumps(env, indent=1)}\n\n{text}\n")


def kernel_times(call, calls: int = 2, top: int = 15) -> list[tuple[str, float]]:
    """GPU time per kernel name over ``calls`` calls (torch.profiler), per call, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.key] = totals.get(event.key, 0.0) + event.device_time_total / 1e3 / calls
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return ranked[:top] + [("(all kernels)", sum(totals.values()))]


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
