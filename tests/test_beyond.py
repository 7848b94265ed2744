"""Beyond the paper: re-positioned sinks and the entropy-anomaly gate."""

from __future__ import annotations

import math

import torch

from dysink_kernels import AnomalyStats, DySinkCache, SinkAttention, rotate_temporal

from harness import tiny_config


def drive(cache, attn, g, blocks, steps=2, record=None):
    cfg = cache.config
    shape = (cache.batch_size, cfg.block_tokens, cfg.num_heads, cfg.head_dim)
    for _ in range(blocks):
        cache.begin_block()
        for _s in range(steps):
            for layer in range(cfg.num_layers):
                q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
                out = attn(q, k, v, cache=cache, layer=layer)
                if record is not None:
                    record(cache, layer, out)
        for layer in range(cfg.num_layers):
            q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
            attn(q, k, v, cache=cache, layer=layer, commit=True)
        cache.end_block(torch.randn(cache.batch_size, 6, generator=g))


def test_relative_sinks_equal_keys_rotated_in_memory():
    """sink_rope="relative" attends exactly what rotating the bank's keys would give."""
    cfg = tiny_config(sink_rope="relative", max_entries=4, dedup=None, tau=0.5)
    cache = DySinkCache(cfg, batch_size=2, dtype=torch.float32)
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(0)
    drive(cache, attn, g, blocks=8)
    cache.begin_block()
    assert (cache.slot_idx >= 0).any()
    twin = DySinkCache(tiny_config(max_entries=4, dedup=None, tau=0.5), batch_size=2,
                       dtype=torch.float32)  # fmt: skip
    # The twin holds the same window and a bank whose retrieved keys are already turned.
    shared = ("local_k", "local_v", "frame_ksum", "window_ksum", "window_tokens", "local_ranges",
              "slot_idx", "sink_active", "write_pos", "write_frames")  # fmt: skip
    for name in shared:
        getattr(twin, name).copy_(getattr(cache, name))
    for name in ("k", "v", "mean_k", "owner", "frame", "stamp"):
        getattr(twin.bank, name).copy_(getattr(cache.bank, name))
    twin._in_block = True
    for b in range(2):
        for j, slot in enumerate(cache.slot_idx[b].tolist()):
            if slot < 0:
                continue
            d = float(cache.slot_delta[b, j])
            expected = cache.frame - cfg.repositioning_distance - int(cache.bank.frame[slot])
            assert d == expected
            twin.bank.k[:, slot] = rotate_temporal(cache.bank.k[:, slot], d)
            twin.bank.mean_k[:, slot] = rotate_temporal(cache.bank.mean_k[:, slot], d)
    q, k, v = (torch.randn(2, cfg.block_tokens, 2, 16, generator=g) for _ in range(3))
    for layer in range(cfg.num_layers):
        a = attn(q, k, v, cache=cache, layer=layer)
        b = SinkAttention(twin.config)(q, k, v, cache=twin, layer=layer)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert torch.equal(cache.stats(layer).kept_idx, twin.stats(layer).kept_idx)


def naive_entropy_gate(records, cfg):
    """Recompute the entropy gate's drops with explicit loops from the recorded stats."""
    mean, var, count, expected = {}, {}, {}, []
    for layer, block, slot_idx, ent, mass in records:
        B, H = len(ent), len(ent[0])
        drop = [[False] * len(slot_idx[0]) for _ in range(B)]
        for b in range(B):
            warm = count.get(layer, 0) >= cfg.anomaly_warmup
            low = 0
            for h in range(H):
                m, v = mean.get((layer, b, h), 0.0), var.get((layer, b, h), 0.0)
                low += int(warm and ent[b][h] < m - cfg.anomaly_z * math.sqrt(max(v, 0.0)))
            for j, slot in enumerate(slot_idx[b]):
                col = [mass[b][h][j] for h in range(H)]
                mu = sum(col) / H
                sd = math.sqrt(sum((x - mu) ** 2 for x in col) / H)
                cv = sd / max(mu, 1e-12)
                draws = mu > cfg.anomaly_min_mass
                drop[b][j] = slot >= 0 and draws and (low / H > 0.5 or cv < cfg.anomaly_min_cv)
        expected.append((layer, block, drop))
        for b in range(B):
            for h in range(H):
                key = (layer, b, h)
                if count.get(layer, 0) == 0:
                    mean[key], var[key] = ent[b][h], 0.0
                else:
                    d = cfg.anomaly_decay
                    diff = ent[b][h] - mean[key]
                    mean[key] += (1 - d) * diff
                    var[key] = d * var[key] + d * (1 - d) * diff * diff
        count[layer] = count.get(layer, 0) + 1
    return expected


