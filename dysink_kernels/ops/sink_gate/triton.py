"""Triton sink anomaly gate: a split reduction for the means, then one vote kernel.

``sink_gate_triton`` launches two kernels:

1. ``_row_sums_fwd``, grid ``(H, NQ + NK, B)``: program ``(h, c, b)`` sums one
   chunk of rows of ``q[b, :, h]`` (``c < NQ``) or of ``k[b, :k_len[b], h]``
   (``c >= NQ``) into an fp32 partial ``(D,)``. Chunks split the rows so that
   the long key window is read by many programs at once; every byte of ``q`` and
   of the valid prefix of ``k`` is read once, ``(B, NQ + NK, H, D)`` fp32 partials
   are written.
2. ``_gate_vote_fwd``, grid ``(B,)`` (``(1,)`` with ``scope="batch"``): adds each
   sample's partials up in a fixed order (deterministic, no atomics) into
   ``qbar``/``kbar`` (a ``(B, 2, H, D)`` scratch), then votes.

``gate_from_means_triton`` launches the vote kernel alone on the given means;
``gate_votes_triton`` only counts the votes (``_gate_votes_fwd``, grid ``(B,)``),
for head parallelism, where the ranks add their counts before deciding.

The vote of sample ``b``: ``s_local[h] = qbar[h] . kbar[h]`` and
``s_entry[j, h] = qbar[h] . slot_mean_k[slot[j], h]``; ``votes[j]`` counts the
heads with ``s_entry > s_local`` (strict); ``ratio = votes / H``. With
``scope="batch"`` one program sums all samples' votes by the rank of each valid
slot among its sample's valid slots and checks whether all samples hold the same
number of valid slots; if so the r-th valid slots are judged together,
``ratio = sum_b votes / (B H)``. The vote reads ``2 H D`` means and ``n H D`` slot
means per sample: microseconds, so one program for the batch costs little and
needs no second launch. Ratios are exact quotients of integer counts (IEEE
division, ``div_rn``, as the CPU oracle; CUDA PyTorch multiplies by a rounded
reciprocal and can differ in the last bit) and are compared with ``tau`` in fp32,
as ``torch`` compares an fp32 tensor with a float.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gate_from_means_triton", "gate_votes_triton", "sink_gate_triton"]

# Rows summed per step of the reduction kernel (x the padded head dim per tile).
BLOCK_S = 64
# Row tiles in flight per reduction program (software pipelining through shared
# memory): the loads, not the adds, bound the reduction.
SUM_STAGES = 3
# Aim for about this many reduction programs so the key window is spread over
# the whole GPU, with at most MAX_CHUNKS partials per (sample, head) for the vote
# kernel to add up.
TARGET_PROGRAMS = 512
MAX_CHUNKS = 16
# Elements of the vote kernel's tiles: (chunks, BLOCK_HD) when finishing the means,
# every chunk of a run of H*D in one load; (BLOCK_N, BLOCK_H, BLOCK_D) slot means.
VOTE_TILE_ELEMS = 8192
NUM_WARPS = 4
VOTE_NUM_WARPS = 8


# ----------------------------------------------------------------------------- means
@triton.jit
def _sum_rows(p_x, p_out, start, end, stride_s, stride_d, D, BLOCK_S: tl.constexpr,
              BLOCK_D: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """``p_out[:D] = sum(x[start:end, :D])`` in fp32, one ``(BLOCK_S, BLOCK_D)`` tile a step."""
    o_s = tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    # Per-lane partial sums, reduced once at the end: a fixed summation order.
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for s0 in tl.range(start, end, BLOCK_S, num_stages=STAGES):
        o_row = s0 + o_s
        m_x = (o_row < end)[:, None] & m_d[None, :]
        acc += tl.load(
            p_x + o_row[:, None].to(tl.int64) * stride_s + o_d[None, :] * stride_d,
            mask=m_x,
            other=0.0,
        ).to(tl.float32)
    tl.store(p_out + o_d, tl.sum(acc, axis=0), mask=m_d)


@triton.jit
def _row_sums_fwd(
    q_ptr,
    k_ptr,
    k_len_ptr,
    part_ptr,
    Sq,
    D,
    NQ,
    rows_q,
    rows_k,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_klen,
    stride_pb,
    stride_pc,
    stride_ph,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Chunk sums of ``q`` (chunks ``[0, NQ)``) and of ``k``'s valid prefix (the rest).

    Reads ``rows * D`` elements, writes ``D`` fp32 (``part`` is ``(B, NQ+NK, H, D)``
    with a contiguous last dim).
    """
    i_h = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    p_out = part_ptr + i_b * stride_pb + i_c * stride_pc + i_h * stride_ph
    if i_c < NQ:
        start = i_c * rows_q
        end = tl.minimum(start + rows_q, Sq)
        p_x = q_ptr + i_b * stride_qb + i_h * stride_qh
        _sum_rows(p_x, p_out, start, end, stride_qs, stride_qd, D, BLOCK_S, BLOCK_D, STAGES)
    else:
        k_len = tl.load(k_len_ptr + i_b * stride_klen).to(tl.int32)
        start = (i_c - NQ) * rows_k
        end = tl.minimum(start + rows_k, k_len)
        p_x = k_ptr + i_b * stride_kb + i_h * stride_kh
        _sum_rows(p_x, p_out, start, end, stride_ks, stride_kd, D, BLOCK_S, BLOCK_D, STAGES)


