"""The sink anomaly gate of one attention call and the entropy-anomaly tracker.

``SinkGate`` decides, per layer and denoising call, which retrieved bank slots (and
whether the static-sink group) are attended: a slot is dropped when more than
``tau`` of the voters ``(sample, head)`` score it above the local window
(``qbar . kbar(slot) > qbar . kbar(window)``), and, with ``gate_mode`` "entropy" or
"both", when ``AnomalyTracker`` flagged it after the previous call. Everything
stays on the device.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch

from .ops.gathered_sink_attention import SinkAttnStats
from .ops.sink_gate import gate_from_means, gate_votes
from .ops.sink_gate.votes import decide_from_votes

if TYPE_CHECKING:
    from .cache import DySinkCache

__all__ = ["AnomalyStats", "AnomalyTracker", "SinkGate"]


def votes_in_dtype(
    qbar: torch.Tensor,
    kbar_local: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``gate_votes`` with the mean query, mean keys and scores rounded to ``dtype``
    (``gate_precision="input"``): scores that round equal do not vote, as in the
    published code, which computes the gate in the run dtype."""
    B, n = slot_idx.shape

    def r(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).float()

    q = r(qbar)
    s_local = r((q * r(kbar_local)).sum(-1))  # (B, H)
    if slot_mean_k.shape[0] == 0 or n == 0:
        return q.new_zeros(B, n)
    km = r(slot_mean_k)[slot_idx.clamp(min=0).long()]  # (B, n, H, D)
    s_entry = r(torch.einsum("bhd,bnhd->bnh", q, km))
    return ((s_entry > s_local[:, None, :]) & (slot_idx >= 0)[..., None]).float().sum(-1)


class AnomalyStats(NamedTuple):
    """Entropy-anomaly statistics of one layer (device tensors), for monitoring and for
    ``gate_mode="entropy"``/``"both"``.

    Attributes:
        entropy: ``(B, H)`` mean attention entropy of each head in the last call (nats).
        entropy_mean, entropy_std: ``(B, H)`` running (EMA) mean and std of it, after
            the update with this call.
        low_fraction: ``(B,)`` fraction of heads whose entropy fell below
            ``mean - anomaly_z * std`` (before the update).
        mass_mean, mass_cv: ``(B, top_k)`` mean over heads of each slot's attention mass
            and its coefficient of variation across heads (small = homogenised heads).
        drop_next: ``(B, top_k)`` slots the entropy gate drops in the next call.
    """

    entropy: torch.Tensor
    entropy_mean: torch.Tensor
    entropy_std: torch.Tensor
    low_fraction: torch.Tensor
    mass_mean: torch.Tensor
    mass_cv: torch.Tensor
    drop_next: torch.Tensor


class _TrackedCall(NamedTuple):
    """What one denoising call gave the tracker: its :class:`AnomalyStats` are computed
    from this when first read (copies of whatever changes later)."""

    entropy: torch.Tensor  # (B, H) per-head mean entropy of the call
    slot_mass: torch.Tensor  # (B, H, k)
    mass_mean: torch.Tensor  # (B, k)
    slot_valid: torch.Tensor  # (B, k) which retrieved slots existed
    mean: torch.Tensor  # (B, H) running mean and var before the call
    var: torch.Tensor
    new_mean: torch.Tensor  # (B, H) and after it
    new_var: torch.Tensor
    warm: bool  # at least anomaly_warmup calls were folded in before


