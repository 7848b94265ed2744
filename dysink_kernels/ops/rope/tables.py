"""Wan 3D rotary position embedding: frequency and angle tables, the pair rotation.

Shared by the RoPE op and by every op that turns keys by a RoPE angle (the
re-positioned sinks of gathered attention), so that none of them imports another
op's oracle.

Each head's ``D`` channels form ``D/2`` complex pairs over adjacent channels
``(2j, 2j+1)``. Pairs are split between three axes, as in Wan2.1: with
``c = D // 6``, the first ``D/2 - 2c`` pairs rotate with the frame (temporal)
position, the next ``c`` with the row, the last ``c`` with the column (D=128:
pairs 0-21 temporal, 22-42 height, 43-63 width). Pair ``j`` of an axis with
``d_axis`` channels turns at frequency ``theta ** (-2 j / d_axis)``. Angles are
formed in fp64.
"""

from __future__ import annotations

import torch

__all__ = [
    "rotate_pairs",
    "temporal_cos_sin",
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
    n_t, n_h = w_t.shape[0], w_h.shape[0]
    ang = torch.empty(f, h, w, head_dim // 2, dtype=torch.float64, device=device)
    ang[..., :n_t] = (pos_t[:, None] * w_t[None, :])[:, None, None, :]
    ang[..., n_t : n_t + n_h] = (pos_h[:, None] * w_h[None, :])[None, :, None, :]
    ang[..., n_t + n_h :] = (pos_w[:, None] * w_w[None, :])[None, None, :, :]
    return ang.reshape(f * h * w, head_dim // 2)


def temporal_cos_sin(
    delta_frames: float | torch.Tensor, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` of a temporal shift by ``delta_frames``: ``(*delta.shape, 1, D/2)``
    (a singleton for the heads), the height and width pairs at angle 0."""
    _, n_h, n_w = wan_rope_axis_pairs(head_dim)
    w_t = wan_rope_freqs(head_dim, theta, device)[0]
    if isinstance(delta_frames, torch.Tensor):
        delta = delta_frames.to(device=device, dtype=torch.float64)
    else:  # a fill on the device, not a host-to-device copy
        delta = torch.full((), float(delta_frames), dtype=torch.float64, device=device)
    n_t = w_t.shape[0]
    ang = torch.zeros(*delta.shape, n_t + n_h + n_w, dtype=torch.float64, device=device)
    ang[..., :n_t] = delta[..., None] * w_t
    ang = ang[..., None, :]  # broadcast over heads
    return torch.cos(ang).float(), torch.sin(ang).float()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x (..., D)`` by angles given as cos/sin
    ``(..., D/2)`` (fp32 arithmetic); returns ``x.dtype``."""
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