def test_entropy_gate_matches_naive_recomputation():
    cfg = tiny_config(
        gate_mode="entropy", anomaly_warmup=2, anomaly_z=0.3, anomaly_min_mass=0.02,
        anomaly_min_cv=0.3, max_entries=4, dedup=None,
    )  # fmt: skip
    cache = DySinkCache(cfg, batch_size=2, dtype=torch.float32)
    attn = SinkAttention(cfg)
    records, kept_log = [], []

    def record(cache, layer, out):
        st = cache.stats(layer)
        records.append((layer, cache.block, st.slot_idx.tolist(),
                        st.attn.entropy.double().mean(-1).tolist(),
                        st.attn.slot_mass.double().tolist()))  # fmt: skip
        kept_log.append((layer, cache.block, st.slot_idx.tolist(), st.kept_idx.tolist()))
        an = cache.anomaly(layer)
        assert an is not None and an.drop_next.shape == st.slot_idx.shape

    drive(cache, attn, torch.Generator().manual_seed(1), blocks=10, steps=3, record=record)
    expected = naive_entropy_gate(records, cfg)
    # The drops decided after call t apply to the next call of that layer in the same block.
    n_drops = 0
    last = {}
    for (layer, block, slots, kept), (_, _, drop) in zip(kept_log, expected):
        prev = last.get(layer)
        want_drop = prev[1] if prev is not None and prev[0] == block else None
        for b in range(len(slots)):
            for j, slot in enumerate(slots[b]):
                dropped = want_drop is not None and want_drop[b][j]
                n_drops += int(dropped)
                assert kept[b][j] == (-1 if dropped or slot < 0 else slot)
        last[layer] = (block, drop)
    assert n_drops > 0, "the entropy gate never dropped a slot: the test would prove little"


def test_anomaly_stats_are_those_of_the_call_whenever_read():
    """The statistics are computed when first read. Read right after each call, each
    call's low-head test uses the running statistics of the call before; read after
    the next begin_block (new slot mask, statistics moved on), they are the same."""
    cfg = tiny_config(anomaly_warmup=2, anomaly_z=0.0, anomaly_decay=0.0, max_entries=4, dedup=None)
    now = []

    def read_now(cache, layer, out):
        now.append((layer, AnomalyStats(*(t.clone() for t in cache.anomaly(layer)))))

    def run(record):
        cache = DySinkCache(cfg, batch_size=2, dtype=torch.float32)
        drive(cache, SinkAttention(cfg), torch.Generator().manual_seed(4), 6, record=record)
        return cache

    run(read_now)
    prev, n_low = {}, 0
    for layer, stats in now:
        if layer in prev and prev[layer][1] >= cfg.anomaly_warmup:
            mean, std = prev[layer][0].entropy_mean, prev[layer][0].entropy_std
            low = stats.entropy < mean - cfg.anomaly_z * std
            assert torch.equal(stats.low_fraction, low.float().mean(dim=1))
            n_low += int(low.any())
        prev[layer] = (stats, prev.get(layer, (None, 0))[1] + 1)
    assert n_low > 0, "no head was ever low: the test would prove little"
    cache = run(None)
    cache.begin_block()
    for layer, (stats, _) in prev.items():
        for late, at_once in zip(cache.anomaly(layer), stats):
            assert torch.equal(late, at_once)