class AnomalyTracker:
    """Per-layer, per-head EMA of attention entropy and the entropy gate's drops.

    ``mean``/``var``: ``(L, B, H)`` running statistics; ``drop``: ``(L, B, top_k)``
    slots the entropy gate drops in the next call of each layer (decided while the
    entropy gate is on, else False); ``updates``: calls folded in per layer (host
    ints). Each call's :class:`AnomalyStats` are computed when first read
    (:meth:`stats`), or at once for the entropy gate.
    """

    def __init__(self, config, batch: int, device: torch.device) -> None:
        Ly, H, k = config.num_layers, config.num_heads, config.top_k
        self.config = config
        self.mean = torch.zeros(Ly, batch, H, dtype=torch.float32, device=device)
        self.var = torch.zeros(Ly, batch, H, dtype=torch.float32, device=device)
        self.drop = torch.zeros(Ly, batch, k, dtype=torch.bool, device=device)
        # Each layer's rows of mean, var and drop (views, made once).
        self._rows = list(zip(self.mean.unbind(0), self.var.unbind(0), self.drop.unbind(0)))
        self._entropy_gate = config.gate and config.gate_mode in ("entropy", "both")
        self.updates = [0] * Ly
        self._calls: list[_TrackedCall | None] = [None] * Ly
        self._stats: list[AnomalyStats | None] = [None] * Ly

    def update(self, layer: int, attn: SinkAttnStats, slot_valid: torch.Tensor) -> torch.Tensor:
        """Fold a denoising call's entropy into the running statistics of ``layer`` and,
        with the entropy gate on, decide its drops for the next call of this layer (all
        on the device).

        Args:
            layer: the call's layer.
            attn: the call's attention statistics.
            slot_valid: ``(B, top_k)`` bool, which of the block's retrieved slots exist.

        Returns:
            ``(B, top_k)`` mean over heads of each slot's attention mass.
        """
        c = self.config
        ent = attn.entropy.mean(dim=-1)  # (B, H) per-head mean entropy
        mean, var, drop_row = self._rows[layer]
        if self.updates[layer] == 0:
            new_mean, new_var = ent.clone(), torch.zeros_like(var)
        else:
            d = c.anomaly_decay
            diff = ent - mean
            new_mean = mean + diff * (1.0 - d)
            new_var = (var * d).add_((diff * (d * (1.0 - d))).mul_(diff))
        call = _TrackedCall(
            ent, attn.slot_mass, attn.slot_mass.mean(dim=1), slot_valid.clone(), mean.clone(),
            var.clone(), new_mean, new_var, self.updates[layer] >= c.anomaly_warmup,
        )  # fmt: skip
        mean.copy_(new_mean)
        var.copy_(new_var)
        self.updates[layer] += 1
        self._calls[layer], self._stats[layer] = call, None
        if self._entropy_gate:
            drop_row.copy_(self.stats(layer).drop_next)
        return call.mass_mean

    def stats(self, layer: int) -> AnomalyStats | None:
        """Statistics of the last call folded into ``layer`` (``None`` before any)."""
        call = self._calls[layer]
        if self._stats[layer] is None and call is not None:
            self._stats[layer] = self._anomaly_stats(call)
        return self._stats[layer]

    def forget(self) -> None:
        """Drop the last calls' statistics (the running ones are left as they are)."""
        self._calls = [None] * len(self._calls)
        self._stats = [None] * len(self._stats)

    def _anomaly_stats(self, call: _TrackedCall) -> AnomalyStats:
        c = self.config
        mass_cv = call.slot_mass.std(dim=1, unbiased=False).div_(call.mass_mean.clamp(min=1e-12))
        # drop = draws & (low_fraction > 0.5 | collapsed heads), for retrieved slots only
        drop = mass_cv < c.anomaly_min_cv
        if call.warm:
            std = call.var.clamp(min=0).sqrt_()
            low = call.entropy < call.mean - std.mul_(c.anomaly_z)
            low_fraction = low.float().mean(dim=1)  # (B,)
            drop.logical_or_((low_fraction > 0.5)[:, None])
        else:  # the z-test is not trusted yet: no head counts as low
            low_fraction = call.entropy.new_zeros(call.entropy.shape[0])
        drop.logical_and_(call.mass_mean > c.anomaly_min_mass).logical_and_(call.slot_valid)
        return AnomalyStats(
            call.entropy, call.new_mean, call.new_var.clamp(min=0).sqrt_(), low_fraction,
            call.mass_mean, mass_cv, drop,
        )  # fmt: skip


