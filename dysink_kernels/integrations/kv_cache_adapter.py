"""DySink behind the list-of-dicts KV cache of Self-Forcing, LongLive and the DySink code.

Those code bases keep one dict per transformer layer::

    {"k": (B, max_tokens, H, D), "v": (B, max_tokens, H, D),
     "global_end_index": tensor([0]), "local_end_index": tensor([0])}

and their self-attention receives ``roped_query, roped_key, v``, that layer's dict
and ``current_start`` (the token index of the block's first token). The adapter
keeps that calling convention and routes the call through ``SinkAttention`` and a
``DySinkCache`` sized from the list::

    adapter = KVCacheAdapter.from_kv_cache(kv_cache, tokens_per_frame=1560, local_frames=9)
    attn = adapter.attention_fn()
    out = attn(layer_idx, roped_q, roped_k, v, kv_cache[layer_idx], current_start)  # denoising
    attn(layer_idx, roped_q, roped_k, v, kv_cache[layer_idx], current_start, commit=True)
    adapter.end_block(feature)          # after the clean pass of every layer

Block boundaries: a block begins by itself with the first call whose
``current_start`` is the next block's first token (retrieval needs nothing from
the caller; ``begin_block()`` may also be called explicitly). A block ends only by
``end_block(feature)``, because that is where the block's feature comes in; with
``feature="mean_key"`` the adapter also ends a fully committed block itself when
the next block's first call arrives. Anything else raises: a ``current_start``
that is neither the current nor the next block, a new block while the previous
one has not ended, a dict that is not that layer's dict of the adapter's list.

What the dicts hold: the adapter updates ``global_end_index`` and
``local_end_index`` after every call as the reference does (``global_end_index`` =
end token of the furthest call, ``local_end_index`` = that clamped to the buffer
size, neither moving back on a recomputation), from host integers and without a
host sync, so code that reads them keeps working. It does not write the ``k``/``v``
tensors: the window lives in ``adapter.cache`` (a ring, no rolling copies) and past
blocks in its frame bank, so code that reads K/V out of the dicts (such as the
reference's own memory bank) is what the adapter replaces. Static sinks
(LongLive's ``sink_size``, in frames) are ``DySinkConfig.sink_frames``; the
window ``local_frames`` counts them, as LongLive's ``local_attn_size`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..cache import DySinkCache
from ..config import DySinkConfig
from ..sink_attention import SinkAttention

__all__ = ["KVCacheAdapter", "dysink_cache_from_kv_cache"]

_INDEX_KEYS = ("global_end_index", "local_end_index")


def _check_kv_list(kv_cache: object) -> tuple[int, ...]:
    """Validate the list of per-layer dicts; returns the common ``k`` shape."""
    if not isinstance(kv_cache, Sequence) or isinstance(kv_cache, (str, bytes)) or not kv_cache:
        raise TypeError("kv_cache must be a non-empty list of per-layer dicts")
    shape: tuple[int, ...] | None = None
    for i, layer in enumerate(kv_cache):
        if not isinstance(layer, dict):
            raise TypeError(f"kv_cache[{i}] must be a dict, got {type(layer).__name__}")
        missing = [key for key in ("k", "v", *_INDEX_KEYS) if key not in layer]
        if missing:
            raise ValueError(f"kv_cache[{i}] lacks {missing}")
        k, v = layer["k"], layer["v"]
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError(f"kv_cache[{i}]['k'] must be a (B, max_tokens, H, D) tensor")
        if not isinstance(v, torch.Tensor) or v.shape != k.shape:
            raise ValueError(f"kv_cache[{i}]['v'] must have the shape of 'k' {tuple(k.shape)}")
        if shape is None:
            shape = tuple(k.shape)
        elif tuple(k.shape) != shape:
            raise ValueError(f"kv_cache[{i}]['k'] has shape {tuple(k.shape)}, layer 0 has {shape}")
    assert shape is not None
    return shape


def dysink_cache_from_kv_cache(
    kv_cache: Sequence[dict],
    *,
    tokens_per_frame: int,
    frames_per_block: int = 3,
    local_frames: int = 9,
    sink_size: int = 0,
    top_k: int = 2,
    bank_slots: int | None = None,
    backend: str = "auto",
    feature_dim: int | None = None,
    **config_overrides: Any,
) -> DySinkCache:
    """A ``DySinkCache`` for the model behind ``kv_cache``.

    Layers, batch, heads, head_dim, device and dtype come from the list's tensors;
    ``sink_size`` (frames) becomes ``sink_frames``; any other ``DySinkConfig`` field
    (``tau``, ``dedup``, ``feature``, ``gate_scope``, ...) goes in ``config_overrides``.
    """
    B, _, H, D = _check_kv_list(kv_cache)
    k0 = kv_cache[0]["k"]
    cfg = DySinkConfig(
        num_layers=len(kv_cache), num_heads=H, head_dim=D, tokens_per_frame=tokens_per_frame,
        frames_per_block=frames_per_block, local_frames=local_frames, sink_frames=sink_size,
        top_k=top_k, **config_overrides,
    )  # fmt: skip
    return DySinkCache(
        cfg, batch_size=B, device=k0.device, dtype=k0.dtype, bank_slots=bank_slots,
        backend=backend, feature_dim=feature_dim,
    )  # fmt: skip


class KVCacheAdapter:
    """The reference's per-layer attention call on top of ``DySinkCache``/``SinkAttention``.

    Args:
        kv_cache: the list of per-layer dicts the caller's model passes around.
        cache: a ``DySinkCache`` matching it (``from_kv_cache`` builds one).

    Binding a list starts a fresh video: its indices are set to 0.

    Attributes:
        cache: the ``DySinkCache`` (retrieved frames, stats, bank).
        kv_cache: the list whose indices the adapter keeps up to date.
    """

    def __init__(self, kv_cache: Sequence[dict], cache: DySinkCache) -> None:
        if not isinstance(cache, DySinkCache):
            raise TypeError(f"cache must be a DySinkCache, got {type(cache).__name__}")
        self.cache = cache
        self.attention_module = SinkAttention(cache.config)
        self._bind(kv_cache)

    @classmethod
    def from_kv_cache(
        cls, kv_cache: Sequence[dict], *, tokens_per_frame: int, **kwargs: Any
    ) -> KVCacheAdapter:
        """Build the cache with :func:`dysink_cache_from_kv_cache` and wrap it."""
        cache = dysink_cache_from_kv_cache(kv_cache, tokens_per_frame=tokens_per_frame, **kwargs)
        return cls(kv_cache, cache)

    def _bind(self, kv_cache: Sequence[dict]) -> None:
        B, size, H, D = _check_kv_list(kv_cache)
        c, batch = self.cache.config, self.cache.batch_size
        if (len(kv_cache), B, H, D) != (c.num_layers, batch, c.num_heads, c.head_dim):
            raise ValueError(
                f"kv_cache has {len(kv_cache)} layers of (B={B}, H={H}, D={D}) but the cache "
                f"expects {c.num_layers} layers of (B={batch}, H={c.num_heads}, "
                f"D={c.head_dim})"
            )
        self.kv_cache = kv_cache
        self._size = size
        self._global_end = [0] * c.num_layers
        self._committed = [False] * c.num_layers
        self._in_block = False
        for layer in kv_cache:
            for key in _INDEX_KEYS:
                layer[key].fill_(0)

    # ------------------------------------------------------------------ blocks
    def begin_block(self) -> None:
        """Start the next block (retrieval). Optional: the block's first call does it."""
        if self._in_block:
            raise RuntimeError(
                f"begin_block: block {self.cache.block} has not ended (call end_block)"
            )
        self.cache.begin_block()
        self._in_block = True
        self._committed = [False] * self.cache.config.num_layers

    def end_block(self, feature: torch.Tensor | None = None) -> torch.Tensor:
        """Store the finished block (after every layer's ``commit=True`` call).

        ``feature``: ``(B, F)`` for ``config.feature == "external"``, else ``None``.
        Returns the ``(B,)`` bool device tensor of ``DySinkCache.end_block``.
        """
        if not self._in_block:
            raise RuntimeError("end_block called without a block in progress")
        stored = self.cache.end_block(feature)
        self._in_block = False
        return stored

    def reset(self, kv_cache: Sequence[dict] | None = None) -> None:
        """Start a new video, optionally with a new list of dicts (indices set to 0)."""
        self.cache.reset()
        self._bind(self.kv_cache if kv_cache is None else kv_cache)

    # --------------------------------------------------------------- attention
    def _enter_block(self, current_start: int) -> None:
        c = self.cache.config
        start = self.cache.frame * c.tokens_per_frame
        if self._in_block and current_start == start:
            return
        next_start = start + (c.block_tokens if self._in_block else 0)
        if current_start != next_start:
            raise ValueError(
                f"current_start={current_start} is not the first token of the current block "
                f"({start}) or of the next one ({next_start}); the adapter follows one video "
                "block by block (a new video: call reset())"
            )
        if self._in_block:
            if c.feature != "mean_key" or not all(self._committed):
                raise RuntimeError(
                    f"a call for the block at token {current_start} came before end_block of "
                    f"block {self.cache.block}: run the clean pass (commit=True) on every layer, "
                    "then call adapter.end_block(feature)"
                )
            self.end_block(None)
        self.begin_block()

    def attention(
        self,
        layer_idx: int,
        roped_query: torch.Tensor,
        roped_key: torch.Tensor,
        v: torch.Tensor,
        kv_cache: dict,
        current_start: int,
        *,
        commit: bool = False,
    ) -> torch.Tensor:
        """One self-attention call of layer ``layer_idx``, in the reference's convention.

        Args:
            roped_query, roped_key, v: ``(B, block_tokens, H, D)`` with RoPE applied at
                absolute positions (as the reference does).
            kv_cache: that layer's dict, ``adapter.kv_cache[layer_idx]``.
            current_start: token index of the block's first token (frame * tokens).
            commit: ``True`` for the clean pass (t=0) that writes the block's K/V.

        Returns ``(B, Sq, H, D)``, before the output projection.
        """
        c = self.cache.config
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx must be an int, got {type(layer_idx).__name__}")
        if not 0 <= layer_idx < c.num_layers:
            raise IndexError(f"layer_idx must be in [0, {c.num_layers}), got {layer_idx}")
        if kv_cache is not self.kv_cache[layer_idx]:
            raise ValueError(
                f"kv_cache is not layer {layer_idx}'s dict of the list this adapter follows "
                "(another layer's dict, or a new video's list: call reset(kv_cache))"
            )
        if isinstance(current_start, bool) or not isinstance(current_start, int):
            what = type(current_start).__name__
            raise TypeError(f"current_start must be a host int (token index), got {what}")
        self._enter_block(current_start)
        out = self.attention_module(
            roped_query, roped_key, v, cache=self.cache, layer=layer_idx, commit=commit
        )
        if commit:
            self._committed[layer_idx] = True
        end = current_start + roped_key.shape[1]
        if end > self._global_end[layer_idx]:  # a recomputation never moves the indices back
            self._global_end[layer_idx] = end
            kv_cache["global_end_index"].fill_(end)
            kv_cache["local_end_index"].fill_(min(end, self._size))
        return out

    __call__ = attention

    def attention_fn(self) -> Callable[..., torch.Tensor]:
        """``attn(layer_idx, roped_q, roped_k, v, kv_cache_dict, current_start, commit=False)``."""
        return self.attention
