"""End-to-end validation of a profile on held-out inputs, and tightening until it holds.

The search bounds each head's attention-output error on sampled calibration rows; what a user sees
is the model's output. ``heldout_error`` measures that: for an LLM the relative perplexity change on
held-out token windows, for a diffusion transformer the relative L2 error of the transformer's output
against dense, worst over the denoising steps given (run in order, as one generation).
``fit_to_target`` lowers the per-head budget and re-chooses from the calibration (no new
calibration pass): each round the heads whose calibration error is largest are the ones that go
denser, until the end-to-end error is within the target or every head is dense.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autosparse.models import library
from autosparse.profile import Profile
from autosparse.search import Calibration, run_model

__all__ = ["Reference", "fit_to_target", "heldout_error", "profile_density"]


@dataclass
class Reference:
    """The dense model on the held-out inputs, computed once: per input the LLM's mean token loss,
    or the diffusion transformer's output."""

    inputs: list[Any]
    dense: list[torch.Tensor | float]

    @classmethod
    def of(cls, model: nn.Module, inputs: Sequence[Any]) -> Reference:
        inputs = list(inputs)
        if not inputs:
            raise ValueError("validation needs at least one held-out input")
        return cls(inputs, _outputs(model, inputs))


def heldout_error(model: nn.Module, profile: Profile, reference: Reference) -> float:
    """LLM: patched perplexity / dense perplexity - 1 over all held-out windows (negative when
    sparse attention happens to help). Diffusion transformer: the largest relative L2 error of the
    output over the held-out steps."""
    from autosparse.patch import patch_model, unpatch_model

    patch_model(model, profile)
    try:
        patched = _outputs(model, reference.inputs)
    finally:
        unpatch_model(model)
    if library(model) == "transformers":
        return math.exp(sum(patched) / len(patched) - sum(reference.dense) / len(reference.dense)) - 1.0
    return max(float((p - d).norm() / d.norm()) for p, d in zip(patched, reference.dense))


def fit_to_target(calibration: Calibration, heldout: Sequence[Any], target: float, *, shrink: float = 0.7,
                  max_rounds: int = 12) -> Profile:
    """The profile under the largest budget (from the calibration's, times ``shrink`` per round)
    whose held-out error is at most ``target``; the rounds are recorded in
    ``profile.search["validation"]``, with ``met`` false if even the last round missed."""
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"shrink must be in (0, 1), got {shrink!r}")
    model = calibration.model
    reference = Reference.of(model, heldout)
    budget = calibration.config.budget
    trials = []
    for _ in range(max_rounds):
        profile = calibration.profile(budget)
        error = heldout_error(model, profile, reference)
        density = profile_density(profile)
        trials.append({"budget": round(budget, 6), "density": round(density, 4), "error": round(error, 6)})
        if error <= target or density >= 1.0:
            break
        budget *= shrink
    metric = ("perplexity change" if library(model) == "transformers"
              else "relative L2 error of the transformer output, worst step")
    profile.search["validation"] = {"metric": metric, "target": target, "heldout_inputs": len(reference.inputs),
                                    "met": trials[-1]["error"] <= target, "trials": trials}
    return profile


def profile_density(profile: Profile) -> float:
    """Mean block density the search measured over every head of every layer (dense heads: 1)."""
    densities = [m["density"] for layer in profile.layers.values() for m in layer.measured]
    return sum(densities) / len(densities)


@torch.inference_mode()
def _outputs(model: nn.Module, inputs: Sequence[Any]) -> list[torch.Tensor | float]:
    if library(model) == "transformers":
        return [_mean_loss(run_model(model, x).logits, x) for x in inputs]
    return [_first_tensor(run_model(model, x)).float() for x in inputs]


def _mean_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    ids = ids.to(logits.device)
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))


def _first_tensor(output: Any) -> torch.Tensor:
    """A diffusers transformer's output tensor (``.sample``, or the first element of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]