class SinkGate:
    """The consensus (and entropy) gate of one cache's attention calls."""

    def __init__(self, cache: DySinkCache) -> None:
        self.cache = cache

    def means(
        self, layer: int, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(qbar, kbar_local)``, ``(B, H, D)`` fp32: the call's mean query and the mean
        of the window's keys and the call's own (from the window's key sums)."""
        cache = self.cache
        qbar = q.float().mean(dim=1)
        kbar_local = k.float().sum(dim=1).add_(cache._layers[layer].window_ksum)
        return qbar, kbar_local.div_(cache._window_tokens_3d + k.shape[1])

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, commit: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Gate the static-sink group and the retrieved slots of one call with keys
        ``k`` (``(B, block_tokens, H, D)``) and queries ``q``.

        Returns ``(kept, ratio, sink_ratio, sink_kept)`` (sink entries ``None`` without
        static sinks). With head parallelism the vote counts of all ranks are summed
        by one all-reduce before the decisions.
        """
        cache = self.cache
        c = cache.config
        B = cache.batch_size
        slots = cache._no_slots if commit else cache.slot_idx
        gate_slots = c.gate and not commit and c.top_k > 0 and c.gate_mode != "entropy"
        gate_sinks = c.gate and c.sink_frames > 0
        kept, ratio, ratio_s = slots, None, None
        if gate_slots or gate_sinks:
            qbar, kbar_local = self.means(layer, q, k)
        # The consensus vote reads each slot's mean key as it is attended: turned by the
        # re-positioning when sink_rope="relative" (rotation is linear).
        if c.sink_rope == "relative" and gate_slots:
            vote_slots, mean_table = cache._rot_slots, cache._rot_mean_k[layer]
        else:
            vote_slots, mean_table = slots, cache._layers[layer].bank_mean_k
        sink_mean = None
        if gate_sinks:
            sink_tokens = c.sink_frames * c.tokens_per_frame
            sink_mean = cache.frame_ksum[layer, :, : c.sink_frames].sum(dim=1) / sink_tokens

        rounded = c.gate_precision == "input" and cache.dtype != torch.float32
        if (cache.parallel is not None or rounded) and (gate_slots or gate_sinks):
            n = slots.shape[1] if gate_slots else 0
            votes = torch.zeros(B, n + int(gate_sinks), device=cache.device)
            if rounded:
                count = partial(votes_in_dtype, dtype=cache.dtype)
            else:
                count = partial(gate_votes, backend=cache.backend)
            if gate_slots:
                votes[:, :n] = count(qbar, kbar_local, mean_table, vote_slots)
            if gate_sinks:
                votes[:, n:] = count(qbar, kbar_local, sink_mean, cache._sink_slots)
            heads = c.num_heads
            if cache.parallel is not None:
                votes = cache.parallel.all_reduce_sum(votes)
                heads = cache.parallel.total_heads
            if gate_slots:
                kept, ratio = decide_from_votes(votes[:, :n], slots, heads, c.tau, c.gate_scope)
            if gate_sinks:
                _, ratio_s = decide_from_votes(
                    votes[:, n:], cache._sink_slots, heads, c.tau, c.gate_scope
                )
        else:
            if gate_slots:
                kept, ratio = gate_from_means(
                    qbar, kbar_local, mean_table, vote_slots, c.tau, c.gate_scope, cache.backend
                )
            if gate_sinks:
                _, ratio_s = gate_from_means(
                    qbar, kbar_local, sink_mean, cache._sink_slots, c.tau, c.gate_scope,
                    cache.backend,
                )  # fmt: skip

        # Back from the vote's slot numbering to the bank's (the same numbering unless
        # the vote read the re-positioned slots).
        if gate_slots and vote_slots is not slots:
            kept = torch.where(kept >= 0, slots, -1).to(slots.dtype)
        if c.gate and not commit and c.gate_mode in ("entropy", "both"):
            kept = torch.where(cache.anomaly_tracker.drop[layer], -1, kept).to(slots.dtype)
        if ratio is None:  # no slot was judged
            ratio = torch.zeros(B, slots.shape[1], device=cache.device)
        if c.sink_frames == 0:
            return kept, ratio, None, None
        if ratio_s is None:
            return kept, ratio, None, torch.ones(B, dtype=torch.bool, device=cache.device)
        sink_ratio = torch.where(cache.sink_active, ratio_s[:, 0], 0.0)
        return kept, ratio, sink_ratio, sink_ratio <= c.tau
