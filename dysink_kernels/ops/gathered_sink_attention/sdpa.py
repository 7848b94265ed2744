"""CPU backend of gathered attention: two matrix products and one softmax per query block.

Same inputs and meaning as ``naive.py``. Every candidate key and value is copied, as
fp32, into one workspace ``[slots | local buffer | current keys]`` per call:

* bank slots: ``index_select`` of the listed slots out of the pool (dequantised for
  an fp8 bank, turned for re-positioned slots); a ``-1`` slot gathers slot 0 and is
  masked;
* the whole local buffer: its ranges are device values, so the shape cannot depend
  on them; keys outside the ranges are masked;
* the current keys.

The copy is where unattended rows are cleared: an AND with all-zero words makes them
exact zeros (NaN or Inf there cannot reach a product; kept rows pass bit for bit),
and their scores get ``_MASKED`` added. The clearing needs a copy of the local buffer
anyway; copying every segment into one workspace adds the small slot and current
segments and leaves one product each for scores and output (measured as fast as one
product per segment writing into place, with fewer operations per call). Its shape
depends on input shapes only, never on tensor values: the call reads nothing on the
host and allocates nothing data-dependent.

Per sample and query block, one fp32 score matrix ``(H, Sq_block, N)`` in base-2
units (``y = score * log2(e)``, the scale folded into ``q``; ``exp2`` is about three
times cheaper than ``exp`` on CPU). With ``m`` the row maximum, ``E = 2^(y - m)`` and
``l = sum E``, the same matrix gives the output and every statistic:

* ``out = (E @ V) / l``;
* ``lse = ln2 (m + log2 l)``;
* ``entropy = ln2 (log2 l - sum E (y - m) / l)`` (masked keys hold a finite
  ``-1e30``, so ``E (y - m)`` is ``0``, never ``0 * inf``);
* ``slot_mass[j] = mean_q sum_{keys of slot j} E / l``.

A query block is sized so that the score matrix stays within ``_SCORE_ELEMS``.
"""

from __future__ import annotations

import math
import threading

import torch

from ..rope.tables import rotate_pairs, temporal_cos_sin
from .common import SinkAttnStats

__all__ = ["gathered_attention_sdpa"]

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
# A masked score in base-2 units: exp2 of it underflows to 0 against any real row
# maximum, and it stays finite so that 0 * (score - max) is 0.
_MASKED = -1.0e30
# Elements of one fp32 score matrix (and of its exponentials): 16 MB each.
_SCORE_ELEMS = 1 << 22
# Scratch memory (workspace, scores, exponentials) up to this many fp32 elements is kept
# per thread between calls: freshly allocated buffers of a few MB come back from the OS
# as new pages, and on the machine measured the page faults of one call cost about as
# much as its softmax. Larger calls allocate afresh (the faults are small next to their
# products).
_KEPT_SCRATCH_ELEMS = 1 << 24


class _Scratch(threading.local):
    buf: torch.Tensor | None = None


_SCRATCH = _Scratch()


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    """``numel`` fp32 elements of uninitialised scratch memory (never returned to a caller)."""
    if numel > _KEPT_SCRATCH_ELEMS:
        return torch.empty(numel, dtype=torch.float32, device=device)
    buf = _SCRATCH.buf
    if buf is None or buf.numel() < numel or buf.device != device:
        buf = _SCRATCH.buf = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]


