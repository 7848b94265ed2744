"""Sizes of every benchmark (shapes and plans) and the synthetic pipeline inputs.

Sizes depend on the device (:func:`plan_for`): the Wan2.1-1.3B reference shapes on a
GPU, small ones on CPU, where the numbers show overheads rather than kernel speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from dysink_kernels import DySinkConfig


# ----------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class AttnShape:
    """One attention call: ``window`` local keys plus ``slots`` bank slots of ``slot_tokens``."""

    batch: int
    sq: int
    heads: int
    head_dim: int
    window: int
    slots: int
    slot_tokens: int
    dtype: torch.dtype

    @property
    def n_keys(self) -> int:
        return self.window + self.slots * self.slot_tokens

    @property
    def layout(self) -> str:
        return "gathered" if self.slots else "contiguous"

    def contiguous(self) -> AttnShape:
        """The same keys as one contiguous KV."""
        return replace(self, window=self.n_keys, slots=0)

    def label(self) -> str:
        keys = f"{self.window}+{self.slots}x{self.slot_tokens}" if self.slots else f"{self.window}"
        return f"B={self.batch} Sq={self.sq} H={self.heads} D={self.head_dim} Sk={keys}"

    def flops(self) -> float:
        """``4 * B * H * Sq * Sk * D`` (QK^T and PV), as the Triton module's ``flops``."""
        return 4.0 * self.batch * self.heads * self.sq * self.n_keys * self.head_dim

    def io_bytes(self) -> int:
        """Least traffic: Q and O once, each key and value once."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_token = self.batch * self.heads * self.head_dim * elem
        return per_token * (2 * self.sq + 2 * self.n_keys)


@dataclass(frozen=True)
class PipelineShape:
    """A layer stack driven block by block (q/k/v random, RoPE already "applied")."""

    layers: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    frames_per_block: int = 3
    local_frames: int = 9
    top_k: int = 2
    steps: int = 4
    feature_dim: int = 64
    batch: int = 1
    dtype: torch.dtype = torch.bfloat16
    sink_frames: int = 0

    @property
    def block_tokens(self) -> int:
        return self.frames_per_block * self.tokens_per_frame

    def label(self) -> str:
        sinks = f" sinks={self.sink_frames}" if self.sink_frames else ""
        return (
            f"layers={self.layers} H={self.heads} D={self.head_dim} "
            f"T={self.tokens_per_frame} block={self.frames_per_block}f L={self.local_frames}"
            f"{sinks} k={self.top_k} steps={self.steps}+1 F={self.feature_dim}"
        )

    def config(self, **overrides) -> DySinkConfig:
        return DySinkConfig(
            num_layers=self.layers,
            num_heads=self.heads,
            head_dim=self.head_dim,
            tokens_per_frame=self.tokens_per_frame,
            frames_per_block=self.frames_per_block,
            local_frames=self.local_frames,
            sink_frames=self.sink_frames,
            top_k=self.top_k,
            **overrides,
        )

    def start_block(self, entries: int) -> int:
        """First block after a synthetic prefill of ``entries`` entries (frames 0, 3, ...):
        late enough that the widest exclusion ``[c - L_eff, c)`` leaves them all eligible
        and the window is full."""
        widest = self.local_frames + self.top_k * self.frames_per_block
        return entries + math.ceil(widest / self.frames_per_block) + 1

    def entry_bytes(self) -> int:
        """K+V of one block over all layers (one bank entry)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.batch * self.block_tokens * self.heads * self.head_dim * elem


@dataclass(frozen=True)
class SmallOpsShape:
    slots: int
    feature_dim: int
    query_blocks: int
    top_k: int
    batch: int
    sq: int
    heads: int
    head_dim: int
    window: int
    insert_layers: int
    insert_tokens: int
    dtype: torch.dtype

    def entry_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.insert_layers * self.insert_tokens * self.heads * self.head_dim * elem

    def label(self, op: str) -> str:
        if op == "select_sinks":
            return (
                f"P={self.slots} F={self.feature_dim} M={self.query_blocks} k={self.top_k} "
                f"B={self.batch}"
            )
        if op == "sink_gate":
            return (
                f"B={self.batch} Sq={self.sq} Sk={self.window} H={self.heads} "
                f"D={self.head_dim} P={self.slots} n={self.top_k}"
            )
        if op == "gate_from_means":
            return f"B={self.batch} H={self.heads} D={self.head_dim} P={self.slots} n={self.top_k}"
        return (
            f"layers={self.insert_layers} tokens={self.insert_tokens} H={self.heads} "
            f"D={self.head_dim} entry={self.entry_bytes() / 1e6:.1f} MB"
        )


