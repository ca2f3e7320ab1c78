"""benchmarks/peers.py's pure parts on the CPU: each peer's copy of the layout means the same token
mask as ours, the error check flags a wrong output, a failing peer is reported with its message,
and the whole script runs in --quick mode. The peers' numerics on the H200: the script itself."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from autosparse.kernels import dense_attention

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
_spec = importlib.util.spec_from_file_location("peers", _PATH)
peers = importlib.util.module_from_spec(_spec)
sys.modules["peers"] = peers  # dataclasses look their module up by name
_spec.loader.exec_module(peers)

LAYOUTS = [
    (peers.Shape("causal", 3, 500, 16, True), peers.LayoutSpec("r 0.3 128x128", density=0.3)),
    (peers.Shape("causal", 3, 500, 16, True), peers.LayoutSpec("r 0.3 64x128", q_block=64, density=0.3)),
    (peers.Shape("grid", 2, 12 * 8 * 8, 16, False),  # tiles of 32 tokens, 6 x 2 x 2 of them
     peers.LayoutSpec("tiles", q_block=32, kv_block=32, grid=(12, 8, 8), tile=(2, 4, 4), window=(3, 3, 3))),
]


def _layout(shape, spec):
    return peers.build_layout(shape, spec, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shape,spec", LAYOUTS, ids=[f"{s.name}-{l.name}" for s, l in LAYOUTS])
def test_fa4_tensors_mean_the_same_token_mask(shape, spec):
    layout = _layout(shape, spec)
    g = layout.geometry
    cnt, idx, block_size = peers.fa4_block_sparse(layout)
    assert block_size == (g.q_block, g.kv_block)
    assert cnt.dtype == idx.dtype == torch.int32
    assert tuple(cnt.shape) == (1, shape.heads, g.num_q_blocks)
    assert tuple(idx.shape) == (1, shape.heads, g.num_q_blocks, g.num_kv_blocks)
    # rebuilt the way FA4 reads it: the first cnt entries of each row, ascending, each a whole block
    # under the causal rule and the sequence end
    blocks = torch.zeros(shape.heads, g.num_q_blocks, g.num_kv_blocks, dtype=torch.bool)
    for h in range(shape.heads):
        for i in range(g.num_q_blocks):
            listed = idx[0, h, i, :cnt[0, h, i]]
            assert torch.all(listed[1:] > listed[:-1])
            blocks[h, i, listed.long()] = True
    mask = blocks.repeat_interleave(g.q_block, 1).repeat_interleave(g.kv_block, 2)[:, :shape.seq, :shape.seq]
    if shape.causal:
        mask &= torch.ones(shape.seq, shape.seq, dtype=torch.bool).tril()
    assert torch.equal(mask, layout.to_dense())
    assert 0 < layout.density() < 1


@pytest.mark.parametrize("shape,spec", LAYOUTS, ids=[f"{s.name}-{l.name}" for s, l in LAYOUTS])
def test_flex_block_mask_means_the_same_token_mask(shape, spec):
    import torch.nn.attention.flex_attention as flex

    layout = _layout(shape, spec)
    g = layout.geometry
    bm = peers.flex_block_mask(layout, flex)
    s = shape.seq
    q_idx, kv_idx = torch.arange(s)[:, None], torch.arange(s)[None, :]
    want = layout.to_dense()
    # what the compiled kernel computes: full blocks whole, partial blocks through the mask_mod
    got = torch.zeros_like(want)
    for h in range(shape.heads):
        mod = bm.mask_mod(0, h, q_idx, kv_idx)
        for i in range(g.num_q_blocks):
            rows = slice(i * g.q_block, (i + 1) * g.q_block)
            for j in bm.full_kv_indices[0, h, i, :bm.full_kv_num_blocks[0, h, i]].tolist():
                got[h, rows, j * g.kv_block:(j + 1) * g.kv_block] = True
            for j in bm.kv_indices[0, h, i, :bm.kv_num_blocks[0, h, i]].tolist():
                cols = slice(j * g.kv_block, (j + 1) * g.kv_block)
                got[h, rows, cols] = mod[rows, cols]
        # what eager flex_attention computes: the mask_mod alone
        assert torch.equal(mod, want[h])
    assert torch.equal(got, want)
    # and the two agree on a real call
    q, k, v = torch.randn(3, 1, shape.heads, s, shape.head_dim, generator=torch.Generator().manual_seed(2))
    out = flex.flex_attention(q, k, v, block_mask=bm)
    torch.testing.assert_close(out, dense_attention(q, k, v, want[None]), atol=1e-5, rtol=1e-5)


def test_tile_order_groups_each_tile_into_one_block():
    # grid (2, 4, 4) in tiles of (1, 2, 2): 8 tiles of 4 tokens; blocks of 4 tokens are tiles
    only_self = peers.tile_blocks(32, 4, 4, (2, 4, 4), (1, 2, 2), (1, 1, 1))
    assert torch.equal(only_self, torch.eye(8, dtype=torch.bool))
    everything = peers.tile_blocks(32, 4, 4, (2, 4, 4), (1, 2, 2), (3, 3, 3))
    assert bool(everything.all())


def test_error_check_flags_a_wrong_output():
    ref = torch.randn(2, 8, 4)
    good = ref + 1e-3 * torch.randn_like(ref)
    yard, _ = peers.errors(good, ref)
    assert peers.verdict(yard, yard) == "ok"
    wrong, _ = peers.errors(ref.roll(1, dims=1), ref)  # the right values on the wrong rows
    assert peers.verdict(wrong, yard).startswith("WRONG")
    nan, _ = peers.errors(torch.full_like(ref, math.nan), ref)
    assert peers.verdict(nan, yard) == "WRONG (non-finite output)"


def test_a_failing_peer_is_reported_with_its_message():
    shape, spec = LAYOUTS[0]
    layout = _layout(shape, spec)
    q, k, v = torch.randn(3, 1, shape.seq, shape.heads, shape.head_dim, dtype=torch.bfloat16)
    inputs = peers.Inputs(q, k, v, shape.causal, 0.25, layout)
    rows = torch.arange(0, shape.seq, 50)
    ref = torch.zeros(shape.heads, rows.numel(), shape.head_dim)

    def raises(_):
        raise ValueError("no kernel for\nthis shape " + "x" * 300)
    row = peers.measure(peers.Row("s", "l", "peer"), raises, inputs, rows, ref, quick=True)
    assert row.ms is None and row.note.startswith("ValueError: no kernel for this shape xxx")
    assert len(row.note) == peers.REASON_CHARS

    def banner(_):
        raise RuntimeError("template failed: " + "=" * 80 + "\nNo module named 'cutlass.cute'")
    row = peers.measure(peers.Row("s", "l", "peer"), banner, inputs, rows, ref, quick=True)
    assert row.note == "RuntimeError: template failed: No module named 'cutlass.cute'"

    def skipped(_):
        raise peers.Skip("needs CUDA")
    assert peers.measure(peers.Row("s", "l", "peer"), skipped, inputs, rows, ref, True).note == "not run: needs CUDA"
    assert "not run:" in peers.table([row, peers.Row("s", "l", "other", note="not run: needs CUDA")])


def test_quick_run_writes_the_table(tmp_path):
    assert peers.main(["--quick", "--out", str(tmp_path), "--cases", "0"]) == 0
    text = (tmp_path / "peers.md").read_text()
    assert "| dense | 1.000 | SDPA default dense |" in text
    assert "ours (Triton kernel)" in text and "WRONG" not in text
