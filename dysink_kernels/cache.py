"""DySinkCache: the window ring, the frame bank and the per-block protocol (see the README).

Layout of the per-layer local buffer (``local_k``/``local_v``, ``(layers, B, N, H, D)``
with ``N = (sink_frames + ring_frames) * tokens_per_frame``)::

    [ static sink frames 0 .. s-1 | ring of the most recent frames (frame f at (f - s) mod R) ]

Attention never concatenates: a call attends the kept bank slots (by index into
the bank pool), up to three token ranges of the local buffer (the sinks and the
window, which may wrap around the ring) and the call's own keys. Every quantity
that changes from block to block (retrieved slots, window ranges, window key sums,
write positions, frame counter) lives in a preallocated device tensor that
``begin_block`` updates in place, so no step reads a device value on the host and
one denoising call can be captured in a CUDA graph and replayed for later blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from ._validate import canonical_device, check_dim, check_tensor, dtype_name
from .bank import FrameBank
from .config import DySinkConfig
from .fp8 import FP8_DTYPE
from .gating import AnomalyStats, AnomalyTracker, SinkGate
from .health import (
    DEFAULT_BANK_SLOTS,
    MAX_BANK_SLOTS,
    CacheHealth,
    bank_slots_for,
    check_cache_state,
    check_device,
)
from .ops.gathered_sink_attention import SinkAttnStats, gathered_sink_attention_general
from .ops.rope import rotate_temporal
from .ops.select_sinks import select_sinks_op
from .recache import Recacher

if TYPE_CHECKING:
    from .distributed import HeadParallel

__all__ = ["DEFAULT_BANK_SLOTS", "MAX_BANK_SLOTS", "AnomalyStats", "DySinkCache", "SinkLayerStats"]

_N_RANGES = 3  # sinks, window part before the ring wraps, window part after


class SinkLayerStats(NamedTuple):
    """What the last attention call of one layer computed (device tensors).

    Attributes:
        attn: ``SinkAttnStats`` (``lse``, ``entropy``, ``slot_mass``) or ``None``
            when ``config.stats`` is off.
        slot_idx: ``(B, top_k)`` slots retrieved for this block (``-1`` = none).
        kept_idx: ``(B, top_k)`` slots attended after the gate (empty for a commit).
        gate_ratio: ``(B, top_k)`` fraction of voters against each slot.
        sink_ratio: ``(B,)`` the static-sink group's ratio (``None`` without sinks).
        sink_kept: ``(B,)`` bool, whether the static sinks were attended.
        commit: whether this was the clean (commit) pass.
    """

    attn: SinkAttnStats | None
    slot_idx: torch.Tensor
    kept_idx: torch.Tensor
    gate_ratio: torch.Tensor
    sink_ratio: torch.Tensor | None
    sink_kept: torch.Tensor | None
    commit: bool


class _LayerBuffers(NamedTuple):
    """One layer's slices of the cache's and its bank's per-layer buffers (views)."""

    local_k: torch.Tensor
    local_v: torch.Tensor
    frame_ksum: torch.Tensor
    window_ksum: torch.Tensor
    bank_k: torch.Tensor
    bank_v: torch.Tensor
    bank_mean_k: torch.Tensor


