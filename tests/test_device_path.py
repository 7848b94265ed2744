"""The per-block path on the device: torch.library ops, no host syncs, torch.compile,
CUDA graphs (GPU only)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dysink_kernels import DySinkCache, DySinkConfig, SinkAttention, available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPS = ("gathered_sink_attention", "select_sinks", "sink_gate", "gate_from_means", "bank_insert")


def backends_for_module() -> list[str]:
    """Backends that implement every op the cache uses, on this device."""
    names = set(available_backends(OPS[0], DEVICE))
    for op in OPS[1:]:
        names &= set(available_backends(op, DEVICE))
    return sorted(names)


class SyncCounter(TorchDispatchMode):
    """Counts host reads of device values; fails on ops whose output size needs one."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "_local_scalar_dense" in name:
            self.calls.append(name)
        if name.startswith(("aten.nonzero", "aten.item")):
            raise AssertionError(f"{name} on the per-block path")
        return func(*args, **(kwargs or {}))


def small_config(**kw) -> DySinkConfig:
    base = dict(num_layers=2, num_heads=2, head_dim=16, tokens_per_frame=8, max_entries=3)
    base.update(kw)
    return DySinkConfig(**base)


def run_block(cache, attn, g, steps=2, dtype=torch.float32):
    cfg = cache.config
    shape = (cache.batch_size, cfg.block_tokens, cfg.num_heads, cfg.head_dim)

    def qkv():
        return tuple(torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(3))

    cache.begin_block()
    for _ in range(steps):
        for layer in range(cfg.num_layers):
            attn(*qkv(), cache=cache, layer=layer)
    for layer in range(cfg.num_layers):
        attn(*qkv(), cache=cache, layer=layer, commit=True)
    feat = torch.randn(cache.batch_size, 6, generator=g).to(DEVICE)
    cache.end_block(None if cfg.feature == "mean_key" else feat)


@pytest.mark.parametrize("backend", backends_for_module())
@pytest.mark.parametrize("kw", [{}, {"sink_frames": 3, "local_frames": 12, "feature": "mean_key"}])
def test_no_host_sync_in_steady_state(backend, kw):
    """10 steady-state blocks (insert, dedup, eviction, retrieval, gate, attention): 0 syncs."""
    cfg = small_config(dedup=0.9, **kw)
    cache = DySinkCache(cfg, batch_size=2, device=DEVICE, dtype=torch.float32, backend=backend)
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # past the window widening, the bank is full (max_entries=3)
        run_block(cache, attn, g)
    counter = SyncCounter()
    with counter:
        for _ in range(10):
            run_block(cache, attn, g)
    assert counter.calls == [], counter.calls
    assert int(cache.bank_size().min()) == 3  # eviction happened in the counted blocks


