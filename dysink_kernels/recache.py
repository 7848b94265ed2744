"""Recomputing stored K/V under a new prompt (interactive prompt switches).

``Recacher`` keeps each stored block's clean latent (per bank slot and per window
block) and, on a prompt switch, reruns the caller's clean forward with the cache's
attention calls redirected to overwrite the stored K/V in place.

What attends what follows the published interactive DySink pipeline: each bank
entry is re-encoded alone at its own frames (it attends itself), and the window is
re-encoded in one forward over its last ``min(L_eff, c)`` frames (``c`` = frames
generated so far), in which every one of those frames attends all of them: the
published code prepares a block-causal mask for that forward, but its KV-cache
attention path does not apply it (``block_causal=True`` applies it instead).
``window="blocks"``: each window block attends itself.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from ._validate import check_tensor
from .ops.gathered_sink_attention import gathered_sink_attention_general

if TYPE_CHECKING:
    from .cache import DySinkCache

__all__ = ["Recacher"]


class _RecacheTarget:
    """Where the attention calls of one recache forward write: bank slots, or the
    frames of one window block (all samples)."""

    def __init__(self, slots=None, window_frames=None, window_first=0, samples=None) -> None:
        self.slots: list[int] | None = slots
        self.samples: list[int] = samples or []
        self.window_frames: list[int] = window_frames or []
        self.window_first = window_first
        self.layers: set[int] = set()


class _WindowTarget:
    """One forward that re-encodes the window's frames ``[first, first + n)`` jointly."""

    def __init__(self, first: int, batch: int, *, block_causal: bool) -> None:
        self.first = first
        self.samples = list(range(batch))
        self.block_causal = block_causal
        self.layers: set[int] = set()


