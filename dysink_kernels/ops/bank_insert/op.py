"""Dispatch of the bank insert (used by FrameBank; not a user-facing op)."""

from __future__ import annotations

import torch

from ... import _library  # noqa: F401  (registers torch.ops.dysink.*)
from ..._backends import csrc_available, triton_available
from ..._registry import register_backend, resolve_backend

OP_NAME = "bank_insert"

register_backend(
    OP_NAME,
    "naive",
    "dysink_kernels.ops.bank_insert.naive:bank_insert_naive",
    priority={"*": 0},
)
register_backend(
    "bank_insert",
    "triton",
    "dysink_kernels.ops.bank_insert.triton:bank_insert_triton",
    available=triton_available,
    priority={"cuda": 10},
)
register_backend(
    "bank_insert",
    "csrc",
    "dysink_kernels.ops.bank_insert.csrc:bank_insert_csrc",
    available=csrc_available,
    priority={"cuda": 5, "cpu": 5},
)


def bank_insert(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resolve ``backend`` for the pool's device and run the insert (see ``naive.py``)."""
    name, _ = resolve_backend(OP_NAME, backend, pool_k.device)
    return torch.ops.dysink.bank_insert(
        pool_k, pool_v, pool_mean_k, slot_feat, slot_owner, slot_frame, slot_stamp, clock,
        src_k, src_v, src_pos, feature, frame, slots_per_sample, limit,
        None if dedup is None else float(dedup), name,
    )  # fmt: skip
