"""sink_gate, gate_from_means and gate_votes through the compiled extension
(``torch.ops.dysink_C``)."""

from __future__ import annotations

import torch

from ..._cuda import ops


def gate_votes_csrc(
    qbar: torch.Tensor,
    kbar_local: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
) -> torch.Tensor:
    """Same arguments and result as ``votes.gate_votes_torch``: ``(B, n)`` fp32 counts."""
    return ops().gate_votes(qbar, kbar_local, slot_mean_k, slot_idx)


def gate_from_means_csrc(
    qbar: torch.Tensor,
    kbar_local: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    tau: float,
    scope: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and results as ``naive.gate_from_means``."""
    return ops().gate_from_means(qbar, kbar_local, slot_mean_k, slot_idx, float(tau), scope)


def sink_gate_csrc(
    q: torch.Tensor,
    k: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    k_len: torch.Tensor,
    tau: float,
    scope: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and results as ``naive.sink_gate_naive``."""
    return ops().sink_gate(q, k, slot_mean_k, slot_idx, k_len, float(tau), scope)
