"""fp8 (e4m3) bank storage: half the bytes of bf16, one fp32 scale per (layer, slot, head).

A block's keys (and values) of one layer and head are stored as
``round_e4m3(x / scale)`` with ``scale = max|x| / 448`` (448 is e4m3's largest
finite value), so every stored value uses the full range and no value overflows.
Reading multiplies by the scale. e4m3 keeps 3 mantissa bits: each element's
relative rounding error is at most 2^-4 (6.25%), about 2% RMS for Gaussian data;
``tests/test_fp8.py`` measures what that does to attention outputs.
"""

from __future__ import annotations

import torch

__all__ = ["FP8_DTYPE", "FP8_MAX", "dequantize", "quantize"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize(x: torch.Tensor, reduce_dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``x ~= q.float() * scale`` with ``scale`` the amax over
    ``reduce_dims`` (kept as size-1 dims) divided by ``FP8_MAX``; an all-zero group gets
    scale 1."""
    amax = x.detach().abs().float().amax(dim=reduce_dims, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale
