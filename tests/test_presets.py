"""Presets of the published settings, the gate's precision option, a bf16 bank in an
fp32 run, and the bank's eviction counter."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import DySinkCache, DySinkConfig, SinkAttention
from dysink_kernels.gating import votes_in_dtype
from dysink_kernels.ops.sink_gate.naive import gate_votes

from harness import features, module_factory, run, tiny_config


def test_presets_hold_the_published_settings():
    sf, ll, dy = DySinkConfig.self_forcing(), DySinkConfig.longlive(), DySinkConfig.dysink()
    for c in (sf, ll, dy):
        assert (c.num_layers, c.num_heads, c.head_dim, c.tokens_per_frame) == (30, 12, 128, 1560)
        assert c.frames_per_block == 3
    assert (sf.local_frames, sf.sink_frames, sf.top_k, sf.gate) == (21, 0, 0, False)
    assert (ll.local_frames, ll.sink_frames, ll.top_k, ll.gate) == (12, 3, 0, False)
    assert (dy.local_frames, dy.sink_frames, dy.top_k, dy.tau, dy.dedup) == (9, 0, 2, 0.8, 0.95)
    assert dy.gate and dy.feature == "external" and dy.gate_precision == "input"
    assert dy.max_entries is None and dy.exclude == "reference" and dy.gate_scope == "batch"
    tiny = DySinkConfig.longlive(2, 2, 16, 8, tau=0.5)
    assert (tiny.num_layers, tiny.tokens_per_frame, tiny.tau, tiny.sink_frames) == (2, 8, 0.5, 3)
    with pytest.raises(ValueError, match="gate_precision"):
        DySinkConfig.dysink(gate_precision="bf16")


def test_gate_votes_in_the_run_dtype():
    """Scores that differ below bf16 resolution round equal and do not vote."""
    g = torch.Generator().manual_seed(0)
    B, H, D = 2, 4, 16
    qbar = torch.randn(B, H, D, generator=g)
    local = torch.randn(B, H, D, generator=g)
    near = local * (1 + 1e-5)  # a hair above the window for positive scores
    table = torch.stack([near[0], near[1], 3 * local[0]])  # (3, H, D)
    slots = torch.tensor([[0, 2], [1, -1]], dtype=torch.int32)
    fp32 = gate_votes(qbar, local, table, slots)
    bf16 = votes_in_dtype(qbar, local, table, slots, torch.bfloat16)
    same = votes_in_dtype(qbar, local, table, slots, torch.float32)
    assert torch.equal(same, fp32)
    assert fp32[0, 0] > 0 and bf16[0, 0] == 0  # near-ties vote only in fp32

    def r(t):
        return t.to(torch.bfloat16).float()

    s_loc = r((r(qbar) * r(local)).sum(-1))
    s_e = r((r(qbar) * r(3 * local[0])).sum(-1))
    assert bf16[0, 1] == (s_e[0] > s_loc[0]).sum()  # direct formula
    assert bf16[1, 1] == 0


def test_input_precision_is_fp32_in_fp32_runs():
    feats = features(1, 8)
    outs = []
    for prec in ("fp32", "input"):
        cfg = tiny_config(tau=0.5, gate_precision=prec)
        outs.append(run(cfg, 1, 8, module_factory(cfg, 1, []), feats))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_bf16_bank_in_an_fp32_run():
    cfg = tiny_config(tau=0.5)
    feats = features(2, 10)
    logs = ([], [])
    held: list = [[], []]
    ref = run(cfg, 2, 10, module_factory(cfg, 2, logs[0], holder=held[0]), feats)
    ours = run(
        cfg, 2, 10,
        module_factory(cfg, 2, logs[1], holder=held[1], bank_dtype=torch.bfloat16),
        feats,
    )  # fmt: skip
    bank, ref_bank = held[1][0].bank, held[0][0].bank
    assert bank.k.dtype == torch.bfloat16 and held[1][0].dtype == torch.float32
    assert [e[3] for e in logs[0]] == [e[3] for e in logs[1]], "retrievals differ"
    assert any(any(row) for e in logs[1] for row in e[3]), "nothing was retrieved"
    torch.testing.assert_close(ours, ref, atol=2e-2, rtol=2e-2)
    first = (bank.frame == 0).nonzero()[0, 0]  # block 0 is never recomputed: exact rounding
    assert torch.equal(bank.k[:, first], ref_bank.k[:, first].to(torch.bfloat16))


def test_evictions_are_counted_on_the_device():
    cfg = tiny_config(dedup=None, top_k=1)
    cache = DySinkCache(cfg, batch_size=2, dtype=torch.float32, bank_slots=3)
    attn = SinkAttention(cfg)
    for i in range(7):
        cache.begin_block()
        for layer in range(cfg.num_layers):
            x = torch.randn(2, 24, 2, 16)
            attn(x, x, x, cache=cache, layer=layer, commit=True)
        cache.end_block(torch.randn(2, 5))
        stats = cache.bank.stats()
        assert stats.evictions.device == cache.device
        assert stats.evictions.tolist() == [max(0, i + 1 - 3)] * 2
        assert stats.entries.tolist() == [min(i + 1, 3)] * 2 and stats.capacity == 3


@pytest.mark.parametrize("precision", ["fp32", "input"])
def test_gate_precision_in_a_bf16_cache(precision):
    """The ratios a bf16 cache reports are the votes of its precision option."""
    cfg = tiny_config(tau=0.5, gate_precision=precision, dedup=None)
    cache = DySinkCache(cfg, dtype=torch.bfloat16, backend="naive")
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(8):
        cache.begin_block()
        for commit in (False, True):
            for layer in range(cfg.num_layers):
                q, k, v = (torch.randn(1, 24, 2, 16, generator=g).bfloat16() for _ in range(3))
                attn(q, k, v, cache=cache, layer=layer, commit=commit)
                if commit or not (cache.slot_idx >= 0).any():
                    continue
                qbar = q.float().mean(dim=1)
                kbar = (cache.window_ksum[layer] + k.float().sum(dim=1)) / (
                    cache.window_tokens + k.shape[1]
                )[:, None, None]
                if precision == "input":
                    votes = votes_in_dtype(
                        qbar, kbar, cache.bank.mean_k[layer], cache.slot_idx, torch.bfloat16
                    )
                else:
                    votes = gate_votes(qbar, kbar, cache.bank.mean_k[layer], cache.slot_idx)
                torch.testing.assert_close(cache.stats(layer).gate_ratio, votes / 2)
                checked += 1
        cache.end_block(torch.randn(1, 5, generator=g))
    assert checked > 4
