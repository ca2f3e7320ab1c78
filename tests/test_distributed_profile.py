"""Distributed profiling: a search split over 2 and 4 processes (gloo on the CPU) makes the profile one
process makes on the same inputs, through the Python API (``group=``) and under ``torchrun``.

"The same" is the profile JSON, apart from the two fields of one run: ``created.date`` and
``search.calibration.seconds``. Each process runs on one CPU thread, as the single-process
reference does here: the forward then computes the same numbers in every process, and the merge
(each input's scores added in input order, whatever the split) makes the same sums bit for bit.
Random weights attend almost uniformly: fine for identity, which is all these tests judge.
"""

import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import autosparse.search.calibration as search
from autosparse import Profile
from autosparse.cli import main
from autosparse.search.calibration import SearchConfig, calibrate
from autosparse.search.validate import fit_to_target
from autosparse.testing.dits import build_dit
from autosparse.testing.llms import llama
from autosparse.testing.processes import spawn

ROOT = Path(__file__).resolve().parents[1]
WORLD = 4
TIMEOUT_S = 240  # a process that never reaches a collective would leave the others waiting

LLM_CONFIG = SearchConfig(budget=0.3, block_size=(32, 16), windows=(32, 64, 128), query_rows=64)
DIT_CONFIG = SearchConfig(budget=0.5, block_size=(16, 32), densities=(0.2, 0.4), dense_steps=1, step_ranges=(3,),
                          query_rows=64)


def _llm():
    """A tiny Llama; 3 calibration windows of different lengths (they do not split evenly over 2 or
    4, and each layer's cost is the first window's shape's), 2 held-out windows."""
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 512, (1, n), generator=gen) for n in (200, 160, 120, 256, 256)]
    return llama(2, tiny=True, device="cpu"), ids[:3], ids[3:], LLM_CONFIG, 1e-4


def _dit(family: str, target: float, **shape):
    """5 denoising steps (the first dense, then two step ranges: the step counter must count the
    other processes' steps too) and 3 held-out steps, validated to a ``target`` that takes rounds."""
    dit = build_dit(family, **shape)
    steps = [dit.inputs(timestep=t) for t in (900.0, 800.0, 700.0, 600.0, 500.0)]
    heldout = [dit.inputs(timestep=t) for t in (900.0, 700.0, 500.0)]
    return dit.model, steps, heldout, DIT_CONFIG, target


CASES = {
    "llm": _llm,
    "wan": functools.partial(_dit, "wan", 0.01, frames=2, height=32, width=96),
    "hunyuan_video": functools.partial(_dit, "hunyuan_video", 0.01, frames=2, height=32, width=48),
    "flux": functools.partial(_dit, "flux", 0.003, height=32, width=64),
}


def _stable(profile: Profile) -> dict:
    """The profile as JSON without the fields of one run (its date, the calibration's seconds)."""
    data = json.loads(json.dumps(profile.to_dict()))
    del data["created"]["date"], data["search"]["calibration"]["seconds"]
    return data


def _sums(calibration) -> list:
    """The calibration's sums per step range and layer, exactly (JSON keeps a float's every bit):
    the profile's rounded numbers could hide a difference in the last bits."""
    return [{name: [s.err_sq.tolist(), s.ref_sq.tolist(), s.blocks.tolist()] for name, s in by_layer.items()}
            for by_layer in calibration.calibrator.ranges]


def _profiles(case: str, group=None) -> dict:
    """The case's calibration sums, calibrated profile and the one validated to its target
    (``group``: split over its processes)."""
    model, inputs, heldout, config, target = CASES[case]()
    calibration = calibrate(model, inputs, config, progress=False, group=group)
    return {"sums": _sums(calibration), "calibrated": _stable(calibration.profile()),
            "validated": _stable(fit_to_target(calibration, heldout, target))}


def _resumed(group, checkpoint: Path) -> dict:
    """Wan split over ``group``, every process stopped at its second input, then started again:
    each resumes from its own checkpoint file."""
    model, steps, _, config, _ = CASES["wan"]()
    real, runs = search.run_model, []

    def stop_at_second(model, x):
        if len(runs) == 1:
            raise KeyboardInterrupt
        runs.append(x)
        return real(model, x)

    search.run_model = stop_at_second
    try:
        with contextlib.suppress(KeyboardInterrupt):
            calibrate(model, steps, config, progress=False, checkpoint=checkpoint, group=group)
        search.run_model = lambda model, x: runs.append(x) or real(model, x)
        calibration = calibrate(model, steps, config, progress=False, checkpoint=checkpoint, group=group)
    finally:
        search.run_model = real
    return {"calibrated": _stable(calibration.profile()), "runs": len(runs)}


