"""CPU tests of the block-sparse attention kernel layer.

The Triton kernel runs under Triton's interpreter (fp32/fp16 only: bf16 ``tl.dot`` is wrong in the
interpreter). ``triton.jit`` picks compile vs interpret when Triton is imported, and conftest imports
Triton (through transformers) before any test runs, so the interpreted launches run in one worker
process started with ``TRITON_INTERPRET=1`` (this file, ``--interpret-worker``); the tests compare its
saved outputs here. The PyTorch block-sparse path runs in-process, as in production. Oracles:
``dense_attention`` in float64 on ``layout_mask``, and PyTorch FlexAttention (eager, float64) with
an equivalent BlockMask + mask_mod for a few cases. Every case draws fresh inputs from its own seed;
outputs are NaN-poisoned before the kernel runs (and checked to be fully written). ``q_rows`` (queries
and outputs in the caller's order, K/V in kernel order) is checked against the same call on permuted
queries and against the oracle.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

try:  # installed package
    from autosparse.kernels import (block_sparse_attention, block_sparse_attention_torch, dense_attention,
                                    layout_mask, supports)
    from autosparse.kernels import reference as reference_mod
except ImportError:  # repository root on sys.path
    from kernels import block_sparse_attention, block_sparse_attention_torch, dense_attention, layout_mask, supports
    from kernels import reference as reference_mod
from autosparse.testing.interpreter import run_interpreted

TOL = {  # (atol, rtol) against the float64 oracle
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (3e-3, 3e-3),
}
LSE_TOL = {torch.float64: (1e-6, 1e-6), torch.float32: (2e-5, 2e-5), torch.float16: (1e-3, 1e-3)}  # lse: fp32


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    q_block: int
    kv_block: int
    causal: bool
    density: float  # fraction of key blocks listed per query block (1.0 = dense layout)
    batch_layout: bool = False  # Bl = B (else Bl = 1, broadcast over batch)
    kv_valid: bool = False
    empty_rows: bool = False  # random counts in [0, MAXK] instead of MAXK, so some rows are empty
    transposed: bool = False  # q/k/v/out are [B, S, H, D] buffers seen through .transpose(1, 2)
    count_overflow: bool = False  # some kv_counts exceed MAXK (must be clamped, never read past the row)
    dtype: torch.dtype = torch.float32
    columns: int = 0  # key columns per head visited token by token on top of the blocks (0: none)


# Curated, not a Cartesian product: each case adds something the others do not cover.
CASES = [
    Case("base", 1, 2, 2, 128, 128, 64, 32, 32, False, 0.5),
    Case("ragged_gqa", 1, 6, 2, 150, 97, 64, 32, 16, False, 0.4, empty_rows=True, dtype=torch.float16),
    Case("causal_dense_layout_d128", 1, 2, 1, 200, 200, 128, 32, 32, True, 1.0),
    Case("causal_sq_lt_sk", 1, 4, 2, 70, 230, 64, 16, 32, True, 0.6, count_overflow=True, dtype=torch.float16),
    Case("causal_sq_gt_sk", 1, 2, 1, 96, 40, 32, 16, 16, True, 1.0),
    Case("batch_bl1_kv_valid_mqa", 2, 4, 1, 64, 100, 64, 16, 32, False, 0.7, kv_valid=True),
    Case("batch_blB_empty_rows", 2, 3, 3, 100, 100, 64, 32, 16, True, 0.3, batch_layout=True, empty_rows=True,
         dtype=torch.float16),
    Case("transposed_views_gqa", 2, 4, 2, 80, 80, 64, 16, 16, True, 0.5, transposed=True),
    Case("d128_kv_valid_blB", 2, 2, 2, 96, 160, 128, 16, 32, False, 0.5, batch_layout=True, kv_valid=True,
         dtype=torch.float16),
    Case("d16_tiny", 1, 2, 2, 64, 64, 16, 16, 16, True, 0.75),
]
FLEX_CASES = ["ragged_gqa", "causal_sq_lt_sk", "batch_blB_empty_rows", "d128_kv_valid_blB"]
# Run again through tensor descriptors (TMA loads/stores), query tiles half the layout block, and a
# reversed program schedule: none of them may change the result.
TMA_CASES = ["base", "ragged_gqa", "causal_sq_lt_sk", "batch_blB_empty_rows", "transposed_views_gqa",
             "d128_kv_valid_blB"]


def _gen(case: Case, salt: str = "") -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32((case.name + salt).encode()))


def make_inputs(case: Case, salt: str = ""):
    """Fresh random q, k, v, layout (with garbage padding past the counts) and kv_valid for a case."""
    g = _gen(case, salt)
    B, Hq, Hkv, Sq, Sk, D = case.B, case.Hq, case.Hkv, case.Sq, case.Sk, case.D

    def rand(h, s):
        if case.transposed:
            return torch.randn(B, s, h, D, generator=g).to(case.dtype).transpose(1, 2)
        return torch.randn(B, h, s, D, generator=g).to(case.dtype)

    q, k, v = rand(Hq, Sq), rand(Hkv, Sk), rand(Hkv, Sk)
    nq, nk = math.ceil(Sq / case.q_block), math.ceil(Sk / case.kv_block)
    bl = B if case.batch_layout else 1
    maxk = max(1, round(case.density * nk))
    chosen = torch.rand(bl, Hq, nq, nk, generator=g).argsort(-1)[..., :maxk].sort(-1).values.to(torch.int32)
    if case.empty_rows:
        counts = torch.randint(0, maxk + 1, (bl, Hq, nq), generator=g, dtype=torch.int32)
        counts.view(-1)[:: max(1, counts.numel() // 4)] = 0  # make sure some rows are empty
    else:
        counts = torch.full((bl, Hq, nq), maxk, dtype=torch.int32)
    if case.count_overflow:
        counts.view(-1)[::3] = maxk + 2
    # padding past the count: garbage that must never be read as a block
    garbage = torch.tensor([-7, nk, 10**6, 0], dtype=torch.int32)[torch.randint(0, 4, chosen.shape, generator=g)]
    slot = torch.arange(maxk, dtype=torch.int32)
    kv_indices = torch.where(slot < counts[..., None], chosen, garbage)
    kv_valid = None
    if case.kv_valid:
        kv_valid = torch.rand(B, Sk, generator=g) > 0.25
        kv_valid[0, :] = False  # batch 0: one sequence with no valid key at all ...
        kv_valid[0, : Sk // 3] = True  # ... except its first third (rows may still end up empty)
    return q, k, v, kv_indices, counts, kv_valid


# Key columns (vertical lines) on top of block layouts: causal (each row takes the columns it may
# see) and not (random prefixes per row, some rows none), GQA, ragged, padding, bad entries.
COLUMN_CASES = [
    Case("cols_causal_gqa", 1, 4, 2, 160, 160, 64, 16, 32, True, 0.3, columns=40),
    Case("cols_ragged_kv_valid_fp16", 2, 2, 1, 100, 150, 32, 32, 16, False, 0.25, batch_layout=True,
         kv_valid=True, empty_rows=True, columns=21, dtype=torch.float16),
    Case("cols_causal_sq_lt_sk_d128", 1, 2, 2, 48, 200, 128, 16, 64, True, 0.4, columns=9),
]


def column_inputs(case: Case, kv_indices, kv_counts) -> dict:
    """``columns``/``column_counts``/``listed`` for a case (empty without columns): per head sorted
    distinct key positions, some of them inside listed blocks (attended once), then bad entries past
    every count; ``listed`` is the layout's block mask."""
    if not case.columns:
        return {}
    g = _gen(case, "columns")
    bl, h, nq, maxk = kv_indices.shape
    nk = math.ceil(case.Sk / case.kv_block)
    chosen = torch.rand(bl, h, case.Sk, generator=g).argsort(-1)[..., :case.columns].sort(-1).values
    columns = torch.cat([chosen, torch.tensor([-2, case.Sk + 3]).expand(bl, h, 2)], -1).to(torch.int32).contiguous()
    if case.causal:  # query block i takes the columns its last query may see
        last = torch.clamp((torch.arange(nq) + 1) * case.q_block, max=case.Sq) - 1 + (case.Sk - case.Sq)
        counts = (chosen[:, :, None, :] <= last[None, None, :, None]).sum(-1)
    else:
        counts = torch.randint(0, case.columns + 1, (bl, h, nq), generator=g)
    listed = layout_mask(kv_indices, kv_counts, q_block=1, kv_block=1, seq_q=nq, seq_k=nk)  # blocks as tokens
    return {"columns": columns, "column_counts": counts.to(torch.int32).contiguous(), "listed": listed.contiguous()}


