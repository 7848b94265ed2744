"""Plain PyTorch gathered-sink attention: the oracle for every other backend.

Readable rather than fast: it gathers the listed slots, concatenates them with
the local keys, masks what is not attended and runs softmax attention in fp32,
a chunk of queries at a time so that memory stays bounded.

The general form attends three segments of keys for each sample ``b``:

* bank slots: ``pool_k[s]`` for every ``s`` in ``slot_idx[b]`` with ``s >= 0``;
* local ranges: ``local_k[b, start:end]`` for each ``(start, end)`` row of
  ``local_ranges[b]`` (disjoint, end <= start means empty);
* current keys: ``cur_k[b]`` in full (optional).

Options: ``slot_delta (B, n)`` re-positions each slot's keys by that many frames
(the temporal RoPE turn of ``rotate_temporal``; the stored bank is not touched);
``pool_k_scale/pool_v_scale (P, H)`` dequantise an fp8 bank (value = stored * scale).

The public function (``gathered_sink_attention``) uses one local range
``[0, k_len)`` and no current keys; ``DySinkCache`` uses all three (static sinks and the
window ring as ranges of its local buffer, the call's own keys as current).
"""

from __future__ import annotations

import torch

from ..rope.tables import rotate_pairs, temporal_cos_sin
from .common import SinkAttnStats

# Score-matrix budget per query chunk (elements of fp32), keeps the oracle usable
# on large shapes without changing its results.
_SCORE_ELEMS_PER_CHUNK = 1 << 25


def ranges_to_mask(local_ranges: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``(B, R, 2)`` half-open ranges -> ``(B, n_tokens)`` bool mask."""
    pos = torch.arange(n_tokens, device=local_ranges.device)
    lo = local_ranges[..., 0:1].to(pos.dtype)
    hi = local_ranges[..., 1:2].to(pos.dtype)
    return ((pos >= lo) & (pos < hi)).any(dim=1)


def gather_keys(
    q: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    slot_idx: torch.Tensor,
    local_k: torch.Tensor,
    local_v: torch.Tensor,
    local_ranges: torch.Tensor,
    cur_k: torch.Tensor | None,
    cur_v: torch.Tensor | None,
    slot_delta: torch.Tensor | None = None,
    rope_theta: float = 10000.0,
    pool_k_scale: torch.Tensor | None = None,
    pool_v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every key a query could attend, explicitly: ``(keys, values)`` fp32
    ``(B, N, H, D)`` = [gathered slots, the whole local buffer, current keys], and the
    ``(B, N)`` bool mask of those actually attended."""
    B, _, H, D = q.shape
    P, S_e = pool_k.shape[:2]
    n = slot_idx.shape[1]
    slot_valid = slot_idx >= 0
    if P > 0 and n > 0:
        flat = slot_idx.clamp(min=0).long().reshape(-1)
        gk = pool_k.index_select(0, flat).reshape(B, n, S_e, H, D)
        gv = pool_v.index_select(0, flat).reshape(B, n, S_e, H, D)
        if pool_k_scale is not None:  # fp8 bank: dequantise per (slot, head)
            gk = gk.float() * pool_k_scale.index_select(0, flat).view(B, n, 1, H, 1)
            gv = gv.float() * pool_v_scale.index_select(0, flat).view(B, n, 1, H, 1)
            gk, gv = gk.to(q.dtype), gv.to(q.dtype)  # as the kernel feeds its dot
        if slot_delta is not None:  # re-positioned sinks: turn the temporal RoPE pairs
            cos, sin = temporal_cos_sin(slot_delta.float()[..., None], D, rope_theta, q.device)
            gk = rotate_pairs(gk.float(), cos, sin)
        gk = gk.reshape(B, n * S_e, H, D)
        gv = gv.reshape(B, n * S_e, H, D)
    else:
        gk = q.new_zeros(B, n * S_e, H, D)
        gv = q.new_zeros(B, n * S_e, H, D)

    parts_k = [gk, local_k]
    parts_v = [gv, local_v]
    parts_m = [
        slot_valid.repeat_interleave(S_e, dim=1),
        ranges_to_mask(local_ranges, local_k.shape[1]),
    ]
    if cur_k is not None:
        parts_k.append(cur_k)
        parts_v.append(cur_v)
        parts_m.append(torch.ones(B, cur_k.shape[1], dtype=torch.bool, device=q.device))
    keys = torch.cat([t.float() for t in parts_k], dim=1)
    vals = torch.cat([t.float() for t in parts_v], dim=1)
    return keys, vals, torch.cat(parts_m, dim=1)


def gathered_attention_naive(
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
    B, Sq, H, _ = q.shape
    S_e = pool_k.shape[1]
    n = slot_idx.shape[1]
    device = q.device
    keys, vals, mask = gather_keys(
        q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges, cur_k, cur_v,
        slot_delta, rope_theta, pool_k_scale, pool_v_scale,
    )  # fmt: skip
    mask = mask[:, None, None, :]  # (B, 1, 1, N)
    n_keys = keys.shape[1]
    n_slot_keys = n * S_e

    out = torch.empty_like(q)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=device)
    entropy = torch.empty(B, H, Sq, dtype=torch.float32, device=device)
    mass = torch.zeros(B, H, n, dtype=torch.float32, device=device)

    chunk = max(1, _SCORE_ELEMS_PER_CHUNK // max(1, B * H * n_keys))
    for q0 in range(0, Sq, chunk):
        qc = q[:, q0 : q0 + chunk].float()
        s = torch.einsum("bqhd,bkhd->bhqk", qc, keys) * softmax_scale
        s = s.masked_fill(~mask, float("-inf"))
        lse_c = torch.logsumexp(s, dim=-1)  # -inf where a row attends nothing
        attended = torch.isfinite(lse_c)
        p = torch.exp(s - torch.where(attended, lse_c, 0.0)[..., None])
        out[:, q0 : q0 + chunk] = torch.einsum("bhqk,bkhd->bqhd", p, vals).to(q.dtype)
        lse[..., q0 : q0 + chunk] = lse_c
        if return_stats:
            ps = (p * s.masked_fill(~mask, 0.0)).sum(-1)
            entropy[..., q0 : q0 + chunk] = torch.where(attended, lse_c - ps, 0.0)
            if n > 0:
                per_slot = p[..., :n_slot_keys].reshape(B, H, p.shape[2], n, S_e).sum(-1)
                mass += per_slot.sum(2)
    if not return_stats:
        return out, None
    return out, SinkAttnStats(lse=lse, entropy=entropy, slot_mass=mass / max(Sq, 1))
