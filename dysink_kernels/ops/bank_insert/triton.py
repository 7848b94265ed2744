"""Triton bank insert: a per-sample decision kernel, then one fused copy kernel.

1. ``_choose_slot_fwd``, grid ``(B,)``: program ``b`` scans only its own region
   ``[b C, (b + 1) C)`` of the bank (``C * F`` feature elements when deduplicating,
   ``C`` owners and stamps), decides ``store`` and ``slot`` as the oracle does
   (finite feature; empty region or max cosine ``<= dedup``; first free slot below
   ``limit``, else the oldest stamp, first index on ties), writes them, and when
   storing also writes the region's metadata: the normalised feature, owner,
   frame and stamp ``clock + b``. Regions are disjoint, so programs never touch
   each other's slots.
2. ``_copy_block_fwd``, grid ``(H, B, L)``: program ``(h, b, l)`` reads
   ``store[b]`` and returns at once when it is false; otherwise it walks the
   block's ``S_e`` tokens in ``BLOCK_T`` rows, gathering ``src[l, b, src_pos[t], h, :]``
   (``D`` contiguous elements per row), writing them to ``pool[l, slot, t, h, :]``
   for K and V, and summing K in fp32 per lane: the mean key
   ``mean_k[l, slot, h]`` comes from the same pass, reduced in a fixed order
   (deterministic, no atomics). Traffic: ``2 * S_e * D`` elements read and written
   per program, ``S_e`` positions read (cached), ``D`` fp32 means written.
   Program ``(0, 0, 0)`` also advances ``clock`` by ``B``: the decision kernel,
   earlier on the same stream, has read it, and no other program reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["bank_insert_triton"]

# Slots of a region scanned per step of the decision kernel, and the number of
# feature elements held per step (BLOCK_C x BLOCK_F).
MAX_BLOCK_C = 64
DECIDE_TILE_ELEMS = 4096
# Tokens copied per step of the copy kernel: BLOCK_T rows of one head's D elements
# (32 KiB of K and V in flight per step at D = 128 in bf16; measured on an H200 at
# 93% of a device-to-device copy, without software pipelining).
BLOCK_T = 128
# F.normalize's default eps: a zero vector normalises to zero.
NORM_EPS = 1e-12
NUM_WARPS = 4
COPY_NUM_WARPS = 8

STAMP_NONE = tl.constexpr(9223372036854775807)  # int64 max: "no occupied slot"


# ----------------------------------------------------------------------------- decision
@triton.jit
def _choose_slot_fwd(
    feat_ptr,
    sfeat_ptr,
    owner_ptr,
    frame_ptr,
    stamp_ptr,
    clock_ptr,
    new_frame_ptr,
    store_ptr,
    slot_ptr,
    F,
    C,
    limit,
    dedup,
    stride_fb,
    stride_ff,
    stride_sp,
    stride_sf,
    stride_owner,
    stride_frame,
    stride_stamp,
    HAS_DEDUP: tl.constexpr,
    NORM_EPS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Store flag and slot of sample ``i_b``, and its metadata write when storing."""
    i_b = tl.program_id(0).to(tl.int64)
    p_f = feat_ptr + i_b * stride_fb

    # The feature's norm and finiteness (NaN and inf fail ``|x| < inf``).
    b_sq = tl.zeros([BLOCK_F], dtype=tl.float32)
    b_bad = tl.zeros([BLOCK_F], dtype=tl.int32)
    for f0 in range(0, F, BLOCK_F):
        o_f = f0 + tl.arange(0, BLOCK_F)
        b_f = tl.load(p_f + o_f * stride_ff, mask=o_f < F, other=0.0).to(tl.float32)
        b_sq += b_f * b_f
        b_bad = tl.maximum(b_bad, (~(tl.abs(b_f) < float("inf"))).to(tl.int32))
    finite = tl.max(b_bad, axis=0) == 0
    f_norm = tl.maximum(tl.sqrt_rn(tl.sum(b_sq, axis=0)), NORM_EPS)

    # One pass over the region: max cosine to the occupied slots, first free slot
    # below ``limit``, oldest occupied slot (first index among equal stamps).
    max_cos = tl.full([], float("-inf"), dtype=tl.float32)
    n_occupied = tl.full([], 0, dtype=tl.int32)
    first_free = tl.cast(C, tl.int32)
    old_stamp = tl.full([], STAMP_NONE, dtype=tl.int64)
    old_idx = tl.full([], 0, dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        o_p = i_b * C + o_c
        b_owner = tl.load(owner_ptr + o_p * stride_owner, mask=m_c, other=-1)
        m_occ = m_c & (b_owner >= 0)
        b_stamp = tl.load(stamp_ptr + o_p * stride_stamp, mask=m_c, other=0).to(tl.int64)
        if HAS_DEDUP:
            b_dot = tl.zeros([BLOCK_C], dtype=tl.float32)
            b_ssq = tl.zeros([BLOCK_C], dtype=tl.float32)
            for f0 in range(0, F, BLOCK_F):
                o_f = f0 + tl.arange(0, BLOCK_F)
                m_f = o_f < F
                b_fn = tl.div_rn(
                    tl.load(p_f + o_f * stride_ff, mask=m_f, other=0.0).to(tl.float32), f_norm
                )
                b_s = tl.load(
                    sfeat_ptr + o_p[:, None] * stride_sp + o_f[None, :] * stride_sf,
                    mask=m_occ[:, None] & m_f[None, :],
                    other=0.0,
                ).to(tl.float32)
                b_dot += tl.sum(b_s * b_fn[None, :], axis=1)
                b_ssq += tl.sum(b_s * b_s, axis=1)
            b_cos = tl.div_rn(b_dot, tl.maximum(tl.sqrt_rn(b_ssq), NORM_EPS))
            max_cos = tl.maximum(max_cos, tl.max(tl.where(m_occ, b_cos, float("-inf")), axis=0))
        n_occupied += tl.sum(m_occ.to(tl.int32), axis=0)
        m_free = m_c & ~m_occ & (o_c < limit)
        first_free = tl.minimum(first_free, tl.min(tl.where(m_free, o_c, C), axis=0))
        t_stamp = tl.min(tl.where(m_occ, b_stamp, STAMP_NONE), axis=0)
        t_idx = tl.min(tl.where(m_occ & (b_stamp == t_stamp), o_c, C), axis=0)
        # Strict: an earlier tile keeps equal stamps.
        old_idx = tl.where(t_stamp < old_stamp, t_idx, old_idx)
        old_stamp = tl.minimum(old_stamp, t_stamp)

    store = finite
    if HAS_DEDUP:
        store = store & ((n_occupied == 0) | (max_cos <= dedup))
    local = tl.where(first_free < C, first_free, old_idx)
    slot = i_b * C + local
    tl.store(store_ptr + i_b, store.to(tl.int8))
    tl.store(slot_ptr + i_b, slot)
    if store:
        for f0 in range(0, F, BLOCK_F):
            o_f = f0 + tl.arange(0, BLOCK_F)
            m_f = o_f < F
            b_f = tl.load(p_f + o_f * stride_ff, mask=m_f, other=0.0).to(tl.float32)
            tl.store(sfeat_ptr + slot * stride_sp + o_f * stride_sf, tl.div_rn(b_f, f_norm),
                     mask=m_f)  # fmt: skip
        tl.store(owner_ptr + slot * stride_owner, i_b)
        tl.store(frame_ptr + slot * stride_frame, tl.load(new_frame_ptr))
        tl.store(stamp_ptr + slot * stride_stamp, tl.load(clock_ptr) + i_b)


# ----------------------------------------------------------------------------- copy
@triton.jit
def _copy_block_fwd(
    src_k_ptr,
    src_v_ptr,
    pos_ptr,
    pool_k_ptr,
    pool_v_ptr,
    mean_ptr,
    store_ptr,
    slot_ptr,
    clock_ptr,
    B,
    S_e,
    D,
    stride_skl,
    stride_skb,
    stride_skn,
    stride_skh,
    stride_skd,
    stride_svl,
    stride_svb,
    stride_svn,
    stride_svh,
    stride_svd,
    stride_pos,
    stride_pkl,
    stride_pkp,
    stride_pkt,
    stride_pkh,
    stride_pkd,
    stride_pvl,
    stride_pvp,
    stride_pvt,
    stride_pvh,
    stride_pvd,
    stride_ml,
    stride_mp,
    stride_mh,
    stride_md,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Copy head ``i_h`` of layer ``i_l`` of sample ``i_b``'s block to its slot, with its mean."""
    i_h = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    i_l = tl.program_id(2).to(tl.int64)
    if (i_h == 0) & (i_b == 0) & (i_l == 0):
        tl.store(clock_ptr, tl.load(clock_ptr) + B)
    if tl.load(store_ptr + i_b) == 0:
        return
    slot = tl.load(slot_ptr + i_b)

    p_sk = src_k_ptr + i_l * stride_skl + i_b * stride_skb + i_h * stride_skh
    p_sv = src_v_ptr + i_l * stride_svl + i_b * stride_svb + i_h * stride_svh
    p_pk = pool_k_ptr + i_l * stride_pkl + slot * stride_pkp + i_h * stride_pkh
    p_pv = pool_v_ptr + i_l * stride_pvl + slot * stride_pvp + i_h * stride_pvh
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for t0 in range(0, S_e, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < S_e
        m_td = m_t[:, None] & m_d[None, :]
        o_n = tl.load(pos_ptr + o_t * stride_pos, mask=m_t, other=0).to(tl.int64)
        o_row = o_t.to(tl.int64)
        b_k = tl.load(
            p_sk + o_n[:, None] * stride_skn + o_d[None, :] * stride_skd, mask=m_td, other=0.0
        )
        b_v = tl.load(p_sv + o_n[:, None] * stride_svn + o_d[None, :] * stride_svd, mask=m_td)
        tl.store(p_pk + o_row[:, None] * stride_pkt + o_d[None, :] * stride_pkd, b_k, mask=m_td)
        tl.store(p_pv + o_row[:, None] * stride_pvt + o_d[None, :] * stride_pvd, b_v, mask=m_td)
        acc += b_k.to(tl.float32)
    mean = tl.div_rn(tl.sum(acc, axis=0), tl.cast(S_e, tl.float32))
    p_m = mean_ptr + i_l * stride_ml + slot * stride_mp + i_h * stride_mh
    tl.store(p_m + o_d * stride_md, mean, mask=m_d)


# ----------------------------------------------------------------------------- launcher
def bank_insert_triton(
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    pool_mean_k: torch.Tensor,
    slot_feat: torch.Tensor,
    slot_owner: torch.Tensor,
    slot_frame: torch.Tensor,
    slot_stamp: torch.Tensor,
    clock: torch.Tensor,
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    src_pos: torch.Tensor,
    feature: torch.Tensor,
    frame: torch.Tensor,
    slots_per_sample: int,
    limit: int,
    dedup: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``bank_insert`` (see ``naive.py``); mutates the bank in place.

    Two launches and no host read: the decision kernel, then the copy kernel.
    """
    B, F = feature.shape
    L, _, S_e, H, D = pool_k.shape
    C = slots_per_sample
    device = feature.device
    stored = torch.empty(B, dtype=torch.bool, device=device)
    slot = torch.empty(B, dtype=torch.int64, device=device)
    if B == 0:
        return stored, slot
    block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    block_f = min(triton.next_power_of_2(max(F, 1)), max(DECIDE_TILE_ELEMS // block_c, 1))
    _choose_slot_fwd[(B,)](
        feature, slot_feat, slot_owner, slot_frame, slot_stamp, clock, frame,
        stored.view(torch.int8), slot,
        F, C, limit, 0.0 if dedup is None else float(dedup),
        feature.stride(0), feature.stride(1), slot_feat.stride(0), slot_feat.stride(1),
        slot_owner.stride(0), slot_frame.stride(0), slot_stamp.stride(0),
        HAS_DEDUP=dedup is not None, NORM_EPS=NORM_EPS, BLOCK_C=block_c, BLOCK_F=block_f,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    if L * H == 0:
        clock.add_(B)  # no copy program to advance it
        return stored, slot
    _copy_block_fwd[(H, B, L)](
        src_k, src_v, src_pos, pool_k, pool_v, pool_mean_k, stored.view(torch.int8), slot,
        clock, B, S_e, D,
        *src_k.stride(), *src_v.stride(), src_pos.stride(0),
        *pool_k.stride(), *pool_v.stride(), *pool_mean_k.stride(),
        BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(max(D, 1)), num_warps=COPY_NUM_WARPS,
    )  # fmt: skip
    return stored, slot
