"""The gate's vote split in two, for head parallelism: count, then decide.

A rank that holds some of the heads counts the votes of its heads
(``gate_votes_torch`` here, or the ``gate_votes`` entry of the Triton and C++
backends), the ranks add their counts up (one all-reduce), and every rank takes
the same decision from the totals (``decide_from_votes``). One process that holds
all heads gets the decisions of ``gate_from_means``.

Voter ``(b, h)`` votes against entry ``j`` of sample ``b`` when
``qbar[b, h] . slot_mean_k[slot_idx[b, j], h] > qbar[b, h] . kbar_local[b, h]``
(strict). Everything stays on the device.
"""

from __future__ import annotations

import torch

__all__ = ["decide_from_votes", "gate_votes_torch"]


def gate_votes_torch(
    qbar: torch.Tensor,
    kbar_local: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
) -> torch.Tensor:
    """Count the heads voting against each listed slot (PyTorch, any device).

    Args:
        qbar, kbar_local: ``(B, H, D)`` mean query and mean local key per head.
        slot_mean_k: ``(P, H, D)`` per-slot mean keys (``P`` may be 0: every listed
            slot then scores 0).
        slot_idx: ``(B, n)`` int slots, ``-1`` = none.

    Returns:
        ``(B, n)`` fp32 vote counts (0 for ``-1`` entries).
    """
    B, n = slot_idx.shape
    H, D = qbar.shape[1], qbar.shape[2]
    q = qbar.float()
    if slot_mean_k.shape[0] > 0:
        rows = slot_idx.long().clamp(min=0).reshape(-1)
        entry = slot_mean_k.float().index_select(0, rows).view(B, n, H, D)
    else:
        entry = q.new_zeros(B, n, H, D)
    # The local key set scored as entry 0 of the same reduction: equal key means give
    # bit-equal scores, which the strict vote relies on.
    keys = q.new_empty(B, 1 + n, H, D)
    keys[:, 0] = kbar_local
    keys[:, 1:] = entry
    score = (keys * q[:, None]).sum(dim=-1)  # (B, 1 + n, H)
    against = (score[:, 1:] > score[:, :1]) & (slot_idx >= 0)[..., None]
    return against.sum(dim=-1, dtype=torch.float32)


def decide_from_votes(
    votes: torch.Tensor, slot_idx: torch.Tensor, num_heads: int, tau: float, scope: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn vote counts over ``num_heads`` heads (all ranks) into ``(kept_idx, ratio)``.

    ``ratio = votes / num_heads``; with ``scope="batch"`` and the same number of valid
    slots in every sample, the r-th valid slots of all samples are judged together:
    ``ratio = sum_b votes / (B * num_heads)``. An entry is dropped (``-1``) when
    ``ratio > tau``; ``-1`` entries get ratio 0.

    Args:
        votes: ``(B, n)`` vote counts summed over every head.
        slot_idx: ``(B, n)`` int slots, ``-1`` = none.
        num_heads: total heads that voted.
        tau: drop threshold in ``[0, 1]``.
        scope: ``"batch"`` or ``"sample"``.

    Returns:
        ``(kept_idx, ratio)``: ``slot_idx`` with dropped entries ``-1`` (same dtype)
        and ``(B, n)`` fp32 ratios.
    """
    B, n = slot_idx.shape
    valid = slot_idx >= 0
    votes = votes.float()
    ratio = votes / num_heads
    if scope == "batch" and B > 0 and n > 0:
        count = valid.sum(dim=1)
        uniform = count.amin() == count.amax()  # a device bool, no host read
        # Rank of each valid slot among its sample's valid slots; invalid ones -> n.
        rank = torch.where(valid, valid.long().cumsum(dim=1) - 1, n)
        by_rank = votes.new_zeros(n + 1).index_add_(
            0, rank.reshape(-1), torch.where(valid, votes, 0.0).reshape(-1)
        )
        ratio = torch.where(uniform, (by_rank / (B * num_heads))[rank], ratio)
    ratio = torch.where(valid, ratio, 0.0)
    kept = torch.where(ratio > tau, -1, slot_idx).to(slot_idx.dtype)
    return kept, ratio
