"""DySink on a diffusers ``WanTransformer3DModel`` (README: "diffusers (Wan2.1)").

``enable_dysink(transformer, cache)`` swaps the processor of every block's
self-attention (``attn1``) for :class:`DySinkWanAttnProcessor`: the projections,
q/k RMS norms, diffusers' rotary embedding, ``to_out`` and dropout stay as in
``WanAttnProcessor``; only the attention itself goes through ``SinkAttention``
with the cache and the block index as the layer. Cross-attention (``attn2``, with
the image-conditioning keys of I2V models) is left alone.

Positions: diffusers computes RoPE for frames ``0 .. f-1`` of the latent it is
given. The processor turns the temporal pairs of those tables by ``cache.frame``
(the absolute first frame of the block, a host int), once per forward pass, with
``rotate_temporal``; the result equals Wan RoPE at the absolute offset, which is
what the cached and banked keys carry.

``generate_video`` runs a Self-Forcing-style few-step sampler block by block:
``begin_block``, the denoising steps, the clean pass at t=0 (``commit=True``) and
``end_block``. diffusers is imported by nothing here: the functions only touch the
model passed to them, so ``import dysink_kernels`` never needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..cache import DySinkCache
from ..config import DySinkConfig
from ..ops.rope import rotate_temporal, wan_rope_axis_pairs, wan_rope_freqs
from ..sink_attention import SinkAttention

__all__ = [
    "DySinkWanAttnProcessor",
    "DySinkWanHandle",
    "disable_dysink",
    "dysink_config_for",
    "enable_dysink",
    "generate_video",
    "switch_prompt",
    "wan_tokens_per_frame",
]

WAN_ROPE_THETA = 10000.0  # fixed in diffusers' WanRotaryPosEmbed
T_MAX = 1000.0  # flow-matching timesteps run from T_MAX (pure noise) to 0 (clean)

# on_attention(layer, commit): called after every DySink attention call.
AttentionHook = Callable[[int, bool], None]


def _blocks(transformer: Any) -> Sequence[Any]:
    blocks = getattr(transformer, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn1") for b in blocks):
        raise TypeError(
            "transformer must be a diffusers WanTransformer3DModel (a .blocks list whose "
            f"blocks have .attn1), got {type(transformer).__name__}"
        )
    return blocks


def _patch_size(transformer: Any) -> tuple[int, int, int]:
    p = tuple(transformer.config.patch_size)
    if len(p) != 3:
        raise ValueError(f"expected a 3D patch size (t, h, w), got {p}")
    return p  # type: ignore[return-value]


def wan_tokens_per_frame(transformer: Any, latent_hw: tuple[int, int]) -> int:
    """Tokens per (patched) latent frame for latents of spatial size ``latent_hw``."""
    _, p_h, p_w = _patch_size(transformer)
    h, w = latent_hw
    if h % p_h or w % p_w:
        raise ValueError(
            f"latent_hw {tuple(latent_hw)} must be divisible by the patch size ({p_h}, {p_w})"
        )
    return (h // p_h) * (w // p_w)


def dysink_config_for(
    transformer: Any, latent_hw: tuple[int, int], **overrides: Any
) -> DySinkConfig:
    """A ``DySinkConfig`` matching ``transformer`` at latent size ``latent_hw``.

    ``num_layers``, ``num_heads``, ``head_dim`` and ``tokens_per_frame`` come from the
    model; every other field (``top_k``, ``local_frames``, ``feature``, ...) from
    ``overrides`` or the paper defaults. ``frames_per_block`` counts patched frames
    (equal to latent frames for Wan2.1's temporal patch of 1).
    """
    cfg = transformer.config
    fields = dict(
        num_layers=len(_blocks(transformer)),
        num_heads=int(cfg.num_attention_heads),
        head_dim=int(cfg.attention_head_dim),
        tokens_per_frame=wan_tokens_per_frame(transformer, latent_hw),
    )
    fields.update(overrides)
    return DySinkConfig(**fields)


def _check_rope(transformer: Any, head_dim: int) -> None:
    """diffusers' ``WanRotaryPosEmbed`` must split and turn pairs as ``wan_rope_*`` do."""
    rope = getattr(transformer, "rope", None)
    if rope is None or not hasattr(rope, "t_dim"):
        return
    pairs = wan_rope_axis_pairs(head_dim)
    dims = (rope.t_dim, rope.h_dim, rope.w_dim)
    if dims != tuple(2 * n for n in pairs):
        raise ValueError(
            f"the model's RoPE splits head_dim {head_dim} as {dims} channels, but "
            f"rotate_temporal expects {tuple(2 * n for n in pairs)}"
        )
    table = getattr(rope, "freqs_sin", None)
    if table is None or table.shape[0] < 2:
        return
    w_t = wan_rope_freqs(head_dim, WAN_ROPE_THETA)[0]
    got = table[1, : rope.t_dim : 2].detach().double().cpu()  # ok: host (once, at enable)
    atol = 1e-3 if table.dtype in (torch.float32, torch.float64) else 2e-2  # tables cast by .to()
    if not torch.allclose(got, torch.sin(w_t), atol=atol):
        raise ValueError("the model's temporal RoPE frequencies differ from Wan's theta=10000")


def _rotate_adjacent(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan ``apply_rotary_emb``: pairs ``(2j, 2j+1)``, interleaved cos/sin tables."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def _shift_tables(
    cos: torch.Tensor, sin: torch.Tensor, delta: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables of a temporal position ``+delta``: the unit vectors ``(cos, sin)`` of each
    pair turned by ``rotate_temporal``, so applying them once equals RoPE at the offset."""
    unit = torch.stack([cos[..., 0::2], sin[..., 1::2]], dim=-1).flatten(-2).float()
    turned = rotate_temporal(unit, delta, WAN_ROPE_THETA).to(cos.dtype)
    c, s = turned[..., 0::2], turned[..., 1::2]
    return c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)


class DySinkWanAttnProcessor:
    """Self-attention processor of one Wan block that attends through ``SinkAttention``.

    Same call convention as diffusers' ``WanAttnProcessor``. ``handle.commit``
    (set by ``handle.clean_pass()``) makes the call the clean pass that writes the
    block's K/V. The processor it replaced is kept in ``original``.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, handle: DySinkWanHandle, layer: int, original: Any) -> None:
        self.handle = handle
        self.layer = layer
        self.original = original

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("DySinkWanAttnProcessor is for self-attention (attn1) only")
        if attention_mask is not None:
            raise ValueError("DySinkWanAttnProcessor takes no attention_mask (blocks attend fully)")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        handle = self.handle
        if rotary_emb is not None:
            cos, sin = handle._absolute_tables(rotary_emb)
            query = _rotate_adjacent(query, cos, sin)
            key = _rotate_adjacent(key, cos, sin)

        out = handle.attention(
            query.contiguous(), key.contiguous(), value.contiguous(),
            cache=handle.cache, layer=self.layer, commit=handle.commit,
        )  # fmt: skip
        if handle.on_attention is not None:
            handle.on_attention(self.layer, handle.commit)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class DySinkWanHandle:
    """What ``enable_dysink`` installed; ``remove()`` puts the original processors back.

    Attributes:
        transformer, cache: the patched model and its ``DySinkCache``.
        attention: the ``SinkAttention`` module all processors call.
        commit: whether the next forward pass is the clean pass (use ``clean_pass()``).
        on_attention: optional ``fn(layer, commit)`` called after every attention call
            (read ``cache.stats(layer)`` there to monitor retrieval and the gate).
    """

    def __init__(
        self, transformer: Any, cache: DySinkCache, on_attention: AttentionHook | None = None
    ) -> None:
        self.transformer = transformer
        self.cache = cache
        self.attention = SinkAttention(cache.config)
        self.commit = False
        self.on_attention = on_attention
        self.processors: list[DySinkWanAttnProcessor] = []
        self._tables_key: tuple | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        # First frame(s) of the latent being recached (switch_prompt); None = cache.frame.
        self.frame_override: int | list[int] | None = None

    @property
    def active(self) -> bool:
        """Whether this handle's processors are installed."""
        return bool(self.processors) and all(
            b.attn1.processor is p for b, p in zip(_blocks(self.transformer), self.processors)
        )

    @contextlib.contextmanager
    def clean_pass(self) -> Iterator[None]:
        """Forward passes inside run with ``commit=True`` (the clean pass at t=0)."""
        self.commit = True
        try:
            yield
        finally:
            self.commit = False

    def _absolute_tables(
        self, rotary_emb: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables shifted to the block's first frame; computed once per forward pass
        (every block receives the same ``rotary_emb`` tensors)."""
        cos, sin = rotary_emb
        delta = self.cache.frame if self.frame_override is None else self.frame_override
        if isinstance(delta, list):  # one first frame per row: (n, S, 1, D) tables
            shift = torch.tensor(delta, dtype=torch.float64, device=cos.device)[:, None]
            return _shift_tables(cos, sin, shift)
        if delta == 0:
            return cos, sin
        cached = self._tables_key
        if cached is None or cached[0] is not cos or cached[1] is not sin or cached[2] != delta:
            self._tables = _shift_tables(cos, sin, delta)
            self._tables_key = (cos, sin, delta)
        assert self._tables is not None
        return self._tables

    def remove(self) -> None:
        """Restore the processors ``enable_dysink`` replaced (the same objects)."""
        for block, proc in zip(_blocks(self.transformer), self.processors):
            if block.attn1.processor is proc:
                block.attn1.set_processor(proc.original)
        self.processors = []
        self._tables_key = self._tables = None


def _installed_handle(transformer: Any) -> DySinkWanHandle | None:
    proc = _blocks(transformer)[0].attn1.processor
    return proc.handle if isinstance(proc, DySinkWanAttnProcessor) else None


def enable_dysink(
    transformer: Any, cache: DySinkCache, *, on_attention: AttentionHook | None = None
) -> DySinkWanHandle:
    """Install a DySink processor on the self-attention of every block of ``transformer``.

    The cache's config must match the model (``dysink_config_for`` builds one). Block
    ``i`` uses cache layer ``i``. Every forward pass then feeds one block of
    ``frames_per_block`` patched frames; wrap the clean pass in ``handle.clean_pass()``
    and call ``cache.begin_block()``/``cache.end_block()`` around each block (or let
    ``generate_video`` do all of it). Returns the handle; ``disable_dysink`` or
    ``handle.remove()`` undoes it.
    """
    if not isinstance(cache, DySinkCache):
        raise TypeError(f"cache must be a DySinkCache, got {type(cache).__name__}")
    blocks = _blocks(transformer)
    if _installed_handle(transformer) is not None:
        raise RuntimeError("DySink is already enabled on this transformer: disable_dysink first")
    c = cache.config
    heads = int(transformer.config.num_attention_heads)
    head_dim = int(transformer.config.attention_head_dim)
    if (len(blocks), heads, head_dim) != (c.num_layers, c.num_heads, c.head_dim):
        raise ValueError(
            f"cache config (num_layers={c.num_layers}, num_heads={c.num_heads}, "
            f"head_dim={c.head_dim}) does not match the transformer (num_layers={len(blocks)}, "
            f"num_heads={heads}, head_dim={head_dim}); build it with dysink_config_for"
        )
    _check_rope(transformer, head_dim)
    handle = DySinkWanHandle(transformer, cache, on_attention)
    for i, block in enumerate(blocks):
        proc = DySinkWanAttnProcessor(handle, i, block.attn1.processor)
        handle.processors.append(proc)
        block.attn1.set_processor(proc)
    return handle


def disable_dysink(transformer: Any) -> bool:
    """Restore the original self-attention processors; ``False`` when none was installed."""
    removed = False
    for block in _blocks(transformer):
        proc = block.attn1.processor
        if isinstance(proc, DySinkWanAttnProcessor):
            block.attn1.set_processor(proc.original)
            proc.handle.processors = []
            removed = True
    return removed


def _randn_like(
    x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
) -> torch.Tensor:
    """Fresh noise; a list of generators draws each sample from its own (as diffusers)."""
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    noise = [_randn_like(x[i : i + 1], g) for i, g in enumerate(generator)]
    return torch.cat(noise)  # ok: host (sampler noise per sample, not a cache)


def _to_cache_latent(x: torch.Tensor, frames_per_block: int) -> torch.Tensor:
    """``(B, C, F, H, W)`` -> ``(B, frames_per_block, F // frames_per_block, C, H, W)``."""
    return x.transpose(1, 2).unflatten(1, (frames_per_block, -1))


def _from_cache_latent(latent: torch.Tensor) -> torch.Tensor:
    return latent.flatten(1, 2).transpose(1, 2)


@torch.no_grad()
def switch_prompt(
    transformer: Any,
    cache: DySinkCache,
    encoder_hidden_states: torch.Tensor,
    *,
    batch: int = 1,
    encoder_hidden_states_image: torch.Tensor | None = None,
) -> int:
    """Switch to a new prompt mid-video: recompute every stored block's K/V under it.

    Runs ``cache.recache`` with the model's clean pass (t = 0) on each stored block's
    latent at its own frames (the cache must be built with ``store_latents=True`` and
    filled by ``generate_video``, which then passes each block's latent). Features,
    retrieval state and counters are unchanged. ``encoder_hidden_states`` is the new
    ``(B, L, text_dim)`` prompt, one row per sample; ``batch`` slots are recached per
    forward. Returns the number of blocks recached.
    """
    handle = _installed_handle(transformer)
    owned = handle is None
    if owned:
        handle = enable_dysink(transformer, cache)
    elif handle.cache is not cache:
        raise ValueError("the transformer has DySink enabled with another cache")
    if encoder_hidden_states.shape[0] != cache.batch_size:
        raise ValueError(
            f"encoder_hidden_states.shape[0] must be the batch size {cache.batch_size}, "
            f"got {encoder_hidden_states.shape[0]}"
        )
    dtype = next(transformer.parameters()).dtype

    def run_block(latent: torch.Tensor, first_frame: int | list[int]) -> None:
        rows = cache.recache_samples
        x = _from_cache_latent(latent).to(dtype)
        image = encoder_hidden_states_image
        handle.frame_override = first_frame
        try:
            with handle.clean_pass():
                transformer(
                    hidden_states=x, timestep=torch.zeros(x.shape[0], device=x.device),
                    encoder_hidden_states=encoder_hidden_states[rows],
                    encoder_hidden_states_image=None if image is None else image[rows],
                    return_dict=False,
                )  # fmt: skip
        finally:
            handle.frame_override = None

    try:
        return cache.recache(run_block, batch=batch)
    finally:
        if owned:
            handle.remove()


@torch.no_grad()
def generate_video(
    transformer: Any,
    cache: DySinkCache,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor | Callable[[int], torch.Tensor],
    timesteps: Sequence[float] = (1000, 750, 500, 250),
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    encoder_hidden_states_image: torch.Tensor | None = None,
    on_block: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Generate ``noise``'s frames block by block with a few-step flow-matching sampler.

    Per block of ``frames_per_block`` (patched) frames: ``cache.begin_block()``; for
    each timestep ``t`` (sigma ``= t/1000``) the model predicts the velocity ``v``,
    ``x0 = x_t - sigma * v``, then ``x`` is re-noised to the next timestep,
    ``(1 - sigma') x0 + sigma' eps`` with fresh ``eps`` from ``generator``; then the
    clean pass feeds ``x0`` at t=0 with ``commit=True``; then ``cache.end_block``
    with ``feature_fn(x0)`` (``config.feature == "external"``) or ``None``
    (``"mean_key"``).

    Args:
        transformer: a ``WanTransformer3DModel``; DySink is enabled for the call
            when it is not already (and disabled again after).
        cache: the ``DySinkCache`` (its next block is the first generated here).
        noise: ``(B, C, F, H, W)`` initial noise, ``F`` a multiple of the block's
            latent frames; the output has its shape and dtype.
        encoder_hidden_states: ``(B, L, text_dim)`` prompt embeddings, or a function
            of the block index (counted from this call's first block) returning them.
        timesteps: denoising timesteps in ``(0, 1000]``, decreasing (Self-Forcing's
            ``denoising_step_list``; pass already warped values for a shifted schedule).
        generator: a ``torch.Generator`` or one per sample for the re-noising.
        feature_fn: ``(B, C, frames, H, W)`` clean block latents -> ``(B, F)``
            features; required when ``config.feature == "external"``.
        encoder_hidden_states_image: passed through to the model (I2V).
        on_block: ``fn(block_index, x0, stored)`` after each block's ``end_block``.
    """
    c = cache.config
    if noise.dim() != 5:
        raise ValueError(f"noise must be (B, C, F, H, W), got shape {tuple(noise.shape)}")
    if noise.shape[0] != cache.batch_size:
        raise ValueError(
            f"noise.shape[0] (batch) must be the cache's batch_size {cache.batch_size}, "
            f"got {noise.shape[0]}"
        )
    p_t = _patch_size(transformer)[0]
    block_frames = c.frames_per_block * p_t
    if noise.shape[2] % block_frames:
        raise ValueError(
            f"noise.shape[2] (frames) must be a multiple of {block_frames} latent frames "
            f"per block, got {noise.shape[2]}"
        )
    tpf = wan_tokens_per_frame(transformer, tuple(noise.shape[3:]))
    if tpf != c.tokens_per_frame:
        raise ValueError(
            f"latents of {tuple(noise.shape[3:])} give {tpf} tokens per frame but the cache "
            f"expects {c.tokens_per_frame}; build its config with dysink_config_for"
        )
    ts = [float(t) for t in timesteps]
    if not ts or any(not 0 < t <= T_MAX for t in ts):
        raise ValueError(f"timesteps must be in (0, {T_MAX:g}], got {list(timesteps)}")
    if c.feature == "external" and feature_fn is None:
        raise ValueError('feature_fn is required when cache.config.feature == "external"')

    handle = _installed_handle(transformer)
    owned = handle is None
    if owned:
        handle = enable_dysink(transformer, cache)
    elif handle.cache is not cache:
        raise ValueError("the transformer has DySink enabled with another cache")
    dtype = next(transformer.parameters()).dtype
    B, dev = noise.shape[0], noise.device

    def predict_x0(x: torch.Tensor, t: float, context: torch.Tensor) -> torch.Tensor:
        v = transformer(
            hidden_states=x.to(dtype), timestep=torch.full((B,), t, device=dev),
            encoder_hidden_states=context, encoder_hidden_states_image=encoder_hidden_states_image,
            return_dict=False,
        )[0]  # fmt: skip
        return x - (t / T_MAX) * v.to(x.dtype)

    out = torch.empty_like(noise)
    try:
        for i in range(noise.shape[2] // block_frames):
            frames = slice(i * block_frames, (i + 1) * block_frames)
            context = (
                encoder_hidden_states(i) if callable(encoder_hidden_states)
                else encoder_hidden_states
            )  # fmt: skip
            cache.begin_block()
            x = noise[:, :, frames].float()
            x0 = x
            for j, t in enumerate(ts):
                x0 = predict_x0(x, t, context)
                if j + 1 < len(ts):
                    sigma = ts[j + 1] / T_MAX
                    x = (1.0 - sigma) * x0 + sigma * _randn_like(x0, generator)
            with handle.clean_pass():
                predict_x0(x0, 0.0, context)
            out[:, :, frames] = x0.to(out.dtype)
            feature = feature_fn(x0) if c.feature == "external" else None
            latent = _to_cache_latent(x0, c.frames_per_block) if cache.store_latents else None
            stored = cache.end_block(feature, latent=latent)
            if on_block is not None:
                on_block(i, x0, stored)
    finally:
        if owned:
            handle.remove()
    return out
