"""Head parallelism over torch.distributed (gloo, CPU): 2 and 3 ranks equal one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dysink_kernels import DySinkCache, SinkAttention
from dysink_kernels.distributed import HeadParallel

from harness import features, run, tiny_config

HEADS = 6  # splits over 2 and 3 ranks
BLOCKS = 7
CONFIGS = {
    "external": dict(num_heads=HEADS, tau=0.5, max_entries=3),
    "mean_key-sinks": dict(
        num_heads=HEADS, tau=0.5, feature="mean_key", dedup=0.9, sink_frames=3, local_frames=12
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _factory(cfg, batch, log, hp=None):
    """Drive a cache (one rank's heads when ``hp`` is given); logs slot-level decisions."""

    def factory():
        if hp is None:
            cache = DySinkCache(cfg, batch_size=batch, dtype=torch.float32)
            attn = SinkAttention(cfg)
            shard = gather = lambda x: x
        else:
            cache = hp.make_cache(cfg, batch_size=batch, dtype=torch.float32)
            attn = SinkAttention(hp.local_config(cfg))
            shard, gather = hp.shard, hp.gather_heads

        def attend(layer, q, k, v, commit):
            o = attn(shard(q), shard(k), shard(v), cache=cache, layer=layer, commit=commit)
            st = cache.stats(layer)
            sinks = None if st.sink_kept is None else st.sink_kept.tolist()
            log.append((cache.block, layer, commit, st.kept_idx.tolist(), sinks))
            return gather(o)

        return cache.begin_block, attend, cache.end_block

    return factory


def _worker(rank: int, world: int, port: int, name: str, batch: int, results) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = tiny_config(**CONFIGS[name])
        log: list = []
        out = run(cfg, batch, BLOCKS, _factory(cfg, batch, log, HeadParallel(HEADS)),
                  features(batch, BLOCKS))  # fmt: skip
        results[rank] = (out, log)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_head_parallel_equals_single_process(world, name):
    batch = 2
    cfg = tiny_config(**CONFIGS[name])
    feats = features(batch, BLOCKS)
    single_log: list = []
    single = run(cfg, batch, BLOCKS, _factory(cfg, batch, single_log), feats)
    assert any(-1 in row for _, _, commit, kept, _ in single_log if not commit for row in kept), (
        "the gate never dropped a slot: the comparison would prove little"
    )

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), name, batch, results), nprocs=world, join=True)
    for rank in range(world):
        out, log = results[rank]
        torch.testing.assert_close(out, single, atol=1e-5, rtol=1e-5)
        assert log == single_log, f"rank {rank} decided differently from one process"
