"""Plain PyTorch bank insert with device-side dedup and slot choice: the oracle.

Slots are partitioned per sample: sample ``b`` owns the region
``[b * C, (b + 1) * C)`` of the pool and uses at most ``limit`` of it. For each
sample, with ``f`` its L2-normalised feature:

* store = ``f`` is finite and (the sample has no entry, or the max cosine
  between ``f`` and its stored features is ``<= dedup``);
* slot  = the first free slot of the region (below ``limit``) if any, else the
  sample's oldest entry (FIFO by insertion stamp);
* when storing: copy the block's K/V of every layer from the local buffer at
  token positions ``src_pos``, write the per-layer mean keys, the feature, the
  owner, the frame and a new stamp. When not storing, nothing changes.

Everything is decided on the device; nothing is read back by the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def choose_slots(
    feature: torch.Tensor,
    slot_feat: torch.Tensor,
    slot_owner: torch.Tensor,
    slot_stamp: torch.Tensor,
    slots_per_sample: int,
    limit: int,
    dedup: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(store (B,) bool, slot (B,) int64, normalised feature (B, F))``."""
    B = feature.shape[0]
    C = slots_per_sample
    device = feature.device
    fn = F.normalize(feature.float(), dim=-1)
    occupied = slot_owner.view(B, C) >= 0
    cos = torch.einsum("bf,bcf->bc", fn, F.normalize(slot_feat.view(B, C, -1), dim=-1))
    max_cos = torch.where(occupied, cos, float("-inf")).amax(dim=1)
    finite = torch.isfinite(feature).all(dim=1)
    novel = ~occupied.any(dim=1)
    if dedup is not None:
        novel = novel | (max_cos <= dedup)
    else:
        novel = torch.ones_like(novel)
    store = finite & novel

    free = ~occupied & (torch.arange(C, device=device) < limit)
    first_free = torch.argmax(free.to(torch.int32), dim=1)
    big = torch.iinfo(torch.int64).max
    oldest = torch.argmin(torch.where(occupied, slot_stamp.view(B, C), big), dim=1)
    local = torch.where(free.any(dim=1), first_free, oldest)
    slot = torch.arange(B, device=device) * C + local
    return store, slot, torch.where(finite[:, None], fn, 0.0)


def bank_insert_naive(
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
    """Insert one block per sample; mutates the pool in place.

    Shapes: ``pool_k/pool_v (L, P, S_e, H, D)`` (float, or the uint8 bytes of an fp8
    bank: copied as they are, their mean keys being the caller's to replace),
    ``pool_mean_k (L, P, H, D)`` fp32,
    ``slot_feat (P, F)`` fp32, ``slot_owner/slot_frame (P,)`` int32,
    ``slot_stamp (P,)`` int64, ``clock ()`` int64, ``src_k/src_v (L, B, N, H, D)``
    local buffers, ``src_pos (S_e,)`` int64 token positions of the block,
    ``feature (B, F)``, ``frame ()`` int64 first frame of the block.

    Returns ``(stored (B,) bool, slot (B,) int64)``.
    """
    B = feature.shape[0]
    store, slot, fn = choose_slots(
        feature, slot_feat, slot_owner, slot_stamp, slots_per_sample, limit, dedup
    )
    blk_k = src_k.index_select(2, src_pos)  # (L, B, S_e, H, D)
    blk_v = src_v.index_select(2, src_pos)
    m5 = store[None, :, None, None, None]
    pool_k.index_copy_(1, slot, torch.where(m5, blk_k, pool_k.index_select(1, slot)))
    pool_v.index_copy_(1, slot, torch.where(m5, blk_v, pool_v.index_select(1, slot)))
    mean_k = blk_k.float().mean(dim=2)  # (L, B, H, D)
    pool_mean_k.index_copy_(
        1, slot, torch.where(store[None, :, None, None], mean_k, pool_mean_k.index_select(1, slot))
    )
    slot_feat.index_copy_(0, slot, torch.where(store[:, None], fn, slot_feat.index_select(0, slot)))
    sample = torch.arange(B, device=feature.device, dtype=slot_owner.dtype)
    slot_owner.index_copy_(0, slot, torch.where(store, sample, slot_owner.index_select(0, slot)))
    new_frame = frame.to(slot_frame.dtype).expand(B)
    slot_frame.index_copy_(0, slot, torch.where(store, new_frame, slot_frame.index_select(0, slot)))
    stamp = clock + torch.arange(B, device=feature.device)
    slot_stamp.index_copy_(0, slot, torch.where(store, stamp, slot_stamp.index_select(0, slot)))
    clock.add_(B)
    return store, slot
