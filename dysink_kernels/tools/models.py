"""A tiny random-weight video transformer and a Self-Forcing-style block sampler.

Enough of a streaming video DiT to drive the DySink protocol end to end without
downloading anything: latent frames of ``h x w`` patches, per-layer q/k/v with
Wan 3D RoPE at absolute frame positions, and an attention callback. The demo and
the end-to-end tests use it; real models plug ``SinkAttention`` in the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..ops.rope import apply_wan_rope

__all__ = ["AttendFn", "TinyVideoDiT", "generate_block"]

# attend(layer, q, k, v, commit) -> (B, S, H, D)
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )


class TinyVideoDiT(nn.Module):
    """Random-weight stand-in for a Wan-style causal video DiT.

    Args:
        num_layers, num_heads, head_dim: attention layout.
        grid_hw: patches per latent frame ``(h, w)``; ``tokens_per_frame = h * w``.
        latent_channels: channels of a latent patch.
        cond_dim: size of the conditioning ("prompt") vector.
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
    ) -> None:
        super().__init__()
        dim = num_heads * head_dim
        self.num_heads, self.head_dim, self.grid_hw = num_heads, head_dim, tuple(grid_hw)
        self.latent_channels = latent_channels
        self.embed = nn.Linear(latent_channels, dim)
        self.time = nn.Linear(1, dim)
        self.cond = nn.Linear(cond_dim, dim)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_ratio) for _ in range(num_layers))
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
        first_frame: int,
        attend: AttendFn,
        commit: bool = False,
    ) -> torch.Tensor:
        """``x (B, F, h*w, C)`` latents of one block -> predicted clean latents, same shape."""
        B, n_frames, hw, _ = x.shape
        H, D = self.num_heads, self.head_dim
        grid = (n_frames, *self.grid_hw)
        tok = self.embed(x).flatten(1, 2)
        tok = tok + self.time(tok.new_full((B, 1, 1), float(t))) + self.cond(cond)[:, None]
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.qkv(blk.norm1(tok)).view(B, -1, 3, H, D).unbind(2)
            q = apply_wan_rope(q, grid, (first_frame, 0, 0))
            k = apply_wan_rope(k, grid, (first_frame, 0, 0))
            o = attend(i, q.contiguous(), k.contiguous(), v.contiguous(), commit)
            tok = tok + blk.proj(o.flatten(2))
            tok = tok + blk.mlp(blk.norm2(tok))
        return self.head(self.norm(tok)).view(B, n_frames, hw, -1)


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
