"""Plain PyTorch Wan 3D RoPE: the oracle (and only backend) of the RoPE ops.

The tables and the pair rotation live in ``tables.py`` (the layout of the pairs is
described there); angles are formed in fp64, the rotation runs in fp32 and results
come back in the input dtype.
"""

from __future__ import annotations

import torch

from .tables import (
    rotate_pairs,
    temporal_cos_sin,
    wan_rope_angles,
)

__all__ = ["apply_wan_rope_naive", "rotate_temporal_naive"]


def apply_wan_rope_naive(
    x: torch.Tensor,
    grid: tuple[int, int, int],
    offset: tuple[int, int, int],
    theta: float,
) -> torch.Tensor:
    ang = wan_rope_angles(grid, x.shape[-1], offset, theta, x.device)  # (S, D/2)
    cos = torch.cos(ang).float()[None, :, None, :]
    sin = torch.sin(ang).float()[None, :, None, :]
    return rotate_pairs(x, cos, sin)


def rotate_temporal_naive(
    x: torch.Tensor, delta_frames: float | torch.Tensor, theta: float
) -> torch.Tensor:
    cos, sin = temporal_cos_sin(delta_frames, x.shape[-1], theta, x.device)
    return rotate_pairs(x, cos, sin)
