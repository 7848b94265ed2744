"""Bad input to the config, the cache and the module: clear exceptions naming the
argument (the ops' own bad-input tests are in tests/ops/)."""

from __future__ import annotations

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
