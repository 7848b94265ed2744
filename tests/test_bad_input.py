"""Bad input to the config, the cache and the module: clear exceptions naming the
argument (the ops' own bad-input tests are in tests/ops/)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dysink_kernels import DySinkCache, DySinkConfig, SinkAttention


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(top_k=-1), "top_k"),
        (dict(tau=2.0), "tau"),
        (dict(sink_frames=2), "multiple of frames_per_block"),
        (dict(local_frames=3, sink_frames=3), "local_frames"),
        (dict(gate_scope="all"), "gate_scope"),
        (dict(feature="pixels"), "feature"),
        (dict(exclude="none"), "exclude"),
        (dict(num_heads=0), "num_heads"),
        (dict(feature_layer=5), "feature_layer"),
        (dict(feature_layer=True), "feature_layer"),
        (dict(dedup=5), "dedup"),
        (dict(dedup=float("nan")), "dedup"),
        (dict(dedup=-1), "dedup"),
        (dict(dedup="0.9"), "dedup"),
        (dict(tau=float("nan")), "tau"),
        (dict(anomaly_z=-0.5), "anomaly_z"),
        (dict(anomaly_z=float("inf")), "anomaly_z"),
        (dict(anomaly_min_mass=float("nan")), "anomaly_min_mass"),
        (dict(anomaly_min_mass=1.5), "anomaly_min_mass"),
        (dict(anomaly_min_cv=-1), "anomaly_min_cv"),
        (dict(anomaly_decay=1.0), "anomaly_decay"),
        (dict(anomaly_decay=float("nan")), "anomaly_decay"),
        (dict(anomaly_warmup=-1), "anomaly_warmup"),
        (dict(softmax_scale=float("inf")), "softmax_scale"),
        (dict(softmax_scale=0.0), "softmax_scale"),
        (dict(softmax_scale=float("nan")), "softmax_scale"),
        (dict(rope_theta=0.0, sink_rope="relative"), "rope_theta"),
        (dict(rope_theta=-5.0), "rope_theta"),
        (dict(rope_theta=float("nan")), "rope_theta"),
        (dict(relevance_mix=float("nan")), "relevance_mix"),
        (dict(usage_decay=0.0), "usage_decay"),
        (dict(usage_decay=float("inf")), "usage_decay"),
        (dict(gate=1), "gate"),
        (dict(stats="yes"), "stats"),
        (dict(max_entries=0), "max_entries"),
        (dict(sink_distance=-1), "sink_distance"),
        (dict(tokens_per_frame=2.5), "tokens_per_frame"),
        (dict(eviction="lru"), "eviction"),
        (dict(gate_mode="x"), "gate_mode"),
        (dict(sink_rope="x"), "sink_rope"),
        (dict(window_scope="x"), "window_scope"),
    ],
)
def test_config_bad_input(kw, needle):
    base = dict(num_layers=2, num_heads=2, head_dim=16, tokens_per_frame=8)
    base.update(kw)
    with pytest.raises(ValueError, match=needle):
        DySinkConfig(**base)


def make_cache(**kw):
    cfg = DySinkConfig(num_layers=2, num_heads=2, head_dim=16, tokens_per_frame=8, **kw)
    return cfg, DySinkCache(cfg, batch_size=1, dtype=torch.float32), SinkAttention(cfg)


def qkv(B=1, S=24, H=2, D=16, dtype=torch.float32):
    return tuple(torch.randn(B, S, H, D, dtype=dtype) for _ in range(3))


def finish_block(cache, attn, feat=True):
    for layer in range(2):
        attn(*qkv(), cache=cache, layer=layer, commit=True)
    cache.end_block(torch.randn(1, 4) if feat else None)


def test_protocol_errors_leave_cache_usable():
    _cfg, cache, attn = make_cache()
    with pytest.raises(RuntimeError, match="begin_block"):
        attn(*qkv(), cache=cache, layer=0)
    with pytest.raises(RuntimeError, match="end_block called without begin_block"):
        cache.end_block(torch.randn(1, 4))
    cache.begin_block()
    with pytest.raises(RuntimeError, match="begin_block called twice"):
        cache.begin_block()
    with pytest.raises(IndexError, match="layer"):
        attn(*qkv(), cache=cache, layer=2)
    with pytest.raises(ValueError, match=r"k.shape\[1\]"):
        attn(*qkv(S=23), cache=cache, layer=0)
    with pytest.raises(TypeError, match="q must have dtype"):
        attn(*qkv(dtype=torch.float16), cache=cache, layer=0)
    with pytest.raises(RuntimeError, match="no commit=True call"):
        cache.end_block(torch.randn(1, 4))
    attn(*qkv(), cache=cache, layer=0, commit=True)
    with pytest.raises(RuntimeError, match="already committed"):
        attn(*qkv(), cache=cache, layer=0, commit=True)
    attn(*qkv(), cache=cache, layer=1, commit=True)
    with pytest.raises(ValueError, match="feature"):
        cache.end_block(None)
    with pytest.raises(ValueError, match=r"feature.shape\[0\]"):
        cache.end_block(torch.randn(2, 4))
    cache.end_block(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"feature.shape\[1\]"):
        cache.begin_block()
        finish_block(cache, attn)  # F=4 stored; now a different F
        cache.begin_block()
        for layer in range(2):
            attn(*qkv(), cache=cache, layer=layer, commit=True)
        cache.end_block(torch.randn(1, 5))
    cache.end_block(torch.randn(1, 4))  # still usable
    assert cache.block == 3


def test_mean_key_rejects_external_feature():
    _, cache, attn = make_cache(feature="mean_key")
    cache.begin_block()
    for layer in range(2):
        attn(*qkv(), cache=cache, layer=layer, commit=True)
    with pytest.raises(ValueError, match="mean_key"):
        cache.end_block(torch.randn(1, 4))
    cache.end_block()


def test_cache_constructor_errors():
    cfg = DySinkConfig(num_layers=2, num_heads=2, head_dim=16, tokens_per_frame=8)
    with pytest.raises(ValueError, match="batch_size"):
        DySinkCache(cfg, batch_size=0)
    with pytest.raises(TypeError, match="dtype"):
        DySinkCache(cfg, dtype=torch.int32)
    with pytest.raises(ValueError, match="bank_slots"):
        DySinkCache(cfg, bank_slots=0)
    with pytest.raises(TypeError, match="DySinkConfig"):
        DySinkCache({"num_layers": 2})
    cache = DySinkCache(cfg, dtype=torch.float32)
    other = SinkAttention(DySinkConfig(num_layers=2, num_heads=2, head_dim=16, tokens_per_frame=4))
    cache.begin_block()
    with pytest.raises(ValueError, match="another DySinkConfig"):
        other(*qkv(), cache=cache, layer=0)


def test_cache_constructor_names_the_argument():
    cfg = DySinkConfig(num_layers=2, num_heads=2, head_dim=16, tokens_per_frame=8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda'.* 0 CUDA device"):
            DySinkCache(cfg, device="cuda")
        with pytest.raises(ValueError, match="bank_device"):
            DySinkCache(cfg, bank_device="cuda:0")
    with pytest.raises(ValueError, match="device='nowhere' is not a device"):
        DySinkCache(cfg, device="nowhere")
    with pytest.raises(ValueError, match="CPU or CUDA"):
        DySinkCache(cfg, device="meta")
    with pytest.raises(ValueError, match=r"bank_slots gives 1000000000000 bank slots.*MAX_BANK"):
        DySinkCache(cfg, bank_slots=10**12)
    # 1e9 bytes of a tiny model are 162,760 slots: refused, not preallocated
    with pytest.raises(ValueError, match="max_bank_bytes gives 162760 bank slots"):
        DySinkCache(cfg, max_bank_bytes=1e9)  # bf16
    # with a cap, the budget gives the cap's slots
    capped = dataclasses.replace(cfg, max_entries=4)
    assert DySinkCache(capped, dtype=torch.float32, max_bank_bytes=1e9).bank.slots_per_sample == 4
    with pytest.raises(ValueError, match="GiB"):  # more bytes than the machine has
        DySinkCache(
            DySinkConfig(num_layers=40, num_heads=40, head_dim=128, tokens_per_frame=4096),
            bank_slots=60_000,
        )
    for bad in (0, -1, float("nan"), float("inf"), True, "1e9"):
        with pytest.raises(ValueError, match="max_bank_bytes"):
            DySinkCache(cfg, max_bank_bytes=bad)
    with pytest.raises(ValueError, match="feature_dim"):
        DySinkCache(cfg, feature_dim=0)
    with pytest.raises(TypeError, match="store_latents"):
        DySinkCache(cfg, store_latents="yes")
    with pytest.raises(ValueError, match="max_entries gives 100000 bank slots"):
        DySinkCache(dataclasses.replace(cfg, max_entries=100_000))


def test_pure_window_allocates_no_bank():
    """top_k=0 (Self-Forcing, LongLive) retrieves nothing: the default bank is empty."""
    cfg = DySinkConfig.self_forcing(
        num_layers=2, num_heads=2, head_dim=16, tokens_per_frame=4, local_frames=6
    )
    cache = DySinkCache(cfg, dtype=torch.float32)
    assert cache.bank.k.shape[1] == 0
    assert DySinkCache(cfg, dtype=torch.float32, bank_slots=3).bank.k.shape[1] == 3


def _one_block(cache, attn, x, layers):
    cache.begin_block()
    for layer in range(layers):
        attn(x, x, x, cache=cache, layer=layer)
    for layer in range(layers):
        attn(x, x, x, cache=cache, layer=layer, commit=True)


def test_dedup_one_stores_every_block():
    """A feature's cosine with itself can round above 1: dedup=1 must still store all."""
    cfg = DySinkConfig(num_layers=1, num_heads=1, head_dim=8, tokens_per_frame=2, dedup=1.0)
    cache = DySinkCache(cfg, dtype=torch.float32, bank_slots=64)
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 768, generator=g)
    x = torch.randn(1, 6, 1, 8, generator=g)
    for _ in range(20):
        _one_block(cache, attn, x, 1)
        cache.end_block(feat)  # the same feature every time
    assert int(cache.bank_size()[0]) == 20


def test_restored_cache_refuses_recache_without_latents():
    cfg = DySinkConfig(num_layers=1, num_heads=1, head_dim=8, tokens_per_frame=2)
    make = lambda: DySinkCache(cfg, dtype=torch.float32, store_latents=True, feature_dim=4)
    cache, attn = make(), SinkAttention(cfg)
    x = torch.randn(1, 6, 1, 8)
    for _ in range(3):
        _one_block(cache, attn, x, 1)
        cache.end_block(torch.randn(1, 4), latent=torch.randn(1, 3, 2))
    restored = make()
    restored.load_state_dict(cache.state_dict())
    with pytest.raises(RuntimeError, match="holds no latents"):
        restored.recache(lambda latent, first: None)
