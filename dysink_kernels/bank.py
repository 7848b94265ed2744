"""FrameBank: a preallocated, on-device pool of past blocks' K/V (README: the protocol)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._validate import canonical_device
from .fp8 import FP8_DTYPE, quantize
from .ops.bank_insert import bank_insert

__all__ = ["BankStats", "FrameBank"]


class BankStats(NamedTuple):
    """Occupancy and eviction counters of a bank (device tensors, no host sync).

    Attributes:
        entries: ``(B,)`` int64 entries held per sample.
        evictions: ``(B,)`` int64 entries evicted so far per sample (a full bank's
            insert replaces its oldest or least used entry).
        capacity: entries a sample can hold (host int).
    """

    entries: torch.Tensor
    evictions: torch.Tensor
    capacity: int


class FrameBank:
    """Fixed-shape pool of bank entries for a whole model.

    One entry (slot) holds one block of ``entry_tokens`` tokens: its post-RoPE K/V
    for every layer, per-layer mean keys, a feature vector, the sample that owns
    it, the block's first frame and an insertion stamp. Slots are partitioned per
    sample: sample ``b`` uses slots ``[b * slots_per_sample, (b+1) * slots_per_sample)``,
    at most ``max_entries`` of them, evicting its oldest entry (FIFO) when full.

    All state is tensors on ``device``; nothing here reads values on the host.

    With ``storage_device="cpu"`` and a CUDA ``device`` the K/V are pinned host memory
    (the per-block path reads only the retrieved slots, staged by ``offload.py``).

    Attributes:
        k, v: ``(num_layers, P, entry_tokens, H, D)`` in ``dtype``, on ``storage_device``.
        mean_k: ``(num_layers, P, H, D)`` fp32 per-slot mean key of each layer.
        feature: ``(P, F)`` fp32 L2-normalised features (``None`` until ``F`` is known).
        owner: ``(P,)`` int32 owning sample, ``-1`` = free.
        frame: ``(P,)`` int32 first frame of the entry, ``-1`` = free.
        stamp: ``(P,)`` int64 insertion order (FIFO eviction).
        usage: ``(P,)`` fp32 decayed attention mass of each entry (``"least_relevant"``).
        evictions: ``(B,)`` int64 entries evicted per sample (see :meth:`stats`).

    ``dtype`` may differ from the run's: ``torch.bfloat16`` stores K/V rounded to bf16
    in an fp32 or fp16 run (as the published bank does); the attention reads the
    retrieved entries through :meth:`gather_as`.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        slots_per_sample: int,
        entry_tokens: int,
        num_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        max_entries: int | None = None,
        feature_dim: int | None = None,
        storage_device: torch.device | str | None = None,
    ) -> None:
        if slots_per_sample < 0:
            raise ValueError(f"slots_per_sample must be >= 0, got {slots_per_sample}")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.slots_per_sample = slots_per_sample
        self.max_entries = max_entries
        self.limit = slots_per_sample if max_entries is None else min(max_entries, slots_per_sample)
        self.entry_tokens = entry_tokens
        self.device = canonical_device(device)
        # K/V may live elsewhere (pinned host memory, see offload.py); everything the
        # per-block decisions read stays on the compute device.
        self.storage_device = (
            self.device if storage_device is None else canonical_device(storage_device)
        )
        pin = self.storage_device.type == "cpu" and self.device.type == "cuda"
        P = batch_size * slots_per_sample
        shape = (num_layers, P, entry_tokens, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.storage_device, pin_memory=pin)
        self.v = torch.zeros(shape, dtype=dtype, device=self.storage_device, pin_memory=pin)
        # fp8 storage: one scale per (layer, slot, head), see fp8.py.
        self.quantized = dtype == FP8_DTYPE
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if self.quantized:
            scale_shape = (num_layers, P, num_heads)
            self.k_scale = torch.ones(scale_shape, dtype=torch.float32, device=self.device)
            self.v_scale = torch.ones(scale_shape, dtype=torch.float32, device=self.device)
        self.mean_k = torch.zeros(
            num_layers, P, num_heads, head_dim, dtype=torch.float32, device=self.device
        )
        self.owner = torch.full((P,), -1, dtype=torch.int32, device=self.device)
        self.frame = torch.full((P,), -1, dtype=torch.int32, device=self.device)
        self.stamp = torch.zeros(P, dtype=torch.int64, device=self.device)
        self.clock = torch.zeros((), dtype=torch.int64, device=self.device)
        self.usage = torch.zeros(P, dtype=torch.float32, device=self.device)
        self.evictions = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.feature: torch.Tensor | None = None
        if feature_dim is not None:
            self.ensure_feature_dim(feature_dim)

    @property
    def num_slots(self) -> int:
        return self.owner.shape[0]

    @property
    def bytes_per_entry(self) -> int:
        """K+V bytes of one entry across all layers."""
        return 2 * self.k[:, :1].numel() * self.k.element_size()

    def ensure_feature_dim(self, feature_dim: int) -> None:
        if self.feature is None:
            self.feature = torch.zeros(
                self.num_slots, feature_dim, dtype=torch.float32, device=self.device
            )
        elif self.feature.shape[1] != feature_dim:
            raise ValueError(
                f"feature has {feature_dim} dims but the bank stores {self.feature.shape[1]}"
            )

    def counts(self) -> torch.Tensor:
        """``(B,)`` int64 number of entries per sample (on the device)."""
        B, C = self.batch_size, self.slots_per_sample
        return (self.owner.view(B, C) >= 0).sum(dim=1)

    def insert(
        self,
        src_k: torch.Tensor,
        src_v: torch.Tensor,
        src_pos: torch.Tensor,
        feature: torch.Tensor,
        frame: torch.Tensor,
        dedup: float | None,
        backend: str = "auto",
        evict_key: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one block per sample, deciding dedup and slot on the device.

        Args:
            src_k, src_v: ``(num_layers, B, N, H, D)`` buffers holding the block.
            src_pos: ``(entry_tokens,)`` int64 positions of the block's tokens in them.
            feature: ``(B, F)`` block features (normalised here).
            frame: ``()`` int64 first frame of the block.
            dedup: skip when the max cosine to the sample's entries is ``> dedup``.
            evict_key: ``(P,)`` int64 eviction order (smallest first) to use instead of
                the insertion stamps (see :meth:`least_relevant_order`).

        Returns:
            ``(stored (B,) bool, slot (B,) int64)`` device tensors.
        """
        self.ensure_feature_dim(feature.shape[1])
        if self.slots_per_sample == 0:
            B = feature.shape[0]
            none = torch.zeros(B, dtype=torch.bool, device=self.device)
            return none, torch.full((B,), -1, dtype=torch.int64, device=self.device)
        # The insert op evicts the smallest "stamp"; a custom order goes in as a copy
        # (the op writes new stamps into it) and the real stamps are set afterwards.
        clock0 = self.clock.clone() if evict_key is not None else None
        stamps = self.stamp if evict_key is None else evict_key.clone()
        pool_k, pool_v = self.k, self.v
        full = self.counts() >= self.limit  # before the insert: a stored block evicts
        if not self.quantized and src_k.dtype != self.k.dtype:  # e.g. a bf16 bank, fp32 run
            src_k = src_k.index_select(2, src_pos).to(self.k.dtype)
            src_v = src_v.index_select(2, src_pos).to(self.v.dtype)
            src_pos = torch.arange(src_k.shape[2], device=src_pos.device)
        if self.quantized:
            # Quantise the block first; the op then moves bytes (uint8 views, which every
            # backend copies as they are) and its mean keys (of bytes) are replaced by
            # the block's true means below.
            blk_k = src_k.index_select(2, src_pos)
            blk_v = src_v.index_select(2, src_pos)
            q_k, s_k = quantize(blk_k, (2, 4))  # scales (L, B, 1, H, 1)
            q_v, s_v = quantize(blk_v, (2, 4))
            src_k, src_v = q_k.view(torch.uint8), q_v.view(torch.uint8)
            src_pos = torch.arange(blk_k.shape[2], device=src_pos.device)
            pool_k, pool_v = self.k.view(torch.uint8), self.v.view(torch.uint8)
        stored, slot = bank_insert(
            pool_k, pool_v, self.mean_k, self.feature, self.owner, self.frame, stamps,
            self.clock, src_k, src_v, src_pos, feature, frame,
            self.slots_per_sample, self.limit, dedup, backend=backend,
        )  # fmt: skip
        if self.quantized:
            keep = stored[None, :, None]
            for table, new in ((self.k_scale, s_k), (self.v_scale, s_v)):
                old = table.index_select(1, slot)
                table.index_copy_(1, slot, torch.where(keep, new[:, :, 0, :, 0], old))
            old = self.mean_k.index_select(1, slot)
            means = torch.where(keep[..., None], blk_k.float().mean(dim=2), old)
            self.mean_k.index_copy_(1, slot, means)
        if clock0 is not None:
            new = clock0 + torch.arange(feature.shape[0], device=self.device)
            self.stamp.index_copy_(
                0, slot, torch.where(stored, new, self.stamp.index_select(0, slot))
            )
        fresh = torch.where(stored, 0.0, self.usage.index_select(0, slot))
        self.usage.index_copy_(0, slot, fresh)
        self.evictions.add_((stored & full).long())
        return stored, slot

    def write_entry(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Overwrite one entry's ``(S_e, H, D)`` K/V of one layer (recache), quantising
        for an fp8 bank, and refresh its mean key."""
        if self.quantized:
            k, s_k = quantize(k, (0, 2))
            v, s_v = quantize(v, (0, 2))
            self.k_scale[layer, slot] = s_k.flatten()
            self.v_scale[layer, slot] = s_v.flatten()
            self.mean_k[layer, slot] = (k.float() * s_k).mean(dim=0)
        else:
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
            self.mean_k[layer, slot] = k.float().mean(dim=0)
        self.k[layer, slot].copy_(k, non_blocking=True)
        self.v[layer, slot].copy_(v, non_blocking=True)

    def gather_as(
        self, pool_k: torch.Tensor, pool_v: torch.Tensor, slot_idx: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The listed entries of one layer's ``pool_k/pool_v (P, S_e, H, D)`` as a small
        pool in ``like``'s dtype and ``slot_idx (B, n)`` renumbered into it (``-1`` kept):
        how an fp32/fp16 run attends a bf16 bank. Reads only the listed entries."""
        dtype = like.dtype
        B, n = slot_idx.shape
        flat = slot_idx.reshape(-1).long().clamp(min=0)
        k = pool_k.index_select(0, flat).to(dtype)
        v = pool_v.index_select(0, flat).to(dtype)
        order = torch.arange(B * n, device=slot_idx.device, dtype=slot_idx.dtype).view(B, n)
        return k, v, torch.where(slot_idx >= 0, order, -1)

    def stats(self) -> BankStats:
        """Entries and evictions per sample (device tensors; nothing waits)."""
        return BankStats(self.counts(), self.evictions, self.limit)

    def clear(self) -> None:
        """Free every entry (on the device); counters other than occupancy stay."""
        self.owner.fill_(-1)
        self.frame.fill_(-1)
        self.usage.zero_()

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(P, H)`` dequantisation scales of ``layer`` (``None`` unless fp8)."""
        if not self.quantized:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def least_relevant_order(self) -> torch.Tensor:
        """``(P,)`` int64 eviction order by (usage, insertion stamp), smallest first."""
        by_stamp = torch.argsort(self.stamp, stable=True)
        order = by_stamp[torch.argsort(self.usage[by_stamp], stable=True)]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        return rank

    def add_usage(self, slot_idx: torch.Tensor, mass: torch.Tensor) -> None:
        """Add ``mass (B, n)`` to the usage of the attended ``slot_idx (B, n)`` (``-1`` skips)."""
        mass = mass.float().masked_fill(slot_idx < 0, 0.0)
        self.usage.index_add_(0, slot_idx.clamp(min=0).flatten(), mass.flatten())

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """The bank's tensors (live buffers, not copies)."""
        return {
            "k": self.k,
            "v": self.v,
            "mean_k": self.mean_k,
            "feature": self.feature,
            "owner": self.owner,
            "frame": self.frame,
            "stamp": self.stamp,
            "clock": self.clock,
            "usage": self.usage,
            "evictions": self.evictions,
            "k_scale": self.k_scale,
            "v_scale": self.v_scale,
        }

    def check_state(self, state: object, frame_end: int | None = None) -> int | None:
        """Validate a :meth:`state_dict` for this bank without changing anything.

        Checks keys, shapes, dtypes, devices, finiteness (K/V, mean keys, features,
        usage, fp8 scales) and the slot invariants: owners in ``[-1, B)`` and inside
        their sample's slot range, at most ``limit`` entries per sample, first frames
        ``>= 0`` for stored entries (``-1`` free) and before ``frame_end`` when given,
        stamps below the clock. Host reads (not per block).

        Returns:
            The state's feature dimension (``None`` when it has no features yet).
        """
        from .health import check_state_tensor as check

        if not isinstance(state, dict):
            raise TypeError(f"state ['bank'] must be a dict, got {type(state).__name__}")
        missing, unknown = (
            sorted(self.state_dict().keys() - state),
            sorted(state.keys() - self.state_dict()),
        )
        if missing or unknown:
            raise ValueError(f"state ['bank'] keys differ: missing {missing}, unknown {unknown}")
        for name in ("k", "v", "mean_k", "usage"):
            check(f"['bank'][{name!r}]", state[name], getattr(self, name), finite=True)
        for name in ("k_scale", "v_scale"):
            if (state[name] is None) != (getattr(self, name) is None):
                raise ValueError("the state's bank and this bank differ in fp8 storage")
            if state[name] is not None:
                scale = check(f"['bank'][{name!r}]", state[name], getattr(self, name), finite=True)
                if bool((scale <= 0).any()):  # ok: host (checkpoint load)
                    raise ValueError(f"state ['bank'][{name!r}] holds scales <= 0")
        owner = check("['bank']['owner']", state["owner"], self.owner)
        frame = check("['bank']['frame']", state["frame"], self.frame)
        stamp = check("['bank']['stamp']", state["stamp"], self.stamp)
        clock = check("['bank']['clock']", state["clock"], self.clock)
        evictions = check("['bank']['evictions']", state["evictions"], self.evictions)
        if bool((evictions < 0).any()):  # ok: host (checkpoint load)
            raise ValueError("state ['bank']['evictions'] holds negative counts")
        if bool((state["usage"] < 0).any()):  # ok: host (checkpoint load)
            raise ValueError("state ['bank']['usage'] holds negative values")
        B, C = self.batch_size, self.slots_per_sample
        region = torch.arange(B, device=owner.device).repeat_interleave(C)
        used = owner >= 0
        if bool(((owner != -1) & (owner != region)).any()):  # ok: host (checkpoint load)
            raise ValueError(
                f"state ['bank']['owner'] must hold -1 or the sample of the slot's range "
                f"(slot p belongs to sample p // {C}, samples [0, {B}))"
            )
        if bool((used.view(B, C).sum(dim=1) > self.limit).any()):  # ok: host
            raise ValueError(f"state ['bank'] holds more than {self.limit} entries for a sample")
        if bool((frame < -1).any() | (used & (frame < 0)).any()):  # ok: host
            raise ValueError("state ['bank']['frame'] must be >= 0 for stored entries, -1 free")
        if frame_end is not None and bool((used & (frame >= frame_end)).any()):  # ok: host
            raise ValueError(
                f"state ['bank']['frame'] holds entries at or after frame {frame_end}, "
                "where the saved video had not arrived"
            )
        if bool((stamp < 0).any() | (used & (stamp >= clock.to(stamp.device))).any()):  # ok: host
            raise ValueError("state ['bank']['stamp'] must be >= 0 and below ['clock']")
        feature = state["feature"]
        if feature is None:
            return None
        dim = feature.shape[-1] if isinstance(feature, torch.Tensor) and feature.dim() == 2 else 1
        like = self.feature
        if like is None:
            like = torch.empty(self.num_slots, dim, dtype=torch.float32, device=self.device)
        check("['bank']['feature']", feature, like, finite=True)
        return dim

    def load_state_dict(self, state: dict[str, torch.Tensor | None], validate: bool = True) -> None:
        """Copy a :meth:`state_dict` into this bank's buffers (they keep their identity).
        Everything is validated first (:meth:`check_state`): a refused state changes
        nothing. ``validate=False`` skips that for a state already checked."""
        if validate:
            self.check_state(state)
        for name, value in state.items():
            if name == "feature":
                if value is None:
                    self.feature = None
                    continue
                self.ensure_feature_dim(value.shape[1])
            if value is not None:
                getattr(self, name).copy_(value)
