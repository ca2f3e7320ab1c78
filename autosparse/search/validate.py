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

from autosparse.models import model_kind
from autosparse.profile import Profile
from autosparse.search.calibration import Calibration, output_tensor, run_model

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
    if model_kind(model).token_ids:
        return math.exp(sum(patched) / len(patched) - sum(reference.dense) / len(reference.dense)) - 1.0
    return max(float((p - d).norm() / d.norm()) for p, d in zip(patched, reference.dense))


def fit_to_target(calibration: Calibration, heldout: Sequence[Any], target: float, *, shrink: float = 0.7,
                  max_rounds: int = 12, refine: int = 2) -> Profile:
    """The profile under the largest budget found whose held-out error is at most ``target``.

    From the calibration's budget, times ``shrink`` per round until the target holds (or every head
    is dense), then ``refine`` rounds of bisection (geometric) between the last budget that missed
    and the first that held. Every round is one patched pass over ``heldout``; the rounds are
    recorded in ``profile.search["validation"]``, with ``met`` false if no round held."""
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"shrink must be in (0, 1), got {shrink!r}")
    model = calibration.model
    reference = Reference.of(model, heldout)
    trials: list[dict[str, float]] = []

    def attempt(budget: float) -> tuple[Profile, bool]:
        profile = calibration.profile(budget)
        error = heldout_error(model, profile, reference)
        trials.append({"budget": round(budget, 6), "density": round(profile_density(profile), 4),
                       "error": round(error, 6)})
        return profile, error <= target

    missed, budget = None, calibration.config.budget
    for _ in range(max_rounds):
        profile, held = attempt(budget)
        if held or trials[-1]["density"] >= 1.0:
            break
        missed, budget = budget, budget * shrink
    best, best_budget = (profile, budget) if held else (None, None)
    for _ in range(refine if held and missed is not None else 0):
        middle = math.sqrt(missed * best_budget)
        candidate, ok = attempt(middle)
        if ok:
            best, best_budget = candidate, middle
        else:
            missed = middle
    chosen = best if best is not None else profile
    metric = ("perplexity change" if model_kind(model).token_ids
              else "relative L2 error of the transformer output, worst step")
    chosen.search["validation"] = {"metric": metric, "target": target, "heldout_inputs": len(reference.inputs),
                                   "met": best is not None, "trials": trials}
    return chosen


def profile_density(profile: Profile) -> float:
    """Mean block density the search measured over every head of every layer (dense heads: 1)."""
    densities = [m["density"] for layer in profile.layers.values() for m in layer.measured]
    return sum(densities) / len(densities)


@torch.inference_mode()
def _outputs(model: nn.Module, inputs: Sequence[Any]) -> list[torch.Tensor | float]:
    if model_kind(model).token_ids:
        return [_mean_loss(output_tensor(run_model(model, x)), x) for x in inputs]
    return [output_tensor(run_model(model, x)).float() for x in inputs]


def _mean_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    ids = ids.to(logits.device)
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))
