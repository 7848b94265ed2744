"""Gathered attention through the compiled extension (``torch.ops.dysink_C``), CPU only.

The C++ op (``csrc/cpu_attention.cpp``) reads ``slot_idx`` and ``local_ranges`` itself
(a memory read on CPU, no synchronisation), packs only the keys a query attends and
runs two matrix products per block of queries with the softmax and every statistic in
one pass between them. Same inputs and meaning as ``naive.py``.
"""

from __future__ import annotations

import torch

from ..._cuda import ops
from .common import SinkAttnStats

__all__ = ["gathered_attention_csrc"]


def gathered_attention_csrc(
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
    """Gathered attention on CPU in C++; the oracle's signature and results."""
    out, lse, ent, mass = ops().gathered_sink_attention(
        q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges, cur_k, cur_v,
        float(softmax_scale), bool(return_stats), slot_delta, float(rope_theta),
        pool_k_scale, pool_v_scale,
    )  # fmt: skip
    if not return_stats:
        return out, None
    return out, SinkAttnStats(lse=lse, entropy=ent, slot_mass=mass)
