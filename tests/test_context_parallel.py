"""Context parallelism on CPUs (gloo, 2 and 4 processes): diffusers' own Ulysses, ring and unified
attention (``transformer.enable_parallelism``) over a patched tiny Wan, FLUX and HunyuanVideo gives
every process the single-process patched model's output, with the same calls served sparse.

Routes: the hook route (F.sdpa inside diffusers' native Ulysses: each process serves its heads of
the profile over the gathered sequence) and the registered backend (``set_attention_backend
("autosparse")``; ring attention needs it: one step per key chunk, merged by lse). Profiles: dense,
and per head a tile-ordered neighbourhood, a 1-D window, a dense head and another neighbourhood,
so that head slices, the gathered token order (FLUX's and HunyuanVideo's text is cut apart from
the image) and ring chunks scattered over tiles all matter. The HunyuanVideo cases run Ulysses
only, with a test ``cp_plan``: diffusers 0.42 has none for it (its joint padding mask is built over
the whole sequence), and its text here is unpadded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist

import autosparse
from autosparse.balance import balance_heads
from autosparse.models.families import family_of
from autosparse.patterns import pattern_from_spec
from autosparse.testing.dits import build_dit
from autosparse.testing.processes import one_cpu_device, spawn

BLOCKS = (16, 16)
SHAPES = {"wan": dict(frames=2, height=16, width=24),  # grid 2x8x12, no text
          "flux": dict(height=8, width=12, text=8),  # grid 8x12, 8 text tokens first
          "hunyuan_video": dict(frames=2, height=16, width=24, text=8)}  # grid 2x8x12, 8 text tokens last
MIXED = {"wan": ([1, 5, 5], [2, 3, 7]), "hunyuan_video": ([1, 5, 5], [2, 3, 7]), "flux": ([3, 5], [5, 3])}
SERVED = 2  # self/joint attention calls per forward of each tiny model


class Case(NamedTuple):
    family: str
    profile: str  # "dense" or "mixed"
    ring: int
    ulysses: int
    backend: bool  # set_attention_backend("autosparse"), else the hook route
    balanced: bool = False  # heads permuted for the Ulysses ranks (autosparse.balance_heads)

    @property
    def name(self) -> str:
        route = "backend" if self.backend else "hooks"
        return (f"{self.family}-{self.profile}-ring{self.ring}-ulysses{self.ulysses}-{route}"
                + ("-balanced" if self.balanced else ""))


def _cases(world: int) -> list[Case]:
    if world == 2:
        cases = [Case(family, profile, ring, 2 // ring, backend)
                 for family in ("wan", "flux") for profile in ("dense", "mixed")
                 for ring, backend in ((1, False), (1, True), (2, True))]
        cases += [Case("hunyuan_video", "dense", 1, 2, False), Case("hunyuan_video", "mixed", 1, 2, False),
                  Case("hunyuan_video", "mixed", 1, 2, True), Case("wan", "mixed", 1, 2, False, balanced=True)]
        return cases
    return [Case(family, "mixed", ring, 4 // ring, ring > 1) for family in ("wan", "flux") for ring in (1, 2, 4)] + [
        Case("wan", "dense", 4, 1, True), Case("hunyuan_video", "mixed", 1, 4, False)]


def _dit(family: str):
    return build_dit(family, "tiny", config={"num_attention_heads": 4}, **SHAPES[family])


def _profile(model, case: Case) -> autosparse.Profile:
    profile = autosparse.Profile.uniform(model, {"kind": "dense"}, block_size=BLOCKS)
    if case.profile == "dense":
        return profile
    near, far = MIXED[case.family]
    heads = tuple(pattern_from_spec(spec) for spec in ({"kind": "neighborhood", "window": near},
                                                        {"kind": "window", "window": 40}, {"kind": "dense"},
                                                        {"kind": "neighborhood", "window": far}))
    layers = {name: dataclasses.replace(entry, heads=heads) for name, entry in profile.layers.items()}
    return dataclasses.replace(profile, layers=layers, token_order="tile")


def _cp_plan(family: str):
    """HunyuanVideo's plan (diffusers has none): rotary tables, latent and text streams cut at the
    first block, the output gathered."""
    if family != "hunyuan_video":
        return None
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    stream = ContextParallelInput(split_dim=1, expected_dims=3)
    return {"rope": {0: rope, 1: rope},
            "transformer_blocks.0": {"hidden_states": stream, "encoder_hidden_states": stream},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]  # diffusers' CP hooks take no output dataclass


def _run(case: Case) -> dict:
    """The case on this process: the single-process patched output, then the same under context
    parallelism; what differs, and what was counted."""
    from diffusers import ContextParallelConfig

    dit = _dit(case.family)
    inputs = dit.inputs()
    if "encoder_attention_mask" in inputs:
        inputs["encoder_attention_mask"].fill_(1)
    profile = _profile(dit.model, case)
    autosparse.patch_model(dit.model, profile, strict=True)
    expected = _forward(dit.model, inputs)
    autosparse.unpatch_model(dit.model)
    if case.balanced:
        tokens = family_of(dit.model).geometry(dit.model, inputs)
        profile, _ = balance_heads(dit.model, profile, case.ulysses, tokens)
    with one_cpu_device():
        config = ContextParallelConfig(ring_degree=case.ring, ulysses_degree=case.ulysses)
        dit.model.enable_parallelism(config=config, cp_plan=_cp_plan(case.family))
    autosparse.patch_model(dit.model, profile, strict=True)  # after: diffusers wraps the model's forward
    # set_attention_backend also sets the process's default: every case names its own
    dit.model.set_attention_backend("autosparse" if case.backend else "native")
    got = _forward(dit.model, inputs)
    calls = autosparse.stats(dit.model)
    autosparse.unpatch_model(dit.model)
    return {"error": float((got - expected).abs().max()), "scale": float(expected.abs().max()),
            "sparse": calls.sparse, "dense": dict(calls.dense), "fallback": dict(calls.fallback)}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)  # 4 processes on 2 cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results = {case.name: _run(case) for case in _cases(world)}
    (Path(out) / f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda world: f"{world}procs")
def processes(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    out = tmp_path_factory.mktemp(f"cp{world}")
    spawn(_worker, world, f"file://{out / 'rendezvous'}", str(out))
    return world, [json.loads((out / f"{rank}.json").read_text()) for rank in range(world)]


def _dense_on(case: Case, rank: int) -> bool:
    """Whether every head process ``rank`` holds is dense (mixed heads: Ulysses rank 2 of 4 holds
    only the dense one; flat rank = ring rank x ulysses + ulysses rank)."""
    if case.profile == "dense":
        return True
    per = 4 // case.ulysses
    return not case.balanced and list(range(per * (rank % case.ulysses), per * (rank % case.ulysses + 1))) == [2]


def test_context_parallel_equals_the_single_process_patched_model(processes):
    world, results = processes
    for case in _cases(world):
        for rank, found in enumerate(r[case.name] for r in results):
            where = f"{case.name}, process {rank} of {world}"
            assert found["error"] <= 2e-6 * max(1.0, found["scale"]), (where, found)
            assert not found["fallback"], (where, found)
            expected = {"dense in profile": SERVED} if _dense_on(case, rank) else {}
            assert found["dense"] == expected and found["sparse"] == SERVED - sum(expected.values()), (where, found)
