"""Head dims 80, 96 (padded to 128 inside the kernel) and 256 (key tiles smaller than the layout's
key block) in the Triton kernel, under Triton's interpreter (fp32/fp16: bf16 ``tl.dot`` is wrong
there), with head_dim 64 as the control.

Every interpreted launch runs in one worker process started with ``TRITON_INTERPRET=1`` (this file,
``--interpret-worker``: conftest imports Triton before any test, and ``triton.jit`` picks compile vs
interpret at import). q/k/v/out are views of buffers wider than the head dim whose spare columns
hold NaN, and out is NaN-poisoned: the kernel must neither read a column past the head dim (a NaN
would reach the result) nor write one (the NaN must stay), and must write every real element.
Oracles: dense attention in float64 on the layout's token mask, and PyTorch FlexAttention (eager,
float64) with a mask_mod built from the block lists and columns directly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import zlib

import pytest
import torch

from autosparse.kernels import (TileConfig, block_sparse_attention, default_config, dense_attention, layout_mask,
                                supports)
from autosparse.kernels import block_sparse_op as bso
from autosparse.layout import BlockLayout
from autosparse.patterns.basic import BlockGeometry
from autosparse.testing.interpreter import run_interpreted

TOL = {torch.float32: 2e-5, torch.float16: 3e-3}  # atol = rtol against the float64 oracles
SPARE = 8  # NaN columns past the head dim in every q/k/v/out buffer


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    D: int
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    q_block: int
    kv_block: int
    causal: bool
    dtype: torch.dtype = torch.float32
    kv_valid: bool = False
    columns: bool = False
    q_rows: bool = False  # q and out in a permuted order (non-causal only)
    config: TileConfig | None = None  # None: default_config (no TMA on the CPU)


TMA = TileConfig(num_warps=4, num_stages=1, block_m=16, use_tma=True)
# Curated: each case adds something (odd lengths everywhere; GQA, key padding, columns, q_rows,
# pointer loads and tensor descriptors, key tiles split 2 or 4 ways at 256).
CASES = [
    Case("d64_control_causal_gqa_cols", 64, 1, 4, 2, 75, 75, 16, 32, True, columns=True),
    Case("d80_causal_gqa_kv_valid", 80, 2, 4, 2, 75, 75, 16, 32, True, kv_valid=True),
    Case("d80_noncausal_cols_tma_fp16", 80, 1, 2, 1, 50, 90, 32, 16, False, torch.float16, columns=True, config=TMA),
    Case("d80_q_rows_kv_valid", 80, 1, 2, 2, 70, 70, 16, 16, False, kv_valid=True, q_rows=True),
    Case("d96_causal_sq_lt_sk_cols", 96, 1, 3, 1, 40, 100, 16, 32, True, columns=True),
    Case("d96_noncausal_tma_kv_valid", 96, 2, 2, 2, 60, 45, 16, 16, False, kv_valid=True, config=TMA),
    Case("d96_q_rows_tma_fp16", 96, 1, 4, 2, 66, 66, 32, 32, False, torch.float16, q_rows=True, config=TMA),
    Case("d256_causal_gqa_split", 256, 1, 4, 2, 90, 90, 32, 64, True),  # default: key tile 32 (fp32)
    Case("d256_noncausal_kv_valid_cols_fp16", 256, 2, 2, 1, 70, 110, 16, 64, False, torch.float16, kv_valid=True,
         columns=True),
    Case("d256_q_rows_tma_split4", 256, 1, 2, 2, 100, 100, 32, 64, False, q_rows=True,
         config=TileConfig(num_warps=4, num_stages=1, block_m=16, use_tma=True, block_n=16)),
    Case("d256_causal_cols_tma_kv_valid", 256, 1, 2, 1, 48, 80, 16, 32, True, kv_valid=True, columns=True,
         config=TileConfig(num_warps=4, num_stages=1, block_m=16, use_tma=True, block_n=16)),
]
FLEX_CASES = ["d80_causal_gqa_kv_valid", "d96_causal_sq_lt_sk_cols", "d256_noncausal_kv_valid_cols_fp16",
              "d256_causal_gqa_split"]
BLOCK_SIZES = (16, 32, 64, 128)
# head_dim 256 with every layout block pair the kernel serves (non-causal and causal, ragged length)
GRID_CASES = [Case(f"d256_grid_{qb}x{kb}", 256, 1, 1, 1, 136, 136, qb, kb, causal=(qb + kb) % 48 == 0)
              for qb in BLOCK_SIZES for kb in BLOCK_SIZES]


def _gen(case: Case, salt: str = "") -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32((case.name + salt).encode()))


def _wide(shape, d: int, dtype: torch.dtype, g: torch.Generator | None) -> torch.Tensor:
    """[..., d] view of a [..., d + SPARE] buffer whose spare columns are NaN (random or NaN values)."""
    buf = torch.full((*shape, d + SPARE), float("nan"), dtype=dtype)
    if g is not None:
        buf[..., :d] = torch.randn(*shape, d, generator=g).to(dtype)
    return buf[..., :d]


def make_inputs(case: Case, salt: str = "") -> dict:
    """Fresh random q, k, v (wide NaN-padded views), a random layout (with columns) built by
    ``BlockLayout``, key padding and the query order of a case."""
    g = _gen(case, salt)
    q = _wide((case.B, case.Hq, case.Sq), case.D, case.dtype, g)
    k, v = (_wide((case.B, case.Hkv, case.Sk), case.D, case.dtype, g) for _ in range(2))
    geometry = BlockGeometry(case.Sq, case.Sk, case.q_block, case.kv_block, case.causal)
    blocks = torch.rand(case.Hq, geometry.num_q_blocks, geometry.num_kv_blocks, generator=g) < 0.5
    columns = torch.rand(case.Hq, case.Sk, generator=g) < 0.15 if case.columns else None
    layout = BlockLayout.from_block_mask(blocks, geometry, columns)
    kv_valid = None
    if case.kv_valid:
        kv_valid = torch.rand(case.B, case.Sk, generator=g) > 0.25
        kv_valid[0, case.Sk // 3:] = False  # a long padded tail: some rows attend nothing
    q_rows = torch.randperm(case.Sq, generator=g).to(torch.int32) if case.q_rows else None
    return dict(q=q, k=k, v=v, layout=layout, kv_valid=kv_valid, q_rows=q_rows)


def run_kernel(case: Case, inputs: dict) -> dict:
    """The kernel into a NaN-poisoned wide out; returns out's whole buffer, lse and the result."""
    layout = inputs["layout"]
    out = _wide((case.B, case.Hq, case.Sq), case.D, case.dtype, None)
    extra = {}
    if layout.columns is not None:
        extra = dict(columns=layout.columns, column_counts=layout.column_counts, listed=layout.listed)
    res, lse = block_sparse_attention(inputs["q"], inputs["k"], inputs["v"], layout.kv_indices, layout.kv_counts,
                                      q_block=case.q_block, kv_block=case.kv_block, causal=case.causal,
                                      kv_valid=inputs["kv_valid"], out=out, return_lse=True, config=case.config,
                                      q_rows=inputs["q_rows"], schedule=layout.schedule(case.Hq // case.Hkv), **extra)
    return {"buffer": out._base if out._base is not None else out, "lse": lse, "wrote_into_out": res is out}


def kernel_order(case: Case, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q in the kernel's order, and the inverse permutation that puts kernel-order rows back."""
    rows = inputs["q_rows"]
    if rows is None:
        return inputs["q"], None
    inverse = torch.empty(case.Sq, dtype=torch.long)
    inverse[rows.long()] = torch.arange(case.Sq)
    return inputs["q"].index_select(2, rows.long()), inverse


def dense_oracle(case: Case, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    layout = inputs["layout"]
    mask = layout_mask(layout.kv_indices, layout.kv_counts, q_block=case.q_block, kv_block=case.kv_block,
                       seq_q=case.Sq, seq_k=case.Sk, causal=case.causal, kv_valid=inputs["kv_valid"],
                       columns=layout.columns, column_counts=layout.column_counts)
    q, inverse = kernel_order(case, inputs)
    out, lse = dense_attention(q.double(), inputs["k"].double(), inputs["v"].double(), mask, return_lse=True)
    return (out, lse) if inverse is None else (out.index_select(2, inverse), lse.index_select(2, inverse))


def flex_oracle(case: Case, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention with a mask_mod over tables built from the block lists and column lists."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    layout = inputs["layout"]
    idx, cnt = layout.kv_indices[0], layout.kv_counts[0]
    nq, nk = idx.shape[1], math.ceil(case.Sk / case.kv_block)
    blocks = torch.zeros(case.Hq, nq, nk, dtype=torch.bool)
    cols = torch.zeros(case.Hq, nq, case.Sk, dtype=torch.bool)
    for h in range(case.Hq):
        for i in range(nq):
            blocks[h, i, idx[h, i, : cnt[h, i]].long()] = True
            if layout.columns is not None:
                cols[h, i, layout.columns[0, h, : layout.column_counts[0, h, i]].long()] = True
    valid = inputs["kv_valid"] if inputs["kv_valid"] is not None else torch.ones(case.B, case.Sk, dtype=torch.bool)
    shift = case.Sk - case.Sq

    def mask_mod(b, h, q_idx, kv_idx):
        ok = (blocks[h, q_idx // case.q_block, kv_idx // case.kv_block] | cols[h, q_idx // case.q_block, kv_idx]) \
            & valid[b, kv_idx]
        return ok & (kv_idx <= q_idx + shift) if case.causal else ok

    block_mask = flex.create_block_mask(mask_mod, case.B, case.Hq, case.Sq, case.Sk, device="cpu")
    q, inverse = kernel_order(case, inputs)
    kw = {"return_aux": flex.AuxRequest(lse=True)} if hasattr(flex, "AuxRequest") else {"return_lse": True}
    out, aux = flex.flex_attention(q.double(), inputs["k"].double(), inputs["v"].double(), block_mask=block_mask,
                                   enable_gqa=case.Hq != case.Hkv, **kw)
    lse = aux.lse if hasattr(aux, "lse") else aux
    return (out, lse) if inverse is None else (out.index_select(2, inverse), lse.index_select(2, inverse))


def check(case: Case, result: dict, ref: torch.Tensor, ref_lse: torch.Tensor) -> None:
    """Every real element written and right, no spare column written, lse right; rows that attend
    nothing give 0 and lse = -inf (FlexAttention's convention too)."""
    assert result["wrote_into_out"]
    buf = result["buffer"]
    assert buf[..., case.D:].isnan().all(), "a column past head_dim was written"
    out = buf[..., : case.D]
    assert not out.isnan().any(), "output not fully written (NaN poison left) or a padding column was read"
    tol = TOL[case.dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(result["lse"].double(), ref_lse.double(), atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------------
# interpreter worker: every Triton launch of this file, run once in a TRITON_INTERPRET=1 process
# --------------------------------------------------------------------------------------------------


def _interpret_worker(path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("the interpreter worker needs TRITON_INTERPRET=1 before triton is imported")
    results = {case.name: run_kernel(case, make_inputs(case)) for case in CASES + GRID_CASES}
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    return run_interpreted(__file__, tmp_path_factory.mktemp("interpreter") / "results.pt", timeout=600)


@pytest.mark.parametrize("case", CASES + GRID_CASES, ids=lambda c: c.name)
def test_kernel_matches_dense_oracle(case, interpreted):
    ref, ref_lse = dense_oracle(case, make_inputs(case))
    check(case, interpreted[case.name], ref, ref_lse)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", FLEX_CASES)
def test_kernel_matches_flex_attention(name, interpreted):
    case = next(c for c in CASES if c.name == name)
    ref, ref_lse = flex_oracle(case, make_inputs(case))
    check(case, interpreted[name], ref, ref_lse)


# --------------------------------------------------------------------------------------------------
# capability: which head dims are served, what is refused and why, and the 256 tile configs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [72, 512, 8, 100])
def test_other_head_dims_refused_with_reason(d, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton path's limits (no launch happens)
    q = torch.randn(1, 2, 32, d)
    reason = supports(q, q, q, 16, 16)
    assert reason == f"head_dim {d} not supported (expected one of {bso.HEAD_DIMS})"
    idx = torch.zeros(1, 2, 2, 1, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match=f"head_dim {d} not supported"):
        block_sparse_attention(q, q, q, idx, idx[..., 0], q_block=16, kv_block=16, causal=False)


@pytest.mark.parametrize("d", [80, 96, 256])
def test_new_head_dims_served(d, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 2, 32, d, dtype=torch.float16)
    assert all(supports(q, q, q, qb, kb) is None for qb in BLOCK_SIZES for kb in BLOCK_SIZES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tma", [True, False])
def test_head_dim_256_configs_fit_shared_memory(dtype, tma):
    """Every layout block pair at 256 gets tiles inside the blocks whose Q, K and V tiles fit the
    H200's 227 KB with room for a second program in 16 bits."""
    for qb in BLOCK_SIZES:
        for kb in BLOCK_SIZES:
            config = default_config(qb, kb, 256, dtype, torch.device("cpu"), tma)
            assert config.block_m in BLOCK_SIZES and config.block_m <= qb and config.num_stages == 1
            assert config.block_n in BLOCK_SIZES and config.block_n <= kb
            smem = dtype.itemsize * 256 * (config.block_m + 2 * config.block_n)
            assert smem <= (227 if dtype == torch.float32 else 113) * 1024, (qb, kb, config)


def test_bad_key_tile_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 1, 32, 256)
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="config.block_n must be a power of two"):
        block_sparse_attention(q, q, q, idx, idx[..., 0], q_block=16, kv_block=16, causal=False,
                               config=TileConfig(num_warps=4, num_stages=1, block_n=32))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpret-worker":
        _interpret_worker(sys.argv[2])
    else:
        raise SystemExit(f"usage: TRITON_INTERPRET=1 python {sys.argv[0]} --interpret-worker OUT.pt")
