"""dysink_kernels: fused kernels and a drop-in module for DySink dynamic frame sinks.

This module is the package's public face: every public name is imported from here
(README "API" lists them).

Importing the package queries no device, compiles nothing and downloads nothing;
backends (Triton, the C++/CUDA extension) load on first use.
"""

from ._registry import available_backends
from ._version import __version__
from .bank import FrameBank
from .cache import AnomalyStats, DySinkCache, SinkLayerStats
from .config import DySinkConfig
from .ops.gathered_sink_attention import SinkAttnStats, gathered_sink_attention
from .ops.rope import (
    apply_wan_rope,
    rotate_temporal,
    wan_rope_angles,
    wan_rope_axis_pairs,
    wan_rope_freqs,
)
from .ops.select_sinks import select_sinks
from .ops.sink_gate import sink_gate
from .sink_attention import SinkAttention

__all__ = [
    "AnomalyStats",
    "DySinkCache",
    "DySinkConfig",
    "FrameBank",
    "SinkAttention",
    "SinkAttnStats",
    "SinkLayerStats",
    "__version__",
    "apply_wan_rope",
    "available_backends",
    "gathered_sink_attention",
    "rotate_temporal",
    "select_sinks",
    "sink_gate",
    "wan_rope_angles",
    "wan_rope_axis_pairs",
    "wan_rope_freqs",
]
