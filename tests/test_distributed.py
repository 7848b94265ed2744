"""Head parallelism over torch.distributed (gloo, CPU): 2 and 3 ranks equal one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dysink_kernels import DySinkCache, SinkAttention, _cuda
from dysink_kernels._backends import triton_installed
from dysink_kernels.distributed import HeadParallel
from dysink_kernels.ops.sink_gate import gate_from_means
from dysink_kernels.ops.sink_gate.votes import decide_from_votes, gate_votes_torch

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


def _vote_backends():
    """Every implementation of the per-rank vote count usable here."""
    fns = {"torch": gate_votes_torch}
    if triton_installed():
        from dysink_kernels.ops.sink_gate.triton import gate_votes_triton

        fns["triton"] = gate_votes_triton
    if _cuda.build_info()["built"]:
        from dysink_kernels.ops.sink_gate.csrc import gate_votes_csrc

        fns["csrc"] = gate_votes_csrc
    return fns


@pytest.mark.parametrize("backend", sorted(_vote_backends()))
@pytest.mark.parametrize("scope", ["batch", "sample"])
@pytest.mark.parametrize("uniform", [True, False])
def test_votes_summed_over_head_shards_equal_the_whole_gate(backend, scope, uniform):
    """What head parallelism does, without processes: each shard of heads counts its
    votes (the device entry of ``backend``), the counts are summed (the all-reduce),
    and decide_from_votes gives the gate of all heads at once."""
    count = _vote_backends()[backend]
    g = torch.Generator().manual_seed(21 + uniform)
    B, H, D, P, n = 3, HEADS, 5, 8, 4
    qbar, kbar = torch.randn(2, B, H, D, generator=g)
    means = torch.randn(P, H, D, generator=g)
    if uniform:
        slots = torch.stack([torch.randperm(P, generator=g)[:n] for _ in range(B)])
        slots[:, 1] = -1
    else:
        slots = torch.randint(-1, P, (B, n), generator=g)
    slots = slots.to(torch.int32)
    for world in (1, 2, 3):
        shards = torch.arange(H).chunk(world)
        votes = sum(count(qbar[:, s], kbar[:, s], means[:, s], slots) for s in shards)
        for tau in (0.0, 0.4, 0.6):
            kept, ratio = decide_from_votes(votes, slots, H, tau, scope)
            want = gate_from_means(qbar, kbar, means, slots, tau, scope, backend="naive")
            assert torch.equal(kept, want[0]) and torch.equal(ratio, want[1]), (world, tau)
