"""The list-of-dicts KV cache adapter against the native DySinkCache/SinkAttention path."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import DySinkCache, DySinkConfig, SinkAttention
from dysink_kernels.integrations.kv_cache_adapter import (
    KVCacheAdapter,
    dysink_cache_from_kv_cache,
)
from dysink_kernels.tools.models import TinyVideoDiT, generate_block

LAYERS, HEADS, HEAD_DIM, GRID, T = 2, 2, 16, (2, 4), 8  # T: tokens per frame
FEAT_DIM = 12


@pytest.fixture(autouse=True)
def _one_thread():
    """The model's ops are tiny: one thread avoids stalls on a busy 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def kv_list(batch: int, frames: int, dtype=torch.float32) -> list[dict]:
    """The reference's ``_build_empty_kv_cache`` at a tiny size."""
    return [
        {
            "k": torch.zeros(batch, frames * T, HEADS, HEAD_DIM, dtype=dtype),
            "v": torch.zeros(batch, frames * T, HEADS, HEAD_DIM, dtype=dtype),
            "global_end_index": torch.tensor([0], dtype=torch.long),
            "local_end_index": torch.tensor([0], dtype=torch.long),
        }
        for _ in range(LAYERS)
    ]


class ReferenceIndices:
    """The reference's index arithmetic (``CausalWanSelfAttention.forward`` and
    ``_apply_cache_updates``), on host ints."""

    def __init__(self, size: int, layers: int):
        self.size = size
        self.state = [(0, 0)] * layers  # (global_end_index, local_end_index)

    def call(self, layer: int, current_start: int, n_new: int) -> tuple[int, int]:
        g, loc = self.state[layer]
        current_end = current_start + n_new
        is_recompute = current_end <= g and current_start > 0
        if current_end > g and n_new + loc > self.size:
            evicted = n_new + loc - self.size
            local_end = loc + current_end - g - evicted
        else:
            local_end = loc + current_end - g
        if not is_recompute:
            self.state[layer] = (current_end, local_end)
        return self.state[layer]


