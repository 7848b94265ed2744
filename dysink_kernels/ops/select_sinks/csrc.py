"""select_sinks through the compiled extension (``torch.ops.dysink_C.select_sinks``)."""

from __future__ import annotations

import torch

from ..._cuda import ops


def select_sinks_csrc(
    query_feat: torch.Tensor,
    slot_feat: torch.Tensor,
    slot_owner: torch.Tensor,
    slot_frame: torch.Tensor,
    k: int,
    exclude_lo: torch.Tensor,
    exclude_hi: torch.Tensor,
    sink_frames: int,
    slot_prior: torch.Tensor | None = None,
    prior_mix: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and results as ``naive.select_sinks_naive``."""
    return ops().select_sinks(
        query_feat, slot_feat, slot_owner, slot_frame, int(k), exclude_lo, exclude_hi,
        int(sink_frames), slot_prior, float(prior_mix),
    )  # fmt: skip
