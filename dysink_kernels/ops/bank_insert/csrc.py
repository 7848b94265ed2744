"""Bank insert through the compiled extension (``torch.ops.dysink_C.bank_insert``)."""

from __future__ import annotations

import torch

from ..._cuda import ops


def bank_insert_csrc(
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
    """Same arguments, in-place updates and results as ``naive.bank_insert_naive``; the
    pools may be float or the uint8 bytes of an fp8 bank (copied as they are)."""
    return ops().bank_insert(
        pool_k, pool_v, pool_mean_k, slot_feat, slot_owner, slot_frame, slot_stamp, clock,
        src_k, src_v, src_pos, feature, frame, int(slots_per_sample), int(limit),
        None if dedup is None else float(dedup),
    )  # fmt: skip