def scene_features(batch: int, blocks: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scenes = torch.randn(3, FEAT_DIM, generator=g)
    order = [0, 0, 1, 2, 0, 1, 1, 2, 0, 2]
    out = torch.empty(blocks, batch, FEAT_DIM)
    for i in range(blocks):
        for b in range(batch):
            noise = [0.02, 0.4][(i + b) % 2]
            out[i, b] = scenes[order[(i + 2 * b) % len(order)]] + noise * torch.randn(
                FEAT_DIM, generator=g
            )
    return out


def drive(batch, blocks, begin, attend, end, feature, seed=0):
    """Generate with TinyVideoDiT; ``attend(layer, q, k, v, commit, block)``."""
    torch.manual_seed(seed)
    model = TinyVideoDiT(LAYERS, HEADS, HEAD_DIM, GRID)
    g = torch.Generator().manual_seed(seed + 1)
    feats = scene_features(batch, blocks)
    outs = []
    for i in range(blocks):
        begin()
        noise = torch.randn(batch, 3, T, 4, generator=g)
        cond = torch.randn(batch, 8, generator=g)
        fn = lambda layer, q, k, v, commit, i=i: attend(layer, q, k, v, commit, i)
        outs.append(generate_block(model, noise, cond, 3 * i, fn, generator=g))
        end(None if feature == "mean_key" else feats[i])
    return torch.stack(outs)


def native(cfg, batch, blocks):
    cache = DySinkCache(cfg, batch_size=batch, dtype=torch.float32)
    attn = SinkAttention(cfg)
    retrieved: list = []

    def attend(layer, q, k, v, commit, block):
        if not commit:
            retrieved.append(cache.retrieved_frames().tolist())
        return attn(q, k, v, cache=cache, layer=layer, commit=commit)

    out = drive(batch, blocks, cache.begin_block, attend, cache.end_block, cfg.feature)
    return out, retrieved


def through_adapter(cfg, batch, blocks, frames, *, explicit_end=True):
    kv = kv_list(batch, frames)
    adapter = KVCacheAdapter.from_kv_cache(
        kv, tokens_per_frame=T, local_frames=cfg.local_frames, sink_size=cfg.sink_frames,
        top_k=cfg.top_k, tau=cfg.tau, feature=cfg.feature, dedup=cfg.dedup,
        gate_scope=cfg.gate_scope,
    )  # fmt: skip
    assert adapter.cache.config == cfg
    attn = adapter.attention_fn()
    indices = ReferenceIndices(frames * T, LAYERS)

    def attend(layer, q, k, v, commit, block):
        start = 3 * block * T
        out = attn(layer, q, k, v, kv[layer], start, commit=commit)
        expected = indices.call(layer, start, q.shape[1])
        got = (int(kv[layer]["global_end_index"]), int(kv[layer]["local_end_index"]))
        assert got == expected, f"block {block} layer {layer}: indices {got} != {expected}"
        return out

    end = adapter.end_block if explicit_end else (lambda feature: None)
    out = drive(batch, blocks, lambda: None, attend, end, cfg.feature)
    assert all(torch.equal(d["k"], torch.zeros_like(d["k"])) for d in kv), "k/v are not written"
    return out, adapter


def config(**kw) -> DySinkConfig:
    base = dict(num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, tokens_per_frame=T)
    base.update(kw)
    return DySinkConfig(**base)


@pytest.mark.parametrize(
    "kw, frames",
    [
        (dict(), 15),  # DySink: buffer of the widest window (L + 3 * top_k)
        (dict(sink_frames=3, local_frames=12, tau=0.5), 12),  # LongLive: sinks + window
        (dict(feature="mean_key", dedup=0.9, batch=3, gate_scope="sample"), 15),
    ],
    ids=["dysink", "longlive-sinks", "mean-key-batch3"],
)
def test_adapter_equals_native(kw, frames):
    kw = dict(kw)
    batch = kw.pop("batch", 1)
    cfg = config(**kw)
    blocks = 8
    ours, retrieved = native(cfg, batch, blocks)
    theirs, adapter = through_adapter(cfg, batch, blocks, frames)
    torch.testing.assert_close(theirs, ours, atol=0, rtol=0)
    assert any(f >= 0 for r in retrieved for row in r for f in row), "nothing was retrieved"
    assert adapter.cache.block == blocks


def test_mean_key_blocks_end_by_themselves():
    cfg = config(feature="mean_key", dedup=0.9)
    ours, _ = native(cfg, 1, 7)
    theirs, adapter = through_adapter(cfg, 1, 7, 15, explicit_end=False)
    torch.testing.assert_close(theirs, ours, atol=0, rtol=0)
    assert adapter.cache.block == 6  # the last block waits for end_block (or the next call)
    adapter.end_block()
    assert adapter.cache.block == 7


def test_constructor_reads_the_list():
    kv = kv_list(2, 12, dtype=torch.bfloat16)
    cache = dysink_cache_from_kv_cache(kv, tokens_per_frame=T, sink_size=3, local_frames=12,
                                       tau=0.6)  # fmt: skip
    c = cache.config
    assert (c.num_layers, c.num_heads, c.head_dim, c.tokens_per_frame) == (2, 2, 16, 8)
    assert (c.sink_frames, c.local_frames, c.tau, c.top_k) == (3, 12, 0.6, 2)
    assert cache.batch_size == 2 and cache.dtype == torch.bfloat16


def test_misuse_raises():
    kv = kv_list(1, 15)
    adapter = KVCacheAdapter.from_kv_cache(kv, tokens_per_frame=T)
    q = torch.randn(1, 3 * T, HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="neither the current block"):
        adapter(0, q, q, q, kv[0], 3 * T)  # block 1 before block 0
    with pytest.raises(ValueError, match="layer 1's dict"):
        adapter(1, q, q, q, kv[0], 0)
    with pytest.raises(TypeError, match="host int"):
        adapter(0, q, q, q, kv[0], torch.tensor(0))
    for layer in range(LAYERS):
        adapter(layer, q, q, q, kv[layer], 0)
        adapter(layer, q, q, q, kv[layer], 0, commit=True)
    with pytest.raises(RuntimeError, match="end_block"):
        adapter(0, q, q, q, kv[0], 3 * T)  # external features: end_block is explicit
    adapter.end_block(torch.randn(1, FEAT_DIM))
    adapter(0, q, q, q, kv[0], 3 * T)
    with pytest.raises(RuntimeError, match="commit=True"):
        adapter.end_block(torch.randn(1, FEAT_DIM))  # layer 1 never committed
    new = kv_list(1, 15)
    with pytest.raises(ValueError, match="reset"):
        adapter(0, q, q, q, new[0], 3 * T)
    adapter.reset(new)
    adapter(0, q, q, q, new[0], 0)
    assert int(new[0]["global_end_index"]) == 3 * T
    with pytest.raises(ValueError, match="layers"):
        KVCacheAdapter(kv_list(1, 15)[:1], adapter.cache)


def test_a_second_video_on_the_same_dicts_starts_a_new_stream():
    """Self-Forcing resets the index tensors and starts again at token 0: no reset() call."""
    cfg = config(feature="mean_key", dedup=0.9)
    first, _ = through_adapter(cfg, 1, 5, 15, explicit_end=False)
    kv = kv_list(1, 15)
    adapter = KVCacheAdapter.from_kv_cache(
        kv, tokens_per_frame=T, local_frames=cfg.local_frames, feature="mean_key", dedup=0.9
    )
    attn = adapter.attention_fn()
    outs = []
    for _ in range(2):
        for d in kv:  # what Self-Forcing does between videos
            d["global_end_index"] = torch.tensor([0], dtype=torch.long)
            d["local_end_index"] = torch.tensor([0], dtype=torch.long)
        attend = lambda layer, q, k, v, commit, block: attn(
            layer, q, k, v, kv[layer], 3 * block * T, commit=commit
        )
        outs.append(drive(1, 5, lambda: None, attend, lambda feature: None, "mean_key"))
    torch.testing.assert_close(outs[0], first, atol=0, rtol=0)
    torch.testing.assert_close(outs[1], first, atol=0, rtol=0)
    assert int(kv[0]["global_end_index"]) == 15 * T


def test_tiny_dicts_keep_the_upstream_indices():
    from dysink_kernels.integrations.kv_cache_adapter import tiny_kv_cache

    kv = tiny_kv_cache(LAYERS, 1, HEADS, HEAD_DIM, dtype=torch.float32)
    adapter = KVCacheAdapter.from_kv_cache(kv, tokens_per_frame=T, top_k=0, kv_tokens=9 * T)
    assert adapter.cache.bank.num_slots == 0  # a pure window keeps no bank
    q = torch.randn(1, 3 * T, HEADS, HEAD_DIM)
    for block in range(4):
        for layer in range(LAYERS):
            adapter(layer, q, q, q, kv[layer], 3 * block * T)
            adapter(layer, q, q, q, kv[layer], 3 * block * T, commit=True)
    assert adapter.indices(0) == (12 * T, 9 * T)
    assert int(kv[1]["local_end_index"]) == 9 * T and kv[0]["k"].numel() == 0
