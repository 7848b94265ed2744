"""Plain PyTorch sink anomaly gate: the oracle for sink_gate.

With ``qbar[b, h]`` the mean query and ``kbar`` a mean key, the score of a key set
is ``qbar . kbar`` (raw dot, no scale). A voter ``(b, h)`` votes against entry
``e`` when ``score(e) > score(local)`` (strict); ``ratio`` is the fraction of
voters against it and the entry is dropped when ``ratio > tau`` (strict).

``gate_votes`` and ``decide_from_votes`` here are the oracles of the production
split in ``votes.py`` (head parallelism counts votes per rank, then decides).
"""

from __future__ import annotations

import torch


def masked_mean_keys(k: torch.Tensor, k_len: torch.Tensor) -> torch.Tensor:
    """``(B, Sk, H, D)`` keys, ``(B,)`` valid prefix -> ``(B, H, D)`` fp32 mean (0 if empty)."""
    _B, Sk = k.shape[:2]
    valid = torch.arange(Sk, device=k.device)[None, :] < k_len.long()[:, None]
    total = torch.einsum("bs,bshd->bhd", valid.float(), k.float())
    return total / k_len.float().clamp(min=1)[:, None, None]


def gate_votes(
    qbar: torch.Tensor,
    kbar_local: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
) -> torch.Tensor:
    """``(B, n)`` fp32 count of heads voting against each listed slot (0 for ``-1``)."""
    B, n = slot_idx.shape
    H = qbar.shape[1]
    valid = slot_idx >= 0
    if slot_mean_k.shape[0] > 0 and n > 0:
        km = slot_mean_k.float()[slot_idx.clamp(min=0).long()]  # (B, n, H, D)
    else:
        km = qbar.new_zeros(B, n, H, qbar.shape[-1])
    s_local = (qbar * kbar_local).sum(-1)  # (B, H)
    s_entry = torch.einsum("bhd,bnhd->bnh", qbar, km)
    return ((s_entry > s_local[:, None, :]) & valid[..., None]).float().sum(-1)


def decide_from_votes(
    votes: torch.Tensor, slot_idx: torch.Tensor, num_heads: int, tau: float, scope: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn vote counts over ``num_heads`` heads into ``(kept_idx, ratio)``."""
    B, n = slot_idx.shape
    valid = slot_idx >= 0
    if n == 0:
        return slot_idx.clone(), torch.zeros(B, 0, dtype=torch.float32, device=votes.device)
    ratio = votes / num_heads
    if scope == "batch":
        count = valid.sum(1)
        uniform = (count == count[0]).all()
        # rank of each valid slot among its sample's valid slots; invalid -> n (dropped)
        rank = torch.where(valid, valid.long().cumsum(1) - 1, n)
        by_rank = torch.zeros(n + 1, dtype=torch.float32, device=votes.device)
        by_rank.index_add_(0, rank.reshape(-1), votes.reshape(-1))
        batch_ratio = (by_rank / (B * num_heads))[rank]
        ratio = torch.where(uniform, batch_ratio, ratio)
    ratio = torch.where(valid, ratio, 0.0)
    kept = torch.where(ratio > tau, -1, slot_idx).to(slot_idx.dtype)
    return kept, ratio


def gate_from_means(
    qbar: torch.Tensor,
    kbar_local: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    tau: float,
    scope: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate on precomputed means: ``qbar, kbar_local (B, H, D)``, ``slot_mean_k (P, H, D)``."""
    votes = gate_votes(qbar, kbar_local, slot_mean_k, slot_idx)
    return decide_from_votes(votes, slot_idx, qbar.shape[1], tau, scope)


def sink_gate_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    k_len: torch.Tensor,
    tau: float,
    scope: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    qbar = q.float().mean(dim=1)
    kbar = masked_mean_keys(k, k_len)
    return gate_from_means(qbar, kbar, slot_mean_k, slot_idx, tau, scope)
