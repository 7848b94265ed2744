"""The drop-in module: ``SinkAttention`` plus everything a video model needs with it.

Import from here (or from ``dysink_kernels``)::

    from dysink_kernels.sink_attention import DySinkConfig, DySinkCache, SinkAttention
"""

from __future__ import annotations

import torch
from torch import nn

from .bank import FrameBank
from .cache import AnomalyStats, DySinkCache, SinkLayerStats
from .config import DySinkConfig
from .ops import (
    SinkAttnStats,
    apply_wan_rope,
    gathered_sink_attention,
    rotate_temporal,
    select_sinks,
    sink_gate,
)

__all__ = [
    "AnomalyStats",
    "DySinkCache",
    "DySinkConfig",
    "FrameBank",
    "SinkAttention",
    "SinkAttnStats",
    "SinkLayerStats",
    "apply_wan_rope",
    "gathered_sink_attention",
    "rotate_temporal",
    "select_sinks",
    "sink_gate",
]


class SinkAttention(nn.Module):
    """Self-attention over [kept retrieved sinks] + [static sinks] + [local window].

    Has no parameters: projections, norms and RoPE stay in the caller's model. Call
    it with the block's rotated ``q, k, v`` of shape ``(B, block_tokens, H, D)``:

    * ``commit=False`` (a denoising step): gates the block's retrieved bank slots
      for this layer against the window, then attends the kept slots, the static
      sinks and the window (previous frames held by the cache plus this ``k``).
      Writes nothing.
    * ``commit=True`` (the clean pass at t=0): attends the static sinks and the
      window (no retrieved slots, as the reference) and writes this block's
      ``k, v`` into the window ring.

    Returns the attention output ``(B, Sq, H, D)`` in the input dtype.
    """

    def __init__(self, config: DySinkConfig | None = None) -> None:
        super().__init__()
        self.config = config

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        cache: DySinkCache,
        layer: int,
        commit: bool = False,
    ) -> torch.Tensor:
        if not isinstance(cache, DySinkCache):
            raise TypeError(f"cache must be a DySinkCache, got {type(cache).__name__}")
        if self.config is not None and self.config != cache.config:
            raise ValueError(
                "this SinkAttention was built for another DySinkConfig than the cache's"
            )
        return cache.attend(layer, q, k, v, commit=commit)

    def extra_repr(self) -> str:
        return "" if self.config is None else f"top_k={self.config.top_k}, tau={self.config.tau}"
