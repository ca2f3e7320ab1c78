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

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autosparse.models import model_kind
from autosparse.profile import Profile
from autosparse.search.calibration import Calibration, InputRunner, output_tensor, widen_span
from autosparse.search.distributed import Share

__all__ = ["Reference", "chosen_trial", "fit_to_target", "heldout_error", "heldout_report", "profile_density"]


@dataclass
class Reference:
    """The dense model on the held-out inputs, computed once: per input the LLM's mean token loss,
    or the diffusion transformer's output. Split over processes (``share``), each holds its own
    inputs' only (None for the others')."""

    inputs: list[Any]
    dense: list[torch.Tensor | float | None]
    share: Share = Share()

    @classmethod
    def of(cls, model: nn.Module, inputs: Sequence[Any], share: Share = Share()) -> Reference:
        inputs = list(inputs)
        if not inputs:
            raise ValueError("validation needs at least one held-out input")
        share.check_same(inputs, "held-out inputs")
        return cls(inputs, _outputs(model, inputs, share), share)


def heldout_error(model: nn.Module, profile: Profile, reference: Reference) -> float:
    """LLM: patched perplexity / dense perplexity - 1 over all held-out windows (negative when
    sparse attention happens to help). Diffusion transformer: the largest relative L2 error of the
    output over the held-out steps."""
    return heldout_report(model, profile, reference)["error"]


def heldout_report(model: nn.Module, profile: Profile, reference: Reference) -> dict[str, Any]:
    """``heldout_error`` (``"error"``) with its spread: ``"per_input"``, the same measure on each
    held-out input alone (LLM: each window's perplexity change; diffusion: each step's error), and
    ``"lengths"``, the shortest and longest key length of the attention calls served. Split over
    the reference's processes, each runs its own inputs and every process returns the whole report."""
    from autosparse.patch import patch_model, patch_of, unpatch_model

    lengths: list[int] = []

    def note(plan, query, key, value, mask, causal, scale) -> None:
        lengths[:] = widen_span(lengths, [key.shape[2]] * 2)

    share, count = reference.share, len(reference.inputs)
    patch_model(model, profile)
    try:
        patch_of(model).state.observer = note
        patched = _outputs(model, reference.inputs, share)
    finally:
        unpatch_model(model)
    mine = share.indices(count)
    if model_kind(model).token_ids:  # per input: (patched, dense) mean token loss
        losses = share.by_input({i: (patched[i], reference.dense[i]) for i in mine}, count)
        per_input = [math.exp(p - d) - 1.0 for p, d in losses]
        error = math.exp(sum(p for p, _ in losses) / count - sum(d for _, d in losses) / count) - 1.0
    else:
        per_input = share.by_input({i: float((patched[i] - reference.dense[i]).norm() / reference.dense[i].norm())
                                    for i in mine}, count)
        error = max(per_input)
    return {"error": error, "per_input": per_input, "lengths": functools.reduce(widen_span, share.gather(lengths))}


def fit_to_target(calibration: Calibration, heldout: Sequence[Any], target: float, *, shrink: float = 0.7,
                  max_rounds: int = 12, refine: int = 2, heldout_note: str | None = None) -> Profile:
    """The profile under the largest budget found whose held-out error is at most ``target``.

    From the calibration's budget, times ``shrink`` per round until the target holds (or every head
    is dense), then ``refine`` rounds of bisection (geometric) between the last budget that missed
    and the first that held. Every round is one patched pass over ``heldout``; the rounds are
    recorded in ``profile.search["validation"]`` (``chosen``: the round of the profile returned;
    each round's ``per_input`` errors give the spread over the held-out inputs; ``heldout_note``:
    where the held-out inputs come from), with ``met`` false if no round held. The key lengths the
    held-out inputs reached become the profile's ``lengths["validated"]``. A calibration split over
    processes validates split the same way (every process calls this with the same ``heldout``)
    and every process returns the same profile."""
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"shrink must be in (0, 1), got {shrink!r}")
    model = calibration.model
    reference = Reference.of(model, heldout, calibration.share)
    trials: list[dict[str, float]] = []

    def attempt(budget: float) -> tuple[Profile, bool]:
        profile = calibration.profile(budget)
        report = heldout_report(model, profile, reference)
        per_input = report["per_input"]
        trials.append({"budget": round(budget, 6), "density": round(profile_density(profile), 4),
                       "error": round(report["error"], 6), "per_input": [round(e, 6) for e in per_input]})
        if report["lengths"]:
            lengths[:] = report["lengths"]
        return profile, report["error"] <= target

    lengths: list[int] = []
    missed, budget = None, calibration.config.budget
    chosen_round = None
    for _ in range(max_rounds):
        profile, held = attempt(budget)
        chosen_round = len(trials) - 1
        if held or trials[-1]["density"] >= 1.0:
            break
        missed, budget = budget, budget * shrink
    best, best_budget = (profile, budget) if held else (None, None)
    for _ in range(refine if held and missed is not None else 0):
        middle = math.sqrt(missed * best_budget)
        candidate, ok = attempt(middle)
        if ok:
            best, best_budget, chosen_round = candidate, middle, len(trials) - 1
        else:
            missed = middle
    chosen = best if best is not None else profile
    metric = ("perplexity change" if model_kind(model).token_ids
              else "relative L2 error of the transformer output, worst step")
    chosen.search["validation"] = {"metric": metric, "target": target, "heldout_inputs": len(reference.inputs),
                                   "met": best is not None, "chosen": chosen_round, "trials": trials,
                                   "margin": "per_input: the metric on each held-out input alone (min/max spread)",
                                   **({"heldout": heldout_note} if heldout_note else {})}
    if lengths:
        chosen.lengths = {**(chosen.lengths or {}), "validated": list(lengths)}
    return chosen


def chosen_trial(validation: dict[str, Any], budget: float | None = None) -> dict[str, Any]:
    """The validation round of the profile that was saved: ``validation["chosen"]``; in profiles
    from before it was recorded, the last round with the profile's ``budget`` (else the last round)."""
    trials = validation["trials"]
    index = validation.get("chosen")
    if isinstance(index, int) and 0 <= index < len(trials):
        return trials[index]
    same = [t for t in trials if budget is not None and t.get("budget") == round(budget, 6)]
    return same[-1] if same else trials[-1]


def profile_density(profile: Profile) -> float:
    """Mean block density the search measured over every head of every layer (dense heads: 1)."""
    densities = [m["density"] for layer in profile.layers.values() for m in layer.measured]
    return sum(densities) / len(densities)


@torch.inference_mode()
def _outputs(model: nn.Module, inputs: Sequence[Any], share: Share) -> list[torch.Tensor | float | None]:
    """Per input of this process: the LLM's mean token loss or the transformer's output (None for
    the other processes' inputs)."""
    token_ids = model_kind(model).token_ids
    run = InputRunner(model, inputs)
    outputs: list[torch.Tensor | float | None] = [None] * len(inputs)
    for i in share.indices(len(inputs)):
        output = output_tensor(run(i))
        outputs[i] = _mean_loss(output, inputs[i]) if token_ids else output.float()
    return outputs


def _mean_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    ids = ids.to(logits.device)
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))
