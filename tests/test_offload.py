"""Host-offloaded bank (bank_device="cpu"): same results as the on-device bank."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import DySinkCache

from harness import features, module_factory, run, tiny_config


@pytest.mark.parametrize(
    "kw",
    [dict(max_entries=3, tau=0.5), dict(sink_rope="relative", sink_frames=3, local_frames=12)],
)
def test_offloaded_bank_equals_on_device_bank(kw):
    cfg = tiny_config(**kw)
    feats = features(2, 10)
    log_a: list = []
    log_b: list = []
    on_device = run(cfg, 2, 10, module_factory(cfg, 2, log_a), feats)
    holder: list = []
    offloaded = run(
        cfg, 2, 10, module_factory(cfg, 2, log_b, holder=holder, bank_device="cpu"), feats
    )
    assert holder[0].stager is not None, "the staged path was not used"
    assert torch.equal(on_device, offloaded)
    assert log_a == log_b


def test_max_bank_bytes_sets_the_capacity():
    cfg = tiny_config()
    entry = 2 * cfg.num_layers * cfg.block_tokens * cfg.num_heads * cfg.head_dim * 4  # fp32
    cache = DySinkCache(cfg, batch_size=2, dtype=torch.float32, max_bank_bytes=entry * 2 * 5)
    assert cache.bank.slots_per_sample == 5
    with pytest.raises(ValueError, match="top_k=2 needs more"):
        DySinkCache(cfg, batch_size=2, dtype=torch.float32, max_bank_bytes=entry * 2)
    with pytest.raises(ValueError, match="not both"):
        DySinkCache(cfg, dtype=torch.float32, bank_slots=4, max_bank_bytes=entry * 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_host_bank_on_gpu_equals_device_bank():
    cfg = tiny_config(num_heads=2, head_dim=64, max_entries=3, tau=0.5)
    g = torch.Generator().manual_seed(0)
    caches = [
        DySinkCache(cfg, device="cuda", dtype=torch.bfloat16),
        DySinkCache(cfg, device="cuda", dtype=torch.bfloat16, bank_device="cpu"),
    ]
    assert caches[1].bank.k.is_pinned()
    shape = (1, cfg.block_tokens, 2, 64)
    for _ in range(8):
        inputs = [tuple(torch.randn(shape, generator=g).to("cuda", torch.bfloat16)
                        for _ in range(3)) for _ in range(2 * cfg.num_layers)]  # fmt: skip
        feat = torch.randn(1, 6, generator=g).cuda()
        outs = []
        for cache in caches:
            cache.begin_block()
            for layer in range(cfg.num_layers):
                outs.append(cache.attend(layer, *inputs[layer]))
            for layer in range(cfg.num_layers):
                cache.attend(layer, *inputs[cfg.num_layers + layer], commit=True)
            cache.end_block(feat)
        n = cfg.num_layers
        for a, b in zip(outs[:n], outs[n:]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.cuda.synchronize()
