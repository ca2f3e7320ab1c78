"""End-to-end validation: the held-out error is what patching really does to the output, and
tightening lowers the budget until the target holds (or every head is dense)."""

import math

import pytest
import torch

import autosparse
from autosparse.testing.dits import build_dit
from autosparse.tools.evaluate import perplexity
from autosparse.search.calibration import SearchConfig, calibrate
from autosparse.search.validate import Reference, fit_to_target, heldout_error, profile_density

from conftest import tiny_llama


def _ids(seed, length=384):
    return torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(seed))


def test_llm_heldout_error_is_the_perplexity_change():
    model = tiny_llama()
    calibration = calibrate(model, [_ids(0)], SearchConfig(budget=0.5, block_size=(32, 16), windows=(16, 32, 64),
                                                           query_rows=64), progress=False)
    profile = calibration.profile()
    assert profile_density(profile) < 1.0
    heldout = [_ids(1), _ids(2)]
    error = heldout_error(model, profile, Reference.of(model, heldout))
    dense = [perplexity(model, ids) for ids in heldout]
    autosparse.patch_model(model, profile)
    patched = [perplexity(model, ids) for ids in heldout]
    autosparse.unpatch_model(model)
    geometric = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))  # noqa: E731
    assert error == pytest.approx(geometric(patched) / geometric(dense) - 1.0, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", ["llm", "dit"])
def test_fit_to_target_tightens_until_the_target_holds(kind):
    if kind == "llm":
        model = tiny_llama()
        config = SearchConfig(budget=0.8, block_size=(32, 16), windows=(16, 32, 64), query_rows=64)
        calibration, heldout = calibrate(model, [_ids(0)], config, progress=False), [_ids(1)]
    else:
        dit = build_dit("wan", frames=2, height=32, width=96)
        model = dit.model
        config = SearchConfig(budget=0.8, block_size=(16, 32), densities=(0.1, 0.2, 0.4), query_rows=64)
        steps = [dit.inputs(timestep=t) for t in (900.0, 600.0)]
        calibration, heldout = calibrate(model, steps, config, progress=False), steps
    loose = heldout_error(model, calibration.profile(), Reference.of(model, heldout))
    target = loose / 3  # the calibration's own budget misses it
    profile = fit_to_target(calibration, heldout, target)
    validation = profile.search["validation"]
    trials = validation["trials"]
    assert len(trials) > 1 and trials[0]["error"] == pytest.approx(loose, abs=1e-6)
    held = [t for t in trials if t["error"] <= target]
    assert validation["met"] == bool(held)
    assert validation["met"] or trials[-1]["density"] == 1.0
    # The chosen budget is the largest that held, and every larger budget tried missed.
    chosen = max(held, key=lambda t: t["budget"])
    assert profile.search["budget"] == pytest.approx(chosen["budget"], rel=1e-5)
    assert all(t["error"] > target for t in trials if t["budget"] > chosen["budget"])
    again = heldout_error(model, profile, Reference.of(model, heldout))
    assert again == pytest.approx(chosen["error"], abs=1e-6)
