"""Launch configurations of the fused gathered-attention kernel (``triton.py``): one
fixed table per architecture and head dim, with the reasons for each choice beside it
(a fixed table keeps CUDA-graph replays and the kernel report deterministic)."""

from __future__ import annotations

import torch
import triton

__all__ = ["AUTOTUNE_CANDIDATES", "KernelConfig", "dim_bucket", "pick_config"]


class KernelConfig:
    """Launch parameters of the attention kernel (``tma``: K/V through tensor
    descriptors, the bulk tensor copies of sm_90; otherwise pointer loads)."""

    __slots__ = ("block_m", "block_n", "num_stages", "num_warps", "tma")

    def __init__(
        self, block_m: int, block_n: int, num_warps: int, num_stages: int, tma: bool = False
    ) -> None:
        self.block_m, self.block_n = block_m, block_n
        self.num_warps, self.num_stages = num_warps, num_stages
        self.tma = tma

    def as_dict(self) -> dict:
        return {s: getattr(self, s) for s in self.__slots__}

    def __repr__(self) -> str:
        return (
            f"KernelConfig(BLOCK_M={self.block_m}, BLOCK_N={self.block_n}, "
            f"num_warps={self.num_warps}, num_stages={self.num_stages}, tma={self.tma})"
        )


# Block sizes per (compute capability major, padded head dim), chosen with the kernel
# report (python -m dysink_kernels kernels) so that no configuration spills on
# Triton 3.6 or 3.9:
# * Hopper (sm_90): 128-row query tiles over two warpgroups (8 warps) feed wgmma; K/V
#   come through tensor descriptors. D = 128: 64-key tiles in 3 stages.
# * Ampere (sm_80): mma.sync with 8 warps and cp.async pointer loads; at D = 128
#   32-key tiles stay clear of spills, at D = 256 64x64 tiles.
# * Other archs and the CPU interpreter: small tiles, pointer loads.
#
# Waves. At the reference shape (B=1, Sq=4680, H=12) a 128-row tile gives
# 37 x 12 = 444 programs; at one program per SM (about 170 registers x 256 threads,
# 130 KB of shared memory) that is 3.36 waves on an H100's 132 SMs, so the last wave
# runs 48 programs on 132 SMs (~16% of the time idle). What the tile choice can do:
# 64-row tiles give 888 programs at two per SM, again 3.36 waves; 192 or 256 rows
# need 12-16 warps or twice the accumulator registers (and 300 programs are 2.27
# waves, worse). A persistent grid of 132 programs takes the same 444 equal items,
# so it keeps the tail. What removes it is finer work: splitting each program's
# keys in two (888 items, 6.7 waves -> a 4% tail) with a log-sum-exp merge of the
# two halves. That merge needs either a second launch or a per-tile counter with
# which the later half merges both (a workspace and a reset per call); the per-call
# single launch and the absence of state were kept, so the split is not done: the
# expected gain (~12% of the kernel at this shape) is recorded here to be taken
# with a GPU to measure it on.
_CONFIGS: dict[tuple[int, int], KernelConfig] = {
    (9, 64): KernelConfig(128, 128, 8, 3, tma=True),
    (9, 128): KernelConfig(128, 64, 8, 3, tma=True),
    (9, 256): KernelConfig(128, 32, 8, 2, tma=True),
    (8, 64): KernelConfig(128, 64, 8, 3),
    (8, 128): KernelConfig(128, 32, 8, 2),
    (8, 256): KernelConfig(64, 64, 8, 2),
}
# Configurations DYSINK_AUTOTUNE=1 tries (on the GPU, at the first call of each
# shape), per padded head dim. Benchmarks only: timing needs host synchronisation.
AUTOTUNE_CANDIDATES: dict[int, list[KernelConfig]] = {
    64: [KernelConfig(128, 128, 8, 3, True), KernelConfig(128, 64, 8, 3, True),
         KernelConfig(128, 64, 4, 3)],
    128: [
        KernelConfig(128, 64, 8, 3, True), KernelConfig(128, 128, 8, 2, True),
        KernelConfig(128, 64, 8, 4, True), KernelConfig(128, 64, 8, 3),
        KernelConfig(128, 32, 8, 3), KernelConfig(64, 64, 4, 3),
    ],
    256: [KernelConfig(128, 32, 8, 2, True), KernelConfig(64, 64, 8, 2),
          KernelConfig(64, 32, 4, 2)],
}  # fmt: skip
_FALLBACK = KernelConfig(64, 64, 4, 2)
_INTERPRETER = KernelConfig(32, 32, 4, 1)


def dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def pick_config(
    device: torch.device,
    head_dim: int,
    arch: int | None = None,
    *,
    stats: bool = False,
    rotate: bool = False,
    quant: bool = False,
) -> KernelConfig:
    """The launch configuration for ``device`` (or compute capability major ``arch``)
    and this call's variant (statistics, re-positioned slots, fp8 bank)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if arch is None:
        if device.type != "cuda":
            return _INTERPRETER
        arch = torch.cuda.get_device_capability(device)[0]
    if arch >= 10:  # no tuned table beyond Hopper: its tiles, pointer loads
        base = _CONFIGS[(9, dim_bucket(block_d))]
        return KernelConfig(base.block_m, base.block_n, base.num_warps, base.num_stages)
    cfg = _CONFIGS.get((arch, dim_bucket(block_d)), _FALLBACK)
    if arch == 9 and quant and cfg.num_stages > 2:
        # The e4m3 conversion's registers: a third stage spills 8 bytes (Triton 3.6).
        cfg = KernelConfig(cfg.block_m, cfg.block_n, cfg.num_warps, 2, cfg.tma)
    if arch == 8 and (stats or rotate or quant) and cfg.block_n > 16:
        # mma.sync holds whole K/V operands per warp: with statistics, turned queries
        # or the fp8 decode, 32-key tiles spill 8-112 bytes (Triton 3.6/3.9).
        cfg = KernelConfig(cfg.block_m, 16, cfg.num_warps, cfg.num_stages, cfg.tma)
    return cfg