# ----------------------------------------------------------------------------- vote
@triton.jit
def _finish_means(
    part_ptr,
    means_ptr,
    k_len_ptr,
    i_b,
    HD,
    NQ,
    NK,
    q_count,
    stride_pb,
    stride_pc,
    stride_mb,
    stride_mw,
    stride_klen,
    BLOCK_C: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    """``means[i_b, 0] = sum_c part[i_b, c] / Sq`` over the q chunks, ``means[i_b, 1]`` the
    same over the k chunks divided by ``max(k_len, 1)`` (a mean over no rows is 0).

    Both buffers are the launcher's own, contiguous over ``(H, D)``, so a head-dim
    row is one flat ``HD`` run: ``(BLOCK_C, BLOCK_HD)`` tiles, every chunk of a run
    in one load. Reads ``(NQ + NK) * HD``, writes ``2 * HD`` fp32.
    """
    o_c = tl.arange(0, BLOCK_C)
    q_div = tl.maximum(tl.cast(q_count, tl.float32), 1.0)
    k_div = tl.maximum(tl.load(k_len_ptr + i_b * stride_klen).to(tl.float32), 1.0)
    p_part = part_ptr + i_b * stride_pb
    p_means = means_ptr + i_b * stride_mb
    for hd0 in range(0, HD, BLOCK_HD):
        o_hd = hd0 + tl.arange(0, BLOCK_HD)
        m_hd = o_hd < HD
        b_q = tl.load(
            p_part + o_c[:, None] * stride_pc + o_hd[None, :],
            mask=(o_c < NQ)[:, None] & m_hd[None, :],
            other=0.0,
        )
        b_k = tl.load(
            p_part + (NQ + o_c)[:, None] * stride_pc + o_hd[None, :],
            mask=(o_c < NK)[:, None] & m_hd[None, :],
            other=0.0,
        )
        tl.store(p_means + o_hd, tl.div_rn(tl.sum(b_q, axis=0), q_div), mask=m_hd)
        tl.store(p_means + stride_mw + o_hd, tl.div_rn(tl.sum(b_k, axis=0), k_div), mask=m_hd)


@triton.jit
def _sample_votes(
    qm_ptr,
    km_ptr,
    mk_ptr,
    idx_ptr,
    i_b,
    H,
    D,
    P,
    n,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kd,
    stride_mp,
    stride_mh,
    stride_md,
    stride_ib,
    stride_in,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Votes against each listed slot of sample ``i_b``: ``(votes f32, valid, slot)``.

    Reads ``2 * H * D`` means and ``n_valid * H * D`` slot means.
    """
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < n
    b_slot = tl.load(idx_ptr + i_b * stride_ib + o_n * stride_in, mask=m_n, other=-1).to(tl.int64)
    m_valid = b_slot >= 0
    # An empty pool (P == 0) has no means to read: its entries score 0, as in the oracle.
    m_slot = m_valid & (b_slot < P)
    o_h = tl.arange(0, BLOCK_H)
    m_h = o_h < H
    s_local = tl.zeros([BLOCK_H], dtype=tl.float32)
    s_entry = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_hd = m_h[:, None] & (o_d < D)[None, :]
        b_qbar = tl.load(
            qm_ptr + i_b * stride_qb + o_h[:, None] * stride_qh + o_d[None, :] * stride_qd,
            mask=m_hd,
            other=0.0,
        ).to(tl.float32)
        b_kbar = tl.load(
            km_ptr + i_b * stride_kb + o_h[:, None] * stride_kh + o_d[None, :] * stride_kd,
            mask=m_hd,
            other=0.0,
        ).to(tl.float32)
        s_local += tl.sum(b_qbar * b_kbar, axis=1)
        b_mk = tl.load(
            mk_ptr
            + b_slot[:, None, None] * stride_mp
            + o_h[None, :, None] * stride_mh
            + o_d[None, None, :] * stride_md,
            mask=m_slot[:, None, None] & m_hd[None, :, :],
            other=0.0,
        ).to(tl.float32)
        s_entry += tl.sum(b_qbar[None, :, :] * b_mk, axis=2)
    m_vote = (s_entry > s_local[None, :]) & m_h[None, :] & m_valid[:, None]
    votes = tl.sum(m_vote.to(tl.float32), axis=1)
    return votes, m_valid, b_slot


@triton.jit
def _gate_vote_fwd(
    part_ptr,
    qm_ptr,
    km_ptr,
    k_len_ptr,
    mk_ptr,
    idx_ptr,
    kept_ptr,
    ratio_ptr,
    B,
    H,
    D,
    P,
    n,
    NQ,
    NK,
    q_count,
    tau,
    stride_pb,
    stride_pc,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kd,
    stride_qk,
    stride_klen,
    stride_mp,
    stride_mh,
    stride_md,
    stride_ib,
    stride_in,
    stride_ob,
    stride_on,
    stride_rb,
    stride_rn,
    FROM_SUMS: tl.constexpr,
    SCOPE_BATCH: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Gate decisions: ``kept`` and ``ratio`` rows (``n`` each) of the program's samples.

    ``SCOPE_BATCH``: one program (grid ``(1,)``) judges all ``B`` samples, since a
    slot's ratio may depend on every sample's votes. Otherwise program ``i_b`` judges
    sample ``i_b``. With ``FROM_SUMS`` the program first finishes its samples' means
    from the row-sum partials into ``qm``/``km`` (its own scratch rows).
    """
    i_b = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < n
    if SCOPE_BATCH:
        b_lo = 0
        b_hi = B
    else:
        b_lo = i_b
        b_hi = i_b + 1
    if FROM_SUMS:
        for b in range(b_lo, b_hi):
            _finish_means(
                part_ptr, qm_ptr, k_len_ptr, b, H * D, NQ, NK, q_count, stride_pb, stride_pc,
                stride_qb, stride_qk, stride_klen, BLOCK_C, BLOCK_HD,
            )  # fmt: skip
        # The means were written by other threads of this program.
        tl.debug_barrier()
    if SCOPE_BATCH:
        # Votes summed by rank among each sample's valid slots, and the spread of
        # the valid counts (uniform when min == max).
        by_rank = tl.zeros([BLOCK_N], dtype=tl.float32)
        count_min = tl.cast(n, tl.int32)
        count_max = tl.full([], 0, dtype=tl.int32)
        for b in range(B):
            votes, m_valid, b_slot = _sample_votes(
                qm_ptr, km_ptr, mk_ptr, idx_ptr, b, H, D, P, n,
                stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kd,
                stride_mp, stride_mh, stride_md, stride_ib, stride_in,
                BLOCK_N, BLOCK_H, BLOCK_D,
            )  # fmt: skip
            flag = m_valid.to(tl.int32)
            rank = tl.cumsum(flag, axis=0) - flag
            m_rank = (rank[:, None] == o_n[None, :]) & m_valid[:, None]
            by_rank += tl.sum(tl.where(m_rank, votes[:, None], 0.0), axis=0)
            count = tl.sum(flag, axis=0)
            count_min = tl.minimum(count_min, count)
            count_max = tl.maximum(count_max, count)
    for b in range(b_lo, b_hi):
        # Batch scope recomputes each sample's (small) vote rather than keeping B rows.
        votes, m_valid, b_slot = _sample_votes(
            qm_ptr, km_ptr, mk_ptr, idx_ptr, b, H, D, P, n,
            stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kd,
            stride_mp, stride_mh, stride_md, stride_ib, stride_in,
            BLOCK_N, BLOCK_H, BLOCK_D,
        )  # fmt: skip
        ratio = tl.div_rn(votes, tl.cast(H, tl.float32))
        if SCOPE_BATCH:
            flag = m_valid.to(tl.int32)
            rank = tl.cumsum(flag, axis=0) - flag
            batch_votes = tl.sum(
                tl.where(rank[:, None] == o_n[None, :], by_rank[None, :], 0.0), axis=1
            )
            batch_ratio = tl.div_rn(batch_votes, tl.cast(B * H, tl.float32))
            ratio = tl.where(count_min == count_max, batch_ratio, ratio)
        ratio = tl.where(m_valid, ratio, 0.0)
        kept = tl.where(ratio > tau, -1, b_slot)
        tl.store(kept_ptr + b * stride_ob + o_n * stride_on, kept, mask=m_n)
        tl.store(ratio_ptr + b * stride_rb + o_n * stride_rn, ratio, mask=m_n)


@triton.jit
def _gate_votes_fwd(
    qm_ptr,
    km_ptr,
    mk_ptr,
    idx_ptr,
    votes_ptr,
    H,
    D,
    P,
    n,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kd,
    stride_mp,
    stride_mh,
    stride_md,
    stride_ib,
    stride_in,
    stride_vb,
    stride_vn,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``votes[i_b, j]``: heads of sample ``i_b`` voting against its ``j``-th slot (fp32)."""
    i_b = tl.program_id(0).to(tl.int64)
    votes, _, _ = _sample_votes(
        qm_ptr, km_ptr, mk_ptr, idx_ptr, i_b, H, D, P, n,
        stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kd,
        stride_mp, stride_mh, stride_md, stride_ib, stride_in,
        BLOCK_N, BLOCK_H, BLOCK_D,
    )  # fmt: skip
    o_n = tl.arange(0, BLOCK_N)
    tl.store(votes_ptr + i_b * stride_vb + o_n * stride_vn, votes, mask=o_n < n)


# ----------------------------------------------------------------------------- launchers
def _launch_vote(
    part: torch.Tensor | None,
    nq: int,
    q_count: int,
    k_len: torch.Tensor,
    qbar: torch.Tensor,
    kbar: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    tau: float,
    scope: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vote on ``qbar, kbar (B, H, D)``; with ``part`` (row-sum partials, ``nq`` of
    them for ``q``) the kernel first writes the means into ``qbar``/``kbar``."""
    B, n = slot_idx.shape
    _, H, D = qbar.shape
    kept = torch.empty_like(slot_idx, memory_format=torch.contiguous_format)
    ratio = torch.empty(B, n, dtype=torch.float32, device=slot_idx.device)
    from_sums = part is not None
    chunks = max(nq, part.shape[1] - nq) if from_sums else 1
    block_c = triton.next_power_of_2(chunks)
    block_n = triton.next_power_of_2(n)
    block_h = triton.next_power_of_2(H)
    block_d = min(triton.next_power_of_2(D), max(VOTE_TILE_ELEMS // (block_n * block_h), 1))
    block_hd = min(triton.next_power_of_2(H * D), max(VOTE_TILE_ELEMS // block_c, 1))
    if not from_sums:
        part = qbar  # never read
    batch = scope == "batch"
    _gate_vote_fwd[(1 if batch else B,)](
        part, qbar, kbar, k_len, slot_mean_k, slot_idx, kept, ratio,
        B, H, D, slot_mean_k.shape[0], n, nq, part.shape[1] - nq, q_count, tau,
        part.stride(0), part.stride(1),
        qbar.stride(0), qbar.stride(1), qbar.stride(2),
        kbar.stride(0), kbar.stride(1), kbar.stride(2), H * D, k_len.stride(0),
        slot_mean_k.stride(0), slot_mean_k.stride(1), slot_mean_k.stride(2),
        slot_idx.stride(0), slot_idx.stride(1),
        kept.stride(0), kept.stride(1), ratio.stride(0), ratio.stride(1),
        FROM_SUMS=from_sums, SCOPE_BATCH=batch, BLOCK_C=block_c, BLOCK_HD=block_hd,
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=VOTE_NUM_WARPS,
    )  # fmt: skip
    return kept, ratio


def _empty_result(slot_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, n = slot_idx.shape
    return slot_idx.clone(), torch.zeros(B, n, dtype=torch.float32, device=slot_idx.device)


def gate_votes_triton(
    qbar: torch.Tensor,
    kbar_local: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
) -> torch.Tensor:
    """Triton ``gate_votes`` entry: ``(B, n)`` fp32 vote counts (see ``votes.py``), one launch."""
    B, n = slot_idx.shape
    _, H, D = qbar.shape
    votes = torch.zeros(B, n, dtype=torch.float32, device=slot_idx.device)
    if n == 0 or B == 0:
        return votes
    block_n = triton.next_power_of_2(n)
    block_h = triton.next_power_of_2(H)
    block_d = min(triton.next_power_of_2(D), max(VOTE_TILE_ELEMS // (block_n * block_h), 1))
    _gate_votes_fwd[(B,)](
        qbar, kbar_local, slot_mean_k, slot_idx, votes, H, D, slot_mean_k.shape[0], n,
        qbar.stride(0), qbar.stride(1), qbar.stride(2),
        kbar_local.stride(0), kbar_local.stride(1), kbar_local.stride(2),
        slot_mean_k.stride(0), slot_mean_k.stride(1), slot_mean_k.stride(2),
        slot_idx.stride(0), slot_idx.stride(1), votes.stride(0), votes.stride(1),
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )  # fmt: skip
    return votes


def gate_from_means_triton(
    qbar: torch.Tensor,
    kbar_local: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    tau: float,
    scope: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``gate_from_means`` (see ``naive.py``): one launch."""
    B, n = slot_idx.shape
    if n == 0 or B == 0:
        return _empty_result(slot_idx)
    # k_len is not read without partials.
    return _launch_vote(None, 1, 1, slot_idx, qbar, kbar_local, slot_mean_k, slot_idx, tau, scope)


def _split_rows(Sq: int, Sk: int, B: int, H: int) -> tuple[int, int]:
    """Chunks ``(NQ, NK)`` for the row sums: about ``TARGET_PROGRAMS`` programs,
    shared between ``q`` and ``k`` by their lengths, at least one each."""
    chunks = min(max(TARGET_PROGRAMS // max(B * H, 1), 2), MAX_CHUNKS)
    nq = max(1, min(round(chunks * Sq / max(Sq + Sk, 1)), triton.cdiv(Sq, BLOCK_S)))
    nk = max(1, min(chunks - nq, triton.cdiv(Sk, BLOCK_S)))
    return nq, nk


def _launch_row_sums(
    q: torch.Tensor, k: torch.Tensor, k_len: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """``(B, NQ + NK, H, D)`` fp32 chunk sums of ``q`` rows, then of ``k``'s valid rows; ``NQ``."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    nq, nk = _split_rows(Sq, Sk, B, H)
    # Chunk lengths in whole BLOCK_S steps, so that no step straddles two chunks.
    rows_q = triton.cdiv(triton.cdiv(Sq, nq), BLOCK_S) * BLOCK_S
    rows_k = triton.cdiv(triton.cdiv(Sk, nk), BLOCK_S) * BLOCK_S
    part = torch.empty(B, nq + nk, H, D, dtype=torch.float32, device=q.device)
    if H * D > 0:
        _row_sums_fwd[(H, nq + nk, B)](
            q, k, k_len, part, Sq, D, nq, rows_q, rows_k,
            q.stride(0), q.stride(1), q.stride(2), q.stride(3),
            k.stride(0), k.stride(1), k.stride(2), k.stride(3), k_len.stride(0),
            part.stride(0), part.stride(1), part.stride(2),
            BLOCK_S=BLOCK_S, BLOCK_D=triton.next_power_of_2(max(D, 1)), STAGES=SUM_STAGES,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return part, nq


def sink_gate_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    k_len: torch.Tensor,
    tau: float,
    scope: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``sink_gate`` (see ``naive.py``): two launches."""
    B, Sq, H, D = q.shape
    n = slot_idx.shape[1]
    if n == 0 or B == 0:
        return _empty_result(slot_idx)
    part, nq = _launch_row_sums(q, k, k_len)
    # The vote kernel finishes the means into this scratch: [:, 0] qbar, [:, 1] kbar.
    means = torch.empty(B, 2, H, D, dtype=torch.float32, device=q.device)
    return _launch_vote(
        part, nq, Sq, k_len, means[:, 0], means[:, 1], slot_mean_k, slot_idx, tau, scope
    )
