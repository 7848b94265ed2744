"""Fused Triton gathered-sink attention: one pass over [local ranges] + [current keys] + [slots].

Each program owns ``BLOCK_M`` queries of one (batch, head) and folds, with one
online softmax in fp32, three kinds of segments, each with a loop of its own:

1. up to ``R`` half-open token ranges of the local buffer (the public op passes
   one range ``[0, k_len)``; ``DySinkCache`` passes its static sinks and the two
   halves of its window ring), unrolled over ``R``;
2. optionally, every key of the current chunk (``cur_k``; the cache's own keys);
3. the listed bank slots, one after another, straight out of ``pool_k/pool_v`` (a
   ``-1`` slot loads nothing). This runtime loop nest comes last: compiled for
   sm_90 with another wgmma loop after it, ptxas serialised every wgmma of the
   kernel (warning C7515, each HGMMA followed by its own wait).

Inside a segment the full ``BLOCK_N``-key tiles run a body without any mask (the
softmax scale folds into the exponent: ``m = max(m, rowmax(s) c)``, ``p = 2^(s c -
m)``); only the last, partial tile masks its scores and zeroes its values, so rows
past a segment (another slot, unused buffer rows, NaN included) never reach the
product. On sm_90 K/V (and Q) come through 4-D tensor descriptors (bulk tensor
copies on mbarriers; rows outside a slot or a sample read as zeros); elsewhere,
and in the interpreter by default, through pointer loads (cp.async when
pipelined). Triton 3.6's interpreter runs tensor descriptors too: the tests run
both paths.

Memory traffic: Q once (again per re-positioned or fp8 slot), each attended K/V
tile once per query tile, O once (plus ``lse``/``entropy`` rows and a ``(n,)``
partial slot mass per query tile with statistics). FLOPs: ``4 * Sq * N_keys * D``
per (batch, head).

Statistics (``STATS``; nothing of it in the plain loop), base-2 units ``y = s c``:

* ``l = sum 2^(y - m)`` and ``u = sum 2^(y - m) y`` (raw scores: one FFMA per
  element, chained by ``_fma_chain`` rather than left to ``tl.sum``'s reduction
  tree, the row's ``c`` applied to the row sum), both rescaled by ``2^(m_old -
  m_new)``. ``lse = ln2 (m + log2 l)``; the entropy in nats is ``ln2 (m + log2 l -
  u / l)``.
* per slot, its share of ``l`` is ``l_end - l_start 2^(m_start - m_end)``, taken once
  at the slot's end (nothing per tile) and kept as a log2-mass in a ``(BLOCK_M,
  N_SLOTS)`` tile; after the last key the masses become probabilities with the
  final ``lse``, are summed over the tile's rows and written per query tile; a tiny
  deterministic reduction over tiles follows (no float atomics).

Re-positioned slots (``ROTATE``): ``q . R(a) k == R(-a) q . k``, so each slot turns
the queries' temporal channel pairs once (per slot and query tile) and its key
loop is the plain one.

fp8 bank (``QUANT``): e4m3 bytes are converted to fp16 exactly (sm_89+: the
hardware conversion; sm_80 and the interpreter: integer ops giving ``value *
2^-8``) and the slot products run in fp16 (fp32 for fp32 queries; bf16 queries
enter as ``q * 2^-8``, so no overflow). The per-(slot, head) key scale folds into
the slot's score scale ``c``; the value scale is applied to the accumulator,
divided by it at the slot's start and multiplied back at its end (once per slot),
so ``p`` stays in ``[0, 1]``.

Compiled loop (sm_90, BLOCK_M 128, BLOCK_N 64, D 128, bf16, 8 warps, 3 stages;
SASS instructions per 64 keys in the worst steady-state key loop, from the kernel
report): Triton 3.6: plain 334-337, with statistics 378-379, re-positioned slots
381, fp8 slot loop 405 (2 stages), against 324-326 for the canonical
flash-attention forward (``tools/canonical_attention.py``) at the same tiles.
Triton 3.9: 357-365, 402-409, 409, 427, canonical 346-348. No configuration
spills on either. (Q as a shared-memory operand through a 2-D descriptor was
tried: 41 registers fewer with statistics, but ptxas then keeps the operand's
descriptors in ordinary registers and moves them to uniform ones every tile: 355
plain on 3.6, 427 with statistics on 3.9; not kept.)

Warp specialisation, tried: ``tl.range(..., warp_specialize=True)`` on every key
loop compiles for sm_90 on Triton 3.6 and 3.9 but changes nothing: no
``ttg.warp_specialize`` region in the TTGIR, no ``setmaxnreg`` in the PTX, the
same registers (203 plain, 255 with statistics) and instruction counts; the same
holds for the plain flash-attention forward above. Triton's automatic
partitioning does not apply to Hopper wgmma loops in these versions; producer /
consumer warpgroups (FA3's lead) would need a Gluon kernel, not written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..rope.tables import wan_rope_freqs
from .common import SinkAttnStats
from .triton_config import AUTOTUNE_CANDIDATES, KernelConfig, dim_bucket, pick_config

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp2(NEG_BIG - m) is 0, never NaN
FP8_DECODE = tl.constexpr(256.0)  # _e4m3_to_f16 without NATIVE yields value * 2^-8
Q_F16_SCALE = tl.constexpr(256.0)  # bf16 queries enter fp16 slot products as q * 2^-8

__all__ = ["KernelConfig", "flops", "gathered_attention_triton", "pick_config"]


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _fold(
    b_q, b_k, b_v, acc, m_i, l_i, u_i, c, n_valid,
    MASKED: tl.constexpr, STATS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Fold one key tile into the online softmax (base-2 units ``y = score * c``).

    Full tiles (``MASKED`` false) carry no mask at all: the scale folds into the
    exponent's FFMA. The last, partial tile of a segment masks its keys past
    ``n_valid`` out of the scores and zeroes their values (rows past a segment may
    hold anything, NaN included)."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
    if MASKED:
        keep = tl.arange(0, BLOCK_N) < n_valid
        b_sm = tl.where(keep[None, :], b_s, float("-inf"))
        b_v = tl.where(keep[:, None], b_v, tl.zeros_like(b_v))
    else:
        b_sm = b_s
    m_new = tl.maximum(m_i, tl.max(b_sm, 1) * c)
    b_p = tl.math.exp2(b_sm * c - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    if STATS:  # raw-score moment: one FFMA per element, its scale applied per row
        if MASKED:
            b_su = tl.where(keep[None, :], b_s, 0.0)
        else:
            b_su = b_s
        z = tl.zeros([b_p.shape[0], 4], dtype=tl.float32)
        u_i = u_i * alpha + tl.sum(_fma_chain(z, b_p, b_su, b_p.shape[0], BLOCK_N), 1) * c
    acc = acc * alpha[:, None]
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=PRECISION)
    return acc, m_new, l_i, u_i


@triton.jit
def _fma_chain(acc, a, b, BLOCK_M: tl.constexpr, W: tl.constexpr):
    """``acc`` ``(BLOCK_M, 4)`` plus the products ``a * b`` of ``(BLOCK_M, W)`` tiles, each
    row's columns summed into four partial sums (their total is ``sum_j a_ij b_ij``).

    The columns are split in halves (the highest index bit first, the lowest last:
    in the MMA accumulator layouts these halves lie in one thread's registers) down
    to four, so each product is one FFMA of a chain. ``tl.sum(a * b, 1)`` is a
    reduction tree on Triton 3.9, where half of the products need a multiply and
    an add. The caller sums the four (across lanes) once per tile."""
    if W == 4:
        acc = acc + a * b
    else:
        if W == 8:
            a0, a1 = tl.split(tl.reshape(a, (BLOCK_M, 4, 2)))
            b0, b1 = tl.split(tl.reshape(b, (BLOCK_M, 4, 2)))
        else:
            a0, a1 = tl.split(tl.permute(tl.reshape(a, (BLOCK_M, 2, W // 2)), (0, 2, 1)))
            b0, b1 = tl.split(tl.permute(tl.reshape(b, (BLOCK_M, 2, W // 2)), (0, 2, 1)))
        acc = _fma_chain(acc, a0, b0, BLOCK_M, W // 2)
        acc = _fma_chain(acc, a1, b1, BLOCK_M, W // 2)
    return acc


@triton.jit
def _kv_tile(
    src, i_x, row, i_h, off, stride_n, n_valid,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_TMA: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """A ``(BLOCK_N, BLOCK_D)`` tile of keys or values starting at ``row``.

    ``USE_TMA``: ``src`` is a 4-D tensor descriptor over ``(X, rows, H, D)`` and the
    tile is one bulk tensor copy at ``[i_x, row, i_h, 0]``; rows outside ``X``'s own
    extent (another slot, another sample) come back as zeros. Otherwise ``src`` is
    a pointer, ``off`` the int64 offset of this segment's origin, and a partial
    tile is loaded under a mask (no address outside the segment is formed)."""
    if USE_TMA:
        b = src.load([i_x, row, i_h, 0])
        return tl.reshape(b, (BLOCK_N, BLOCK_D))
    else:
        o_n = tl.arange(0, BLOCK_N)
        o_d = tl.arange(0, BLOCK_D)
        p = src + off + (row + o_n)[:, None] * stride_n + o_d[None, :]
        if MASKED:
            return tl.load(p, mask=(o_n < n_valid)[:, None] & (o_d < D)[None, :], other=0.0)
        elif BLOCK_D != D:
            return tl.load(p, mask=(o_d < D)[None, :], other=0.0)
        else:
            return tl.load(p)


@triton.jit
def _e4m3_to_f16(b, NATIVE: tl.constexpr):
    """fp8 e4m3 bytes -> fp16, exactly (e4m3 is a subset of fp16).

    ``NATIVE`` (sm_89+): the hardware conversion, two bytes per instruction, giving
    the value itself. Otherwise integer ops: the byte's exponent and mantissa bits
    move into fp16's fields, whose bias is 8 larger, giving ``value * 2^-8``
    (subnormals included); the caller folds the ``2^8`` into the slot's scales."""
    if NATIVE:
        return b.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    else:
        x = b.to(tl.uint16)
        return (((x & 0x80) << 8) | ((x & 0x7F) << 7)).to(tl.float16, bitcast=True)


@triton.jit
def _turn_q(b_q, cos, sin, OUT_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``b_q`` with each channel pair ``(2j, 2j+1)`` turned by ``-angle_j`` (and scaled
    by ``|cos + i sin|``), as ``OUT_T``.

    ``q . R(a) k == R(-a) q . k``: turning the queries once per slot replaces turning
    every key of the slot in every query tile."""
    x_re, x_im = tl.split(tl.reshape(b_q, (BLOCK_M, BLOCK_D // 2, 2)))
    x_re = x_re.to(tl.float32)
    x_im = x_im.to(tl.float32)
    cs = cos[None, :]
    sn = sin[None, :]
    y = tl.join((x_re * cs + x_im * sn).to(OUT_T), (x_im * cs - x_re * sn).to(OUT_T))
    return tl.reshape(y, (BLOCK_M, BLOCK_D))


@triton.jit
def _gathered_attn_fwd(
    Q, QD, PK, PV, SLOT, LK, LV, RANGES, CK, CV, ROT_COS, ROT_SIN, K_SCALE, V_SCALE,
    OUT, LSE, ENT, MASS,
    n_slots, Sq, S_e, Sc, H, qk_scale,
    stride_qb, stride_qm, stride_qh,
    stride_pp, stride_pn, stride_ph,
    stride_sb, stride_sn,
    stride_rotb, stride_rotn,
    stride_scp,
    stride_lb, stride_ln, stride_lh,
    stride_rb, stride_rr,
    stride_cb, stride_cn, stride_ch,
    stride_ob, stride_om, stride_oh,
    stride_mb, stride_mh, stride_mt,
    D: tl.constexpr,
    N_RANGES: tl.constexpr,
    HAS_CUR: tl.constexpr,
    STATS: tl.constexpr,
    ROTATE: tl.constexpr,
    QUANT: tl.constexpr,
    N_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
):  # fmt: skip
    """One program: ``BLOCK_M`` queries of one (batch, head) against all its segments.

    One loop per segment kind (slots, local ranges, current keys), each walking its
    full tiles with an unmasked body and its last, partial tile (if any) with a
    masked one; see the module docstring for the statistics and the fp8 bank.
    """
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_b64 = i_b.to(tl.int64)
    i_h64 = i_h.to(tl.int64)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < Sq
    m_d = o_d < D

    p_q0 = Q + i_b64 * stride_qb + i_h64 * stride_qh + o_m[:, None] * stride_qm
    p_q = p_q0 + o_d[None, :]
    if USE_TMA:  # straight into shared memory, where both products read it
        b_q = tl.reshape(QD.load([i_b, i_m * BLOCK_M, i_h, 0]), (BLOCK_M, BLOCK_D))
    else:
        b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    u_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    o_s = tl.arange(0, N_SLOTS)
    lm_slot = tl.full([BLOCK_M, N_SLOTS], float("-inf"), dtype=tl.float32)

    # ---- 1. local ranges [lo, hi) of the local buffer.
    off_l = i_b64 * stride_lb + i_h64 * stride_lh
    for r in tl.static_range(N_RANGES):
        p_rng = RANGES + i_b64 * stride_rb + r * stride_rr
        lo = tl.load(p_rng)
        n_keys = tl.maximum(tl.load(p_rng + 1) - lo, 0)
        r_full = n_keys // BLOCK_N
        r_rem = n_keys - r_full * BLOCK_N
        for t in range(0, r_full):
            b_k = _kv_tile(LK, i_b, lo + t * BLOCK_N, i_h, off_l, stride_ln, BLOCK_N,
                           D, BLOCK_N, BLOCK_D, USE_TMA, False)  # fmt: skip
            b_v = _kv_tile(LV, i_b, lo + t * BLOCK_N, i_h, off_l, stride_ln, BLOCK_N,
                           D, BLOCK_N, BLOCK_D, USE_TMA, False)  # fmt: skip
            acc, m_i, l_i, u_i = _fold(b_q, b_k, b_v, acc, m_i, l_i, u_i, qk_scale, BLOCK_N,
                                       False, STATS, PRECISION, BLOCK_N)  # fmt: skip
        if r_rem > 0:
            b_k = _kv_tile(LK, i_b, lo + r_full * BLOCK_N, i_h, off_l, stride_ln, r_rem,
                           D, BLOCK_N, BLOCK_D, USE_TMA, True)  # fmt: skip
            b_v = _kv_tile(LV, i_b, lo + r_full * BLOCK_N, i_h, off_l, stride_ln, r_rem,
                           D, BLOCK_N, BLOCK_D, USE_TMA, True)  # fmt: skip
            acc, m_i, l_i, u_i = _fold(b_q, b_k, b_v, acc, m_i, l_i, u_i, qk_scale, r_rem,
                                       True, STATS, PRECISION, BLOCK_N)  # fmt: skip

    # ---- 2. every key of the current chunk.
    if HAS_CUR:
        off_c = i_b64 * stride_cb + i_h64 * stride_ch
        c_full = Sc // BLOCK_N
        c_rem = Sc - c_full * BLOCK_N
        for t in range(0, c_full):
            b_k = _kv_tile(CK, i_b, t * BLOCK_N, i_h, off_c, stride_cn, BLOCK_N,
                           D, BLOCK_N, BLOCK_D, USE_TMA, False)  # fmt: skip
            b_v = _kv_tile(CV, i_b, t * BLOCK_N, i_h, off_c, stride_cn, BLOCK_N,
                           D, BLOCK_N, BLOCK_D, USE_TMA, False)  # fmt: skip
            acc, m_i, l_i, u_i = _fold(b_q, b_k, b_v, acc, m_i, l_i, u_i, qk_scale, BLOCK_N,
                                       False, STATS, PRECISION, BLOCK_N)  # fmt: skip
        if c_rem > 0:
            b_k = _kv_tile(CK, i_b, c_full * BLOCK_N, i_h, off_c, stride_cn, c_rem,
                           D, BLOCK_N, BLOCK_D, USE_TMA, True)  # fmt: skip
            b_v = _kv_tile(CV, i_b, c_full * BLOCK_N, i_h, off_c, stride_cn, c_rem,
                           D, BLOCK_N, BLOCK_D, USE_TMA, True)  # fmt: skip
            acc, m_i, l_i, u_i = _fold(b_q, b_k, b_v, acc, m_i, l_i, u_i, qk_scale, c_rem,
                                       True, STATS, PRECISION, BLOCK_N)  # fmt: skip

    # ---- 3. bank slots, one at a time; a -1 entry loads nothing. (Last: a runtime
    # loop nest followed by another MMA loop makes ptxas serialise every wgmma.)
    n_full = S_e // BLOCK_N
    n_rem = S_e - n_full * BLOCK_N
    if ROTATE:
        o_p = tl.arange(0, BLOCK_D // 2)
    for j in range(n_slots):
        slot = tl.load(SLOT + i_b64 * stride_sb + j * stride_sn)
        if slot >= 0:
            off = slot.to(tl.int64) * stride_pp + i_h64 * stride_ph
            c = qk_scale
            if QUANT or ROTATE:  # this slot's own query operand, built once per slot
                # fp8 slots multiply in fp16 (e4m3 converts exactly; fp32 stays fp32),
                # bf16 queries entering it as q * 2^-8 (no overflow), the factor
                # folded back into c.
                if QUANT and Q.dtype.element_ty != tl.float32:
                    q_dt: tl.constexpr = tl.float16
                else:
                    q_dt: tl.constexpr = Q.dtype.element_ty
                if QUANT and Q.dtype.element_ty == tl.bfloat16:
                    q_mul = 1.0 / Q_F16_SCALE
                    c = c * Q_F16_SCALE
                else:
                    q_mul = 1.0
                # With TMA, Q is read again here (a load is not hoisted out of the slot
                # loop, so its fp32 form is not held in registers through the loop).
                if USE_TMA:
                    b_q0 = tl.reshape(QD.load([i_b, i_m * BLOCK_M, i_h, 0]), (BLOCK_M, BLOCK_D))
                else:
                    b_q0 = b_q
                if ROTATE:
                    p_rot = i_b64 * stride_rotb + j * stride_rotn + o_p
                    rot_cos = tl.load(ROT_COS + p_rot) * q_mul
                    rot_sin = tl.load(ROT_SIN + p_rot) * q_mul
                    b_qj = _turn_q(b_q0, rot_cos, rot_sin, q_dt, BLOCK_M, BLOCK_D)
                else:
                    b_qj = (b_q0.to(tl.float32) * q_mul).to(q_dt)
                if QUANT:
                    # Keys: the slot's scale (and the decode's 2^8) folds into c. Values:
                    # p stays in [0, 1]; acc is divided by the value scale while this
                    # slot is summed (fp32, once per slot, not per tile).
                    if FP8_NATIVE:
                        dec = 1.0
                    else:
                        dec = FP8_DECODE
                    k_sc = tl.load(K_SCALE + slot.to(tl.int64) * stride_scp + i_h)
                    v_sc = tl.load(V_SCALE + slot.to(tl.int64) * stride_scp + i_h) * dec
                    c = c * k_sc * dec
                    acc = acc * (1.0 / v_sc)
            else:
                b_qj = b_q
            if STATS:
                l_start = l_i
                m_start = m_i
            for t in range(0, n_full):
                b_k = _kv_tile(PK, slot, t * BLOCK_N, i_h, off, stride_pn, BLOCK_N,
                               D, BLOCK_N, BLOCK_D, USE_TMA, False)  # fmt: skip
                b_v = _kv_tile(PV, slot, t * BLOCK_N, i_h, off, stride_pn, BLOCK_N,
                               D, BLOCK_N, BLOCK_D, USE_TMA, False)  # fmt: skip
                if QUANT:
                    b_k = _e4m3_to_f16(b_k, FP8_NATIVE).to(b_qj.dtype)
                    b_v = _e4m3_to_f16(b_v, FP8_NATIVE).to(b_qj.dtype)
                acc, m_i, l_i, u_i = _fold(b_qj, b_k, b_v, acc, m_i, l_i, u_i, c, BLOCK_N,
                                           False, STATS, PRECISION, BLOCK_N)  # fmt: skip
            if n_rem > 0:
                b_k = _kv_tile(PK, slot, n_full * BLOCK_N, i_h, off, stride_pn, n_rem,
                               D, BLOCK_N, BLOCK_D, USE_TMA, True)  # fmt: skip
                b_v = _kv_tile(PV, slot, n_full * BLOCK_N, i_h, off, stride_pn, n_rem,
                               D, BLOCK_N, BLOCK_D, USE_TMA, True)  # fmt: skip
                if QUANT:
                    b_k = _e4m3_to_f16(b_k, FP8_NATIVE).to(b_qj.dtype)
                    b_v = _e4m3_to_f16(b_v, FP8_NATIVE).to(b_qj.dtype)
                acc, m_i, l_i, u_i = _fold(b_qj, b_k, b_v, acc, m_i, l_i, u_i, c, n_rem,
                                           True, STATS, PRECISION, BLOCK_N)  # fmt: skip
            if QUANT:
                acc = acc * v_sc
            if STATS:  # this slot's share of l, at the current max: once per slot
                l_seg = tl.maximum(l_i - l_start * tl.math.exp2(m_start - m_i), 0.0)
                lm_slot = tl.where(o_s[None, :] == j, (m_i + tl.math.log2(l_seg))[:, None],
                                   lm_slot)  # fmt: skip

    # Rows that attended nothing (l == 0) get zeros, lse = -inf, entropy 0.
    attended = l_i > 0.0
    l_safe = tl.where(attended, l_i, 1.0)
    out = acc / l_safe[:, None]
    p_o = OUT + i_b64 * stride_ob + i_h64 * stride_oh + o_m[:, None] * stride_om + o_d[None, :]
    tl.store(p_o, out.to(OUT.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])

    if STATS:
        lse2 = m_i + tl.math.log2(l_safe)
        lse = tl.where(attended, lse2 * LN2, float("-inf"))
        ent = tl.where(attended, (lse2 - u_i / l_safe) * LN2, 0.0)
        row_id = (i_b64 * H + i_h) * Sq + o_m
        tl.store(LSE + row_id, lse, mask=m_m)
        tl.store(ENT + row_id, ent, mask=m_m)
        # lm_slot and l_i share the running max, so 2^(lm - lse2) is the probability.
        keep = m_m & attended
        mass = tl.where(keep[:, None], tl.math.exp2(lm_slot - lse2[:, None]), 0.0)
        p_mass = MASS + i_b64 * stride_mb + i_h * stride_mh + i_m * stride_mt + o_s
        tl.store(p_mass, tl.sum(mass, 0))


# Configurations picked by DYSINK_AUTOTUNE=1, per (device, shape, variant).
_AUTOTUNED: dict[tuple, KernelConfig] = {}

# Pointer loads address a tile as int32 row offsets from a segment's int64 origin.
_INT32_MAX = 2**31 - 1


def _check_offsets(**tensors: torch.Tensor) -> None:
    """Refuse a K/V tensor whose row offsets inside one (sample or slot, head) exceed
    int32 (the kernel would wrap them): rows x row stride + head dim < 2^31."""
    for name, t in tensors.items():
        span = (t.shape[1] - 1) * abs(t.stride(1)) + t.shape[3] if t.shape[1] else 0
        if span > _INT32_MAX:
            raise ValueError(
                f"{name}: one (sample, head) spans {span} elements (shape {tuple(t.shape)}, "
                f"strides {t.stride()}); the triton backend addresses at most 2^31 - 1"
            )


def _descriptor_ok(t: torch.Tensor) -> bool:
    """A 4-D tensor a tensor descriptor can address: 16-byte aligned base and strides,
    contiguous last dim, no empty dim."""
    size = t.element_size()
    return (
        t.numel() > 0
        and t.data_ptr() % 16 == 0
        and t.stride(-1) == 1
        and all((s * size) % 16 == 0 for s in t.stride()[:-1])
    )


def _native_fp8(device: torch.device) -> bool:
    """Whether the GPU converts e4m3 in hardware (compute capability 8.9 and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 accuracy; 16-bit inputs use the tensor cores as they are.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- launcher
def _rotation_table(
    slot_delta: torch.Tensor, head_dim: int, block_d: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, n, block_d // 2)`` fp32 cos/sin of each channel pair's turn for a slot moved
    by ``slot_delta`` frames: Wan's temporal pairs turn by ``w_j * delta`` (fp64),
    every other pair (and the padding) stays put."""
    w_t = wan_rope_freqs(head_dim, theta, slot_delta.device)[0]
    ang = torch.zeros(*slot_delta.shape, block_d // 2, dtype=torch.float64,
                      device=slot_delta.device)  # fmt: skip
    ang[..., : w_t.shape[0]] = slot_delta.double()[..., None] * w_t
    return torch.cos(ang).float().contiguous(), torch.sin(ang).float().contiguous()


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (the tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _same_layout(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pointer path addresses V with K's strides: copy only when they differ."""
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return k, v


def gathered_attention_triton(
    q: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    slot_idx: torch.Tensor,
    local_k: torch.Tensor,
    local_v: torch.Tensor,
    local_ranges: torch.Tensor,
    cur_k: torch.Tensor | None,
    cur_v: torch.Tensor | None,
    softmax_scale: float,
    return_stats: bool,
    slot_delta: torch.Tensor | None = None,
    rope_theta: float = 10000.0,
    pool_k_scale: torch.Tensor | None = None,
    pool_v_scale: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, SinkAttnStats | None]:
    """Triton backend of ``gathered_sink_attention`` (see ``naive.py`` for the semantics)."""
    B, Sq, H, D = q.shape
    if D % 16 or D > 256:  # tensor-core tiles need it; the matrix-product backend does not
        from .sdpa import gathered_attention_sdpa

        return gathered_attention_sdpa(
            q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges, cur_k, cur_v,
            softmax_scale, return_stats, slot_delta, rope_theta, pool_k_scale, pool_v_scale,
        )  # fmt: skip
    quant = pool_k_scale is not None
    if quant:  # fp8 bank: the kernel reads its bytes and decodes them
        pool_k, pool_v = pool_k.view(torch.uint8), pool_v.view(torch.uint8)
        pool_k_scale = pool_k_scale.float().contiguous()
        pool_v_scale = pool_v_scale.float().contiguous()
    q_in, q = q, _last_dim_contiguous(q)
    pool_k, pool_v = _same_layout(pool_k, pool_v)
    if quant and pool_k_scale.stride() != pool_v_scale.stride():
        raise ValueError("pool_k_scale and pool_v_scale must share a layout")
    local_k, local_v = _same_layout(local_k, local_v)
    has_cur = cur_k is not None
    if has_cur:
        cur_k, cur_v = _same_layout(cur_k, cur_v)
        _check_offsets(cur_k=cur_k)
    _check_offsets(pool_k=pool_k, local_k=local_k)
    slot_idx = slot_idx.to(torch.int32)
    local_ranges = local_ranges.to(torch.int32)
    n = slot_idx.shape[1]
    S_e = pool_k.shape[1]
    Sc = cur_k.shape[1] if has_cur else 0

    out = _empty(q.shape, q.dtype, q.device)
    if Sq == 0 or B * H == 0:
        return gathered_attention_empty(out, n, return_stats)
    if config is None and q.is_cuda and os.environ.get("DYSINK_AUTOTUNE", "0") == "1":
        config = _autotune(
            (q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges,
             cur_k, cur_v, softmax_scale, return_stats, slot_delta, rope_theta),
        )  # fmt: skip
    cfg = config or pick_config(
        q.device, D, stats=return_stats, rotate=slot_delta is not None, quant=quant
    )
    n_m = triton.cdiv(Sq, cfg.block_m)
    n_slots_pad = max(2, triton.next_power_of_2(n))
    if return_stats:
        lse = _empty((B, H, Sq), torch.float32, q.device)
        ent = _empty((B, H, Sq), torch.float32, q.device)
        mass = _empty((B, H, n_m, n_slots_pad), torch.float32, q.device)
    else:
        lse = ent = mass = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q.device)

    rotate = slot_delta is not None
    block_d = max(16, triton.next_power_of_2(D))
    if rotate:
        rot_cos, rot_sin = _rotation_table(slot_delta, D, block_d, rope_theta)
    else:
        rot_cos = rot_sin = lse  # never read without ROTATE

    kv = [pool_k, pool_v, local_k, local_v] + ([cur_k, cur_v] if has_cur else [])
    use_tma = cfg.tma and all(_descriptor_ok(t) for t in [q, *kv])
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        block = [1, cfg.block_n, 1, block_d]
        pk_a, pv_a, lk_a, lv_a = (TensorDescriptor.from_tensor(t, block) for t in kv[:4])
        qd = TensorDescriptor.from_tensor(q, [1, cfg.block_m, 1, block_d])
        ck_a, cv_a = (
            (TensorDescriptor.from_tensor(t, block) for t in kv[4:]) if has_cur else (lk_a, lv_a)
        )
    else:
        qd, pk_a, pv_a, lk_a, lv_a = q, pool_k, pool_v, local_k, local_v
        ck_a, cv_a = (cur_k, cur_v) if has_cur else (local_k, local_v)  # never read without cur
    cs = cur_k.stride() if has_cur else (0, 0, 0)
    grid = (n_m, B * H)
    _gathered_attn_fwd[grid](
        q, qd, pk_a, pv_a, slot_idx, lk_a, lv_a, local_ranges, ck_a, cv_a,
        rot_cos, rot_sin,
        pool_k_scale if quant else lse, pool_v_scale if quant else lse,
        out, lse, ent, mass,
        n, Sq, S_e, Sc, H, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        pool_k.stride(0), pool_k.stride(1), pool_k.stride(2),
        slot_idx.stride(0), slot_idx.stride(1),
        rot_cos.stride(0) if rotate else 0, rot_cos.stride(1) if rotate else 0,
        pool_k_scale.stride(0) if quant else 0,
        local_k.stride(0), local_k.stride(1), local_k.stride(2),
        local_ranges.stride(0), local_ranges.stride(1),
        cs[0], cs[1], cs[2],
        out.stride(0), out.stride(1), out.stride(2),
        mass.stride(0), mass.stride(1), mass.stride(2),
        D=D, N_RANGES=local_ranges.shape[1], HAS_CUR=has_cur, STATS=return_stats,
        ROTATE=rotate, QUANT=quant, N_SLOTS=n_slots_pad,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=block_d, PRECISION=_precision(q.dtype), USE_TMA=use_tma,
        FP8_NATIVE=quant and _native_fp8(q.device),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not q_in.is_contiguous():  # the op's output is laid out like q (torch.empty_like)
        out = torch.empty_like(q_in).copy_(out)
    if not return_stats:
        return out, None
    slot_mass = mass.sum(dim=2)[..., :n] / max(Sq, 1)
    return out, SinkAttnStats(lse=lse, entropy=ent, slot_mass=slot_mass)


def _autotune(args: tuple) -> KernelConfig:
    """Time every candidate on these inputs once per shape key; keep the fastest."""
    from triton.testing import do_bench

    q, pool_k, _, slot_idx, local_k, _, ranges, cur_k, _, _, stats, delta, _ = args
    key = (
        torch.cuda.get_device_capability(q.device), q.dtype, tuple(q.shape), tuple(pool_k.shape),
        slot_idx.shape[1], tuple(local_k.shape), ranges.shape[1],
        None if cur_k is None else tuple(cur_k.shape), stats, delta is None,
    )  # fmt: skip
    if key not in _AUTOTUNED:
        block_d = max(16, triton.next_power_of_2(q.shape[-1]))
        timings = []
        for cand in AUTOTUNE_CANDIDATES[dim_bucket(block_d)]:
            try:
                ms = do_bench(lambda c=cand: gathered_attention_triton(*args, config=c), rep=50)
            except Exception:  # a candidate that does not fit this GPU is skipped
                continue
            timings.append((ms, cand))
        _AUTOTUNED[key] = min(timings, key=lambda t: t[0])[1]
    return _AUTOTUNED[key]


def gathered_attention_empty(
    out: torch.Tensor, n: int, return_stats: bool
) -> tuple[torch.Tensor, SinkAttnStats | None]:
    """Result for a call with no query (nothing to launch)."""
    if not return_stats:
        return out, None
    B, Sq, H, _ = out.shape
    z = torch.zeros(B, H, Sq, dtype=torch.float32, device=out.device)
    mass = torch.zeros(B, H, n, dtype=torch.float32, device=out.device)
    return out, SinkAttnStats(lse=z, entropy=z.clone(), slot_mass=mass)


def flops(batch: int, heads: int, sq: int, n_keys: int, head_dim: int) -> float:
    """FLOPs of one attention call (QK^T and PV): ``4 * B * H * Sq * N * D``."""
    return 4.0 * batch * heads * sq * n_keys * head_dim