class Recacher:
    """Latent storage and the recache pass of one :class:`~dysink_kernels.DySinkCache`."""

    def __init__(self, cache: DySinkCache, store_latents: bool) -> None:
        c = cache.config
        self.cache = cache
        self.store_latents = bool(store_latents)
        self.bank_latent: torch.Tensor | None = None  # (P, fpb, ...)
        self.window_latent: torch.Tensor | None = None  # (B, n_window_blocks, fpb, ...)
        self.window_blocks = -(-c.ring_frames // c.frames_per_block) + 1
        self.window_blocks += c.sink_frames // c.frames_per_block
        self.target: _RecacheTarget | None = None

    def forget_latents(self) -> None:
        """Drop the stored latents (a loaded checkpoint carries none)."""
        self.bank_latent = self.window_latent = None

    def check_latent(self, latent: torch.Tensor | None) -> None:
        if not self.store_latents:
            if latent is not None:
                raise ValueError("end_block got a latent but the cache has store_latents=False")
            return
        if latent is None:
            raise ValueError("end_block needs latent=(B, frames_per_block, ...) with store_latents")
        check_tensor(latent, "latent", latent.dim(), None, self.cache.device)
        fpb = self.cache.config.frames_per_block
        if latent.dim() < 2 or latent.shape[0] != self.cache.batch_size or latent.shape[1] != fpb:
            raise ValueError(
                f"latent must be (B={self.cache.batch_size}, frames_per_block={fpb}, ...), got "
                f"{tuple(latent.shape)}"
            )
        if self.window_latent is not None and latent.shape[2:] != self.window_latent.shape[3:]:
            raise ValueError(
                f"latent frames are {tuple(latent.shape[2:])}, earlier blocks were "
                f"{tuple(self.window_latent.shape[3:])}"
            )

    def keep_latent(self, latent: torch.Tensor, stored: torch.Tensor, slot: torch.Tensor) -> None:
        if self.window_latent is None:
            rest = latent.shape[1:]
            self.window_latent = latent.new_zeros(self.cache.batch_size, self.window_blocks, *rest)
            self.bank_latent = latent.new_zeros(self.cache.bank.num_slots, *rest)
        self.window_latent[:, self.latent_row(self.cache.block)] = latent
        if self.cache.bank.num_slots:
            keep = stored.view(-1, *([1] * (latent.dim() - 1)))
            old = self.bank_latent.index_select(0, slot)
            self.bank_latent.index_copy_(0, slot, torch.where(keep, latent, old))

    def latent_row(self, block: int) -> int:
        """Row of ``window_latent`` that holds ``block``: sink blocks keep their own rows,
        later blocks share a ring of rows (enough for every block the window holds)."""
        n_sink = self.cache.config.sink_frames // self.cache.config.frames_per_block
        if block < n_sink:
            return block
        return n_sink + (block - n_sink) % (self.window_blocks - n_sink)

    def held_frames(self) -> list[int]:
        """Frames whose K/V the local buffer holds (sinks and the ring), known on the host."""
        c = self.cache.config
        done = self.cache.block * c.frames_per_block
        ring = range(max(c.sink_frames, done - c.ring_frames), done)
        return [*range(min(c.sink_frames, done)), *ring]

    def frame_slot(self, frame: int) -> int:
        c = self.cache.config
        s = c.sink_frames
        return frame if frame < s else s + (frame - s) % c.ring_frames

    def window_frames(self) -> int:
        """Frames of the joint window recache: ``min(L_eff, c)`` without static sinks,
        ``min(L_eff - s, c - s)`` after the ``s`` sink frames otherwise. Reads the bank's
        occupancy on the host (once per prompt switch)."""
        c, cache = self.cache.config, self.cache
        counts = cache.bank.counts().tolist()  # ok: host (once per prompt switch)
        l_eff = c.local_frames + max(0, c.top_k - min(counts)) * c.frames_per_block
        s = min(c.sink_frames, cache.frame) + cache.frame_shift
        return max(0, min(l_eff - c.sink_frames, cache.frame - s))

    @torch.no_grad()
    def run(self, run_block, batch: int = 1, window: str = "joint") -> int:
        """Recompute stored K/V under a new prompt (interactive prompt switches).

        For every stored block -- bank slots of every sample in frame order (``batch``
        of them per call), then the window's blocks in frame order (all samples in one
        call) -- calls ``run_block(latent, first_frame)``: the caller's clean forward at
        t = 0 under the new prompt, whose attention calls (``attn(q, k, v, cache=cache,
        layer=l, ...)``) each attend the block's own keys and overwrite that block's
        K/V in place (slot or window position) instead of appending. Mean keys and
        window key sums follow; features, frames, ownership and counters do not change.
        ``latent`` is ``(n, frames_per_block, ...)``; ``first_frame`` is an int when all
        rows share it (one slot, or a window block of every sample) and a list of ints,
        one per row, when ``batch > 1`` slots are recached together.

        With ``window="joint"`` (default, the published pipeline) the static sink
        blocks are recached each by itself as above, then the window's last frames
        (:meth:`window_frames`) in ONE call ``run_block(latent, first_frame)`` with
        ``latent (B, n, ...)``, the blocks' latents in frame order, in which every frame
        attends all of them; with ``window="blocks"`` each window block attends itself.

        Reads the bank's occupancy once on the host (a prompt switch is rare); nothing
        inside a block's recache synchronises. Returns the number of bank entries and
        window blocks or ranges recached.
        """
        if window not in ("joint", "blocks"):
            raise ValueError(f'window must be "joint" or "blocks", got {window!r}')
        if self.cache._in_block:
            raise RuntimeError("recache between blocks: call end_block first")
        if not self.store_latents:
            raise RuntimeError(
                "recache needs the blocks' latents: build the cache with store_latents=True "
                "and pass end_block(latent=...)"
            )
        if self.window_latent is None:
            if self.cache.block > 0:
                raise RuntimeError(
                    "recache: this cache holds no latents for its stored blocks (latents are "
                    "not part of state_dict; a restored cache cannot recache earlier blocks)"
                )
            return 0
        c = self.cache.config
        owner = self.cache.bank.owner.tolist()  # ok: host (once per prompt switch)
        frames = self.cache.bank.frame.tolist()  # ok: host (once per prompt switch)
        slots = sorted((frames[p], p) for p in range(len(owner)) if owner[p] >= 0)
        count = 0
        for i in range(0, len(slots), max(1, batch)):
            group = slots[i : i + max(1, batch)]
            ids = [p for _, p in group]
            idx = torch.tensor(ids, device=self.cache.device)
            latent = self.bank_latent.index_select(0, idx)
            target = _RecacheTarget(slots=ids, samples=[owner[p] for p in ids])
            self._run(run_block, latent, [f for f, _ in group], target)
            count += len(group)
        fpb = c.frames_per_block
        held = self.held_frames()
        starts = sorted({f // fpb * fpb for f in held})
        if window == "joint":
            n = self.window_frames()
            lo = self.cache.frame - n
            starts = [f for f in starts if f < min(c.sink_frames, lo)]
        for first in starts:
            latent = self.window_latent[:, self.latent_row(first // fpb)]
            frames_held = [f for f in range(first, first + fpb) if f in held]
            target = _RecacheTarget(
                window_frames=frames_held,
                window_first=first,
                samples=list(range(self.cache.batch_size)),
            )
            self._run(run_block, latent, [first], target)
            count += 1
        if window == "joint" and n > 0:
            rows = [self.latent_row(b) for b in range(lo // fpb, self.cache.frame // fpb)]
            # (B, n, ...): whole blocks, less the frames before the window's first
            latent = self.window_latent[:, rows].flatten(1, 2)[:, lo - lo // fpb * fpb :]
            target = _WindowTarget(lo, self.cache.batch_size, block_causal=False)
            self._run(run_block, latent, [lo], target)
            count += 1
        return count

    @property
    def samples(self) -> list[int] | None:
        """During a ``recache`` call: the sample each row of the latent belongs to
        (to pick per-sample prompts); ``None`` otherwise."""
        return None if self.target is None else list(self.target.samples)

    def _run(self, run_block, latent, first_frames, target) -> None:
        self.target = target
        try:
            run_block(latent, first_frames[0] if len(first_frames) == 1 else first_frames)
        finally:
            self.target = None
        missing = sorted(set(range(self.cache.config.num_layers)) - target.layers)
        if missing:
            raise RuntimeError(f"recache: run_block made no attention call for layers {missing}")

    def attend(self, layer, q, k, v) -> torch.Tensor:
        c = self.cache.config
        t = self.target
        if isinstance(t, _WindowTarget):
            if layer in t.layers:
                raise RuntimeError(f"recache: layer {layer} was called twice for one window")
            out = self.rewrite_window(
                layer, q, k, v, t.first, sinks="apart", block_causal=t.block_causal
            )
            t.layers.add(layer)
            return out
        if layer in t.layers:
            raise RuntimeError(f"recache: layer {layer} was called twice for one block")
        if k.shape[1] != c.block_tokens:
            raise ValueError(f"recache: k must hold one block ({c.block_tokens} tokens)")
        n = k.shape[0]
        none = torch.full((n, 0), -1, dtype=torch.int32, device=k.device)
        empty = torch.zeros(n, 1, 2, dtype=torch.int32, device=k.device)
        out, _ = gathered_sink_attention_general(
            q, self.cache.bank.k[layer], self.cache.bank.v[layer], none, k, v, empty, k, v,
            softmax_scale=c.softmax_scale, backend=self.cache.backend,
        )  # fmt: skip
        T = c.tokens_per_frame
        if t.slots is not None:
            for i, p in enumerate(t.slots):
                self.cache.bank.write_entry(layer, p, k[i], v[i])
        else:
            for f in t.window_frames:
                i = f - t.window_first
                pos = self.frame_slot(f)
                rows = slice(pos * T, (pos + 1) * T)
                self.cache.local_k[layer][:, rows] = k[:, i * T : (i + 1) * T]
                self.cache.local_v[layer][:, rows] = v[:, i * T : (i + 1) * T]
                self.cache.frame_ksum[layer][:, pos] = k[:, i * T : (i + 1) * T].float().sum(dim=1)
        t.layers.add(layer)
        return out

    @torch.no_grad()
    def rewrite_window(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        first: int,
        *,
        sinks: str = "apart",
        block_causal: bool = False,
    ) -> torch.Tensor:
        """Re-encode frames ``[first, first + n)`` (``k: (B, n * tokens_per_frame, H, D)``)
        of ``layer``, which must end at the cache's current frame: every query attends
        all ``n`` frames' keys (``block_causal``: those of its own block and before) and
        the frames' K/V overwrite the window (the newest ``ring_frames`` of them).

        ``sinks`` says what a range that does not start at frame 0 does with the static
        sinks: ``"apart"`` (the package's recache: the range is window frames, which
        attend each other only; the sinks are recached by themselves), ``"replace"``
        (LongLive's ``sink_recache_after_switch``, its default): the first
        ``sink_frames`` of the range become the static sinks; ``"keep"`` (LongLive's
        ``global_sink=True``): the sinks keep their K/V, every query attends them and the
        range's frames after its first ``sink_frames``, whose K/V are dropped.
        Returns the attention output ``(B, Sq, H, D)``.
        """
        if sinks not in ("apart", "replace", "keep"):
            raise ValueError(f'sinks must be "apart", "replace" or "keep", got {sinks!r}')
        c, cache = self.cache.config, self.cache
        T, s, R, fpb = c.tokens_per_frame, c.sink_frames, c.ring_frames, c.frames_per_block
        n = k.shape[1] // T
        if k.shape[1] != n * T or n < 1 or first < 0 or first + n != cache.frame:
            raise ValueError(
                f"recache of the window: {k.shape[1]} tokens from frame {first} must be whole "
                f"frames ending at the current frame {cache.frame}"
            )
        old_sinks = s > 0 and first > 0 and sinks == "keep"
        skip = s if old_sinks else 0  # leading frames whose K/V are neither attended nor kept
        own_k, own_v = k[:, skip * T :], v[:, skip * T :]
        B = k.shape[0]
        ranges = torch.zeros(B, 1, 2, dtype=torch.int32, device=k.device)
        if old_sinks:
            ranges[:, 0, 1] = s * T
        none = torch.full((B, 0), -1, dtype=torch.int32, device=k.device)
        pool_k, pool_v = cache.bank.k[layer], cache.bank.v[layer]
        local_k, local_v = cache.local_k[layer], cache.local_v[layer]

        def attend(q_part: torch.Tensor, end: int) -> torch.Tensor:
            out, _ = gathered_sink_attention_general(
                q_part, pool_k, pool_v, none, local_k, local_v, ranges,
                own_k[:, :end], own_v[:, :end], softmax_scale=c.softmax_scale,
                backend=cache.backend,
            )  # fmt: skip
            return out

        if block_causal and q.shape[1] == k.shape[1]:
            # query block j attends the range's frames up to the end of its block
            edges = sorted({0, n, *range(fpb - first % fpb, n, fpb)})
            parts = []
            for a, b in itertools.pairwise(edges):
                parts.append(attend(q[:, a * T : b * T], max(b - skip, 0) * T))
            out = torch.cat(parts, dim=1)  # ok: host (activations, once per prompt switch)
        else:
            out = attend(q, own_k.shape[1])
        for i in range(n):
            f = first + i
            if first > 0 and i < s and sinks != "apart":  # leading frames: new sinks, or dropped
                if sinks == "keep":
                    continue
                pos = i
            elif f >= s and i < n - R:  # older than the ring holds (never attended again)
                continue
            else:
                pos = self.frame_slot(f)
            rows = slice(pos * T, (pos + 1) * T)
            cache.local_k[layer][:, rows] = k[:, i * T : (i + 1) * T]
            cache.local_v[layer][:, rows] = v[:, i * T : (i + 1) * T]
            cache.frame_ksum[layer][:, pos] = k[:, i * T : (i + 1) * T].float().sum(dim=1)
        return out
