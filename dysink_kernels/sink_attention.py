"""The drop-in module ``SinkAttention``.

README's quick start imports the module with its cache and config from here::

    from dysink_kernels.sink_attention import DySinkConfig, DySinkCache, SinkAttention

Everything else the package offers is imported from ``dysink_kernels``.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import DySinkCache
from .config import DySinkConfig


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
        if self.config not in (None, cache.config):  # identity first, then equality
            raise ValueError(
                "this SinkAttention was built for another DySinkConfig than the cache's"
            )
        return cache.attend(layer, q, k, v, commit=commit)

    def extra_repr(self) -> str:
        return "" if self.config is None else f"top_k={self.config.top_k}, tau={self.config.tau}"
