"""The package's ops, one folder each: ``naive.py`` (oracle), backends, ``op.py`` (public)."""

from .gathered_sink_attention import SinkAttnStats, gathered_sink_attention
from .rope import apply_wan_rope, rotate_temporal
from .select_sinks import select_sinks
from .sink_gate import sink_gate

__all__ = [
    "SinkAttnStats",
    "apply_wan_rope",
    "gathered_sink_attention",
    "rotate_temporal",
    "select_sinks",
    "sink_gate",
]
