"""Bank memory at the reference shape (computed from the shapes, not measured)."""

from __future__ import annotations

from dataclasses import replace

import torch

from measure import Recorder
from plans import WAN_LAYER, PipelineShape

# ----------------------------------------------------------------------------- memory
VIDEO_FPS = 16
PIXEL_FRAMES_PER_LATENT = 4  # Wan2.1's VAE: 4 pixel frames per latent frame


def add_memory_rows(rec: Recorder, shape: PipelineShape = WAN_LAYER) -> None:
    """Bank memory at the reference shape, bf16 and fp8 (computed from the shapes, not
    measured)."""
    s = replace(shape, dtype=torch.bfloat16)
    cfg = s.config()
    entry = s.entry_bytes()
    latent_per_minute = 60 * VIDEO_FPS // PIXEL_FRAMES_PER_LATENT
    blocks_per_minute = latent_per_minute // s.frames_per_block
    elem = 2
    fp8_entry = entry // 2 + s.layers * 2 * s.heads * 4  # bytes + fp32 K/V scales
    ring = 2 * s.layers * s.batch * cfg.ring_frames * s.tokens_per_frame * s.heads * s.head_dim
    ref_cache_tokens = (s.local_frames + s.top_k * s.frames_per_block) * s.tokens_per_frame
    ref_cache = 2 * s.layers * ref_cache_tokens * s.heads * s.head_dim * elem
    shape_label = f"Wan2.1-1.3B: {s.layers} layers, H={s.heads}, D={s.head_dim}, " + (
        f"{s.tokens_per_frame} tokens/frame, {s.frames_per_block} frames/block"
    )
    rows = [
        ("bank_entry", "bf16", entry, "K+V of every layer for one block (one entry)"),
        ("bank_entry_mean_k", "fp32", s.layers * s.heads * s.head_dim * 4,
         "per-layer mean keys the package keeps with each entry (for the gate)"),
        ("bank_per_minute", "bf16", blocks_per_minute * entry,
         f"{VIDEO_FPS} fps: {60 * VIDEO_FPS} pixel frames = {latent_per_minute} latent frames = "
         f"{blocks_per_minute} blocks; at most one entry per block, fewer with dedup"),
        ("reference_h2d_per_block", "bf16", s.top_k * entry,
         f"the reference copies its top_k={s.top_k} entries host->device every block"),
        ("window_ring", "bf16", ring * elem,
         f"the package's window ring: {cfg.ring_frames} frames x every layer, K+V"),
        ("reference_kv_cache", "bf16", ref_cache,
         f"the reference's KV cache: {ref_cache_tokens} tokens x every layer, K+V"),
        ("bank_entry", "fp8_e4m3", fp8_entry,
         "bank_dtype=torch.float8_e4m3fn: 1 byte per element plus fp32 K and V scales per "
         "(layer, head)"),
        ("bank_per_minute", "fp8_e4m3", blocks_per_minute * fp8_entry,
         "as bank_per_minute, with the fp8 bank"),
    ]  # fmt: skip
    for case, dtype, value, note in rows:
        rec.add(
            suite="memory",
            case=case,
            provider="computed",
            shape=shape_label,
            dtype=dtype,
            kind="computed",
            value=value,
            unit="bytes" if value is not None else None,
            note=note,
        )
