"""Sink anomaly gate: drop retrieved entries most heads would collapse onto."""

from .op import gate_from_means, gate_votes, sink_gate, sink_gate_op

__all__ = ["gate_from_means", "gate_votes", "sink_gate", "sink_gate_op"]
