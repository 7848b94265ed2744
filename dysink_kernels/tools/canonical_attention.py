"""A canonical flash-attention forward over one contiguous KV: the kernel report's yardstick.

The gathered-sink kernel walks bank slots, local ranges and the current keys; this
kernel walks one contiguous ``(B, S, H, D)`` key/value tensor with the same tiles,
warps and pipeline depth, so that the SASS of its key loop is what a flash-attention
forward costs per key tile when nothing is gathered. The kernel report compiles it
next to every attention configuration and prints the gathered kernel's loop against
this one (``python -m dysink_kernels kernels``).

The loop is the textbook one: every full key tile unmasked, the softmax scale folded
into one FFMA (``m = max(m, rowmax(s) * c)``, ``p = 2^(s * c - m)``), K and V through
TMA tensor descriptors on sm_90 (plain loads, pipelined with cp.async, elsewhere), and
only the one partial tile at the end of the keys masked, after the loop.

Memory traffic: Q once, each K/V tile once per query tile, O once. FLOPs:
``4 * Sq * Sk * D`` per (batch, head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_report import CANONICAL_NAME, KernelSpec, signature_for

__all__ = ["aot_specs", "canonical_attention"]

LOG2E = 1.4426950408889634
_TMA_ARCH = 90  # the first compute capability with the tensor memory accelerator


@triton.jit
def _canonical_tile(
    b_q, b_k, b_v, acc, m_i, l_i, qk_scale, n_valid,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold one key tile into the online softmax (base 2, scale folded)."""
    b_s = tl.dot(b_q, b_k, input_precision=PRECISION)
    if MASKED:
        b_s = tl.where(tl.arange(0, BLOCK_N)[None, :] < n_valid, b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
    b_p = tl.math.exp2(b_s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _canonical_attn_fwd(
    Q, K, V, OUT, qk_scale, B, Sq, Sk, H,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """``OUT = softmax(Q K^T * qk_scale / log2(e)) V`` for contiguous ``(B, S, H, D)``
    tensors; ``qk_scale`` is the softmax scale times ``log2(e)``; ``PRECISION`` is
    ``tl.dot``'s input precision (it matters for fp32 inputs only). One program per
    (query tile, batch * head)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    row_stride = H * D
    q_row0 = i_b * Sq + i_m * BLOCK_M
    k_row0 = i_b * Sk
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D)
    m_q = o_m < Sq
    if USE_TMA:
        # 2-D views (B * S, H * D): a head is a column block, a tile a row block. Rows
        # past a batch's end belong to the next batch (or read as zero past the
        # tensor): their scores are masked and their outputs never stored.
        desc_q = tl.make_tensor_descriptor(Q, [B * Sq, row_stride], [row_stride, 1], [BLOCK_M, D])
        desc_k = tl.make_tensor_descriptor(K, [B * Sk, row_stride], [row_stride, 1], [BLOCK_N, D])
        desc_v = tl.make_tensor_descriptor(V, [B * Sk, row_stride], [row_stride, 1], [BLOCK_N, D])
        b_q = desc_q.load([q_row0, i_h * D])
    else:
        p_q = Q + (i_b * Sq + o_m)[:, None] * row_stride + i_h * D + o_d[None, :]
        b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)
        # K and V tiles share one (BLOCK_N, D) int32 offset tile from a scalar base
        # each (a tile of 64-bit pointers per tensor, held through the loop, costs
        # twice the registers); K is transposed in registers for the product.
        kv_base = (k_row0 * row_stride + i_h * D).to(tl.int64)
        o_kv = o_n[:, None] * row_stride + o_d[None, :]
        p_k = K + kv_base
        p_v = V + kv_base

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n_full = (Sk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        if USE_TMA:
            b_k = desc_k.load([k_row0 + start_n, i_h * D]).T
            b_v = desc_v.load([k_row0 + start_n, i_h * D])
        else:
            b_k = tl.trans(tl.load(p_k + start_n * row_stride + o_kv))
            b_v = tl.load(p_v + start_n * row_stride + o_kv)
        acc, m_i, l_i = _canonical_tile(b_q, b_k, b_v, acc, m_i, l_i, qk_scale, BLOCK_N,
                                        False, BLOCK_N, PRECISION)  # fmt: skip
    if n_full < Sk:
        if USE_TMA:
            b_k = desc_k.load([k_row0 + n_full, i_h * D]).T
            b_v = desc_v.load([k_row0 + n_full, i_h * D])
        else:
            m_n = (n_full + o_n) < Sk
            b_k = tl.trans(tl.load(p_k + n_full * row_stride + o_kv, mask=m_n[:, None], other=0.0))
            b_v = tl.load(p_v + n_full * row_stride + o_kv, mask=m_n[:, None], other=0.0)
        acc, m_i, l_i = _canonical_tile(b_q, b_k, b_v, acc, m_i, l_i, qk_scale, Sk - n_full,
                                        True, BLOCK_N, PRECISION)  # fmt: skip
    acc = acc / l_i[:, None]
    p_o = OUT + (i_b * Sq + o_m)[:, None] * row_stride + i_h * D + o_d[None, :]
    tl.store(p_o, acc.to(OUT.dtype.element_ty), mask=m_q[:, None])


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory for device-side tensor descriptors (``triton.set_allocator``)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def canonical_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    use_tma: bool | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q`` ``(B, Sq, H, D)`` over ``k, v`` ``(B, Sk, H, D)``.

    The kernel report's reference loop, runnable (on a GPU or under
    ``TRITON_INTERPRET=1``) so that its numbers stand for a correct kernel. ``D`` must
    be a power of two >= 16 and the tensors contiguous. ``use_tma`` defaults to the
    tensor descriptors on sm_90 and later, plain loads elsewhere.
    """
    batch, sq, heads, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k and v must be (B, Sk, H, D) with q {tuple(q.shape)}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")  # fmt: skip
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {dim}")
    if k.shape[1] == 0:
        raise ValueError("k and v need at least one key")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    if use_tma is None:
        use_tma = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] * 10 >= _TMA_ARCH
    if use_tma and q.is_cuda:
        triton.set_allocator(_scratch)
    scale = dim**-0.5 if scale is None else scale
    grid = (triton.cdiv(sq, block_m), batch * heads)
    _canonical_attn_fwd[grid](
        q, k, v, out, scale * LOG2E, batch, sq, k.shape[1], heads,
        D=dim, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=use_tma,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- AOT report
# The reference shape (B=1, Sq=4680, Sk=23,400 window + slot keys, H=12): integer
# arguments take these values so that Triton specialises them as at run time.
_B, _SQ, _SK, _H = 1, 4680, 23400, 12


def _tiles(spec: KernelSpec) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, D) of an attention spec, from its constexprs or its config."""
    c, cfg = spec.constexprs, spec.config
    block_m = c.get("BLOCK_M", cfg.get("block_m"))
    block_n = c.get("BLOCK_N", cfg.get("block_n"))
    dim = c.get("BLOCK_D", c.get("D", cfg.get("D")))
    return int(block_m), int(block_n), int(dim)


def aot_specs(arch: int) -> list[KernelSpec]:
    """The canonical forward at every distinct configuration of the gathered attention
    specs (same tiles, warps, stages and dtype), named ``canonical_attn`` with the
    attention rows' own ``config`` so that the report pairs them."""
    from .kernel_specs import gathered_attention_specs

    specs, seen = [], []
    for att in gathered_attention_specs(arch):
        if att.config in seen:
            continue
        seen.append(att.config)
        block_m, block_n, dim = _tiles(att)
        dtype = att.config.get("dtype", "bf16")
        constexprs = dict(D=dim, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=arch >= _TMA_ARCH,
                          PRECISION="tf32")  # fmt: skip
        if _B == 1:
            constexprs["B"] = 1
        pointers = {name: f"*{dtype}" for name in ("Q", "K", "V", "OUT")}
        specs.append(
            KernelSpec(
                name=CANONICAL_NAME,
                fn=_canonical_attn_fwd,
                signature=signature_for(_canonical_attn_fwd, pointers, constexprs, ("qk_scale",)),
                constexprs=constexprs,
                num_warps=att.num_warps,
                num_stages=att.num_stages,
                config=dict(att.config),
                divisible=tuple(pointers),
                needs_tensor_cores=True,
            )
        )
    return specs