def _refused() -> str:
    """Processes given different inputs: every one refuses to merge them."""
    ids = torch.full((1, 64), min(dist.get_rank(), 1))
    try:
        calibrate(llama(1, tiny=True, device="cpu"), [ids], LLM_CONFIG, progress=False, group=dist.group.WORLD)
    except ValueError as err:
        return str(err)
    return "not refused"


def _worker(rank: int, world: int, init: str, out: Path) -> None:
    """One of ``world`` processes: every case split over all of them, then over processes 0 and 1."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    pair = dist.new_group([0, 1])  # every process takes part in making a group
    results = {f"{case}/{world}": _profiles(case, dist.group.WORLD) for case in CASES}
    results["refused"] = _refused()
    if rank < 2:
        results.update({f"{case}/2": _profiles(case, pair) for case in CASES})
        results["resumed/2"] = _resumed(pair, out / "calibration.pt")
    dist.barrier()
    (out / f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@contextlib.contextmanager
def _one_thread():
    """The single-process reference on one thread, as every split process runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> list[dict]:
    """Per process of WORLD, what it returned for every case (``_worker``)."""
    out = tmp_path_factory.mktemp("split")
    spawn(_worker, WORLD, f"file://{out / 'rendezvous'}", out, timeout_s=TIMEOUT_S)
    return [json.loads((out / f"{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.parametrize("case", CASES)
def test_a_split_search_makes_the_single_process_profile(split, case):
    """On 2 and 4 processes, every process returns the single-process calibration (its sums bit
    for bit) and profiles, calibrated and validated (held-out inputs split too)."""
    with _one_thread():
        single = _profiles(case)
    heads = [h for layer in single["calibrated"]["layers"].values() for h in layer["heads"]]
    assert any(h["kind"] != "dense" for h in heads)  # something was chosen, not all dense
    for world in (2, WORLD):
        for rank in range(world):
            assert split[rank][f"{case}/{world}"] == single, f"{case} on {world} processes, process {rank}"
    if case != "llm":  # the target took more than one round: every round's held-out error matched
        assert len(single["validated"]["search"]["validation"]["trials"]) > 1


def test_a_split_calibration_resumes_from_each_process_checkpoint(split):
    """Stopped at each process's second input and started again, each process ran each of its
    inputs once (process 0 has inputs 0, 2, 4; process 1 has 1, 3) and the result is the whole run's."""
    assert [split[rank]["resumed/2"]["runs"] for rank in (0, 1)] == [3, 2]
    assert split[0]["resumed/2"]["calibrated"] == split[1]["resumed/2"]["calibrated"] == split[0]["wan/2"]["calibrated"]


def test_processes_with_different_inputs_refuse_to_merge(split):
    for rank in range(WORLD):
        assert "calibration inputs: process" in split[rank]["refused"] and "input 0 differs" in split[rank]["refused"]


def test_a_resumed_calibration_counts_guidance_steps_as_one_run(tmp_path):
    """Classifier-free guidance (each timestep twice), stopped between a step's two calls and
    resumed: the inputs done advance the step counter again (repeats included), so the same calls
    are dense and fall in each step range as in one uninterrupted run."""
    model, steps, _, config, _ = CASES["wan"]()
    guided = [x for x in steps for _ in range(2)]
    whole = calibrate(model, guided, config, progress=False)
    real = search.run_model
    runs = []

    def stop_after_five(model, x):
        if len(runs) == 5:
            raise KeyboardInterrupt
        runs.append(x)
        return real(model, x)

    search.run_model = stop_after_five
    try:
        with contextlib.suppress(KeyboardInterrupt):
            calibrate(model, guided, config, progress=False, checkpoint=tmp_path / "c.pt")
    finally:
        search.run_model = real
    resumed = calibrate(model, guided, config, progress=False, checkpoint=tmp_path / "c.pt")
    assert _sums(resumed) == _sums(whole) and _stable(resumed.profile()) == _stable(whole.profile())


def test_profile_under_torchrun_writes_the_single_process_profile(tmp_path, monkeypatch):
    """``torchrun -m autosparse.cli profile`` on 2 processes: one profile, written once, equal to
    the single-process command's (with --target: the held-out steps are split too)."""
    args = ["profile", "--factory", "examples.dit_factory:wan", "--budget", "0.5", "--dense-steps", "1",
            "--block-size", "16", "32", "--target", "0.01"]
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "autosparse.cli", *args, "--out", str(tmp_path / "split.json")],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert [line for line in launched.stdout.splitlines() if line.startswith("saved ")] == [f"saved {tmp_path / 'split.json'}"]
    monkeypatch.chdir(ROOT)
    with _one_thread():
        main([*args, "--out", str(tmp_path / "single.json")])
    assert _stable(Profile.load(tmp_path / "split.json")) == _stable(Profile.load(tmp_path / "single.json"))
