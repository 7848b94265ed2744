"""Wan 3D rotary position embedding helpers."""

from .naive import wan_rope_angles, wan_rope_axis_pairs, wan_rope_freqs
from .op import apply_wan_rope, rotate_temporal

__all__ = [
    "apply_wan_rope",
    "rotate_temporal",
    "wan_rope_angles",
    "wan_rope_axis_pairs",
    "wan_rope_freqs",
]
