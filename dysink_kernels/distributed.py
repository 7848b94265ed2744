"""Head parallelism over ``torch.distributed`` (Ulysses-style, as xDiT and other video
DiT runtimes lay attention out across GPUs).

After the runtime's all-to-all, each rank holds every token of ``H / world`` heads.
Everything DySink does per head stays on the rank: its window, its bank K/V, its
attention. Two things couple heads and are reduced across ranks:

* the gate's votes: each rank counts the votes of its heads; one all-reduce sums
  the counts (slots and the static-sink group together) before the decisions, so
  every rank drops exactly what a single process would;
* the ``"mean_key"`` feature: per-head mean keys are all-gathered in head order
  before normalisation, so retrieval and dedup see the same feature on every rank.

External features must be passed identically on every rank (they usually come from
one encoder pass). Retrieval, dedup and slot choices are then identical on all
ranks without further communication. The same code runs on gloo (CPU) and NCCL.

Example::

    hp = HeadParallel(group)                       # after dist.init_process_group
    cfg_local = hp.local_config(cfg)               # num_heads = cfg.num_heads // world
    cache = hp.make_cache(cfg, batch_size=1, device="cuda", dtype=torch.bfloat16)
    out = attn(q_local, k_local, v_local, cache=cache, layer=i)   # (B, S, H/world, D)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .cache import DySinkCache
from .config import DySinkConfig

__all__ = ["HeadParallel"]


class HeadParallel:
    """Shards heads over a process group and provides the two cross-rank reductions.

    Args:
        group: the process group (default: the world).
        total_heads: attention heads of the model; must divide evenly by the group size.
    """

    def __init__(self, total_heads: int, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("HeadParallel needs torch.distributed initialised first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if total_heads % self.world:
            raise ValueError(f"{total_heads} heads cannot be split evenly over {self.world} ranks")
        self.total_heads = total_heads
        self.local_heads = total_heads // self.world
        self.head_start = self.rank * self.local_heads

    def local_config(self, config: DySinkConfig) -> DySinkConfig:
        """``config`` with this rank's head count."""
        if config.num_heads != self.total_heads:
            raise ValueError(
                f"config has {config.num_heads} heads, this HeadParallel {self.total_heads}"
            )
        return dataclasses.replace(config, num_heads=self.local_heads)

    def make_cache(self, config: DySinkConfig, **kwargs) -> DySinkCache:
        """A ``DySinkCache`` for this rank's heads of the full-model ``config``."""
        return DySinkCache(self.local_config(config), parallel=self, **kwargs)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a full ``(..., H, D)`` tensor (for callers holding all heads)."""
        return x[..., self.head_start : self.head_start + self.local_heads, :]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks (in place, asynchronous on the device with NCCL)."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, local_heads * D)`` per rank -> ``(B, total_heads * D)`` in head order."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts, dim=1).flatten(1)

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., local_heads, D)`` per rank -> ``(..., total_heads, D)`` (for outputs)."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.stack(parts, dim=-3).flatten(-3, -2)
