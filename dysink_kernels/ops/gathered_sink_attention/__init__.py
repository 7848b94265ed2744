"""Gathered-sink attention: bank slots by index plus a local window, one pass."""

from .common import SinkAttnStats
from .op import gathered_attention, gathered_sink_attention

__all__ = ["SinkAttnStats", "gathered_attention", "gathered_sink_attention"]
