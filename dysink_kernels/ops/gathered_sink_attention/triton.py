"""Fused Triton gathered-sink attention: one pass over [slots] + [local ranges] + [current keys].

Each program owns ``BLOCK_M`` queries of one (batch, head). It walks, with one
online softmax in fp32:

1. the listed bank slots, by index, straight out of ``pool_k/pool_v`` (a ``-1``
   slot is skipped without loading anything);
2. up to ``R`` half-open token ranges of the local buffer (the public op passes
   one range ``[0, k_len)``; ``DySinkCache`` passes its static sinks and the two
   halves of its window ring);
3. optionally, every key of the current chunk (``cur_k``; the cache's own keys).

Memory traffic: Q once, each attended K/V tile once per query tile, O once (plus
``lse``/``entropy`` rows and a ``(n,)`` partial slot mass per query tile with
statistics). FLOPs: ``4 * Sq * N_keys * D`` per (batch, head).

Statistics, switched by the ``STATS`` constexpr so that the plain path carries
nothing extra, in base-2 units (``y = score * log2(e)``) against the running max
``m``:

* ``l = sum 2^(y - m)`` (the normaliser) and ``e = sum 2^(y - m) (y - m)``, both
  rescaled when ``m`` grows: ``e <- a (e + l (m_old - m_new))``, ``l <- a l`` with
  ``a = 2^(m_old - m_new)``. Then ``lse = ln2 (m + log2 l)`` and the entropy in
  nats is ``ln l - ln2 e / l``.
* per slot, ``l_seg`` accumulates the slot's own terms with the same rescaling;
  at the slot's end ``m + log2(l_seg)`` is its log2-mass for each query row, kept
  in a ``(BLOCK_M, N_SLOTS)`` register tile. After the last key the masses become
  probabilities with the final ``lse``, are summed over the tile's valid rows and
  written per query tile; a tiny deterministic reduction over tiles follows (no
  float atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..rope.naive import wan_rope_freqs
from .common import SinkAttnStats

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity": 0 * (m_old - m_new) stays 0

__all__ = ["KernelConfig", "flops", "gathered_attention_triton", "pick_config"]


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _fold_tile(
    b_q, b_k, b_v, m_n, slot_hit, acc, m_i, l_i, e_i, l_slot, qk_scale,
    STATS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold one tile of keys (``m_n`` marks the valid ones) into the online softmax."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    b_p = tl.math.exp2(b_s - m_new[:, None])
    p_sum = tl.sum(b_p, 1)
    if STATS:
        centred = tl.where(m_n[None, :], b_s - m_new[:, None], 0.0)
        e_i = alpha * (e_i + l_i * (m_i - m_new)) + tl.sum(b_p * centred, 1)
        l_slot = l_slot * alpha[:, None] + tl.where(slot_hit, p_sum[:, None], 0.0)
    l_i = l_i * alpha + p_sum
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return acc, m_new, l_i, e_i, l_slot


@triton.jit
def _e4m3_to_f32(b):
    """fp8 e4m3 bytes -> fp32 with integer ops only: normal numbers get their exponent
    re-biased (7 -> 127) and mantissa moved into place; subnormals are ``m * 2^-9``."""
    x = b.to(tl.int32)
    sign = (x & 0x80) << 24
    e = (x >> 3) & 0xF
    m = x & 0x7
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    return tl.where(e == 0, tl.where(sign != 0, -sub, sub), normal)


@triton.jit
def _rotate_pairs(b_x, cos, sin, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Multiply each adjacent channel pair ``(2j, 2j+1)`` of ``b_x`` by ``cos_j + i sin_j``.

    cos/sin come from a host-built table (fp64 angles): no trigonometry in the loop,
    whose large-argument reduction would need a local-memory array."""
    x = tl.reshape(b_x.to(tl.float32), (BLOCK_N, BLOCK_D // 2, 2))
    x_re, x_im = tl.split(x)
    cs = cos[None, :]
    sn = sin[None, :]
    y = tl.join(x_re * cs - x_im * sn, x_re * sn + x_im * cs)
    return tl.reshape(y, (BLOCK_N, BLOCK_D)).to(b_x.dtype)


@triton.jit
def _gathered_attn_fwd(
    Q, PK, PV, SLOT, LK, LV, RANGES, CK, CV, ROT_COS, ROT_SIN, K_SCALE, V_SCALE,
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
    N_SEGS: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program: ``BLOCK_M`` queries of one (batch, head) against all its segments.

    The segments (slots, local ranges, current keys) are described by a small
    table in registers (``N_SEGS`` lanes: kind, first row, length, first tile), and
    one flat loop walks their tiles, so the whole pass is a single software
    pipeline whatever the number of segments. With an fp8 bank (``QUANT``) the slots
    are walked by a loop of their own that decodes and scales them while loading
    (their bytes cannot share the flat loop's pointer type).
    """
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_b64 = i_b.to(tl.int64)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < Sq
    m_d = o_d < D

    # Segment table: lanes [0, n_slots) are bank slots, then N_RANGES local ranges,
    # then the current keys. A skipped slot or an empty range has length 0.
    if QUANT:
        n_tab = 0  # the slots have their own loop
    else:
        n_tab = n_slots
    o_g = tl.arange(0, N_SEGS)
    is_slot = o_g < n_tab
    is_range = (o_g >= n_tab) & (o_g < n_tab + N_RANGES)
    slot = tl.load(SLOT + i_b64 * stride_sb + o_g * stride_sn, mask=is_slot, other=-1)
    p_rng = RANGES + i_b64 * stride_rb + (o_g - n_tab) * stride_rr
    lo = tl.load(p_rng, mask=is_range, other=0)
    hi = tl.load(p_rng + 1, mask=is_range, other=0)
    g_len = tl.where(is_slot & (slot >= 0), S_e, 0)
    g_len = tl.where(is_range, tl.maximum(hi - lo, 0), g_len)
    if HAS_CUR:
        g_len = tl.where(o_g == n_tab + N_RANGES, Sc, g_len)
    g_row = tl.where(is_range, lo, 0)
    if ROTATE:  # per-slot re-positioning: cos/sin of each channel pair's turn
        o_p = tl.arange(0, BLOCK_D // 2)
    g_tiles = tl.cdiv(g_len, BLOCK_N)
    g_first = tl.cumsum(g_tiles, 0) - g_tiles
    n_tiles = tl.sum(g_tiles, 0)
    # Offsets of each segment's (batch or slot, head) origin, in units of ALIGN
    # elements (int32: pools up to 2^31 * ALIGN elements). The loop multiplies them
    # back by the constant ALIGN, which tells the compiler that tile addresses stay
    # 16-byte aligned; otherwise it cannot issue asynchronous copies and the loop is
    # not software-pipelined. V uses K's offsets (the launcher checks the layouts).
    g_off = (
        tl.where(
            is_slot,
            tl.maximum(slot, 0).to(tl.int64) * stride_pp + i_h * stride_ph,
            tl.where(
                is_range, i_b64 * stride_lb + i_h * stride_lh, i_b64 * stride_cb + i_h * stride_ch
            ),
        )
        // ALIGN
    )
    g_off = g_off.to(tl.int32)

    p_q = Q + i_b64 * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qm + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    e_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    o_s = tl.arange(0, N_SLOTS)
    l_slot = tl.zeros([BLOCK_M, N_SLOTS], dtype=tl.float32)

    if QUANT:  # fp8 slots: decode e4m3 bytes and scale them per (slot, head) on load
        for j in range(n_slots):
            q_slot = tl.load(SLOT + i_b64 * stride_sb + j * stride_sn)
            if q_slot >= 0:
                slot64 = q_slot.to(tl.int64)
                k_sc = tl.load(K_SCALE + slot64 * stride_scp + i_h)
                v_sc = tl.load(V_SCALE + slot64 * stride_scp + i_h)
                base = slot64 * stride_pp + i_h * stride_ph
                if ROTATE:
                    p_rot = i_b64 * stride_rotb + j * stride_rotn + o_p
                    rot_cos = tl.load(ROT_COS + p_rot)
                    rot_sin = tl.load(ROT_SIN + p_rot)
                slot_hit = o_s[None, :] == j
                for i_n in range(0, S_e, BLOCK_N):
                    m_n = (i_n + o_n) < S_e
                    p_kv = base + (i_n + o_n)[:, None] * stride_pn + o_d[None, :]
                    k8 = tl.load(PK + p_kv, mask=m_n[:, None] & m_d[None, :], other=0)
                    v8 = tl.load(PV + p_kv, mask=m_n[:, None] & m_d[None, :], other=0)
                    b_k = (_e4m3_to_f32(k8) * k_sc).to(b_q.dtype)
                    b_v = (_e4m3_to_f32(v8) * v_sc).to(b_q.dtype)
                    if ROTATE:
                        b_k = _rotate_pairs(b_k, rot_cos, rot_sin, BLOCK_N, BLOCK_D)
                    acc, m_i, l_i, e_i, l_slot = _fold_tile(
                        b_q, b_k, b_v, m_n, slot_hit, acc, m_i, l_i, e_i, l_slot, qk_scale,
                        STATS, PRECISION,
                    )  # fmt: skip

    for t in range(0, n_tiles):
        seg = tl.sum((g_first <= t).to(tl.int32), 0) - 1
        sel = o_g == seg
        kind_slot = seg < n_tab
        kind_range = (seg >= n_tab) & (seg < n_tab + N_RANGES)
        tile = t - tl.sum(tl.where(sel, g_first, 0), 0)
        row = tl.sum(tl.where(sel, g_row, 0), 0) + tile * BLOCK_N
        valid = tl.sum(tl.where(sel, g_len, 0), 0) - tile * BLOCK_N
        off = tl.sum(tl.where(sel, g_off, 0), 0).to(tl.int64) * ALIGN
        if QUANT:  # no slot tile here (and PK/PV hold bytes, not K/V's type)
            base_k = tl.where(kind_range, LK, CK) + off
            base_v = tl.where(kind_range, LV, CV) + off
        else:
            base_k = tl.where(kind_slot, PK, tl.where(kind_range, LK, CK)) + off
            base_v = tl.where(kind_slot, PV, tl.where(kind_range, LV, CV)) + off
        s_n = tl.where(kind_slot, stride_pn, tl.where(kind_range, stride_ln, stride_cn))
        m_n = o_n < valid
        p_k = base_k + (row + o_n)[:, None] * s_n + o_d[None, :]
        p_v = base_v + (row + o_n)[:, None] * s_n + o_d[None, :]
        b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_v = tl.load(p_v, mask=m_n[:, None] & m_d[None, :], other=0.0)
        if ROTATE:
            p_rot = i_b64 * stride_rotb + seg * stride_rotn + o_p
            rot_cos = tl.load(ROT_COS + p_rot, mask=kind_slot & (o_p >= 0), other=1.0)
            rot_sin = tl.load(ROT_SIN + p_rot, mask=kind_slot & (o_p >= 0), other=0.0)
            b_k = _rotate_pairs(b_k, rot_cos, rot_sin, BLOCK_N, BLOCK_D)

        slot_hit = (o_s[None, :] == seg) & kind_slot
        acc, m_i, l_i, e_i, l_slot = _fold_tile(
            b_q, b_k, b_v, m_n, slot_hit, acc, m_i, l_i, e_i, l_slot, qk_scale,
            STATS, PRECISION,
        )  # fmt: skip

    # Rows that attended nothing (l == 0) get zeros, lse = -inf, entropy 0.
    attended = l_i > 0.0
    l_safe = tl.where(attended, l_i, 1.0)
    out = acc / l_safe[:, None]
    p_o = OUT + i_b64 * stride_ob + i_h * stride_oh + o_m[:, None] * stride_om + o_d[None, :]
    tl.store(p_o, out.to(OUT.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])

    if STATS:
        lse = tl.where(attended, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
        ent = tl.where(attended, tl.log(l_safe) - LN2 * e_i / l_safe, 0.0)
        row_id = (i_b64 * H + i_h) * Sq + o_m
        tl.store(LSE + row_id, lse, mask=m_m)
        tl.store(ENT + row_id, ent, mask=m_m)
        # l_slot and l_i share the running max, so their ratio is the probability.
        mass = tl.where(m_m[:, None], l_slot / l_safe[:, None], 0.0)
        p_mass = MASS + i_b64 * stride_mb + i_h * stride_mh + i_m * stride_mt + o_s
        tl.store(p_mass, tl.sum(mass, 0))


# ----------------------------------------------------------------------------- configs
class KernelConfig:
    """Launch parameters of the attention kernel."""

    __slots__ = ("block_m", "block_n", "num_stages", "num_warps")

    def __init__(self, block_m: int, block_n: int, num_warps: int, num_stages: int) -> None:
        self.block_m, self.block_n = block_m, block_n
        self.num_warps, self.num_stages = num_warps, num_stages

    def as_dict(self) -> dict:
        return {s: getattr(self, s) for s in self.__slots__}

    def __repr__(self) -> str:
        return (
            f"KernelConfig(BLOCK_M={self.block_m}, BLOCK_N={self.block_n}, "
            f"num_warps={self.num_warps}, num_stages={self.num_stages})"
        )


# Block sizes per (compute capability major, padded head dim), chosen with the kernel
# report (python -m dysink_kernels kernels) so that no configuration spills:
# * Hopper (sm_90): 128-row query tiles over two warpgroups (8 warps) feed wgmma.
#   D = 128: 64-key tiles in 3 stages use 222-255 registers and 129 KB of shared
#   memory; 128-key tiles also fit (3 stages: 225 KB) and are the candidate the GPU
#   benchmark compares against. D = 64 affords 128-key tiles, D = 256 only 32.
# * Ampere (sm_80): mma.sync with 8 warps; at D = 128 only 32-key tiles stay clear
#   of spills (64-key tiles spill 40-216 bytes), at D = 256 64x64 tiles.
# * Other archs and the CPU interpreter: small tiles.
_CONFIGS: dict[tuple[int, int], KernelConfig] = {
    (9, 64): KernelConfig(128, 128, 8, 3),
    (9, 128): KernelConfig(128, 64, 8, 3),
    (9, 256): KernelConfig(128, 32, 8, 2),
    (8, 64): KernelConfig(128, 64, 8, 3),
    (8, 128): KernelConfig(128, 32, 8, 3),
    (8, 256): KernelConfig(64, 64, 8, 2),
}
# Configurations DYSINK_AUTOTUNE=1 tries (on the GPU, at the first call of each
# shape), per padded head dim. Benchmarks only: timing needs host synchronisation.
_AUTOTUNE_CANDIDATES: dict[int, list[KernelConfig]] = {
    64: [KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 4, 3)],
    128: [
        KernelConfig(128, 64, 8, 3), KernelConfig(128, 128, 8, 2), KernelConfig(128, 128, 8, 3),
        KernelConfig(128, 64, 8, 4), KernelConfig(128, 32, 8, 3), KernelConfig(64, 64, 4, 3),
    ],
    256: [KernelConfig(128, 32, 8, 2), KernelConfig(64, 64, 8, 2), KernelConfig(64, 32, 4, 2)],
}  # fmt: skip
_AUTOTUNED: dict[tuple, KernelConfig] = {}
_FALLBACK = KernelConfig(64, 64, 4, 2)
_INTERPRETER = KernelConfig(32, 32, 4, 1)


def _dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def pick_config(device: torch.device, head_dim: int, arch: int | None = None) -> KernelConfig:
    """The launch configuration for ``device`` (or compute capability major ``arch``)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if arch is None:
        if device.type != "cuda":
            return _INTERPRETER
        arch = torch.cuda.get_device_capability(device)[0]
    arch = 9 if arch >= 9 else arch
    return _CONFIGS.get((arch, _dim_bucket(block_d)), _FALLBACK)


_ALIGN_ELEMS = 16


def _alignment(*tensors: torch.Tensor) -> int:
    """16 when every K/V origin offset is a multiple of 16 elements and every base is
    16-byte aligned (the usual case: contiguous (…, H, D) tensors with D % 16 == 0),
    else 1 (correct, but the loads cannot be pipelined)."""
    for t in tensors:
        if t.data_ptr() % 16 or any(st % _ALIGN_ELEMS for st in t.stride()[:-1]):
            return 1
    return _ALIGN_ELEMS


def _n_segs(n_slots: int, n_ranges: int) -> int:
    return max(2, triton.next_power_of_2(n_slots + n_ranges + 1))


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
    """The kernel addresses V with K's strides: copy only when they differ."""
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
    """Triton backend of ``gathered_attention`` (see ``naive.py`` for the semantics)."""
    B, Sq, H, D = q.shape
    quant = pool_k_scale is not None
    if quant:  # fp8 bank: the kernel reads its bytes and decodes them
        pool_k, pool_v = pool_k.view(torch.uint8), pool_v.view(torch.uint8)
        pool_k_scale = pool_k_scale.float().contiguous()
        pool_v_scale = pool_v_scale.float().contiguous()
    if D % 16 or D > 256:
        raise ValueError(f"the triton backend needs head_dim a multiple of 16 up to 256, got {D}")
    q = _last_dim_contiguous(q)
    pool_k, pool_v = _same_layout(pool_k, pool_v)
    if quant and pool_k_scale.stride() != pool_v_scale.stride():
        raise ValueError("pool_k_scale and pool_v_scale must share a layout")
    local_k, local_v = _same_layout(local_k, local_v)
    slot_idx = slot_idx.to(torch.int32)
    local_ranges = local_ranges.to(torch.int32)
    n = slot_idx.shape[1]
    S_e = pool_k.shape[1]
    has_cur = cur_k is not None
    if has_cur:
        cur_k, cur_v = _same_layout(cur_k, cur_v)
    else:
        cur_k = cur_v = q  # never read
    Sc = cur_k.shape[1] if has_cur else 0

    out = _empty(q.shape, q.dtype, q.device)
    if Sq == 0 or B * H == 0:
        return gathered_attention_empty(out, n, return_stats)
    if config is None and q.is_cuda and os.environ.get("DYSINK_AUTOTUNE", "0") == "1":
        config = _autotune(
            (q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges,
             cur_k if has_cur else None, cur_v if has_cur else None, softmax_scale, return_stats,
             slot_delta, rope_theta),
        )  # fmt: skip
    cfg = config or pick_config(q.device, D)
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
    grid = (n_m, B * H)
    _gathered_attn_fwd[grid](
        q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges, cur_k, cur_v,
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
        cur_k.stride(0), cur_k.stride(1), cur_k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        mass.stride(0), mass.stride(1), mass.stride(2),
        D=D, N_RANGES=local_ranges.shape[1], HAS_CUR=has_cur, STATS=return_stats,
        ROTATE=rotate, QUANT=quant,
        N_SLOTS=n_slots_pad, N_SEGS=_n_segs(n, local_ranges.shape[1]),
        ALIGN=_alignment(pool_k, pool_v, local_k, local_v, cur_k, cur_v),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=block_d, PRECISION=_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
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
        for cand in _AUTOTUNE_CANDIDATES[_dim_bucket(block_d)]:
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