@dataclass(frozen=True)
class ModelShape:
    """A whole model driven block by block (``tools.models.wan_shaped_dit``); the
    defaults are Wan2.1-T2V-1.3B at 480p: 30 layers of dim 1536 (12 heads x 128),
    feed-forward 8960, 1,560 tokens per latent frame (30 x 52), a 512-token text
    context of 4,096 features, 3 frames per block, 4 denoising steps + 1 clean pass."""

    layers: int = 30
    heads: int = 12
    head_dim: int = 128
    grid_hw: tuple[int, int] = (30, 52)
    ffn_dim: int = 8960
    latent_channels: int = 64
    text_tokens: int = 512
    text_dim: int = 4096
    frames_per_block: int = 3
    steps: int = 4
    bank_entries: int = 16
    feature_dim: int = 1024
    dtype: torch.dtype = torch.bfloat16

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    def label(self) -> str:
        return (
            f"layers={self.layers} dim={self.heads * self.head_dim} ({self.heads}x"
            f"{self.head_dim}) ffn={self.ffn_dim} T={self.tokens_per_frame} "
            f"block={self.frames_per_block}f text={self.text_tokens}x{self.text_dim} "
            f"steps={self.steps}+1"
        )

    def pipeline(self, *, local_frames: int, top_k: int, sink_frames: int) -> PipelineShape:
        """The attention layout of this model for one protocol setting."""
        return PipelineShape(
            layers=self.layers,
            heads=self.heads,
            head_dim=self.head_dim,
            tokens_per_frame=self.tokens_per_frame,
            frames_per_block=self.frames_per_block,
            local_frames=local_frames,
            top_k=top_k,
            steps=self.steps,
            feature_dim=self.feature_dim,
            dtype=self.dtype,
            sink_frames=sink_frames,
        )


