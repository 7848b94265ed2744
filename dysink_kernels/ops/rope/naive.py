"""Wan 3D rotary position embedding (plain PyTorch).

Each head's ``D`` channels form ``D/2`` complex pairs over adjacent channels
``(2j, 2j+1)``. Pairs are split between three axes, as in Wan2.1: with
``c = D // 6``, the first ``D/2 - 2c`` pairs rotate with the frame (temporal)
position, the next ``c`` with the row, the last ``c`` with the column (D=128:
pairs 0-21 temporal, 22-42 height, 43-63 width). Pair ``j`` of an axis with
``d_axis`` channels turns at frequency ``theta ** (-2 j / d_axis)``.

Angles are formed in fp64 and the rotation runs in fp32; results come back in
the input dtype.
"""

from __future__ import annotations

import torch

__all__ = [
    "apply_wan_rope_naive",
    "rotate_temporal_naive",
    "wan_rope_angles",
    "wan_rope_axis_pairs",
    "wan_rope_freqs",
]


def wan_rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Number of complex pairs on the (temporal, height, width) axes."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    c = head_dim // 6
    return head_dim // 2 - 2 * c, c, c


def wan_rope_freqs(
    head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis angular frequencies (fp64): ``theta ** (-2 j / d_axis)``."""
    out = []
    for pairs in wan_rope_axis_pairs(head_dim):
        d_axis = 2 * pairs
        j = torch.arange(pairs, dtype=torch.float64, device=device)
        out.append(theta ** (-2.0 * j / d_axis) if pairs else j)
    return out[0], out[1], out[2]


def wan_rope_angles(
    grid: tuple[int, int, int],
    head_dim: int,
    offset: tuple[int, int, int] = (0, 0, 0),
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(f*h*w, D/2)`` fp64 angles for tokens in (frame, row, column) order.

    ``offset`` gives the absolute (frame, row, column) of the grid's first token.
    """
    f, h, w = grid
    w_t, w_h, w_w = wan_rope_freqs(head_dim, theta, device)
    pos_t = torch.arange(f, dtype=torch.float64, device=device) + offset[0]
    pos_h = torch.arange(h, dtype=torch.float64, device=device) + offset[1]
    pos_w = torch.arange(w, dtype=torch.float64, device=device) + offset[2]
    a_t = (pos_t[:, None] * w_t[None, :])[:, None, None, :].expand(f, h, w, -1)
    a_h = (pos_h[:, None] * w_h[None, :])[None, :, None, :].expand(f, h, w, -1)
    a_w = (pos_w[:, None] * w_w[None, :])[None, None, :, :].expand(f, h, w, -1)
    return torch.cat([a_t, a_h, a_w], dim=-1).reshape(f * h * w, head_dim // 2)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x (..., D)`` by angles given as cos/sin ``(..., D/2)``."""
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_wan_rope_naive(
    x: torch.Tensor,
    grid: tuple[int, int, int],
    offset: tuple[int, int, int],
    theta: float,
) -> torch.Tensor:
    ang = wan_rope_angles(grid, x.shape[-1], offset, theta, x.device)  # (S, D/2)
    cos = torch.cos(ang).float()[None, :, None, :]
    sin = torch.sin(ang).float()[None, :, None, :]
    return _rotate_pairs(x, cos, sin)


def rotate_temporal_naive(
    x: torch.Tensor, delta_frames: float | torch.Tensor, theta: float
) -> torch.Tensor:
    D = x.shape[-1]
    _n_t, n_h, n_w = wan_rope_axis_pairs(D)
    w_t = wan_rope_freqs(D, theta, x.device)[0]
    if isinstance(delta_frames, torch.Tensor):
        delta = delta_frames.to(device=x.device, dtype=torch.float64)
    else:  # a fill on the device, not a host-to-device copy
        delta = torch.full((), float(delta_frames), dtype=torch.float64, device=x.device)
    ang_t = delta[..., None] * w_t  # (*batch, n_t)
    zeros = torch.zeros(*ang_t.shape[:-1], n_h + n_w, dtype=torch.float64, device=x.device)
    ang = torch.cat([ang_t, zeros], dim=-1)[..., None, :]  # broadcast over heads
    return _rotate_pairs(x, torch.cos(ang).float(), torch.sin(ang).float())
