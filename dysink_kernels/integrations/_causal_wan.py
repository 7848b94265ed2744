"""Shared patching of Wan-based causal models (Self-Forcing, LongLive, DySink code).

Their ``CausalWanModel`` runs ``block.self_attn(x, seq_lens, grid_sizes, freqs,
block_mask, kv_cache, current_start, cache_start, ...)`` for every block of
``model.blocks`` with one list of per-layer KV dicts. :class:`CausalWanHandle`
replaces each self-attention's ``forward`` (an instance attribute, removed by
:meth:`CausalWanHandle.remove`) with one that computes q/k/v with the module's own
projections and norms, applies RoPE with the ``causal_rope_apply`` of the module
that defines the class (the upstream function itself, found at run time), and
attends through a :class:`~dysink_kernels.integrations.kv_cache_adapter.KVCacheAdapter`.
The layer index is the module's position in ``model.blocks``; whether a forward is
the clean pass comes from its timestep (``t <= clean_timestep``) or from
``handle.clean_pass()``; the model's inference forward is wrapped for that.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..cache import DySinkCache
from ..config import DySinkConfig
from .kv_cache_adapter import KVCacheAdapter

__all__ = ["CausalWanHandle", "config_for_model"]


def _self_attentions(model: Any) -> list[Any]:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks):
        raise TypeError("model must be a CausalWanModel-like module with a non-empty .blocks")
    attns = [getattr(b, "self_attn", None) for b in blocks]
    if any(a is None for a in attns):
        raise TypeError("every entry of model.blocks must have a .self_attn module")
    return attns


def config_for_model(
    model: Any, preset: Callable[..., DySinkConfig], tokens_per_frame: int, **overrides: Any
) -> tuple[DySinkConfig, int]:
    """``(config, first_block_frames)`` from a loaded model: layers, heads and head_dim
    from its modules; ``frames_per_block`` from ``model.num_frame_per_block``;
    ``local_frames`` from ``local_attn_size`` (``-1``: its ``max_attention_size``);
    ``sink_frames`` from ``sink_size``; the rest from ``preset`` and ``overrides``."""
    attns = _self_attentions(model)
    a0 = attns[0]
    T = tokens_per_frame
    local = int(getattr(a0, "local_attn_size", -1))
    if local == -1:
        local = int(getattr(a0, "max_attention_size", 32760)) // T
    fields = dict(
        frames_per_block=int(getattr(model, "num_frame_per_block", 3)),
        local_frames=local,
        sink_frames=int(getattr(a0, "sink_size", 0)),
    )
    fields.update(overrides)
    cfg = preset(len(attns), int(a0.num_heads), int(a0.head_dim), T, **fields)
    first = 1 if getattr(model, "independent_first_frame", False) else cfg.frames_per_block
    return cfg, first


class CausalWanHandle:
    """DySink installed in a loaded causal Wan model (returned by ``enable_dysink``).

    Attributes:
        cache: the ``DySinkCache`` (built at the first forward from the KV list's batch,
            device and dtype unless given).
        adapter: the ``KVCacheAdapter`` bound to the pipeline's KV list (``None`` until
            the first forward).
    """

    def __init__(
        self,
        model: Any,
        config: DySinkConfig,
        *,
        cache: DySinkCache | None = None,
        first_block_frames: int | None = None,
        returns_indices: bool = False,
        clean_timestep: float = 0.0,
        block_causal_recache: bool = False,
        bank_slots: int | None = None,
        cache_kwargs: dict | None = None,
    ) -> None:
        if cache is not None and cache.config != config:
            raise ValueError("cache.config differs from the configuration derived for the model")
        self.model = model
        self.config = config
        self.cache = cache
        self.adapter: KVCacheAdapter | None = None
        self.first_block_frames = first_block_frames
        self.returns_indices = returns_indices
        self.clean_timestep = clean_timestep
        self.block_causal_recache = block_causal_recache
        self._cache_kwargs = dict(cache_kwargs or {})
        if bank_slots is not None:  # (a pure window gets an empty bank by default)
            self._cache_kwargs["bank_slots"] = bank_slots
        self._clean = False
        self._forced_clean = False
        self._index_ids: tuple[int, ...] = ()
        attns = _self_attentions(model)
        self._attns = attns
        rope = getattr(sys.modules[type(attns[0]).__module__], "causal_rope_apply", None)
        if rope is None:
            raise TypeError(
                f"{type(attns[0]).__module__} defines no causal_rope_apply (the upstream RoPE)"
            )
        self._rope = rope
        for layer, attn in enumerate(attns):
            original = attn.forward
            attn.forward = self._make_forward(layer, attn, original)
        self._wrapped = "_forward_inference" if hasattr(model, "_forward_inference") else "forward"
        inner = getattr(model, self._wrapped)
        setattr(model, self._wrapped, self._make_model_forward(inner))

    # ------------------------------------------------------------- patching
    def remove(self) -> None:
        """Restore the model's own forwards."""
        for attn in self._attns:
            attn.__dict__.pop("forward", None)
        self.model.__dict__.pop(self._wrapped, None)

    @contextlib.contextmanager
    def clean_pass(self) -> Iterator[None]:
        """Treat the forwards inside as clean passes (no timestep read on the host)."""
        self._forced_clean = True
        try:
            yield
        finally:
            self._forced_clean = False

    def end_block(self, feature: torch.Tensor | None = None) -> torch.Tensor:
        """Store the finished block with its ``(B, F)`` feature (``feature="external"``
        with ``top_k > 0``; otherwise blocks end by themselves)."""
        if self.adapter is None:
            raise RuntimeError("end_block before the first forward")
        return self.adapter.end_block(feature)

    def _is_clean(self, t: Any) -> bool:
        if self._forced_clean:
            return True
        if t is None:
            return False
        if isinstance(t, torch.Tensor):
            # One read per forward (the upstream code reads its index tensors per layer);
            # handle.clean_pass() avoids it.
            return bool((t <= self.clean_timestep).all())  # ok: host
        return all(float(x) <= self.clean_timestep for x in (t if isinstance(t, Sequence) else [t]))

    def _bind(self, kv_cache: Sequence[dict]) -> None:
        ids = tuple(id(d["global_end_index"]) for d in kv_cache)
        if self.adapter is not None and kv_cache is self.adapter.kv_cache:
            if ids != self._index_ids:  # the pipeline replaced its index tensors: a new video
                self.adapter.reset()
                self._index_ids = ids
            return
        self._index_ids = ids
        if self.cache is None:
            k0 = kv_cache[0]["k"]
            self.cache = DySinkCache(
                self.config, batch_size=k0.shape[0], device=k0.device, dtype=k0.dtype,
                **self._cache_kwargs,
            )  # fmt: skip
        kv_tokens = None
        if kv_cache[0]["k"].shape[1] == 0:  # tiny dicts: the upstream buffer's size
            kv_tokens = int(getattr(self._attns[0], "max_attention_size", 0)) or None
        if self.adapter is None:
            self.adapter = KVCacheAdapter(
                kv_cache, self.cache, first_block_frames=self.first_block_frames,
                kv_tokens=kv_tokens,
            )  # fmt: skip
        else:
            self.adapter.kv_tokens = kv_tokens
            self.adapter.reset(kv_cache)

    def _make_model_forward(self, inner: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            kv_cache = kwargs.get("kv_cache")
            if kv_cache is None:
                return inner(*args, **kwargs)
            self._bind(kv_cache)
            self._clean = self._is_clean(kwargs.get("t", args[1] if len(args) > 1 else None))
            return inner(*args, **kwargs)

        return forward

    def _make_forward(self, layer: int, attn: Any, original: Callable) -> Callable:
        def forward(
            x: torch.Tensor,
            seq_lens: Any,
            grid_sizes: torch.Tensor,
            freqs: torch.Tensor,
            block_mask: Any,
            kv_cache: dict | None = None,
            current_start: int = 0,
            cache_start: int | None = None,
            sink_recache_after_switch: bool = False,
            **kwargs: Any,
        ) -> Any:
            if kv_cache is None:  # training paths: the model's own attention
                return original(
                    x, seq_lens, grid_sizes, freqs, block_mask, kv_cache, current_start,
                    cache_start, **kwargs,
                )  # fmt: skip
            if self.adapter is None:
                raise RuntimeError("the self-attention was called outside the model's forward")
            b, s = x.shape[:2]
            n, d = attn.num_heads, attn.head_dim
            q = attn.norm_q(attn.q(x)).view(b, s, n, d)
            k = attn.norm_k(attn.k(x)).view(b, s, n, d)
            v = attn.v(x).view(b, s, n, d)
            first = int(current_start) // self.config.tokens_per_frame
            rq = self._rope(q, grid_sizes, freqs, start_frame=first).type_as(v)
            rk = self._rope(k, grid_sizes, freqs, start_frame=first).type_as(v)
            out = self.adapter.attention(
                layer, rq, rk, v, kv_cache, int(current_start), commit=self._clean,
                new_sinks=bool(sink_recache_after_switch),
                block_causal=self.block_causal_recache,
            )  # fmt: skip
            y = attn.o(out.flatten(2))
            if not self.returns_indices:
                return y
            _, local_end = self.adapter.indices(layer)
            return y, (int(current_start) + s, local_end, None)

        return forward
