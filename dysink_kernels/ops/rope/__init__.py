"""Wan 3D rotary position embedding: the ops and their tables."""

from .op import apply_wan_rope, rotate_temporal
from .tables import wan_rope_angles, wan_rope_axis_pairs, wan_rope_freqs

__all__ = [
    "apply_wan_rope",
    "rotate_temporal",
    "wan_rope_angles",
    "wan_rope_axis_pairs",
    "wan_rope_freqs",
]
