"""fp8 bank: quantisation bound, Triton equals naive, the cache against a bf16 bank."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import DySinkCache
from dysink_kernels._backends import triton_available
from dysink_kernels.fp8 import FP8_DTYPE, quantize
from dysink_kernels.ops.gathered_sink_attention import (
    gathered_sink_attention_general as gathered_attention,
)

from harness import features, module_factory, run, tiny_config

# Documented bounds (README, fp8.py): per element <= 2^-4 relative (normal numbers);
# attention outputs with a third of the keys from an fp8 bank <= 5% relative RMS.
ELEMENT_REL = 2.0**-4
OUTPUT_REL_RMS = 0.05


def test_quantisation_error_bound():
    x = torch.randn(3, 50, 4, 32) * torch.logspace(-3, 2, 4)[None, None, :, None]
    q, scale = quantize(x, (1, 3))
    assert q.dtype == FP8_DTYPE and scale.shape == (3, 1, 4, 1)
    deq = q.float() * scale
    tiny = scale * 2.0**-9  # subnormal step
    assert ((deq - x).abs() <= ELEMENT_REL * x.abs() + tiny).all()
    assert q.float().abs().max() <= 448


def fp8_inputs(seed=0, D=32):
    g = torch.Generator().manual_seed(seed)
    B, Sq, P, S_e, H, N = 2, 37, 5, 19, 3, 40
    r = lambda *s: torch.randn(*s, generator=g)
    pk, pv = r(P, S_e, H, D), r(P, S_e, H, D)
    qk, sk = quantize(pk, (1, 3))
    qv, sv = quantize(pv, (1, 3))
    slots = torch.tensor([[0, -1, 4], [2, 2, 1]], dtype=torch.int32)
    ranges = torch.tensor(
        [[[0, 17], [20, 40], [5, 5]], [[0, 0], [3, 39], [39, 40]]], dtype=torch.int32
    )
    return (r(B, Sq, H, D), pk, pv, qk, qv, sk[:, 0, :, 0], sv[:, 0, :, 0], slots,
            r(B, N, H, D), r(B, N, H, D), ranges, r(B, 7, H, D), r(B, 7, H, D))  # fmt: skip


def test_fp8_attention_close_to_unquantised():
    q, pk, pv, qk, qv, sk, sv, slots, lk, lv, rg, ck, cv = fp8_inputs(D=64)
    ref, rs = gathered_attention(q, pk, pv, slots, lk, lv, rg, ck, cv, return_stats=True)
    got, gs = gathered_attention(q, qk, qv, slots, lk, lv, rg, ck, cv, return_stats=True,
                                 pool_k_scale=sk, pool_v_scale=sv)  # fmt: skip
    assert float((got - ref).norm() / ref.norm()) <= OUTPUT_REL_RMS
    assert float((gs.slot_mass - rs.slot_mass).abs().max()) <= 0.01


@pytest.mark.skipif(not triton_available(torch.device("cpu")) and not torch.cuda.is_available(),
                    reason="needs the Triton interpreter or a GPU")  # fmt: skip
@pytest.mark.parametrize("rotate", [False, True])
def test_triton_fp8_equals_naive(rotate):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = [t.to(dev) for t in fp8_inputs(seed=3)]
    q, _, _, qk, qv, sk, sv, slots, lk, lv, rg, ck, cv = args
    delta = torch.tensor([[4.0, 0.0, -30.0], [2.0, 7.0, 1.0]], device=dev) if rotate else None
    common = dict(return_stats=True, slot_delta=delta, pool_k_scale=sk, pool_v_scale=sv)
    a = gathered_attention(q, qk, qv, slots, lk, lv, rg, ck, cv, backend="triton", **common)
    b = gathered_attention(q, qk, qv, slots, lk, lv, rg, ck, cv, backend="naive", **common)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, atol=4e-5, rtol=1e-5)


@pytest.mark.skipif(not triton_available(torch.device("cpu")) and not torch.cuda.is_available(),
                    reason="needs the Triton interpreter or a GPU")  # fmt: skip
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_fp8_full_tiles_tails_and_unlisted_slots(tma, dtype):
    """fp8 slots over full tiles and a tail (16-key tiles, 37 keys per slot), pool
    rows of unlisted slots holding e4m3 NaN bytes, both load paths, fp32 and fp16
    queries (fp16 products in the slot loop), scales from 1e-3 to 1e2."""
    from dysink_kernels.ops.gathered_sink_attention import naive
    from dysink_kernels.ops.gathered_sink_attention import triton as tmod

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    B, Sq, H, D, P, S_e, N = 2, 21, 2, 32, 5, 37, 30
    r = lambda *s: torch.randn(*s, generator=g)
    mag = torch.tensor([1e-3, 1.0, 10.0, 100.0, 1.0])[:, None, None, None]
    qk, sk = quantize(r(P, S_e, H, D) * mag, (1, 3))
    qv, sv = quantize(r(P, S_e, H, D) * mag.flip(0), (1, 3))
    for t in (qk, qv):
        t.view(torch.uint8)[3] = 0x7F  # e4m3 NaN: slot 3 is never listed
    sk, sv = sk[:, 0, :, 0].to(dev), sv[:, 0, :, 0].to(dev)
    slots = torch.tensor([[0, -1, 4], [2, 2, 1]], dtype=torch.int32, device=dev)
    ranges = torch.tensor([[[0, 17]], [[3, 30]]], dtype=torch.int32, device=dev)
    q, lk, lv = (r(*s).to(dtype).to(dev) for s in ((B, Sq, H, D), (B, N, H, D), (B, N, H, D)))
    qk, qv = qk.to(dev), qv.to(dev)
    cfg = tmod.KernelConfig(32, 16, 4, 1, tma=tma)
    got = tmod.gathered_attention_triton(q, qk, qv, slots, lk, lv, ranges, None, None, 0.2, True,
                                         pool_k_scale=sk, pool_v_scale=sv, config=cfg)  # fmt: skip
    clean = [t.view(torch.uint8).clone() for t in (qk, qv)]
    for t in clean:
        t[3] = 0
    ck, cv = (t.view(FP8_DTYPE) for t in clean)
    # The oracle in fp32 (in fp16 it rounds the scaled keys to fp16: scores of several
    # hundred would move by ~0.1). The kernel folds each slot's scale into the score
    # scale: fp32 rounding of such scores differs by ~1e-5.
    want = naive.gathered_attention_naive(q.float(), ck, cv, slots, lk.float(), lv.float(), ranges,
                                          None, None, 0.2, True, pool_k_scale=sk,
                                          pool_v_scale=sv)  # fmt: skip
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    assert not torch.isnan(got[0]).any()
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=tol, rtol=tol)
    for x, y in zip(got[1], want[1]):
        torch.testing.assert_close(x, y, atol=4 * tol, rtol=tol)


@pytest.mark.parametrize("offload", [False, True])
def test_cache_with_fp8_bank_tracks_the_plain_bank(offload):
    """Same stream, same decisions (retrieval reads features, the gate true mean keys),
    outputs within the documented bound, half the bytes per entry for 16-bit K/V."""
    cfg = tiny_config(max_entries=4, sink_frames=3, local_frames=12, tau=0.5)
    feats = features(2, 10)
    log_a, log_b, holder = [], [], []
    plain = run(cfg, 2, 10, module_factory(cfg, 2, log_a), feats)
    kw = dict(bank_dtype=FP8_DTYPE, bank_device="cpu" if offload else None)
    quant = run(cfg, 2, 10, module_factory(cfg, 2, log_b, holder=holder, **kw), feats)
    assert log_a == log_b
    assert float((quant - plain).norm() / plain.norm()) <= OUTPUT_REL_RMS
    cache = holder[0]
    assert cache.bank.k.dtype == FP8_DTYPE and cache.bank.k.element_size() == 1
    # checkpoint round trip keeps the scales
    fresh = DySinkCache(cfg, batch_size=2, dtype=torch.float32, **kw)
    fresh.load_state_dict(cache.state_dict())
    assert torch.equal(fresh.bank.k_scale, cache.bank.k_scale)
    assert torch.equal(fresh.bank.k.view(torch.uint8), cache.bank.k.view(torch.uint8))


def test_bank_bytes_halve():
    cfg = tiny_config()
    bf16 = DySinkCache(cfg, dtype=torch.bfloat16)
    fp8 = DySinkCache(cfg, dtype=torch.bfloat16, bank_dtype=FP8_DTYPE)
    assert fp8.bank.bytes_per_entry * 2 == bf16.bank.bytes_per_entry
    with pytest.raises(TypeError, match="bank_dtype"):
        DySinkCache(cfg, dtype=torch.bfloat16, bank_dtype=torch.float16)


def test_recache_into_an_fp8_bank():
    from dysink_kernels import SinkAttention

    cfg = tiny_config(max_entries=4, dedup=None)
    caches = [DySinkCache(cfg, dtype=torch.float32, store_latents=True, bank_dtype=bd)
              for bd in (None, FP8_DTYPE)]  # fmt: skip
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        kv = [tuple(torch.randn(1, 24, 2, 16, generator=g) for _ in range(3)) for _ in range(2)]
        lat, feat = torch.randn(1, 3, 4, generator=g), torch.randn(1, 5, generator=g)
        for cache in caches:
            cache.begin_block()
            for layer in range(2):
                attn(*kv[layer], cache=cache, layer=layer, commit=True)
            cache.end_block(feat, latent=lat)
    for cache in caches:
        g2 = torch.Generator().manual_seed(1)

        def run_block(latent, first, cache=cache, g2=g2):
            for layer in range(2):
                attn(*(torch.randn(latent.shape[0], 24, 2, 16, generator=g2) for _ in range(3)),
                     cache=cache, layer=layer, commit=True)  # fmt: skip

        cache.recache(run_block, window="blocks")
    plain, quant = caches
    deq = quant.bank.k.float() * quant.bank.k_scale[:, :, None, :, None]
    assert ((deq - plain.bank.k).abs() <= ELEMENT_REL * plain.bank.k.abs() + 1e-3).all()
    torch.testing.assert_close(quant.bank.mean_k, plain.bank.mean_k, atol=0.05, rtol=0.05)
