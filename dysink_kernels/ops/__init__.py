"""The package's ops, one folder each, named as the op and its public function.

Each folder holds ``naive.py`` (the plain PyTorch oracle), one file per other backend
(``sdpa.py``, ``triton.py``, ``csrc.py``) and ``op.py``: the argument checks, the
``torch.library`` custom op with its fake, and the one resolution of ``backend``.
Ops and backends import neither the cache, nor the tools, nor another op's oracle.
"""

from .gathered_sink_attention import SinkAttnStats, gathered_sink_attention
from .rope import (
    apply_wan_rope,
    rotate_temporal,
    wan_rope_angles,
    wan_rope_axis_pairs,
    wan_rope_freqs,
)
from .select_sinks import select_sinks
from .sink_gate import sink_gate

__all__ = [
    "SinkAttnStats",
    "apply_wan_rope",
    "gathered_sink_attention",
    "rotate_temporal",
    "select_sinks",
    "sink_gate",
    "wan_rope_angles",
    "wan_rope_axis_pairs",
    "wan_rope_freqs",
]
