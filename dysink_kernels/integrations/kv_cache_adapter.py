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
the caller; ``begin_block()`` may also be called explicitly). A block ends by
``end_block(feature)``, because that is where the block's feature comes in; with
``feature="mean_key"`` or ``top_k=0`` the adapter also ends a fully committed block
itself when the next call arrives.

Calls the upstream pipelines make besides that, each recognised from
``current_start``, the call's length and ``commit``:

* a new video on the same list: a denoising call at ``current_start=0`` after the
  first block (Self-Forcing resets the index tensors between videos) starts a new
  stream (``reset()``); so does binding another list with ``reset(kv_cache)``;
* a short first block (``first_block_frames=1``: Self-Forcing's
  ``independent_first_frame``): frame 0 alone, then blocks of ``frames_per_block``;
  it attends itself, is written to the window and is not stored in the bank;
* a recache (LongLive's and DySink's prompt switch): a ``commit=True`` call over
  whole frames ``[a, c)`` ending at the last generated frame ``c``; the frames attend
  each other and overwrite the window (``Recacher.rewrite_window``; ``new_sinks``
  as LongLive's ``sink_recache_after_switch``).

Anything else raises: a ``current_start`` that is neither the current nor the next
block, a new block while the previous one has not ended, a dict that is not that
layer's dict of the adapter's list.

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
from ..ops.gathered_sink_attention import gathered_sink_attention_general
from ..sink_attention import SinkAttention

__all__ = ["KVCacheAdapter", "dysink_cache_from_kv_cache", "tiny_kv_cache"]

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


def tiny_kv_cache(
    num_layers: int,
    batch_size: int,
    num_heads: int,
    head_dim: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """A list of per-layer dicts in the upstream layout whose ``k``/``v`` hold no tokens
    (``(B, 0, H, D)``): with DySink the K/V live in the ``DySinkCache``, so the upstream
    buffers (about 6 GB at Self-Forcing's 32,760 tokens x 30 layers in bf16) need not
    exist. Assign it before the pipeline allocates its own (``pipeline.kv_cache1 =
    tiny_kv_cache(...)``) and give the adapter ``kv_tokens`` (the upstream buffer size)."""
    return [
        {
            "k": torch.zeros(batch_size, 0, num_heads, head_dim, dtype=dtype, device=device),
            "v": torch.zeros(batch_size, 0, num_heads, head_dim, dtype=dtype, device=device),
            "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
            "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
        }
        for _ in range(num_layers)
    ]


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
    bank_dtype: torch.dtype | None = None,
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
        backend=backend, feature_dim=feature_dim, bank_dtype=bank_dtype,
    )  # fmt: skip


class KVCacheAdapter:
    """The reference's per-layer attention call on top of ``DySinkCache``/``SinkAttention``.

    Args:
        kv_cache: the list of per-layer dicts the caller's model passes around.
        cache: a ``DySinkCache`` matching it (``from_kv_cache`` builds one).

    Binding a list starts a fresh video: its indices are set to 0.

    Keyword args:
        first_block_frames: frames of the first block (``1`` for Self-Forcing's
            ``independent_first_frame``; default ``frames_per_block``).
        kv_tokens: the upstream buffer size in tokens, for ``local_end_index``
            (default: the dicts' ``k.shape[1]``; give it with :func:`tiny_kv_cache`).

    Attributes:
        cache: the ``DySinkCache`` (retrieved frames, stats, bank).
        kv_cache: the list whose indices the adapter keeps up to date.
    """

    def __init__(
        self,
        kv_cache: Sequence[dict],
        cache: DySinkCache,
        *,
        first_block_frames: int | None = None,
        kv_tokens: int | None = None,
    ) -> None:
        if not isinstance(cache, DySinkCache):
            raise TypeError(f"cache must be a DySinkCache, got {type(cache).__name__}")
        fpb = cache.config.frames_per_block
        first = fpb if first_block_frames is None else first_block_frames
        if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first <= fpb:
            raise ValueError(f"first_block_frames must be an int in [1, {fpb}], got {first!r}")
        if first < fpb and cache.config.sink_frames:
            raise ValueError("a short first block needs sink_frames=0")
        self.cache = cache
        self.first_block_frames = first
        self.kv_tokens = kv_tokens
        self.attention_module = SinkAttention(cache.config)
        self._bind(kv_cache)

    @classmethod
    def from_kv_cache(
        cls,
        kv_cache: Sequence[dict],
        *,
        tokens_per_frame: int,
        first_block_frames: int | None = None,
        kv_tokens: int | None = None,
        **kwargs: Any,
    ) -> KVCacheAdapter:
        """Build the cache with :func:`dysink_cache_from_kv_cache` and wrap it."""
        cache = dysink_cache_from_kv_cache(kv_cache, tokens_per_frame=tokens_per_frame, **kwargs)
        return cls(kv_cache, cache, first_block_frames=first_block_frames, kv_tokens=kv_tokens)

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
        self._size = size if self.kv_tokens is None else self.kv_tokens
        self._global_end = [0] * c.num_layers
        self._local_end = [0] * c.num_layers
        self._committed = [False] * c.num_layers
        self._in_block = False
        self.cache.frame_shift = c.frames_per_block - self.first_block_frames
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
        if self.cache.block == 1 and self.cache.frame_shift:
            self.cache.bank.clear()  # the short first block is no bank entry
        return stored

    def reset(self, kv_cache: Sequence[dict] | None = None) -> None:
        """Start a new video, optionally with a new list of dicts (indices set to 0)."""
        self.cache.reset()
        self._bind(self.kv_cache if kv_cache is None else kv_cache)

    # --------------------------------------------------------------- attention
    def _block_frames(self, block: int) -> int:
        return self.first_block_frames if block == 0 else self.cache.config.frames_per_block

    def _auto_end(self, why: str) -> None:
        c = self.cache.config
        if not all(self._committed) or (c.feature != "mean_key" and c.top_k > 0):
            raise RuntimeError(
                f"{why} came before end_block of block {self.cache.block}: run the clean pass "
                "(commit=True) on every layer, then call adapter.end_block(feature)"
            )
        feature = None
        if c.feature != "mean_key":  # a pure window: the feature is never used
            bank_feat = self.cache.bank.feature
            dim = 1 if bank_feat is None else bank_feat.shape[1]
            feature = torch.zeros(self.cache.batch_size, dim, device=self.cache.device)
        self.end_block(feature)

    def _classify(self, current_start: int, n_tokens: int, commit: bool) -> str:
        """``"block"`` (a call of the current block, starting it if needed) or
        ``"recache"``; starts a new stream or ends the previous block as needed."""
        c = self.cache.config
        T = c.tokens_per_frame
        if current_start % T or n_tokens % T:
            raise ValueError(
                f"current_start={current_start} and the call's {n_tokens} tokens must be whole "
                f"frames of {T} tokens"
            )
        a, nf = current_start // T, n_tokens // T
        blk = self.cache.block
        start = self.cache.frame - self.cache.frame_shift if blk else 0  # absolute frames
        done = self._in_block and all(self._committed)
        if self._in_block and not done and a == start and nf == self._block_frames(blk):
            return "block"
        end = start + self._block_frames(blk) if self._in_block else start  # generated so far
        if commit and end > 0 and a + nf == end and (done or not self._in_block):
            if self._in_block:
                self._auto_end("a recache")
            return "recache"
        if a == 0 and not commit and (blk > 0 or done):  # a new video on the same list
            self.reset()
            blk, end = 0, 0
        if a == end and nf == self._block_frames(blk if not self._in_block else blk + 1):
            if self._in_block:
                self._auto_end(f"a call for the block at token {current_start}")
            self.begin_block()
            return "block"
        raise ValueError(
            f"current_start={current_start} ({nf} frames) is neither the current block (frame "
            f"{start}), the next one (frame {end}), a recache ending at frame {end} "
            "(commit=True) nor a new video (a denoising call at 0)"
        )

    def _own_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention of ``q`` over ``k`` alone (the short first block)."""
        c, cache = self.cache.config, self.cache
        B = q.shape[0]
        none = torch.full((B, 0), -1, dtype=torch.int32, device=q.device)
        empty = torch.zeros(B, 1, 2, dtype=torch.int32, device=q.device)
        out, _ = gathered_sink_attention_general(
            q, cache.bank.k[0], cache.bank.v[0], none, k, v, empty, k, v,
            softmax_scale=c.softmax_scale, backend=cache.backend,
        )  # fmt: skip
        return out

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
        new_sinks: bool = True,
        block_causal: bool = False,
    ) -> torch.Tensor:
        """One self-attention call of layer ``layer_idx``, in the reference's convention.

        Args:
            roped_query, roped_key, v: ``(B, tokens, H, D)`` with RoPE applied at
                absolute positions (as the reference does); one block, or a recache range.
            kv_cache: that layer's dict, ``adapter.kv_cache[layer_idx]``.
            current_start: token index of the call's first token (frame * tokens).
            commit: ``True`` for the clean pass (t=0) that writes the block's K/V.
            new_sinks, block_causal: for a recache call (see ``Recacher.rewrite_window``).

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
        mode = self._classify(current_start, roped_key.shape[1], commit)
        if mode == "recache":
            first = current_start // c.tokens_per_frame + self.cache.frame_shift
            out = self.cache.recacher.rewrite_window(
                layer_idx, roped_query, roped_key, v, first,
                sinks="replace" if new_sinks else "keep", block_causal=block_causal,
            )  # fmt: skip
        elif self.cache.block == 0 and self.cache.frame_shift:
            out = self._own_attention(roped_query, roped_key, v)
            if commit:  # written at the block's last frames; the frames before never existed
                pad = roped_key.new_zeros(roped_key.shape[0], c.block_tokens, *roped_key.shape[2:])
                pad_v = pad.clone()
                pad[:, -roped_key.shape[1] :] = roped_key
                pad_v[:, -v.shape[1] :] = v
                self.attention_module(
                    roped_query, pad, pad_v, cache=self.cache, layer=layer_idx, commit=True
                )
        else:
            out = self.attention_module(
                roped_query, roped_key, v, cache=self.cache, layer=layer_idx, commit=commit
            )
        if commit and mode == "block":
            self._committed[layer_idx] = True
        end = current_start + roped_key.shape[1]
        if end > self._global_end[layer_idx]:  # a recomputation never moves the indices back
            self._global_end[layer_idx] = end
            self._local_end[layer_idx] = min(end, self._size)
            kv_cache["global_end_index"].fill_(end)
            kv_cache["local_end_index"].fill_(self._local_end[layer_idx])
        return out

    __call__ = attention

    def indices(self, layer_idx: int) -> tuple[int, int]:
        """``(global_end_index, local_end_index)`` of a layer as host ints (what LongLive's
        self-attention returns beside its output)."""
        return self._global_end[layer_idx], self._local_end[layer_idx]

    def attention_fn(self) -> Callable[..., torch.Tensor]:
        """``attn(layer_idx, roped_q, roped_k, v, kv_cache_dict, current_start, commit=False)``."""
        return self.attention