# Reduced dims for CPU: every part of the model and every case, at toy size.
CPU_MODEL = ModelShape(
    layers=2, heads=2, head_dim=32, grid_hw=(2, 4), ffn_dim=128, latent_channels=16,
    text_tokens=8, text_dim=32, feature_dim=32, dtype=torch.float32,
)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Every size and repetition count of one run."""

    name: str
    attn: AttnShape
    pipeline: PipelineShape
    pipeline_entries: int
    scaling: PipelineShape
    bank_points: tuple[int, ...]
    local_points: tuple[int, ...]
    topk_points: tuple[int, ...]
    sweep_entries: int
    small: SmallOpsShape
    n_sets: int
    attn_rounds: int
    pipeline_rounds: int
    scaling_rounds: int
    small_rounds: int
    warmup: int = 1
    model: ModelShape | None = None
    model_rounds: int = 3


# The reference shapes: Wan2.1-1.3B attention, 4,680 queries against 23,400
# keys as 14,040 window + 2 slots of 4,680.
WAN_LAYER = PipelineShape(
    layers=30, heads=12, head_dim=128, tokens_per_frame=1560, feature_dim=1024
)
GPU_PLAN = Plan(
    name="gpu",
    attn=AttnShape(1, 4680, 12, 128, 14040, 2, 4680, torch.bfloat16),
    pipeline=replace(WAN_LAYER, layers=4),
    pipeline_entries=8,
    scaling=replace(WAN_LAYER, layers=2),
    bank_points=(0, 16, 64, 256),
    local_points=(3, 9, 15),
    topk_points=(0, 1, 2, 4),
    sweep_entries=8,
    small=SmallOpsShape(64, 1024, 3, 2, 1, 4680, 12, 128, 23400, 30, 4680, torch.bfloat16),
    n_sets=3,
    attn_rounds=20,
    pipeline_rounds=5,
    scaling_rounds=3,
    small_rounds=50,
    model=ModelShape(),
    model_rounds=3,
)
# CPU: the reference's proportions (block = 3 frames, window 9 frames + 2 slots) at
# 32 tokens per frame, fp32; the scaling sweeps on a tiny stack.
CPU_PLAN = Plan(
    name="cpu",
    attn=AttnShape(1, 96, 4, 64, 288, 2, 96, torch.float32),
    pipeline=PipelineShape(2, 4, 64, 32, feature_dim=64, dtype=torch.float32),
    pipeline_entries=8,
    scaling=PipelineShape(2, 2, 16, 8, feature_dim=32, dtype=torch.float32),
    bank_points=(0, 1, 4, 16, 64, 256),
    local_points=(3, 6, 9, 12, 15),
    topk_points=(0, 1, 2, 4),
    sweep_entries=8,
    small=SmallOpsShape(64, 64, 3, 2, 1, 96, 4, 64, 480, 2, 96, torch.float32),
    n_sets=1,
    attn_rounds=200,
    pipeline_rounds=60,
    scaling_rounds=40,
    small_rounds=500,
    model=CPU_MODEL,
    model_rounds=10,
)
CPU_QUICK_PLAN = replace(
    CPU_PLAN,
    name="cpu-quick",
    bank_points=(0, 16, 256),
    local_points=(3, 9, 15),
    topk_points=(0, 2, 4),
    attn_rounds=20,
    pipeline_rounds=10,
    scaling_rounds=5,
    small_rounds=50,
    model_rounds=3,
)
# Every code path on the smallest shapes (gpu_suite.py --dry-run).
DRY_PLAN = Plan(
    name="dry-run",
    attn=AttnShape(1, 48, 2, 32, 144, 2, 48, torch.float32),
    pipeline=PipelineShape(2, 2, 32, 16, feature_dim=32, dtype=torch.float32),
    pipeline_entries=4,
    scaling=PipelineShape(2, 2, 16, 8, feature_dim=32, dtype=torch.float32),
    bank_points=(0, 4, 16),
    local_points=(3, 9),
    topk_points=(0, 2),
    sweep_entries=4,
    small=SmallOpsShape(16, 32, 3, 2, 1, 48, 2, 32, 144, 2, 48, torch.float32),
    n_sets=2,
    attn_rounds=2,
    pipeline_rounds=2,
    scaling_rounds=1,
    small_rounds=2,
    model=replace(CPU_MODEL, layers=1, bank_entries=4),
    model_rounds=1,
)


def plan_for(device: torch.device | str, *, quick: bool = False, dry: bool = False) -> Plan:
    """The sizes for ``device``: reference shapes on CUDA, small ones on CPU."""
    if dry:
        return DRY_PLAN
    if torch.device(device).type == "cuda":
        return GPU_PLAN
    return CPU_QUICK_PLAN if quick else CPU_PLAN


# ----------------------------------------------------------------------------- pipelines
class Workload:
    """Synthetic q/k/v for every call and one feature per block, shared by every
    pipeline so each sees the same inputs (stateless: indexed by call / block).

    Features are random unit vectors, distinct for ``n_features`` blocks: no block is
    deduplicated, so every block pays for storing its entry."""

    def __init__(
        self,
        shape: PipelineShape,
        device: torch.device,
        *,
        n_sets: int = 2,
        n_features: int = 64,
        seed: int = 0,
    ) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        size = (shape.batch, shape.block_tokens, shape.heads, shape.head_dim)
        self._qkv = [
            tuple(torch.randn(size, generator=g, device=device, dtype=shape.dtype) for _ in "qkv")
            for _ in range(n_sets)
        ]
        feats = torch.randn(n_features, shape.batch, shape.feature_dim, generator=g, device=device)
        self._features = list(F.normalize(feats, dim=-1))

    def qkv(self, call: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._qkv[call % len(self._qkv)]

    def feature(self, block: int) -> torch.Tensor:
        """``(B, F)`` L2-normalised block feature (the caller's encoder output)."""
        return self._features[block % len(self._features)]
