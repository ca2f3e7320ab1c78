"""vertical_slash's estimate: the last query rows' attention summed along diagonals and key columns.

The Triton kernel (``kernels/last_rows.py``) runs under Triton's interpreter in one worker process
started with ``TRITON_INTERPRET=1`` (this file, ``--interpret-worker``), on fresh random inputs, and
is checked against two oracles: the torch path in float64, and sums written from the definition
(every (row, key) pair's probability added to its offset and its column, one by one). The pattern
then chooses the same lines from either path.
"""

from __future__ import annotations

import os
import sys
import zlib
from dataclasses import dataclass

import pytest
import torch

from autosparse.kernels.last_rows_op import _TorchRows, last_rows
from autosparse.patterns import BlockGeometry, VerticalSlash
from autosparse.testing.interpreter import run_interpreted


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: int
    kv_heads: int
    rows: int
    keys: int
    dim: int
    dtype: torch.dtype


CASES = [
    Case("gqa-ragged-keys", 1, 4, 2, 64, 300, 32, torch.float32),
    Case("batch-16-rows-d80-fp16", 2, 2, 1, 16, 517, 80, torch.float16),
    Case("keys-fewer-than-a-tile", 1, 2, 2, 32, 40, 64, torch.float32),
    Case("one-tile-exactly", 1, 1, 1, 64, 64, 16, torch.float32),
]


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (the last rows), k, and a random set of kept diagonals; sharp logits (scale 2), so the
    attention is far from uniform."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))  # the same in the worker
    q = (2 * torch.randn(case.batch, case.heads, case.rows, case.dim, generator=gen)).to(case.dtype)
    k = (2 * torch.randn(case.batch, case.kv_heads, case.keys, case.dim, generator=gen)).to(case.dtype)
    kept = torch.rand(case.batch, case.heads, case.keys, generator=gen) < 0.3
    return q, k, kept


def run_kernel(case: Case) -> dict[str, torch.Tensor]:
    q, k, kept = make_inputs(case)
    rows = last_rows(q, k, case.dim ** -0.5)
    assert type(rows).__name__ == "_TritonRows", f"{case.name}: the kernel did not take the call"
    diagonals, columns = rows.lines()
    return {"diagonals": diagonals, "columns": columns, "missed": rows.columns_off(kept)}


def by_definition(case: Case) -> dict[str, torch.Tensor]:
    """Every pair (row, key) added to its offset and column, in float64."""
    q, k, kept = (x.double() if x.is_floating_point() else x for x in make_inputs(case))
    group = case.heads // case.kv_heads
    logits = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * case.dim ** -0.5  # [B, H, R, Sk]
    first = case.keys - case.rows
    position = first + torch.arange(case.rows)
    visible = torch.arange(case.keys)[None, :] <= position[:, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
    diagonals = torch.zeros(case.batch, case.heads, case.keys, dtype=torch.float64)
    missed = torch.zeros_like(diagonals)
    for r in range(case.rows):
        for j in range(int(position[r]) + 1):
            offset = int(position[r]) - j
            diagonals[..., offset] += probs[..., r, j]
            missed[..., j] += torch.where(kept[..., offset], 0.0, probs[..., r, j])
    return {"diagonals": diagonals, "columns": probs.sum(2), "missed": missed}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    return run_interpreted(__file__, tmp_path_factory.mktemp("interpreter") / "results.pt", timeout=600)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_sums_match_the_definition(case, interpreted):
    expected = by_definition(case)
    tol = 2e-3 if case.dtype == torch.float16 else 1e-5
    for name in ("diagonals", "columns", "missed"):
        torch.testing.assert_close(interpreted[case.name][name].double(), expected[name], atol=tol, rtol=tol,
                                   msg=lambda m, n=name: f"{case.name} {n}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_path_matches_the_definition(case):
    q, k, kept = make_inputs(case)
    rows = _TorchRows(q.double(), k.double(), case.dim ** -0.5)
    expected = by_definition(case)
    diagonals, columns = rows.lines()
    got = {"diagonals": diagonals, "columns": columns, "missed": rows.columns_off(kept)}
    for name, value in got.items():
        torch.testing.assert_close(value.double(), expected[name], atol=1e-5, rtol=1e-5)


def test_cpu_without_the_interpreter_uses_the_torch_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, _ = make_inputs(CASES[0])
    assert isinstance(last_rows(q, k, 0.1), _TorchRows)


def test_refuses_rows_that_do_not_fit_the_keys():
    with pytest.raises(ValueError, match="does not fit"):
        last_rows(torch.randn(1, 2, 64, 16), torch.randn(1, 2, 32, 16), 0.25)


@pytest.mark.parametrize("mass", [None, 0.9])
def test_pattern_chooses_the_same_lines_from_either_path(mass, interpreted):
    """vertical_slash's blocks and columns from the kernel's sums equal those from the torch path
    (the kernel's choice is made in the worker; float32 sums of continuous random inputs: no ties)."""
    q, k = _pattern_inputs()
    geometry = BlockGeometry(q.shape[2], k.shape[2], 16, 16, True)
    blocks, columns = VerticalSlash(vertical=24, slash=40, mass=mass).select(q, k, geometry, 0.25)
    assert torch.equal(blocks, interpreted[f"select-{mass}"]["blocks"])
    assert torch.equal(columns, interpreted[f"select-{mass}"]["columns"])


def _pattern_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return 2 * torch.randn(1, 4, 256, 32, generator=gen), 2 * torch.randn(1, 2, 256, 32, generator=gen)


# --------------------------------------------------------------------------------------------------
# interpreter worker: every Triton launch of this file, run once in a TRITON_INTERPRET=1 process
# --------------------------------------------------------------------------------------------------


def _interpret_worker(path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("the interpreter worker needs TRITON_INTERPRET=1 before triton is imported")
    results = {case.name: run_kernel(case) for case in CASES}
    q, k = _pattern_inputs()
    geometry = BlockGeometry(q.shape[2], k.shape[2], 16, 16, True)
    for mass in (None, 0.9):
        blocks, columns = VerticalSlash(vertical=24, slash=40, mass=mass).select(q, k, geometry, 0.25)
        results[f"select-{mass}"] = {"blocks": blocks, "columns": columns}
    torch.save(results, path)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpret-worker":
        _interpret_worker(sys.argv[2])
    else:
        raise SystemExit(f"usage: TRITON_INTERPRET=1 python {sys.argv[0]} --interpret-worker OUT.pt")