def test_compile_fullgraph_denoising_call_matches_eager():
    cfg = small_config()
    cache = DySinkCache(cfg, device=DEVICE, dtype=torch.float32, backend="naive")
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        run_block(cache, attn, g)
    cache.begin_block()
    q, k, v = (torch.randn(1, 24, 2, 16, generator=g).to(DEVICE) for _ in range(3))

    def step(q, k, v):
        return attn(q, k, v, cache=cache, layer=1)

    eager = step(q, k, v)
    compiled = torch.compile(step, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


def _opcheck_inputs():
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)
    B, Sq, H, D, P, S_e, N = 2, 5, 2, 16, 4, 3, 9
    attn = (
        r(B, Sq, H, D), r(P, S_e, H, D), r(P, S_e, H, D), i32([[0, -1], [3, 3]]),
        r(B, N, H, D), r(B, N, H, D), i32([[[0, 4]], [[2, 9]]]), r(B, 4, H, D), r(B, 4, H, D),
        0.25, True, r(B, 2), 10000.0, None, None,
    )  # fmt: skip
    select = (
        r(B, 2, 8),
        r(P, 8),
        i32([0, 1, 0, -1]),
        i32([0, 3, 6, 9]),
        2,
        i32([0, 0]),
        i32([3, 3]),
        0,
        None,
        0.0,
    )
    gate = (r(B, Sq, H, D), r(B, N, H, D), r(P, H, D), i32([[0, 2], [1, -1]]), i32([9, 4]), 0.5,
            "batch")  # fmt: skip
    means = (r(B, H, D), r(B, H, D), r(P, H, D), i32([[0, 2], [1, -1]]), 0.5, "sample")
    L, C = 2, 2
    insert = (
        torch.zeros(L, B * C, S_e, H, D, device=DEVICE),
        torch.zeros(L, B * C, S_e, H, D, device=DEVICE),
        torch.zeros(L, B * C, H, D, device=DEVICE), torch.zeros(B * C, 8, device=DEVICE),
        torch.full((B * C,), -1, dtype=torch.int32, device=DEVICE),
        torch.full((B * C,), -1, dtype=torch.int32, device=DEVICE),
        torch.zeros(B * C, dtype=torch.int64, device=DEVICE),
        torch.zeros((), dtype=torch.int64, device=DEVICE),
        r(L, B, N, H, D), r(L, B, N, H, D), torch.tensor([4, 5, 6], device=DEVICE), r(B, 8),
        torch.tensor(3, device=DEVICE), C, C, 0.95,
    )  # fmt: skip
    return {"gathered_sink_attention": attn, "select_sinks": select, "sink_gate": gate,
            "gate_from_means": means, "bank_insert": insert}  # fmt: skip


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    args = _opcheck_inputs()[op] + ("naive",)
    torch.library.opcheck(getattr(torch.ops.dysink, op), args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_across_blocks_equals_eager():
    """Capture one denoising call per layer once; replay it for 10 blocks while the
    retrievals and gate decisions change; outputs equal an eager twin cache."""
    cfg = small_config(num_layers=2, num_heads=2, head_dim=64, tokens_per_frame=16, dedup=0.9)
    dtype = torch.bfloat16
    graphed = DySinkCache(cfg, device="cuda", dtype=dtype)
    eager = DySinkCache(cfg, device="cuda", dtype=dtype)
    attn = SinkAttention(cfg)
    shape = (1, cfg.block_tokens, cfg.num_heads, cfg.head_dim)
    static = [tuple(torch.zeros(shape, device="cuda", dtype=dtype) for _ in range(3))
              for _ in range(cfg.num_layers)]  # fmt: skip
    g = torch.Generator().manual_seed(3)

    def fresh():
        return tuple(torch.randn(shape, generator=g).to("cuda", dtype) for _ in range(3))

    def commit_and_end(feat):
        for cache in (graphed, eager):
            for layer in range(cfg.num_layers):
                attn(*static[layer], cache=cache, layer=layer, commit=True)
            cache.end_block(feat)

    for _ in range(4):  # warm up both caches (and compile the kernels) eagerly
        for cache in (graphed, eager):
            cache.begin_block()
        for layer in range(cfg.num_layers):
            for t, x in zip(static[layer], fresh()):
                t.copy_(x)
            for cache in (graphed, eager):
                attn(*static[layer], cache=cache, layer=layer)
        commit_and_end(torch.randn(1, 6, generator=g).cuda())

    graphs, outs = [], []
    graphed.begin_block()
    eager.begin_block()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for layer in range(cfg.num_layers):
            attn(*static[layer], cache=graphed, layer=layer)
    torch.cuda.current_stream().wait_stream(side)
    for layer in range(cfg.num_layers):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs.append(attn(*static[layer], cache=graphed, layer=layer))
        graphs.append(graph)
    commit_and_end(torch.randn(1, 6, generator=g).cuda())

    changed = set()
    for _ in range(10):
        graphed.begin_block()
        eager.begin_block()
        changed.add(tuple(graphed.slot_idx.flatten().tolist()))
        for _step in range(2):
            for layer in range(cfg.num_layers):
                for t, x in zip(static[layer], fresh()):
                    t.copy_(x)
                graphs[layer].replay()
                want = attn(*static[layer], cache=eager, layer=layer)
                torch.testing.assert_close(outs[layer], want, atol=0, rtol=0)
                assert torch.equal(graphed.stats(layer).kept_idx, eager.stats(layer).kept_idx)
        commit_and_end(torch.randn(1, 6, generator=g).cuda())
    assert len(changed) > 1, "retrievals never changed: the replay test proves little"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sync_debug_mode_block_loop():
    cfg = small_config(head_dim=64, tokens_per_frame=16)
    cache = DySinkCache(cfg, device="cuda", dtype=torch.bfloat16)
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(4)
    inputs = [
        tuple(torch.randn(1, cfg.block_tokens, 2, 64, generator=g).to("cuda", torch.bfloat16)
              for _ in range(3))
        for _ in range(6)
    ]  # fmt: skip
    feats = torch.randn(12, 1, 6, generator=g).cuda()
    for i in range(2):  # compile kernels first
        cache.begin_block()
        for layer in range(2):
            attn(*inputs[layer], cache=cache, layer=layer, commit=True)
        cache.end_block(feats[i])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 12):
            cache.begin_block()
            for layer in range(2):
                attn(*inputs[2 + layer], cache=cache, layer=layer)
            for layer in range(2):
                attn(*inputs[4 + layer], cache=cache, layer=layer, commit=True)
            cache.end_block(feats[i])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
