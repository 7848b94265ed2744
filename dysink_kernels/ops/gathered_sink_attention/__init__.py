"""Gathered-sink attention: bank slots by index plus a local window, one pass."""

from .common import SinkAttnStats
from .op import (
    gathered_sink_attention,
    gathered_sink_attention_general,
    gathered_sink_attention_op,
)

__all__ = [
    "SinkAttnStats",
    "gathered_sink_attention",
    "gathered_sink_attention_general",
    "gathered_sink_attention_op",
]