class DySinkCache:
    """Window ring + frame bank + per-block state for one batch of videos.

    Protocol (see the README)::

        cache.begin_block()                      # retrieval for this block
        out = attn(q, k, v, cache=cache, layer=l)                # denoising calls
        attn(q, k, v, cache=cache, layer=l, commit=True)         # clean pass, every layer
        cache.end_block(feature)                 # store the block in the bank

    NaN or Inf in call inputs, committed K/V or features are flagged on the device and
    raised as ``health.NonFiniteError`` at a later protocol call or by
    :meth:`check_health`; non-finite committed K/V are kept as 0 in the window and
    their block is not stored (see ``health.py``).

    Args:
        config: the protocol's configuration.
        batch_size: videos generated together (each has its own bank entries).
        device, dtype: where and in which dtype K/V are kept; calls must match.
        bank_slots: bank capacity per sample (default ``config.max_entries`` or
            32; 0 when ``config.top_k == 0``, a pure window), at most
            ``MAX_BANK_SLOTS`` (65,536) and no more bytes than the bank's device has;
            when ``max_entries`` is ``None`` it is also the FIFO cap.
        backend: backend of every op the cache runs (``"auto"``, ``"naive"``, ...).
        feature_dim: size of external features (default: taken from the first
            ``end_block``).
        parallel: head parallelism (:class:`dysink_kernels.distributed.HeadParallel`):
            this cache then holds one rank's heads (``config.num_heads`` is the local
            count) and sums gate votes and ``mean_key`` features across ranks.
        bank_device: where the bank's K/V live (default: ``device``). ``"cpu"`` with a
            CUDA ``device`` keeps them in pinned host memory and stages only the
            retrieved slots on the device, layer by layer, on a side stream
            (``offload.py``); results equal the on-device bank's.
        max_bank_bytes: bank budget in bytes of K/V (all samples); sets the slots per
            sample instead of ``bank_slots`` (at most ``config.max_entries``).
        bank_dtype: the bank's K/V dtype: ``dtype`` (default), ``torch.bfloat16`` (K/V
            rounded to bf16 in an fp32/fp16 run, as the published bank) or
            ``torch.float8_e4m3fn`` (half the bytes of bf16; one fp32 scale per layer,
            slot and head, computed at insert; the attention dequantises while loading;
            see ``fp8.py``).
        store_latents: keep each stored block's clean latent (per bank slot and per
            window block; ``end_block(latent=...)``) so that :meth:`recache` can
            recompute their K/V under a new prompt. Costs one block latent per slot and
            per window block (e.g. 3 x 16 x 60 x 104 bf16 = 0.6 MB for Wan2.1 at 480p).
    """

    def __init__(
        self,
        config: DySinkConfig,
        batch_size: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        *,
        bank_slots: int | None = None,
        backend: str = "auto",
        feature_dim: int | None = None,
        parallel: HeadParallel | None = None,
        bank_device: torch.device | str | None = None,
        max_bank_bytes: int | None = None,
        store_latents: bool = False,
        bank_dtype: torch.dtype | None = None,
    ) -> None:
        # Every argument, replayed by reset().
        self._init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if not isinstance(config, DySinkConfig):
            raise TypeError(f"config must be a DySinkConfig, got {type(config).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        if not isinstance(store_latents, bool):
            raise TypeError(f"store_latents must be a bool, got {store_latents!r}")
        if feature_dim is not None and (
            isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1
        ):
            raise ValueError(f"feature_dim must be an int >= 1 or None, got {feature_dim!r}")
        device = check_device("device", device) or canonical_device(None)
        bank_device = check_device("bank_device", bank_device)
        bank_dtype = dtype if bank_dtype is None else bank_dtype
        if bank_dtype not in (dtype, FP8_DTYPE, torch.bfloat16):
            raise TypeError(
                f"bank_dtype must be the cache dtype ({dtype_name(dtype)}), bfloat16 or "
                f"float8_e4m3fn, got {bank_dtype}"
            )
        bank_slots = bank_slots_for(
            config, batch_size, bank_slots, max_bank_bytes, bank_dtype, bank_device or device
        )
        self.config = config
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.parallel = parallel

        c = config
        T, H, D, Ly = c.tokens_per_frame, c.num_heads, c.head_dim, c.num_layers
        B, s, R = batch_size, c.sink_frames, c.ring_frames
        dev = self.device
        n_local = (s + R) * T
        self.local_k = torch.zeros(Ly, B, n_local, H, D, dtype=dtype, device=dev)
        self.local_v = torch.zeros(Ly, B, n_local, H, D, dtype=dtype, device=dev)
        # Per-frame key sums (fp32) of what the local buffer holds: window and
        # sink means come from them without re-reading the keys.
        self.frame_ksum = torch.zeros(Ly, B, s + R, H, D, dtype=torch.float32, device=dev)
        self.bank = FrameBank(
            Ly, B, bank_slots, c.block_tokens, H, D,
            dtype=bank_dtype, device=dev, max_entries=c.max_entries, feature_dim=feature_dim,
            storage_device=bank_device,
        )  # fmt: skip
        # An explicit bank_device selects the staged path even when it equals the
        # compute device (CPU tensors stand in for host and device in the tests).
        self.stager = None
        if bank_device is not None and c.top_k > 0:
            from .offload import SlotStager

            self.stager = SlotStager(self.bank.k, self.bank.v, B * c.top_k, dev)
        self.recent_feat: torch.Tensor | None = None
        if feature_dim is not None:
            self._ensure_recent(feature_dim)

        # Per-block device state, updated in place by begin_block.
        self.frame_dev = torch.zeros((), dtype=torch.int64, device=dev)
        self.slot_idx = torch.full((B, c.top_k), -1, dtype=torch.int32, device=dev)
        self.slot_valid = torch.zeros(B, c.top_k, dtype=torch.bool, device=dev)  # slot_idx >= 0
        self.slot_score = torch.full((B, c.top_k), float("-inf"), device=dev)
        self.local_ranges = torch.zeros(B, _N_RANGES, 2, dtype=torch.int32, device=dev)
        self.window_ksum = torch.zeros(Ly, B, H, D, dtype=torch.float32, device=dev)
        self.window_tokens = torch.zeros(B, dtype=torch.float32, device=dev)
        self._window_tokens_3d = self.window_tokens.view(B, 1, 1)  # divides (B, H, D) sums
        self.sink_active = torch.zeros((), dtype=torch.bool, device=dev)
        self.write_frames = torch.zeros(c.frames_per_block, dtype=torch.int64, device=dev)
        self.write_pos = torch.zeros(c.block_tokens, dtype=torch.int64, device=dev)
        self.last_stored = torch.zeros(B, dtype=torch.bool, device=dev)
        # Each layer's views, made once (indexing a buffer by layer is an op of its own).
        self._layers = [
            _LayerBuffers(*views)
            for views in zip(
                self.local_k.unbind(0), self.local_v.unbind(0), self.frame_ksum.unbind(0),
                self.window_ksum.unbind(0), self.bank.k.unbind(0), self.bank.v.unbind(0),
                self.bank.mean_k.unbind(0),
            )
        ]  # fmt: skip
        self._sink_slots = torch.arange(B, dtype=torch.int32, device=dev)[:, None]
        self._no_slots = torch.full((B, 0), -1, dtype=torch.int32, device=dev)
        # Constants of begin_block's layout arithmetic, and views it writes through.
        self._ring_slot = torch.arange(R, device=dev)
        self._block_frame = torch.arange(c.frames_per_block, device=dev)
        self._frame_token = torch.arange(T, device=dev)
        self._zero = torch.zeros(B, dtype=torch.int64, device=dev)
        # local_ranges = T * [0, sinks, start, start + len_a, 0, len_b] + these offsets
        self._range_base = torch.tensor([0, 0, s * T, s * T, s * T, s * T], device=dev)
        self._ranges_flat = self.local_ranges.view(B, 2 * _N_RANGES)
        self._write_pos_2d = self.write_pos.view(c.frames_per_block, T)
        # Re-positioned sinks: per-slot shift in frames and the gate's turned mean keys.
        k_ = c.top_k
        self.slot_delta = torch.zeros(B, k_, dtype=torch.float32, device=dev)
        self._rot_mean_k = torch.zeros(Ly, B * k_, H, D, dtype=torch.float32, device=dev)
        self._rot_slots = torch.full((B, k_), -1, dtype=torch.int32, device=dev)
        self._slot_order = torch.arange(B * k_, dtype=torch.int32, device=dev).view(B, k_)
        # Entropy-anomaly statistics per layer and head (EMA over denoising calls).
        self.anomaly_tracker = AnomalyTracker(c, B, dev)
        self.gate = SinkGate(self)

        # Non-finite call inputs, K/V and features are flagged on the device; the host
        # learns of it without waiting (health.py).
        self._health = CacheHealth(B, dev)

        # Latents for recache (allocated at the first end_block, once their shape is known).
        self.recacher = Recacher(self, store_latents)

        # Host bookkeeping (no device values).
        self.block = 0
        self.frame_shift = 0  # frames before frame 0 that never existed (a short first block)
        self._in_block = False
        self._committed = [False] * Ly
        self._stats: list[SinkLayerStats | None] = [None] * Ly

    # ------------------------------------------------------------------ helpers
    @property
    def frame(self) -> int:
        """First frame of the current (or next) block, known on the host."""
        return self.block * self.config.frames_per_block

    def _ensure_recent(self, feature_dim: int) -> None:
        if self.recent_feat is None:
            self.recent_feat = torch.zeros(
                self.batch_size, self.config.query_blocks, feature_dim,
                dtype=torch.float32, device=self.device,
            )  # fmt: skip

    def _check_qkv(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        c = self.config
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < c.num_layers:
            raise IndexError(f"layer must be an int in [0, {c.num_layers}), got {layer!r}")
        check_tensor(q, "q", 4, (self.dtype,), self.device)
        check_tensor(k, "k", 4, (self.dtype,), self.device)
        check_tensor(v, "v", 4, (self.dtype,), self.device)
        B, H, D = self.batch_size, c.num_heads, c.head_dim
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_dim(t, name, 0, B, "batch")
            check_dim(t, name, 2, H, "heads")
            check_dim(t, name, 3, D, "head_dim")
        check_dim(k, "k", 1, c.block_tokens, "block tokens")
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        if q.shape[1] < 1:
            raise ValueError("q must hold at least one query")

    # ----------------------------------------------------------------- protocol
    @torch.no_grad()
    def begin_block(self) -> None:
        """Retrieve this block's sinks and lay out its window (all on the device)."""
        if self._in_block:
            raise RuntimeError(
                f"begin_block called twice: block {self.block} has not ended (call end_block)"
            )
        self._health.raise_if_reported()
        c = self.config
        fpb, L, s, R, T = (
            c.frames_per_block, c.local_frames, c.sink_frames, c.ring_frames, c.tokens_per_frame,
        )  # fmt: skip
        cur = self.frame_dev
        counts = self.bank.counts()
        B = self.batch_size
        # Window widening while a bank holds fewer than top_k entries: each sample's
        # own bank for its exclusion; the smallest bank of the batch for the shared
        # window (window_scope="batch", the reference) or its own (="sample").
        l_eff = L + (c.top_k - counts).clamp(min=0) * fpb  # (B,)
        l_eff_win = l_eff.max().expand(B) if c.window_scope == "batch" else l_eff
        lo = torch.clamp(cur + fpb - (l_eff_win - s), min=s + self.frame_shift)  # (B,)
        n_prev = (cur - lo).clamp(min=0)

        if c.top_k > 0 and self.recent_feat is not None and self.bank.feature is not None:
            ex_lo = cur - l_eff if c.exclude == "reference" else torch.minimum(lo, cur)
            args = (self.recent_feat, self.bank.feature, self.bank.owner, self.bank.frame,
                    c.top_k, ex_lo, cur.expand(B), s)  # fmt: skip
            prior = self._usage_prior() if c.relevance_mix > 0 else None
            slot, score = select_sinks_op(*args, prior, c.relevance_mix, backend=self.backend)
            self.slot_idx.copy_(slot)
            self.slot_score.copy_(score)

        # Window ranges in the local buffer: [sinks] + ring part a + ring part b, from
        # their bounds in frames.
        start = (lo - s) % R
        len_a = torch.minimum(n_prev, R - start)
        len_b = n_prev - len_a
        sinks = torch.clamp(cur, max=s).expand(B)
        bounds = torch.stack([self._zero, sinks, start, start + len_a, self._zero, len_b], dim=1)
        torch.add(self._range_base, bounds, alpha=T, out=self._ranges_flat)

        in_window = ((self._ring_slot - start[:, None]) % R) < n_prev[:, None]  # (B, R)
        self.window_ksum.copy_(
            torch.einsum("br,lbrhd->lbhd", in_window.float(), self.frame_ksum[:, :, s:])
        )
        torch.mul(n_prev, T, out=self.window_tokens)
        if s > 0:  # without static sinks sink_active stays False
            torch.ge(cur, s, out=self.sink_active)

        if c.top_k > 0:
            self._prepare_slots(cur)
            if self.stager is not None:
                self.stager.prefetch(self.slot_idx)
        self.anomaly_tracker.drop.fill_(False)

        frames = cur + self._block_frame
        slots = torch.where(frames < s, frames, s + (frames - s) % R, out=self.write_frames)
        torch.add(self._frame_token, (slots * T)[:, None], out=self._write_pos_2d)

        self._in_block = True
        self._committed = [False] * c.num_layers
        self._stats = [None] * c.num_layers

    @torch.no_grad()
    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        commit: bool = False,
    ) -> torch.Tensor:
        """One attention call of ``layer`` for the current block (see :class:`SinkAttention`)."""
        if self.recacher.target is not None:
            return self.recacher.attend(layer, q, k, v)
        if not self._in_block:
            raise RuntimeError("attention called outside a block: call cache.begin_block() first")
        self._check_qkv(layer, q, k, v)
        self._health.raise_if_reported()
        if self._committed[layer]:
            raise RuntimeError(
                f"layer {layer} of block {self.block} was already committed; each layer "
                "commits once, after its denoising calls"
            )
        c = self.config
        B = self.batch_size
        k, v = self._health.check_call(q, k, v, commit)

        buffers = self._layers[layer]
        kept, ratio, sink_ratio, sink_kept = self.gate(layer, q, k, commit)
        ranges = self.local_ranges
        if sink_kept is not None:
            ranges = ranges.clone()
            ranges[:, 0, 1] *= sink_kept.to(ranges.dtype)

        relative = c.sink_rope == "relative" and not commit and c.top_k > 0
        pool_k, pool_v, attend_slots = buffers.bank_k, buffers.bank_v, kept
        k_scale, v_scale = self.bank.scales(layer)
        if self.stager is not None:  # the retrieved slots were staged at _rot_slots' places
            self.stager.wait(layer)
            pool_k, pool_v = self.stager.k[layer], self.stager.v[layer]
            if not commit:
                attend_slots = torch.where(kept >= 0, self._rot_slots, -1)
            if k_scale is not None:
                staged = self.stager.slots.long().clamp(min=0)
                k_scale, v_scale = k_scale.index_select(0, staged), v_scale.index_select(0, staged)
        if pool_k.dtype != q.dtype and k_scale is None:  # a bf16 bank in an fp32/fp16 run
            pool_k, pool_v, attend_slots = self.bank.gather_as(pool_k, pool_v, attend_slots, q)
        out, attn_stats = gathered_sink_attention_general(
            q, pool_k, pool_v, attend_slots,
            buffers.local_k, buffers.local_v, ranges, k, v,
            softmax_scale=c.softmax_scale, return_stats=c.stats,
            slot_delta=self.slot_delta if relative else None, rope_theta=c.rope_theta,
            pool_k_scale=k_scale, pool_v_scale=v_scale, backend=self.backend,
        )  # fmt: skip
        if attn_stats is not None and not commit and c.top_k > 0:
            mass_mean = self.anomaly_tracker.update(layer, attn_stats, self.slot_valid)
            self.bank.add_usage(kept, mass_mean)

        if commit:
            buffers.local_k.index_copy_(1, self.write_pos, k)
            buffers.local_v.index_copy_(1, self.write_pos, v)
            per_frame = k.float().view(B, c.frames_per_block, c.tokens_per_frame, *k.shape[2:])
            buffers.frame_ksum.index_copy_(1, self.write_frames, per_frame.sum(dim=2))
            self._committed[layer] = True
        self._stats[layer] = SinkLayerStats(
            attn_stats, self.slot_idx, kept, ratio, sink_ratio, sink_kept, commit
        )
        return out

    def _prepare_slots(self, cur: torch.Tensor) -> None:
        """Per-block state of the retrieved slots: re-positioning shifts and the
        gate's view of their mean keys."""
        c = self.config
        B, k = self.batch_size, c.top_k
        valid = torch.ge(self.slot_idx, 0, out=self.slot_valid)
        idx = self.slot_idx.clamp(min=0).flatten()
        frames = self.bank.frame.index_select(0, idx).view(B, k)
        target = cur - c.repositioning_distance
        missing = valid.logical_not()
        torch.sub(target, frames, out=self.slot_delta).masked_fill_(missing, 0.0)
        self._rot_slots.copy_(self._slot_order).masked_fill_(missing, -1)
        if c.sink_rope == "relative":
            means = self.bank.mean_k.index_select(1, idx)  # (L, B*k, H, D)
            delta = self.slot_delta.reshape(1, B * k)
            self._rot_mean_k.copy_(rotate_temporal(means, delta, c.rope_theta))

    def _usage_prior(self) -> torch.Tensor:
        """``(B, P)`` each slot's usage over the largest usage of its sample (0 elsewhere)."""
        B, C = self.batch_size, self.bank.slots_per_sample
        usage = self.bank.usage.view(B, C)
        top = usage.amax(dim=1, keepdim=True)
        own = torch.where(top > 0, usage / top.clamp(min=1e-12), 0.0)  # (B, C)
        prior = torch.zeros(B, B, C, device=self.device)
        prior[torch.arange(B), torch.arange(B)] = own
        return prior.view(B, B * C)

    def anomaly(self, layer: int) -> AnomalyStats | None:
        """Entropy-anomaly statistics of ``layer`` after its last denoising call."""
        return self.anomaly_tracker.stats(layer)

    @torch.no_grad()
    def end_block(
        self, feature: torch.Tensor | None = None, latent: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Store the finished block in the bank (dedup and eviction on the device).

        Args:
            feature: ``(B, F)`` block features when ``config.feature == "external"``;
                must be ``None`` for ``"mean_key"``.
            latent: ``(B, frames_per_block, ...)`` the block's clean latent; required
                with ``store_latents=True`` (kept for :meth:`recache`), else ``None``.

        Returns:
            ``(B,)`` bool device tensor: whether each sample's block was stored.
        """
        if not self._in_block:
            raise RuntimeError("end_block called without begin_block")
        c = self.config
        missing = [i for i, done in enumerate(self._committed) if not done]
        if missing:
            raise RuntimeError(
                f"end_block: layers {missing} of block {self.block} have no commit=True call; "
                "run the clean pass on every layer first"
            )
        if c.feature == "external":
            if feature is None:
                raise ValueError('end_block needs a (B, F) feature when feature="external"')
            check_tensor(feature, "feature", 2, None, self.device)
            if not feature.is_floating_point():
                raise TypeError(f"feature must be floating point, got {dtype_name(feature.dtype)}")
            check_dim(feature, "feature", 0, self.batch_size, "batch")
            if self.bank.feature is not None:
                check_dim(feature, "feature", 1, self.bank.feature.shape[1], "feature dim")
            feat = feature.float()
        else:
            if feature is not None:
                raise ValueError('feature must be None when config.feature == "mean_key"')
            feat = self.block_mean_key()
        self.recacher.check_latent(latent)
        self._ensure_recent(feat.shape[1])
        feat, finite = self._health.refuse(feat)

        self.bank.usage.mul_(c.usage_decay)
        evict_key = self.bank.least_relevant_order() if c.eviction == "least_relevant" else None
        # A cosine of a feature with itself can round above 1: dedup=1 means "store all".
        dedup = None if c.dedup is None or c.dedup >= 1 else c.dedup
        stored, slot = self.bank.insert(
            self.local_k, self.local_v, self.write_pos, feat, self.frame_dev, dedup,
            backend=self.backend, evict_key=evict_key,
        )  # fmt: skip
        self.last_stored.copy_(stored)
        if self.store_latents:
            self.recacher.keep_latent(latent, stored, slot)
        row = self.block % c.query_blocks
        self.recent_feat[:, row] = torch.where(finite[:, None], F.normalize(feat, dim=-1), 0.0)

        self.frame_dev.add_(c.frames_per_block)
        self._health.report(self.block)
        self.block += 1
        self._in_block = False
        self._health.raise_if_reported()
        return stored

    @property
    def store_latents(self) -> bool:
        """Whether each stored block's clean latent is kept for :meth:`recache`."""
        return self.recacher.store_latents

    @property
    def bank_latent(self) -> torch.Tensor | None:
        """``(P, frames_per_block, ...)`` clean latent of each bank slot (``store_latents``)."""
        return self.recacher.bank_latent

    @property
    def window_latent(self) -> torch.Tensor | None:
        """``(B, window_blocks, frames_per_block, ...)`` latents of the window's blocks."""
        return self.recacher.window_latent

    def recache(self, run_block, batch: int = 1, window: str = "joint") -> int:
        """Recompute stored K/V under a new prompt; see :meth:`Recacher.run`."""
        return self.recacher.run(run_block, batch, window)

    @property
    def recache_samples(self) -> list[int] | None:
        """During a ``recache`` call: the sample each row of the latent belongs to
        (to pick per-sample prompts); ``None`` otherwise."""
        return self.recacher.samples

    def block_mean_key(self) -> torch.Tensor:
        """``(B, H*D)`` L2-normalised mean keys of ``feature_layer`` over the committed block."""
        c = self.config
        sums = self.frame_ksum[c.mean_key_layer].index_select(1, self.write_frames).sum(dim=1)
        mean = (sums / c.block_tokens).flatten(1)
        if self.parallel is not None:
            mean = self.parallel.all_gather_heads(mean)
        return F.normalize(mean, dim=-1)

    # ------------------------------------------------------------------ queries
    def stats(self, layer: int) -> SinkLayerStats | None:
        """Statistics of the last attention call of ``layer`` in this block."""
        return self._stats[layer]

    def bank_size(self) -> torch.Tensor:
        """``(B,)`` entries per sample (device tensor)."""
        return self.bank.counts()

    def retrieved_frames(self) -> torch.Tensor:
        """``(B, top_k)`` first frames of this block's retrieved entries (``-1`` = none)."""
        idx = self.slot_idx.long()
        frames = self.bank.frame.index_select(0, idx.clamp(min=0).flatten()).view_as(idx)
        return torch.where(idx >= 0, frames, -1)

    def check_health(self) -> None:
        """Raise :class:`~dysink_kernels.health.NonFiniteError` if NaN or Inf reached
        the cache: call inputs, committed K/V or block features, including the block in
        progress. Synchronises with the device (the per-block path reports the same
        errors at a later protocol call without waiting)."""
        self._health.raise_if_reported(wait=True)
        if self._in_block:
            self._health.raise_if_flagged(self.block)

    # ----------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """Everything needed to continue the video later: window, bank, counters,
        recent features. Taken between blocks (after ``end_block``)."""
        if self._in_block:
            raise RuntimeError("state_dict inside a block: call it after end_block")
        return {
            "config": self.config.to_dict(),
            "batch_size": self.batch_size,
            "dtype": str(self.dtype),
            "block": self.block,
            "frame_dev": self.frame_dev,
            "local_k": self.local_k,
            "local_v": self.local_v,
            "frame_ksum": self.frame_ksum,
            "recent_feat": self.recent_feat,
            "ent_mean": self.anomaly_tracker.mean,
            "ent_var": self.anomaly_tracker.var,
            "ent_updates": list(self.anomaly_tracker.updates),
            "bank": self.bank.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict`` into this cache in place (buffers keep their identity,
        so captured CUDA graphs stay valid). Everything is checked before anything is
        copied (``health.check_cache_state``: keys, config, batch size, dtypes, shapes,
        devices, finiteness, counters, bank invariants): a refused state raises
        ``ValueError``/``TypeError`` and leaves the cache as it was."""
        if self._in_block:
            raise RuntimeError("load_state_dict inside a block: call it between blocks")
        check_cache_state(self, state)
        self.bank.load_state_dict(state["bank"], validate=False)
        for name in ("local_k", "local_v", "frame_ksum", "frame_dev"):
            getattr(self, name).copy_(state[name])
        self.anomaly_tracker.mean.copy_(state["ent_mean"])
        self.anomaly_tracker.var.copy_(state["ent_var"])
        self.anomaly_tracker.updates = list(state["ent_updates"])
        if state["recent_feat"] is None:
            self.recent_feat = None
        else:
            self._ensure_recent(state["recent_feat"].shape[-1])
            self.recent_feat.copy_(state["recent_feat"])
        self.slot_idx.fill_(-1)  # nothing retrieved until the next begin_block
        self.slot_valid.fill_(False)
        self.slot_score.fill_(float("-inf"))
        self._health.clear()
        self.recacher.forget_latents()  # the earlier video's latents do not belong here
        self._stats = [None] * self.config.num_layers
        self.anomaly_tracker.forget()
        self.block = int(state["block"])

    def reset(self) -> None:
        """Forget everything: start a new video. The cache is rebuilt with the arguments
        it was constructed with (every option kept; new buffers, so CUDA graphs captured
        on the old ones must be captured again)."""
        self.__init__(**self._init_args)  # type: ignore[misc]
