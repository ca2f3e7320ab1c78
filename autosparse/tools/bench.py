"""``autosparse bench``: a profile on this device: dense vs patched forward time and output error.

The inputs run in order as one sequence (a diffusion transformer's denoising steps count from the
timestep, so the patched run must see them as a generation would); times are medians over ``reps``
runs of the whole sequence, per forward; the error is the relative L2 difference of each output from
dense (LLM: the logits), its mean and worst over the inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from autosparse.patch import patch_model, stats, unpatch_model
from autosparse.profile import Profile
from autosparse.search.calibration import output_tensor, run_model
from autosparse.tools.timing import median_ms

__all__ = ["bench"]


def bench(model: nn.Module, profile: Profile, inputs: Sequence[Any], *, reps: int = 3,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time and compare ``model`` dense and patched with ``profile`` on ``inputs``; ``progress``
    hears a line after every run (which, how long, about how long is left)."""
    inputs = list(inputs)
    device = next(model.parameters()).device
    total = 2 * (reps + 2)  # per side: one warm-up, ``reps`` timed, one for the outputs
    done: list[float] = []

    @torch.inference_mode()
    def run(side: str) -> list[torch.Tensor]:
        started = time.perf_counter()
        out = [output_tensor(run_model(model, x)).float() for x in inputs]
        done.append(time.perf_counter() - started)
        if progress is not None:
            left = (total - len(done)) * sum(done) / len(done)
            progress(f"  {side} run {len(done)}/{total}: {done[-1]:.1f}s (about {left:.0f}s left)")
        return out

    dense_ms = median_ms(lambda: run("dense"), reps, device, warmup=1) / len(inputs)
    dense = run("dense")
    patch_model(model, profile)
    try:
        patched_ms = median_ms(lambda: run("patched"), reps, device, warmup=1) / len(inputs)
        stats(model, reset=True)
        patched = run("patched")
        calls = stats(model)
    finally:
        unpatch_model(model)
    errors = [float((p - d).norm() / d.norm()) for p, d in zip(patched, dense)]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "inputs": len(inputs),
        "dense_ms": dense_ms,
        "patched_ms": patched_ms,
        "speedup": dense_ms / patched_ms,
        "mean_error": sum(errors) / len(errors),
        "max_error": max(errors),
        "stats": str(calls),
    }
