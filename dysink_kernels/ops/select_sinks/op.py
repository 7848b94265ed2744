"""Public entry point of select_sinks (DESIGN 3.2) and its dispatch."""

from __future__ import annotations

import torch

from ... import _library  # noqa: F401  (registers torch.ops.dysink.*)
from ..._backends import csrc_available, triton_available
from ..._registry import register_backend, resolve_backend
from ..._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_tensor,
)

OP_NAME = "select_sinks"

register_backend(
    OP_NAME,
    "naive",
    "dysink_kernels.ops.select_sinks.naive:select_sinks_naive",
    priority={"*": 0},
)
register_backend(
    "select_sinks",
    "triton",
    "dysink_kernels.ops.select_sinks.triton:select_sinks_triton",
    available=triton_available,
    priority={"cuda": 10},
)
register_backend(
    "select_sinks",
    "csrc",
    "dysink_kernels.ops.select_sinks.csrc:select_sinks_csrc",
    available=csrc_available,
    priority={"cuda": 5, "cpu": 5},
)


def select_sinks_impl(
    query_feat: torch.Tensor,
    slot_feat: torch.Tensor,
    slot_owner: torch.Tensor,
    slot_frame: torch.Tensor,
    k: int,
    exclude_lo: torch.Tensor,
    exclude_hi: torch.Tensor,
    sink_frames: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchecked dispatch, for callers that built the inputs themselves."""
    name, _ = resolve_backend(OP_NAME, backend, query_feat.device)
    return torch.ops.dysink.select_sinks(
        query_feat, slot_feat, slot_owner, slot_frame, k, exclude_lo, exclude_hi, sink_frames, name
    )


def select_sinks(
    query_feat: torch.Tensor,
    slot_feat: torch.Tensor,
    slot_owner: torch.Tensor,
    slot_frame: torch.Tensor,
    *,
    k: int,
    exclude_lo: torch.Tensor,
    exclude_hi: torch.Tensor,
    sink_frames: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the ``k`` bank slots most relevant to each sample's recent blocks.

    ``score[b, p]`` is the mean cosine between slot ``p``'s feature and the query
    rows of sample ``b`` (rows that are all zeros are padding and are ignored; a
    sample with no valid row retrieves nothing). Candidates are the slots owned by
    ``b`` whose frame lies neither in ``[exclude_lo[b], exclude_hi[b])`` nor in
    ``[0, sink_frames)``. The top ``k`` by score (ties: lower frame, then lower
    slot) are returned ordered by frame ascending.

    Args:
        query_feat: ``(B, M, F)`` features of the last blocks of each sample.
        slot_feat: ``(P, F)`` bank features.
        slot_owner: ``(P,)`` int sample owning each slot, ``-1`` = free.
        slot_frame: ``(P,)`` int first frame index of each entry.
        k: how many slots to return (``>= 0``).
        exclude_lo, exclude_hi: ``(B,)`` int, frames ``[lo, hi)`` are excluded.
        sink_frames: frames ``[0, sink_frames)`` are excluded (static sinks).
        backend: ``"auto"`` or a registered backend name.

    Returns:
        ``(slot_idx, score)``: ``(B, k)`` int32 slots (``-1`` padding after the
        chosen ones) and ``(B, k)`` fp32 scores aligned with them (``-inf`` for
        padding).
    """
    check_tensor(query_feat, "query_feat", 3, FLOAT_DTYPES)
    device = query_feat.device
    B, _, F = query_feat.shape
    check_tensor(slot_feat, "slot_feat", 2, FLOAT_DTYPES, device=device)
    check_dim(slot_feat, "slot_feat", 1, F, "feature dim")
    P = slot_feat.shape[0]
    for name, t in (("slot_owner", slot_owner), ("slot_frame", slot_frame)):
        check_tensor(t, name, 1, INDEX_DTYPES, device=device)
        check_dim(t, name, 0, P, "slots")
    for name, t in (("exclude_lo", exclude_lo), ("exclude_hi", exclude_hi)):
        check_tensor(t, name, 1, INDEX_DTYPES, device=device)
        check_dim(t, name, 0, B, "batch")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if isinstance(sink_frames, bool) or not isinstance(sink_frames, int) or sink_frames < 0:
        raise ValueError(f"sink_frames must be an int >= 0, got {sink_frames!r}")
    return select_sinks_impl(
        query_feat, slot_feat, slot_owner, slot_frame, k, exclude_lo, exclude_hi,
        sink_frames, backend,
    )  # fmt: skip
