"""apply_wan_rope and rotate_temporal: argument checks and one backend resolution.

Plain PyTorch (``naive.py``, on ``tables.py``): ``torch.compile`` traces them
directly, so they need no custom op.
"""

from __future__ import annotations

import torch

from ..._registry import register_backend, resolve_backend
from ..._validate import check_tensor

for _op in ("apply_wan_rope", "rotate_temporal"):
    register_backend(_op, "naive", f"{__package__}.naive:{_op}_naive")


def apply_wan_rope(
    x: torch.Tensor,
    grid: tuple[int, int, int],
    offset: tuple[int, int, int] = (0, 0, 0),
    theta: float = 10000.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate ``x (B, S, H, D)`` with Wan 3D RoPE, tokens in (frame, row, column) order.

    ``grid`` is ``(f, h, w)``; ``offset`` the absolute (frame, row, column) of the
    first token, e.g. ``(first_frame_of_block, 0, 0)``. Returns ``x.dtype``.
    """
    check_tensor(x, "x", 4, dtypes=None)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    f, h, w = grid
    if x.shape[1] != f * h * w:
        raise ValueError(
            f"x.shape[1] must be f*h*w = {f * h * w} for grid {tuple(grid)}, got {x.shape[1]}"
        )
    _, fn = resolve_backend("apply_wan_rope", backend, x.device)
    return fn(x, tuple(grid), tuple(offset), float(theta))


def rotate_temporal(
    x: torch.Tensor,
    delta_frames: float | torch.Tensor,
    theta: float = 10000.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Shift the temporal position of rotated ``x (..., H, D)`` by ``delta_frames`` frames.

    Only the temporal pairs turn, by ``exp(i * w_j * delta)``; height and width
    pairs are untouched, so ``rotate_temporal(apply_wan_rope(x, g, (p, r, c)), d)``
    equals ``apply_wan_rope(x, g, (p + d, r, c))``. A tensor ``delta_frames`` is
    broadcast against ``x.shape[:-2]`` (e.g. ``(B, 1)`` per sample, ``(B, S)`` per
    token); it stays on the device (no host sync).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError("x must be a floating tensor of shape (..., H, D)")
    _, fn = resolve_backend("rotate_temporal", backend, x.device)
    return fn(x, delta_frames, float(theta))
