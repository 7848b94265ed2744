"""A random-weight video transformer and a Self-Forcing-style block sampler.

Enough of a streaming video DiT to drive the DySink protocol end to end without
downloading anything: latent frames of ``h x w`` patches, per-layer q/k/v with
Wan 3D RoPE at absolute frame positions, and an attention callback. The demo and
the end-to-end tests use it tiny; with ``ffn_dim``, ``cross_attn`` and ``qk_norm``
(see :func:`wan_shaped_dit`) it takes the shape of a Wan2.1 block for benchmarks.
Real models plug ``SinkAttention`` in the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.rope import apply_wan_rope, rotate_temporal

__all__ = ["AttendFn", "TinyVideoDiT", "generate_block", "wan_shaped_dit"]

# attend(layer, q, k, v, commit) -> (B, S, H, D)
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


class _Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: int,
        ffn_dim: int | None = None,
        cross_attn: bool = False,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        hidden = ffn_dim or mlp_ratio * dim
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        # Optional parts after the original ones, so that a default block draws the
        # same random weights as before they existed.
        self.norm_q = nn.RMSNorm(dim) if qk_norm else None
        self.norm_k = nn.RMSNorm(dim) if qk_norm else None
        self.cross = _CrossAttention(dim, num_heads, qk_norm) if cross_attn else None


class _CrossAttention(nn.Module):
    """Attention of the video tokens to a text context (no cache: the context is fixed)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, S, dim = x.shape
        H = self.num_heads
        q = self.norm_q(self.q(self.norm(x))).view(B, S, H, -1).transpose(1, 2)
        k = self.norm_k(self.k(context)).view(B, context.shape[1], H, -1).transpose(1, 2)
        v = self.v(context).view(B, context.shape[1], H, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(B, S, dim))


class TinyVideoDiT(nn.Module):
    """Random-weight stand-in for a Wan-style causal video DiT.

    Args:
        num_layers, num_heads, head_dim: attention layout.
        grid_hw: patches per latent frame ``(h, w)``; ``tokens_per_frame = h * w``.
        latent_channels: channels of a latent patch.
        cond_dim: size of the conditioning ("prompt") vector, or with ``cross_attn`` of
            each text-context token.
        mlp_ratio: feed-forward width as a multiple of ``num_heads * head_dim``.
        ffn_dim: feed-forward width (overrides ``mlp_ratio``).
        cross_attn: every block attends a text context ``cond (B, L, cond_dim)``
            (projected once per forward) instead of adding a prompt vector.
        qk_norm: RMS-normalise queries and keys before RoPE (as Wan does).
    """

    def __init__(
        self,
        num_layers: int = 2,
        num_heads: int = 2,
        head_dim: int = 16,
        grid_hw: tuple[int, int] = (2, 4),
        latent_channels: int = 4,
        cond_dim: int = 8,
        mlp_ratio: int = 2,
        *,
        ffn_dim: int | None = None,
        cross_attn: bool = False,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        dim = num_heads * head_dim
        self.num_heads, self.head_dim, self.grid_hw = num_heads, head_dim, tuple(grid_hw)
        self.latent_channels = latent_channels
        self.cross_attn, self.qk_norm = cross_attn, qk_norm
        self.embed = nn.Linear(latent_channels, dim)
        self.time = nn.Linear(1, dim)
        self.cond = nn.Linear(cond_dim, dim)
        self.blocks = nn.ModuleList(
            _Block(dim, num_heads, mlp_ratio, ffn_dim, cross_attn, qk_norm)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, latent_channels)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    def forward(
        self,
        x: torch.Tensor,
        t: float,
        cond: torch.Tensor,
        first_frame: int | torch.Tensor,
        attend: AttendFn,
        commit: bool = False,
    ) -> torch.Tensor:
        """``x (B, F, h*w, C)`` latents of one block -> predicted clean latents, same shape.

        ``first_frame`` is the block's absolute first frame: an int, or a 0-dim device
        tensor (RoPE at frame 0, then turned by that many frames on the device, so that
        a captured CUDA graph stays right for later blocks).
        """
        B, n_frames, hw, _ = x.shape
        H, D = self.num_heads, self.head_dim
        grid = (n_frames, *self.grid_hw)
        on_device = isinstance(first_frame, torch.Tensor)
        offset = (0, 0, 0) if on_device else (first_frame, 0, 0)
        tok = self.embed(x).flatten(1, 2)
        tok = tok + self.time(tok.new_full((B, 1, 1), float(t)))
        if self.cross_attn:
            context = self.cond(cond)
        else:
            tok = tok + self.cond(cond)[:, None]
        for i, blk in enumerate(self.blocks):
            if self.qk_norm:
                q, k, v = blk.qkv(blk.norm1(tok)).view(B, -1, 3, H * D).unbind(2)
                q, k = blk.norm_q(q).view(B, -1, H, D), blk.norm_k(k).view(B, -1, H, D)
                v = v.view(B, -1, H, D)
            else:
                q, k, v = blk.qkv(blk.norm1(tok)).view(B, -1, 3, H, D).unbind(2)
            q = apply_wan_rope(q, grid, offset)
            k = apply_wan_rope(k, grid, offset)
            if on_device:
                q, k = rotate_temporal(q, first_frame), rotate_temporal(k, first_frame)
            o = attend(i, q.contiguous(), k.contiguous(), v.contiguous(), commit)
            tok = tok + blk.proj(o.flatten(2))
            if blk.cross is not None:
                tok = tok + blk.cross(tok, context)
            tok = tok + blk.mlp(blk.norm2(tok))
        return self.head(self.norm(tok)).view(B, n_frames, hw, -1)


def wan_shaped_dit(
    num_layers: int = 30,
    num_heads: int = 12,
    head_dim: int = 128,
    grid_hw: tuple[int, int] = (30, 52),
    ffn_dim: int = 8960,
    latent_channels: int = 64,
    text_dim: int = 4096,
) -> TinyVideoDiT:
    """A random-weight :class:`TinyVideoDiT` with the layout of Wan2.1-T2V-1.3B by
    default: 30 layers of dim 1536 (12 heads x 128), feed-forward 8960, q/k RMS norms,
    cross-attention to a text context of ``text_dim`` features, 30 x 52 patches per
    latent frame (480p), 16 latent channels x 2 x 2 patch = 64 per token.

    Left out: Wan's adaptive layer-norm modulation (the timestep is added instead) and
    the text encoder (the caller passes a context). Build it under
    ``with torch.device("cuda"):`` to initialise the weights on the GPU.
    """
    return TinyVideoDiT(
        num_layers, num_heads, head_dim, grid_hw, latent_channels, text_dim,
        ffn_dim=ffn_dim, cross_attn=True, qk_norm=True,
    )  # fmt: skip


@torch.no_grad()
def generate_block(
    model: TinyVideoDiT,
    noise: torch.Tensor,
    cond: torch.Tensor,
    first_frame: int,
    attend: AttendFn,
    timesteps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Few-step sampling of one block, then the clean pass (t = 0, ``commit=True``).

    Each step predicts clean latents and re-noises them to the next timestep;
    the clean pass feeds the final prediction through the model once more so that
    every layer writes the block's K/V into the cache.
    """
    x = noise
    x0 = noise
    for i, t in enumerate(timesteps):
        x0 = model(x, t, cond, first_frame, attend)
        if i + 1 < len(timesteps):
            t_next = timesteps[i + 1]
            fresh = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = (1.0 - t_next) * x0 + t_next * fresh
    model(x0, 0.0, cond, first_frame, attend, commit=True)
    return x0
