"""The last query rows' attention over every key, summed along lines (vertical_slash's estimate).

MInference's vertical-slash estimate reads the exact attention of a causal prefill's last R query
rows (row r at absolute position ``Sk - R + r``) and ranks key columns ("verticals") and diagonals
("slashes", offset ``query - key``) by the attention they hold. Done with torch ops that is a
``[B, H, R, Sk]`` tensor written and read some eight times (logits, softmax, a skewed copy for the
diagonals, the column sums); at 32K keys that is ~10 % of dense attention's time. Here it is two
passes over K per head and no ``[R, Sk]`` tensor in memory:

1. ``PASS == 0``: per key chunk, each row's running max and sum of ``exp2`` (online softmax);
   the chunks' partials are combined on the host side of the launch (``[B, H, chunks, R]``: tiny).
2. ``PASS == 1``: recompute each tile's logits, normalise them with the combined max and sum, and
   sum them over the rows (one column each: plain stores) and along diagonals. A tile's diagonals
   are its anti-skewed columns: the tile goes through a per-program scratch buffer and comes back
   read with row ``r`` shifted by ``r``, so each diagonal is one column of the reloaded tile, and
   the ``BLOCK_N + R - 1`` diagonal sums of a tile are added to the output with atomics (tiles
   next to each other share ``R - 1`` diagonals).
3. ``PASS == 2`` (``vertical_slash(mass=...)``): the column sums of pass 1 without the pairs that
   lie on kept diagonals (``Skip[b, h, offset]``).

One program owns one query head and a chunk of keys; the heads of one KV head are next to each
other in the grid, so their K tiles come from L2 after the first read.
"""

import triton
import triton.language as tl


@triton.jit
def _last_rows_fwd(Q, K, Stats, Skip, Columns, Diagonals, Scratch,  #
                   stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kn,  #
                   H, Sk, qk_scale, keys_per_program, chunks,  #
                   GROUP: tl.constexpr, R: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, DIAG: tl.constexpr, PASS: tl.constexpr):
    """Q ``[B, H, R, D]`` (the last R rows), K ``[B, H // GROUP, Sk, D]``; Stats fp32
    ``[B, H, chunks, 2, R]``: pass 0 writes each chunk's (max, sum) in the log2 domain, passes 1-2
    read the combined (max, sum) from chunk 0. Columns / Diagonals fp32 ``[B, H, Sk]`` (zeroed by the
    caller), Skip uint8 ``[B, H, Sk]``, Scratch fp32 ``[programs, R, BLOCK_N]``. DIAG: the next power
    of two of ``BLOCK_N + R - 1`` (the diagonals one tile touches)."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, R)
    dims = tl.arange(0, HEAD_DIM_PAD)
    d_ok = dims[None, :] < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qr + dims[None, :],
                mask=d_ok, other=0.0)
    k_head = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    first = Sk - R
    position = first + rows  # each row's absolute position: it sees the keys up to it
    lines = bh.to(tl.int64) * Sk  # the head's row of Columns / Diagonals / Skip
    stats = Stats + bh.to(tl.int64) * chunks * 2 * R
    if PASS == 0:
        m_i = tl.full([R], float("-inf"), tl.float32)
        l_i = tl.zeros([R], tl.float32)
    else:
        m_i = tl.load(stats + rows)
        l_i = tl.load(stats + R + rows)
    scratch = Scratch + (bh * chunks + chunk).to(tl.int64) * R * BLOCK_N
    start = chunk * keys_per_program
    end = tl.minimum(start + keys_per_program, Sk)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_head + keys[:, None].to(tl.int64) * stride_kn + dims[None, :], mask=(keys[:, None] < end) & d_ok,
                    other=0.0)
        visible = (keys[None, :] <= position[:, None]) & (keys[None, :] < end)
        s = tl.where(visible, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        if PASS == 0:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key of this tile yet
            l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        else:
            p = tl.math.exp2(s - m_i[:, None]) / l_i[:, None]  # 0 where not visible
            offset = position[:, None] - keys[None, :]
            if PASS == 2:
                skip = tl.load(Skip + lines + offset, mask=visible, other=0)
                p = tl.where(skip != 0, 0.0, p)
            tl.store(Columns + lines + keys, tl.sum(p, 0), mask=keys < end)
            if PASS == 1:
                tl.store(scratch + rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], p)
                tl.debug_barrier()
                # Row r reads the tile shifted by r: entry (r, u) is the tile's (r, u - (R - 1) + r),
                # whose offset first + r - (n0 + u - (R - 1) + r) does not depend on r.
                u = tl.arange(0, DIAG)
                n = u[None, :] - (R - 1) + rows[:, None]
                inside = (n >= 0) & (n < BLOCK_N)
                diagonal = tl.sum(tl.load(scratch + rows[:, None] * BLOCK_N + n, mask=inside, other=0.0), 0)
                d = first - n0 + (R - 1) - u
                tl.atomic_add(Diagonals + lines + d, diagonal, mask=(d >= 0) & (u < BLOCK_N + R - 1), sem="relaxed")
                tl.debug_barrier()  # every row has read the scratch before the next tile overwrites it
    if PASS == 0:
        at = stats + chunk * 2 * R
        tl.store(at + rows, m_i)
        tl.store(at + R + rows, l_i)