def test_rope_diagnostic_cli(tmp_path, capsys):
    from dysink_kernels.__main__ import main

    rc = main(["rope-diagnostic", "--out", str(tmp_path), "--points", "9", "--max-distance", "300"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "original" in out and "relative" in out
    assert (tmp_path / "rope_diagnostic.png").exists()
    import json

    data = json.loads((tmp_path / "rope_diagnostic.json").read_text())
    # re-positioned sinks do not depend on the distance; original ones do
    assert len(set(data["relative_similarity"])) == 1
    assert len(set(data["original_similarity"])) > 1


def usage_run(blocks=10, entries=3, **kw):
    cfg = tiny_config(max_entries=entries, dedup=None, **kw)
    cache = DySinkCache(cfg, batch_size=2, dtype=torch.float32)
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(5)
    events = []  # ("call", kept, mass) / ("end", usage_before, owner, stamp, frame_after)

    def record(cache, layer, out):
        st = cache.stats(layer)
        events.append(("call", st.kept_idx.clone(), st.attn.slot_mass.mean(dim=1).clone()))

    shape = (2, cfg.block_tokens, cfg.num_heads, cfg.head_dim)
    for _ in range(blocks):
        cache.begin_block()
        if cfg.relevance_mix > 0:
            bank = cache.bank
            state = (bank.usage.clone(), bank.owner.clone(), bank.frame.clone(), cache.frame)
            events.append(("begin", cache.slot_idx.clone(), *state))
        for _s in range(2):
            for layer in range(cfg.num_layers):
                q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
                attn(q, k, v, cache=cache, layer=layer)
                record(cache, layer, None)
        for layer in range(cfg.num_layers):
            q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
            attn(q, k, v, cache=cache, layer=layer, commit=True)
        before = (cache.bank.usage.clone(), cache.bank.owner.clone(), cache.bank.stamp.clone())
        cache.end_block(torch.randn(2, 6, generator=g))
        events.append(("end", *before, cache.bank.frame.clone()))
    return cfg, cache, events


def test_usage_accumulates_decays_and_resets():
    cfg, cache, events = usage_run()
    usage = torch.zeros_like(cache.bank.usage)
    for ev in events:
        if ev[0] == "call":
            for b in range(2):
                for j, slot in enumerate(ev[1][b].tolist()):
                    if slot >= 0:
                        usage[slot] += ev[2][b, j]
        elif ev[0] == "end":
            frames_after = ev[4]
            usage *= cfg.usage_decay
            stored_now = [s for s in range(usage.numel())
                          if int(frames_after[s]) == int(frames_after.max())]  # fmt: skip
            for s in stored_now:
                usage[s] = 0.0
    torch.testing.assert_close(cache.bank.usage, usage, atol=1e-6, rtol=1e-5)


def test_least_relevant_eviction_takes_the_least_used_entry():
    cfg, _, events = usage_run(eviction="least_relevant")
    ends = [ev[1:] for ev in events if ev[0] == "end"]
    checked = 0
    for usage, owner, stamp, frame_after in ends:
        for b in range(2):
            region = range(b * cfg.max_entries, (b + 1) * cfg.max_entries)
            if any(int(owner[s]) < 0 for s in region):
                continue  # not full: a free slot is used
            decayed = usage * cfg.usage_decay
            victim = min(region, key=lambda s: (float(decayed[s]), int(stamp[s])))
            newest = int(frame_after.max())
            assert int(frame_after[victim]) == newest, "did not evict the least used entry"
            checked += 1
    assert checked > 3


def test_relevance_mix_one_retrieves_by_usage():
    """With relevance_mix=1 the score is the normalised usage alone: the retrieved entry
    is the sample's most used candidate (ties: lower frame)."""
    cfg, _, events = usage_run(blocks=14, entries=6, relevance_mix=1.0, top_k=1)
    checked = 0
    for ev in events:
        if ev[0] != "begin":
            continue
        _, slots, usage, owner, frame, cur = ev
        for b in range(2):
            mine = [p for p in range(owner.numel()) if int(owner[p]) == b]
            l_eff = cfg.local_frames + max(0, cfg.top_k - len(mine)) * cfg.frames_per_block
            cands = [p for p in mine if not cur - l_eff <= int(frame[p]) < cur]
            if not cands:
                assert int(slots[b, 0]) == -1
                continue
            top = max(float(usage[p]) for p in cands)
            if top == 0:
                continue  # every candidate unused: the order is by frame, tested elsewhere
            want = min((p for p in cands if float(usage[p]) == top), key=lambda p: int(frame[p]))
            assert int(slots[b, 0]) == want
            checked += 1
    assert checked > 3