def oracle(case: Case, q, k, v, kv_indices, kv_counts, kv_valid, columns=None, column_counts=None, listed=None):
    mask = layout_mask(kv_indices, kv_counts, q_block=case.q_block, kv_block=case.kv_block, seq_q=case.Sq,
                       seq_k=case.Sk, causal=case.causal, kv_valid=kv_valid, columns=columns,
                       column_counts=column_counts)
    return dense_attention(q.double(), k.double(), v.double(), mask, return_lse=True)


def poisoned_out(case: Case, q):
    if case.transposed:  # a differently-strided out=: [B, Hq, Sq, D] view of a [B, Sq, Hq, D] buffer
        return torch.full((case.B, case.Sq, case.Hq, case.D), float("nan"), dtype=case.dtype).transpose(1, 2)
    return torch.full((case.B, case.Hq, case.Sq, case.D), float("nan"), dtype=case.dtype)


def check(case: Case, out, lse, ref, ref_lse):
    assert out.dtype == case.dtype and tuple(out.shape) == (case.B, case.Hq, case.Sq, case.D)
    assert not out.isnan().any(), "output not fully written (NaN poison left) or NaN produced"
    atol, rtol = TOL[case.dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    if lse is not None:
        assert lse.dtype == torch.float32 and tuple(lse.shape) == (case.B, case.Hq, case.Sq)
        atol, rtol = LSE_TOL[case.dtype]
        torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# interpreter worker: every Triton launch of this file, run once in a TRITON_INTERPRET=1 process
# --------------------------------------------------------------------------------------------------


def _interpret_jobs():
    """name -> (case, salt, variant) of every interpreted launch the tests below check."""
    jobs = {f"oracle/{c.name}": (c, "", False) for c in CASES}
    for name in FLEX_CASES:
        jobs[f"flex/{name}"] = (next(c for c in CASES if c.name == name), "flex", False)
    for name in TMA_CASES:
        jobs[f"tma/{name}"] = (next(c for c in CASES if c.name == name), "tma", True)
    for case in COLUMN_CASES:
        jobs[f"oracle/{case.name}"] = (case, "", False)
        jobs[f"tma/{case.name}"] = (case, "tma", True)
    return jobs


def _variant_kwargs(case: Case, cnt):
    """TMA descriptors, query tile = half the layout block (>= 16), reversed heaviest-first schedule."""
    from autosparse.kernels import TileConfig, row_schedule

    config = TileConfig(num_warps=4, num_stages=1, block_m=max(16, case.q_block // 2), use_tma=True)
    return {"config": config, "schedule": row_schedule(cnt, case.Hq // case.Hkv).flip(0).contiguous()}


LAYOUT_CASE = Case("layout", 2, 2, 1, 40, 40, 32, 16, 16, True, 0.5)

# q_rows: q and out in the model's order, k/v/kv_valid/layout in kernel order. Non-causal only.
# A DiT's tile order (grid 3x5x7 in 2x2x4 tiles, then 5 prefix and 3 suffix text tokens: 113 tokens,
# not a multiple of any query tile) and random permutations.
TILE_TOKENS = dict(grid=(3, 5, 7), prefix=5, suffix=3, tile=(2, 2, 4))
ROWS_CASES = [  # (case, permutation)
    (Case("rows_tile_gqa_kv_valid", 1, 4, 2, 113, 113, 32, 32, 16, False, 0.5, kv_valid=True), "tile"),
    (Case("rows_tile_mqa_fp16_transposed", 2, 2, 1, 113, 113, 64, 16, 32, False, 0.6, transposed=True,
          dtype=torch.float16), "tile"),
    (Case("rows_random_ragged_fp16", 2, 6, 2, 150, 97, 64, 32, 16, False, 0.4, batch_layout=True, empty_rows=True,
          kv_valid=True, transposed=True, dtype=torch.float16), "random"),
    (Case("rows_random_d128", 1, 2, 2, 80, 80, 128, 64, 16, False, 0.7), "random"),
]


def q_rows_of(case: Case, kind: str) -> torch.Tensor:
    """int32 [Sq]: the model row of the query at each kernel position."""
    if kind == "tile":
        from autosparse.patterns.geometry import TokenGeometry

        perm = TokenGeometry(**TILE_TOKENS).permutation()
        assert perm.numel() == case.Sq
    else:
        perm = torch.randperm(case.Sq, generator=_gen(case, "perm"))
    return perm.to(torch.int32)


def rows_runs(fn, case: Case, kind: str, salt: str, **extra):
    """``fn`` (block_sparse_attention or its torch path) twice on one draw of inputs: on model-order
    q with ``q_rows``, and on kernel-order q without; both into NaN-poisoned outputs. Returns the
    inputs (q in model order) and both (out, lse)."""
    q, k, v, idx, cnt, valid = make_inputs(case, salt)
    rows = q_rows_of(case, kind)
    kw = dict(q_block=case.q_block, kv_block=case.kv_block, causal=False, kv_valid=valid, return_lse=True, **extra)
    out = poisoned_out(case, q)
    res, lse = fn(q, k, v, idx, cnt, out=out, q_rows=rows, **kw)
    assert res is out
    out_k = poisoned_out(case, q)
    _, lse_k = fn(q.index_select(2, rows.long()), k, v, idx, cnt, out=out_k, **kw)
    return (q, k, v, idx, cnt, valid, rows), (out, lse), (out_k, lse_k)


def check_rows(case: Case, inputs, model, kernel):
    """The q_rows run is the kernel-order run with its rows put back in model order (bit for bit: the
    same queries meet the same keys in the same tiles), is fully written, and matches the oracle."""
    q, k, v, idx, cnt, valid, rows = inputs
    (out, lse), (out_k, lse_k) = model, kernel
    inverse = torch.empty_like(rows, dtype=torch.long)
    inverse[rows.long()] = torch.arange(case.Sq)
    assert not out_k.isnan().any()
    torch.testing.assert_close(out, out_k.index_select(2, inverse), atol=0, rtol=0)
    torch.testing.assert_close(lse, lse_k.index_select(2, inverse), atol=0, rtol=0)
    ref, ref_lse = oracle(case, q.index_select(2, rows.long()), k, v, idx, cnt, valid)
    check(case, out, lse, ref.index_select(2, inverse), ref_lse.index_select(2, inverse))


def _interpret_worker(path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("the interpreter worker needs TRITON_INTERPRET=1 before triton is imported")
    results = {}
    for name, (case, salt, variant) in _interpret_jobs().items():
        q, k, v, idx, cnt, valid = make_inputs(case, salt)
        out = poisoned_out(case, q)
        extra = _variant_kwargs(case, cnt) if variant else {}
        extra.update(column_inputs(case, idx, cnt))
        res, lse = block_sparse_attention(q, k, v, idx, cnt, q_block=case.q_block, kv_block=case.kv_block,
                                          causal=case.causal, kv_valid=valid, out=out, return_lse=True, **extra)
        results[name] = {"out": out, "lse": lse, "wrote_into_out": res is out}
    q, k, v, idx, cnt, _ = make_inputs(LAYOUT_CASE)
    results["layout/default_out"] = block_sparse_attention(q, k, v, idx, cnt, q_block=16, kv_block=16, causal=True)
    idx0 = torch.full((1, 2, 3, 1), 5, dtype=torch.int32)
    out0, lse0 = block_sparse_attention(q, k[:, :, :0], v[:, :, :0], idx0, torch.ones((1, 2, 3), dtype=torch.int32),
                                        q_block=16, kv_block=16, causal=False, return_lse=True)
    results["layout/empty_keys"] = {"out": out0, "lse": lse0}
    for case, kind in ROWS_CASES:
        for path_name in ("pointer", "tma"):
            extra = {}
            if path_name == "tma":  # K/V through descriptors (Q/O by pointers), split tiles, other schedule
                extra = _variant_kwargs(case, make_inputs(case, path_name)[4])
            _, model, kernel = rows_runs(block_sparse_attention, case, kind, path_name, **extra)
            results[f"rows/{path_name}/{case.name}"] = {"model": model, "kernel": kernel}
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    return run_interpreted(__file__, tmp_path_factory.mktemp("interpreter") / "results.pt", timeout=900)


@pytest.fixture
def no_interpret(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# --------------------------------------------------------------------------------------------------
# Triton kernel (interpreter) and the PyTorch block-sparse path against the float64 dense oracle
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES + COLUMN_CASES, ids=lambda c: c.name)
def test_triton_kernel_matches_dense_oracle(case, interpreted):
    q, k, v, idx, cnt, valid = make_inputs(case)
    ref, ref_lse = oracle(case, q, k, v, idx, cnt, valid, **column_inputs(case, idx, cnt))
    res = interpreted[f"oracle/{case.name}"]
    assert res["wrote_into_out"]
    assert res["out"].stride() == poisoned_out(case, q).stride()
    check(case, res["out"], res["lse"], ref, ref_lse)


@pytest.mark.parametrize("name", TMA_CASES + [c.name for c in COLUMN_CASES])
def test_triton_kernel_tma_split_tiles_any_schedule(name, interpreted):
    case = next(c for c in CASES + COLUMN_CASES if c.name == name)
    q, k, v, idx, cnt, valid = make_inputs(case, "tma")
    ref, ref_lse = oracle(case, q, k, v, idx, cnt, valid, **column_inputs(case, idx, cnt))
    check(case, interpreted[f"tma/{name}"]["out"], interpreted[f"tma/{name}"]["lse"], ref, ref_lse)


@pytest.mark.parametrize("case", CASES + COLUMN_CASES, ids=lambda c: c.name)
def test_torch_path_matches_dense_oracle(case, no_interpret):
    q, k, v, idx, cnt, valid = make_inputs(case, salt="torch")
    columns = column_inputs(case, idx, cnt)
    ref, ref_lse = oracle(case, q, k, v, idx, cnt, valid, **columns)
    out = poisoned_out(case, q)
    res, lse = block_sparse_attention(q, k, v, idx, cnt, q_block=case.q_block, kv_block=case.kv_block,
                                      causal=case.causal, kv_valid=valid, out=out, return_lse=True, **columns)
    assert res is out
    check(case, out, lse, ref, ref_lse)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6], COLUMN_CASES[1]], ids=lambda c: c.name)
def test_torch_path_float64_and_online_chunks(case, monkeypatch):
    """float64 end to end (tight tolerance), with a tiny memory budget that forces one query block per
    chunk and the online softmax over several key-slot passes."""
    case = dataclasses.replace(case, dtype=torch.float64)
    q, k, v, idx, cnt, valid = make_inputs(case, salt="f64")
    columns = column_inputs(case, idx, cnt)
    columns.pop("listed", None)  # the PyTorch path reads the listed blocks from the layout itself
    ref, ref_lse = oracle(case, q, k, v, idx, cnt, valid, **columns)
    out, lse = block_sparse_attention_torch(q, k, v, idx, cnt, q_block=case.q_block, kv_block=case.kv_block,
                                            causal=case.causal, kv_valid=valid, return_lse=True, **columns)
    monkeypatch.setattr(reference_mod, "MAX_CHUNK_BYTES", 4 * case.q_block * case.kv_block * 8)
    out_small, lse_small = block_sparse_attention_torch(q, k, v, idx, cnt, q_block=case.q_block,
                                                        kv_block=case.kv_block, causal=case.causal,
                                                        kv_valid=valid, return_lse=True, **columns)
    lse = lse.double()  # lse is float32 by contract
    for o, l in ((out, lse), (out_small, lse_small.double())):
        torch.testing.assert_close(o, ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(l, ref_lse, atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", FLEX_CASES)
def test_matches_flex_attention(name, interpreted):
    """Independent second oracle: FlexAttention (eager, float64) with the layout as BlockMask + mask_mod."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    case = next(c for c in CASES if c.name == name)
    q, k, v, idx, cnt, valid = make_inputs(case, salt="flex")
    B, Hq, Sq, Sk, qb, kb = case.B, case.Hq, case.Sq, case.Sk, case.q_block, case.kv_block
    nq, nk = math.ceil(Sq / qb), math.ceil(Sk / kb)
    # block table built directly from the lists (not through layout_mask)
    blocks = torch.zeros(idx.shape[0], Hq, nq, nk, dtype=torch.bool)
    for b in range(idx.shape[0]):
        for h in range(Hq):
            for i in range(nq):
                blocks[b, h, i, idx[b, h, i, : cnt[b, h, i]].long()] = True
    blocks = blocks.expand(B, -1, -1, -1)
    shift = Sk - Sq
    valid_t = valid if valid is not None else torch.ones(B, Sk, dtype=torch.bool)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = blocks[b, h, q_idx // qb, kv_idx // kb] & valid_t[b, kv_idx]
        if case.causal:
            ok = ok & (kv_idx <= q_idx + shift)
        return ok

    kv_num = blocks.sum(-1).to(torch.int32).contiguous()
    kv_list = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
    block_mask = flex.BlockMask.from_kv_blocks(kv_num, kv_list, BLOCK_SIZE=(qb, kb), mask_mod=mask_mod,
                                               seq_lengths=(Sq, Sk))
    kw = {"return_aux": flex.AuxRequest(lse=True)} if hasattr(flex, "AuxRequest") else {"return_lse": True}
    ref, aux = flex.flex_attention(q.double(), k.double(), v.double(), block_mask=block_mask,
                                   enable_gqa=Hq != case.Hkv, **kw)
    ref_lse = aux.lse if hasattr(aux, "lse") else aux
    res = interpreted[f"flex/{name}"]
    check(case, res["out"], res["lse"], ref, ref_lse)


def test_dense_layout_equals_sdpa(no_interpret):
    """A full layout without masks is plain attention: compare with F.scaled_dot_product_attention."""
    case = Case("dense_sdpa", 2, 6, 2, 130, 130, 64, 32, 32, False, 1.0, dtype=torch.float64)
    q, k, v, idx, cnt, _ = make_inputs(case)
    out = block_sparse_attention(q, k, v, idx, cnt, q_block=32, kv_block=32, causal=False)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    out_c = block_sparse_attention(q, k, v, idx, cnt, q_block=32, kv_block=32, causal=True, scale=0.3)
    ref_c = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True,
                                           scale=0.3)
    torch.testing.assert_close(out_c, ref_c, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------------------------------
# q_rows: Q read from and O written to the caller's rows, K/V in kernel order
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["pointer", "tma"])
@pytest.mark.parametrize("case,kind", ROWS_CASES, ids=[c.name for c, _ in ROWS_CASES])
def test_triton_kernel_q_rows(case, kind, path, interpreted):
    res = interpreted[f"rows/{path}/{case.name}"]
    inputs = make_inputs(case, path) + (q_rows_of(case, kind),)
    check_rows(case, inputs, res["model"], res["kernel"])


@pytest.mark.parametrize("case,kind", ROWS_CASES, ids=[c.name for c, _ in ROWS_CASES])
def test_torch_path_q_rows(case, kind, no_interpret):
    inputs, model, kernel = rows_runs(block_sparse_attention, case, kind, "torch")
    check_rows(case, inputs, model, kernel)


def test_torch_path_q_rows_float64_online_chunks(monkeypatch):
    """block_sparse_attention_torch directly (int64 q_rows accepted), float64, one query block per
    chunk: exact against the kernel-order run, 1e-10 against the oracle (lse: float32 by contract)."""
    case, kind = ROWS_CASES[0]
    case = dataclasses.replace(case, dtype=torch.float64)
    monkeypatch.setattr(reference_mod, "MAX_CHUNK_BYTES", 4 * case.q_block * case.kv_block * 8)

    def torch_path(*args, q_rows=None, **kw):
        return block_sparse_attention_torch(*args, q_rows=None if q_rows is None else q_rows.long(), **kw)

    inputs, model, kernel = rows_runs(torch_path, case, kind, "f64")
    check_rows(case, inputs, model, kernel)


def test_q_rows_custom_op(no_interpret):
    """The op's trailing ``q_rows`` argument: same as the Python API, fake impl, opcheck, compile."""
    case, kind = ROWS_CASES[0]
    q, k, v, idx, cnt, valid = make_inputs(case)
    rows = q_rows_of(case, kind)
    op = torch.ops.autosparse.block_sparse_attention
    got = op(q, k, v, idx, cnt, valid, None, case.q_block, case.kv_block, False, 0.2, rows)
    want = block_sparse_attention(q, k, v, idx, cnt, q_block=case.q_block, kv_block=case.kv_block, causal=False,
                                  scale=0.2, kv_valid=valid, q_rows=rows)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert op(q, k, v, idx, cnt, valid, None, case.q_block, case.kv_block, False, 0.2, q_rows=rows).equal(got)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(t) for t in (q, k, v, idx, cnt, valid)), None, case.q_block, case.kv_block,
                  False, 0.2, mode.from_tensor(rows))
    assert fake.shape == got.shape and fake.stride() == got.stride() and fake.dtype == got.dtype
    torch.library.opcheck(op.default, (q, k, v, idx, cnt, valid, None, case.q_block, case.kv_block, False, 0.2, rows))

    def attend(q, k, v):
        return op(q * 1.5, k, v, idx, cnt, valid, None, case.q_block, case.kv_block, False, 0.2, rows)

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), atol=0, rtol=0)


def test_q_rows_argument_checks(no_interpret):
    case = Case("rows_checks", 1, 4, 2, 64, 64, 64, 16, 16, False, 0.5)
    q, k, v, idx, cnt, _ = make_inputs(case)
    rows = torch.randperm(64).to(torch.int32)
    kw = dict(q_block=16, kv_block=16, causal=False)
    with pytest.raises(ValueError, match=r"q_rows must be int32 \[Sq=64\]"):
        block_sparse_attention(q, k, v, idx, cnt, q_rows=rows.long(), **kw)
    with pytest.raises(ValueError, match=r"q_rows must be int32 \[Sq=64\]"):
        block_sparse_attention(q, k, v, idx, cnt, q_rows=rows[:63], **kw)
    with pytest.raises(ValueError, match=r"q_rows must be int32 \[Sq=64\]"):
        block_sparse_attention(q, k, v, idx, cnt, q_rows=rows.view(1, 64), **kw)
    with pytest.raises(ValueError, match="q_rows must be contiguous"):
        block_sparse_attention(q, k, v, idx, cnt, q_rows=torch.arange(128, dtype=torch.int32)[::2], **kw)
    with pytest.raises(ValueError, match="q_rows must be on q's device"):
        block_sparse_attention(q, k, v, idx, cnt, q_rows=rows.to("meta"), **kw)
    with pytest.raises(TypeError, match="q_rows must be an int32 Tensor"):
        block_sparse_attention(q, k, v, idx, cnt, q_rows=list(range(64)), **kw)
    with pytest.raises(ValueError, match="q_rows is not supported with causal=True"):
        block_sparse_attention(q, k, v, idx, cnt, q_rows=rows, q_block=16, kv_block=16, causal=True)
    with pytest.raises(ValueError, match="q_rows is not supported with causal=True"):
        torch.ops.autosparse.block_sparse_attention(q, k, v, idx, cnt, None, None, 16, 16, True, 0.1, rows)


# --------------------------------------------------------------------------------------------------
# API contract: output layout, edge sizes, checks, supports(), custom op
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["interpret", "torch"])
def test_default_output_layout_and_empty_key_sequence(mode, request, monkeypatch):
    q, k, v, idx, cnt, _ = make_inputs(LAYOUT_CASE)
    if mode == "interpret":
        results = request.getfixturevalue("interpreted")
        out, empty = results["layout/default_out"], results["layout/empty_keys"]
        out0, lse0 = empty["out"], empty["lse"]
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        out = block_sparse_attention(q, k, v, idx, cnt, q_block=16, kv_block=16, causal=True)
        idx0 = torch.full((1, 2, 3, 1), 5, dtype=torch.int32)
        out0, lse0 = block_sparse_attention(q, k[:, :, :0], v[:, :, :0], idx0, torch.ones((1, 2, 3), dtype=torch.int32),
                                            q_block=16, kv_block=16, causal=False, return_lse=True)
    assert tuple(out.shape) == (2, 2, 40, 32)
    assert out.transpose(1, 2).is_contiguous()  # allocated as empty(B, Sq, Hq, D).transpose(1, 2)
    ref, _ = oracle(LAYOUT_CASE, q, k, v, idx, cnt, None)
    check(LAYOUT_CASE, out, None, ref, None)
    # Sk = 0: nothing to attend, every row is 0 with lse = -inf
    assert (out0 == 0).all() and (lse0 == float("-inf")).all()


