"""``autosparse bench``: a profile on this device: dense vs patched forward time and output error.

The inputs run in order as one sequence (a diffusion transformer's denoising steps count from the
timestep, so the patched run must see them as a generation would); times are medians over ``reps``
runs of the whole sequence, per forward; the error is the relative L2 difference of each output from
dense (LLM: the logits), its mean and worst over the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from autosparse.patch import patch_model, stats, unpatch_model
from autosparse.profile import Profile
from autosparse.search.calibration import output_tensor, run_model
from autosparse.tools.timing import median_ms

__all__ = ["bench"]


def bench(model: nn.Module, profile: Profile, inputs: Sequence[Any], *, reps: int = 3) -> dict[str, Any]:
    """Time and compare ``model`` dense and patched with ``profile`` on ``inputs``."""
    inputs = list(inputs)
    device = next(model.parameters()).device

    @torch.inference_mode()
    def run() -> list[torch.Tensor]:
        return [output_tensor(run_model(model, x)).float() for x in inputs]

    dense_ms = median_ms(run, reps, device, warmup=1) / len(inputs)
    dense = run()
    patch_model(model, profile)
    try:
        patched_ms = median_ms(run, reps, device, warmup=1) / len(inputs)
        stats(model, reset=True)
        patched = run()
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
