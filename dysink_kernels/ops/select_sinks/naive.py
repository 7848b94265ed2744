"""Plain PyTorch frame-relevance scoring and top-k: the oracle for select_sinks.

score[b, p] = mean over the valid query rows m of cos(query_feat[b, m], slot_feat[p]);
a query row that is all zeros is padding and does not count. A slot is a candidate
for sample ``b`` when it is owned by ``b``, its frame lies outside
``[exclude_lo[b], exclude_hi[b])`` and outside ``[0, sink_frames)``, and its score
is a number. The ``k`` best candidates (score descending, then frame ascending,
then slot ascending) are returned ordered by frame (then slot) ascending,
``-1`` padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relevance_scores(query_feat: torch.Tensor, slot_feat: torch.Tensor) -> torch.Tensor:
    """``(B, M, F)`` x ``(P, F)`` -> ``(B, P)`` mean cosine over the non-zero query rows."""
    qf = query_feat.float()
    valid_q = (qf != 0).any(dim=-1)  # (B, M)
    qn = F.normalize(qf, dim=-1)
    sn = F.normalize(slot_feat.float(), dim=-1)
    cos = torch.einsum("bmf,pf->bmp", qn, sn)
    count = valid_q.sum(dim=1, keepdim=True)
    score = (cos * valid_q[..., None]).sum(dim=1) / count.clamp(min=1)
    # No query at all means nothing is relevant.
    return torch.where(count > 0, score, torch.full_like(score, float("nan")))


def candidate_mask(
    score: torch.Tensor,
    slot_owner: torch.Tensor,
    slot_frame: torch.Tensor,
    exclude_lo: torch.Tensor,
    exclude_hi: torch.Tensor,
    sink_frames: int,
) -> torch.Tensor:
    B = score.shape[0]
    sample = torch.arange(B, device=score.device)[:, None]
    frame = slot_frame.long()[None, :]
    in_window = (frame >= exclude_lo.long()[:, None]) & (frame < exclude_hi.long()[:, None])
    return (
        (slot_owner.long()[None, :] == sample)
        & ~in_window
        & (frame >= sink_frames)
        & ~torch.isnan(score)
    )


def select_sinks_naive(
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
    """See the module docstring. ``slot_prior (B, P)`` in [0, 1] blends into the score:
    ``(1 - prior_mix) * cosine + prior_mix * prior`` (usage-aware relevance)."""
    B = query_feat.shape[0]
    P = slot_feat.shape[0]
    device = query_feat.device
    slot_out = torch.full((B, k), -1, dtype=torch.int32, device=device)
    score_out = torch.full((B, k), float("-inf"), dtype=torch.float32, device=device)
    if k == 0 or P == 0:
        return slot_out, score_out

    score = relevance_scores(query_feat, slot_feat)
    if slot_prior is not None and prior_mix > 0:
        score = (1.0 - prior_mix) * score + prior_mix * slot_prior.float()
    cand = candidate_mask(score, slot_owner, slot_frame, exclude_lo, exclude_hi, sink_frames)
    masked = torch.where(cand, score, torch.full_like(score, float("-inf")))

    # Rank by (score desc, frame asc, slot asc): a stable sort by frame, then a
    # stable sort by descending score.
    by_frame = torch.argsort(slot_frame.long(), stable=True)
    order = torch.argsort(-masked[:, by_frame], dim=1, stable=True)
    kk = min(k, P)
    top = by_frame[order[:, :kk]]  # (B, kk) slot ids
    top_score = masked.gather(1, top)
    chosen = top_score > float("-inf")

    # Chosen entries ordered by (frame, slot) ascending, padding last.
    big = torch.iinfo(torch.int64).max
    frame_key = torch.where(chosen, slot_frame.long()[top] * P + top, torch.full_like(top, big))
    reorder = torch.argsort(frame_key, dim=1, stable=True)
    top = top.gather(1, reorder)
    top_score = top_score.gather(1, reorder)
    chosen = chosen.gather(1, reorder)
    slot_out[:, :kk] = torch.where(chosen, top, -1).to(torch.int32)
    score_out[:, :kk] = torch.where(chosen, top_score, float("-inf"))
    return slot_out, score_out