def _ranges_mask(local_ranges: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``(B, R, 2)`` half-open token ranges -> ``(B, n_tokens)`` bool, True inside one."""
    pos = torch.arange(n_tokens, device=local_ranges.device, dtype=local_ranges.dtype)
    lo, hi = local_ranges[..., 0:1], local_ranges[..., 1:2]
    return ((pos >= lo) & (pos < hi)).any(dim=1)


def _slot_rows(
    q: torch.Tensor,
    pool: torch.Tensor,
    scale: torch.Tensor | None,
    flat: torch.Tensor,
) -> torch.Tensor:
    """``(B * n, S_e, H, D)`` rows of the listed slots, dequantised as the other backends
    read an fp8 bank (value = stored * scale[slot, head], rounded to ``q.dtype``)."""
    rows = pool.index_select(0, flat)
    if scale is None:
        return rows
    return (rows.float() * scale.index_select(0, flat)[:, None, :, None]).to(q.dtype)


def _copy_rows(dst_bits: torch.Tensor, src: torch.Tensor, ones: torch.Tensor) -> None:
    """Copy ``src`` into the fp32 workspace seen as int32 ``dst_bits``, with the rows
    whose word in ``ones`` (broadcast over the trailing ``(H, D)``) is 0 set to +0.0."""
    if src.dtype == torch.float32:
        torch.bitwise_and(src.view(torch.int32), ones, out=dst_bits)
    else:
        dst_bits.view(torch.float32).copy_(src)
        dst_bits.bitwise_and_(ones)


def _empty_result(
    q: torch.Tensor, n: int, return_stats: bool
) -> tuple[torch.Tensor, SinkAttnStats | None]:
    """No key at all (or nothing to compute): zeros, ``lse = -inf``, entropy and mass 0."""
    B, Sq, H, _ = q.shape
    out = torch.zeros_like(q)
    if not return_stats:
        return out, None
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    zeros = torch.zeros(B, H, Sq, dtype=torch.float32, device=q.device)
    mass = torch.zeros(B, H, n, dtype=torch.float32, device=q.device)
    return out, SinkAttnStats(lse=lse, entropy=zeros, slot_mass=mass)


def gathered_attention_sdpa(
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
) -> tuple[torch.Tensor, SinkAttnStats | None]:
    """Gathered attention on CPU (see the module docstring); the oracle's signature.

    Returns ``out`` with the strides of ``torch.empty_like(q)`` and, with
    ``return_stats``, contiguous fp32 statistics.
    """
    B, Sq, H, _ = q.shape
    n = slot_idx.shape[1]
    S_e = pool_k.shape[1]
    # Without a pool row every listed slot is -1 (validated): no slot segment at all.
    n_slot_keys = n * S_e if pool_k.shape[0] > 0 else 0
    n_local = local_k.shape[1]
    n_cur = 0 if cur_k is None else cur_k.shape[1]
    n_keys = n_slot_keys + n_local + n_cur
    if n_keys == 0 or B * Sq * H == 0:
        return _empty_result(q, n, return_stats)

    # Every candidate key and value, fp32, in one workspace [slots | local | current]:
    # one product each for scores and output instead of one per segment, and the copy
    # is where unused rows are cleared (below). The shape depends on shapes only.
    dev = q.device
    n_masked = n_slot_keys + n_local
    chunk = max(1, min(Sq, _SCORE_ELEMS // (H * n_keys)))
    ws_shape = (B, n_keys, H, q.shape[3])
    ws_elems, s_elems = math.prod(ws_shape), H * chunk * n_keys
    scratch = _scratch(2 * ws_elems + 2 * s_elems, dev)
    ws_k, ws_v = (t.view(ws_shape) for t in scratch[: 2 * ws_elems].chunk(2))
    s_buf, e_buf = scratch[2 * ws_elems :].chunk(2)
    bits_k, bits_v = ws_k.view(torch.int32), ws_v.view(torch.int32)
    # Rows not attended are copied as exact zeros, through an AND with all-zero words
    # (NaN or Inf there cannot leak into a product; kept rows pass bit for bit), and
    # their scores get _MASKED added.
    bias = torch.zeros(B, n_keys, dtype=torch.float32, device=dev)
    if n_slot_keys:
        keep = slot_idx >= 0
        ones = keep.to(torch.int32).neg_()[:, :, None, None, None]  # -1: all bits set
        flat = slot_idx.clamp(min=0).long().view(-1)
        gk = _slot_rows(q, pool_k, pool_k_scale, flat).view(B, n, S_e, H, -1)
        if slot_delta is not None:  # re-positioned slots: turn the temporal RoPE pairs
            cos, sin = temporal_cos_sin(slot_delta[..., None], gk.shape[-1], rope_theta, dev)
            gk = rotate_pairs(gk.float(), cos, sin)
        gv = _slot_rows(q, pool_v, pool_v_scale, flat).view(B, n, S_e, H, -1)
        _copy_rows(bits_k[:, :n_slot_keys].view(B, n, S_e, H, -1), gk, ones)
        _copy_rows(bits_v[:, :n_slot_keys].view(B, n, S_e, H, -1), gv, ones)
        bias[:, :n_slot_keys].view(B, n, S_e).masked_fill_(~keep[..., None], _MASKED)
    if n_local:
        keep = _ranges_mask(local_ranges, n_local)
        ones = keep.to(torch.int32).neg_()[:, :, None, None]
        _copy_rows(bits_k[:, n_slot_keys:n_masked], local_k, ones)
        _copy_rows(bits_v[:, n_slot_keys:n_masked], local_v, ones)
        torch.mul(~keep, _MASKED, out=bias[:, n_slot_keys:n_masked])
    if n_cur:
        ws_k[:, n_masked:].copy_(cur_k)
        ws_v[:, n_masked:].copy_(cur_v)
    # A sample with no key at all gets the empty result (only possible without cur_k).
    attended = bias.amax(dim=1) == 0 if n_cur == 0 else None

    qs = (q.float() * (softmax_scale * _LOG2E)).transpose(1, 2)  # (B, H, Sq, D)
    keys_t = ws_k.permute(0, 2, 3, 1)  # (B, H, D, N)
    values = ws_v.transpose(1, 2)  # (B, H, N, D)
    out = torch.empty_like(q)
    out_h = out.transpose(1, 2)
    lse = torch.empty(B, H, Sq, 1, dtype=torch.float32, device=dev)
    entropy = torch.empty(B, H, Sq, 1, dtype=torch.float32, device=dev)
    mass = torch.zeros(B, H, n, dtype=torch.float32, device=dev)
    for b in range(B):
        for q0 in range(0, Sq, chunk):
            q1 = min(Sq, q0 + chunk)
            # Scores in base-2 units with the bias added by the product's epilogue.
            s = s_buf[: H * (q1 - q0) * n_keys].view(H, q1 - q0, n_keys)
            torch.baddbmm(bias[b], qs[b, :, q0:q1], keys_t[b], out=s)
            m = s.amax(dim=-1, keepdim=True)
            e = torch.exp2(s.sub_(m), out=e_buf[: s.numel()].view(s.shape))
            l = e.sum(dim=-1, keepdim=True)  # noqa: E741  (the softmax normaliser)
            torch.div(torch.bmm(e, values[b]), l, out=out_h[b, :, q0:q1])
            if not return_stats:
                continue
            log2_l = torch.log2(l)
            lse_c = torch.add(log2_l, m, out=lse[b, :, q0:q1]).mul_(_LN2)
            u = s.mul_(e).sum(dim=-1, keepdim=True).div_(l)  # sum p (y - m)
            ent_c = torch.sub(log2_l, u, out=entropy[b, :, q0:q1]).mul_(_LN2)
            if attended is not None:
                lse_c.masked_fill_(~attended[b], float("-inf"))
                ent_c.mul_(attended[b])
            if n_slot_keys:
                p_slot = e[..., :n_slot_keys].view(H, q1 - q0, n, S_e).sum(dim=-1).div_(l)
                if attended is not None:
                    p_slot.mul_(attended[b])
                mass[b].add_(p_slot.sum(dim=1))
    if not return_stats:
        return out, None
    return out, SinkAttnStats(lse=lse.view(B, H, Sq), entropy=entropy.view(B, H, Sq),
                              slot_mass=mass.div_(Sq))  # fmt: skip