def test_argument_checks(no_interpret):
    case = Case("checks", 1, 4, 2, 64, 64, 64, 16, 16, False, 0.5)
    q, k, v, idx, cnt, _ = make_inputs(case)
    kw = dict(q_block=16, kv_block=16, causal=False)
    with pytest.raises(ValueError, match="kv_indices must be int32"):
        block_sparse_attention(q, k, v, idx.long(), cnt, **kw)
    with pytest.raises(ValueError, match=r"NQ=ceil\(64/16\)=4"):
        block_sparse_attention(q, k, v, idx[:, :, :3], cnt, **kw)
    with pytest.raises(ValueError, match="kv_counts must be int32"):
        block_sparse_attention(q, k, v, idx, cnt[:, :, :3], **kw)
    with pytest.raises(ValueError, match="Hq must be a multiple of Hkv"):
        block_sparse_attention(q[:, :3], k, v, idx[:, :3], cnt[:, :3], **kw)
    with pytest.raises(ValueError, match="q_block must be a power of two"):
        block_sparse_attention(q, k, v, idx, cnt, q_block=24, kv_block=16, causal=False)
    with pytest.raises(ValueError, match="kv_valid must be bool"):
        block_sparse_attention(q, k, v, idx, cnt, kv_valid=torch.ones(1, 63, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="out must be"):
        block_sparse_attention(q, k, v, idx, cnt, out=torch.empty(1, 4, 64, 32), **kw)
    with pytest.raises(ValueError, match=r"schedule must be int32 \[Hq \* NQ"):
        block_sparse_attention(q, k, v, idx, cnt, schedule=torch.arange(3, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="schedule must be int32"):
        block_sparse_attention(q, k, v, idx, cnt, schedule=torch.arange(cnt.numel()), **kw)
    with pytest.raises(ValueError, match="scale must be a positive"):
        block_sparse_attention(q, k, v, idx, cnt, scale=-1.0, **kw)
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        block_sparse_attention(q, k.half(), v, idx, cnt, **kw)
    with pytest.raises(NotImplementedError, match="no backward"):
        block_sparse_attention(q.requires_grad_(), k, v, idx, cnt, **kw)


def test_supports_reasons(monkeypatch):
    q, k, v = torch.randn(1, 2, 32, 64), torch.randn(1, 2, 32, 64), torch.randn(1, 2, 32, 64)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert supports(q, k, v, 16, 16) is None
    assert supports(q.double(), k.double(), v.double(), 16, 16) is None  # CPU PyTorch path: any float
    assert supports(q, k, v, 16, 48) == "kv_block 48 not supported (expected one of (16, 32, 64, 128))"
    assert supports(q.requires_grad_(), k, v, 16, 16) == "requires_grad"
    with torch.no_grad():
        assert supports(q, k, v, 16, 16) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton path: the kernel's own limits
    q72 = torch.randn(1, 2, 32, 72)  # 80, 96 and 256 are served; 72 is not
    assert supports(q72, q72, q72, 16, 16).startswith("head_dim 72 not supported")
    assert supports(q.detach().double(), k.double(), v.double(), 16, 16) == "dtype float64 not supported"
    with pytest.raises(NotImplementedError, match="head_dim 72 not supported"):
        idx = torch.zeros(1, 2, 2, 1, dtype=torch.int32)
        block_sparse_attention(q72, q72, q72, idx, idx[..., 0], q_block=16, kv_block=16, causal=False)


def test_custom_op_matches_and_fake_strides(no_interpret):
    case = Case("op", 2, 4, 2, 48, 80, 32, 16, 16, True, 0.5, kv_valid=True)
    q, k, v, idx, cnt, valid = make_inputs(case)
    scale = 0.2
    got = torch.ops.autosparse.block_sparse_attention(q, k, v, idx, cnt, valid, None, 16, 16, True, scale)
    want = block_sparse_attention(q, k, v, idx, cnt, q_block=16, kv_block=16, causal=True, scale=scale,
                                  kv_valid=valid)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv, fi, fc, fvalid = (mode.from_tensor(t) for t in (q, k, v, idx, cnt, valid))
        fake = torch.ops.autosparse.block_sparse_attention(fq, fk, fv, fi, fc, fvalid, None, 16, 16, True, scale)
    assert fake.shape == got.shape and fake.stride() == got.stride() and fake.dtype == got.dtype
    torch.library.opcheck(torch.ops.autosparse.block_sparse_attention.default,
                          (q, k, v, idx, cnt, valid, None, 16, 16, True, scale))


def test_custom_op_under_torch_compile(no_interpret):
    """The op (with a schedule) inside a compiled function: no graph break, same result as eager."""
    case = Case("compile", 1, 4, 2, 64, 64, 32, 16, 16, True, 0.5)
    q, k, v, idx, cnt, _ = make_inputs(case)
    from autosparse.kernels import row_schedule

    sched = row_schedule(cnt, 2)

    def attend(q, k, v):
        out = torch.ops.autosparse.block_sparse_attention(q * 1.5, k, v, idx, cnt, None, sched, 16, 16, True, 0.25)
        return out.transpose(1, 2).reshape(1, 64, -1)

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), atol=0, rtol=0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpret-worker":
        _interpret_worker(sys.argv[2])
    else:
        raise SystemExit(f"usage: TRITON_INTERPRET=1 python {sys.argv[0]} --interpret-worker OUT.pt")
