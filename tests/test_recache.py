"""Interactive prompt switches: recache the bank and the window under a new prompt.

``window="joint"`` (default) re-encodes the window's last ``min(L_eff, c)`` frames in
one forward where they attend each other, as the published interactive pipeline;
``window="blocks"`` recaches each window block by itself."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import DySinkCache, SinkAttention
from dysink_kernels.tools.models import TinyVideoDiT, generate_block

from harness import GRID, features, tiny_config
from reference_pipeline import ReferencePipeline

BLOCKS_BEFORE, BLOCKS_AFTER = 9, 5


def _full_attention(store):
    def attend(layer, q, k, v, commit):
        store[layer] = (k.clone(), v.clone())
        p = torch.softmax(
            torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5, dim=-1
        )
        return torch.einsum("bhqk,bkhd->bqhd", p, v.double()).to(q.dtype)

    return attend


class JointReference(ReferencePipeline):
    """The emulation with the published window recache: bank entries and sink blocks
    each alone, then the window's last ``min(L_eff - s, c - s)`` frames in one forward
    in which they attend each other."""

    def recache(self, run_block):
        c = self.cfg
        T, fpb, s = c.tokens_per_frame, c.frames_per_block, c.sink_frames
        for bank in self.banks:
            for e in bank:
                store = {}
                run_block(e["latent"], e["frame"], _full_attention(store))
                e["k"] = [store[ly][0][0] for ly in range(c.num_layers)]
                e["v"] = [store[ly][1][0] for ly in range(c.num_layers)]
        done = self.block * fpb
        l_eff = self._l_eff(min(len(bank) for bank in self.banks))
        n = max(0, min(l_eff - s, done - min(s, done)))
        for first in range(0, min(s, done - n), fpb):
            self._rewrite(run_block, [first], first)
        if n:
            self._rewrite(run_block, list(range(done - n, done, fpb)), done - n)
        del T

    def _rewrite(self, run_block, blocks, first):
        c = self.cfg
        T = c.tokens_per_frame
        latent = torch.cat([self.latents[b] for b in blocks], dim=1)
        store = {}
        run_block(latent, first, _full_attention(store))
        for i in range(latent.shape[1]):
            for ly in range(c.num_layers):
                self.frames_k[ly][first + i] = store[ly][0][:, i * T : (i + 1) * T].clone()
                self.frames_v[ly][first + i] = store[ly][1][:, i * T : (i + 1) * T].clone()


def drive(cfg, batch, use_module: bool, switch: bool = True, window: str = "joint"):
    """Generate, switch the prompt after BLOCKS_BEFORE blocks, continue; return the
    latents, the decision log and the cache/emulation."""
    torch.manual_seed(0)
    model = TinyVideoDiT(cfg.num_layers, cfg.num_heads, cfg.head_dim, GRID)
    g = torch.Generator().manual_seed(1)
    cond_a = torch.randn(batch, 8, generator=g)
    cond_b = torch.randn(batch, 8, generator=g)
    feats = features(batch, BLOCKS_BEFORE + BLOCKS_AFTER)
    log = []
    if use_module:
        state = DySinkCache(cfg, batch_size=batch, dtype=torch.float32, store_latents=True)
        attn = SinkAttention(cfg)

        def attend(layer, q, k, v, commit):
            out = attn(q, k, v, cache=state, layer=layer, commit=commit)
            if state.recacher.target is None:
                frames = state.bank.frame.tolist()
                kept = [
                    [frames[s] for s in row if s >= 0]
                    for row in state.stats(layer).kept_idx.tolist()
                ]
                log.append((state.block, layer, commit, kept))
            return out
    else:
        state = (JointReference if window == "joint" else ReferencePipeline)(cfg, batch)

        def attend(layer, q, k, v, commit):
            out = state.attend(layer, q, k, v, commit)
            log.append((state.block, layer, commit, state.log[-1][4]))
            return out

    outs = []
    cond = cond_a
    for i in range(BLOCKS_BEFORE + BLOCKS_AFTER):
        if switch and i == BLOCKS_BEFORE:
            cond = cond_b
            if use_module:
                n = state.recache(
                    lambda lat, first: model(lat, 0.0, cond_b[: lat.shape[0]], first, attend, True),
                    window=window,
                )
                assert n > 0
            else:
                state.recache(
                    lambda lat, first, att: model(
                        lat, 0.0, cond_b[: lat.shape[0]], first, att, True
                    )
                )
        state.begin_block()
        noise = torch.randn(batch, cfg.frames_per_block, 8, 4, generator=g)
        x0 = generate_block(model, noise, cond, i * cfg.frames_per_block, attend, generator=g)
        outs.append(x0)
        feat = None if cfg.feature == "mean_key" else feats[i]
        state.end_block(feat, latent=x0)
    return torch.stack(outs), log, state


@pytest.mark.parametrize("window", ["joint", "blocks"])
@pytest.mark.parametrize(
    "kw",
    [dict(max_entries=4), dict(sink_frames=3, local_frames=12, tau=0.5)],
    ids=["dysink", "sinks"],
)
def test_recache_equals_emulation_and_generation_continues(kw, window):
    cfg = tiny_config(**kw)
    ours, log, _ = drive(cfg, 2, use_module=True, window=window)
    theirs, ref_log, _ = drive(cfg, 2, use_module=False, window=window)
    assert log == ref_log, "decisions differ after the switch"
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=2e-4)


def test_recached_kv_match_fresh_clean_passes():
    """Right after a switch, every stored K/V equals a clean pass of its latent under the
    new prompt (the block attending itself); mean keys follow; features do not change."""
    cfg = tiny_config(max_entries=4)
    torch.manual_seed(0)
    model = TinyVideoDiT(cfg.num_layers, cfg.num_heads, cfg.head_dim, GRID)
    g = torch.Generator().manual_seed(1)
    cond_a, cond_b = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    cache = DySinkCache(cfg, dtype=torch.float32, store_latents=True)
    attn = SinkAttention(cfg)
    attend = lambda layer, q, k, v, commit: attn(q, k, v, cache=cache, layer=layer, commit=commit)
    latents = {}
    for i in range(BLOCKS_BEFORE):
        cache.begin_block()
        noise = torch.randn(1, 3, 8, 4, generator=g)
        latents[3 * i] = generate_block(model, noise, cond_a, 3 * i, attend, generator=g)
        cache.end_block(torch.randn(1, 5, generator=g), latent=latents[3 * i])
    before = {n: getattr(cache.bank, n).clone() for n in ("feature", "owner", "frame", "stamp")}
    cache.recache(lambda lat, first: model(lat, 0.0, cond_b, first, attend, True), window="blocks")
    for n, t in before.items():
        assert torch.equal(getattr(cache.bank, n), t), f"recache changed the bank's {n}"

    def fresh(first):
        store = {}

        def own(layer, q, k, v, commit):
            store[layer] = k.clone()
            p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, dim=-1)
            return torch.einsum("bhqk,bkhd->bqhd", p, v)

        model(latents[first], 0.0, cond_b, first, own, True)
        return store

    for slot, frame in enumerate(cache.bank.frame.tolist()):
        if frame < 0:
            continue
        store = fresh(frame)
        for layer in range(cfg.num_layers):
            torch.testing.assert_close(
                cache.bank.k[layer, slot], store[layer][0], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                cache.bank.mean_k[layer, slot], store[layer][0].mean(0), atol=1e-5, rtol=1e-5
            )
    T = cfg.tokens_per_frame
    for f in cache.recacher.held_frames():
        first = f // 3 * 3
        store = fresh(first)
        pos = cache.recacher.frame_slot(f)
        for layer in range(cfg.num_layers):
            want = store[layer][0, (f - first) * T : (f - first + 1) * T]
            got = cache.local_k[layer, 0, pos * T : (pos + 1) * T]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_recache_without_latents_is_refused_and_cache_stays_usable():
    cfg = tiny_config()
    cache = DySinkCache(cfg, dtype=torch.float32)
    attn = SinkAttention(cfg)
    with pytest.raises(RuntimeError, match="store_latents=True"):
        cache.recache(lambda lat, first: None)
    for _ in range(3):
        cache.begin_block()
        for layer in range(2):
            attn(
                *(torch.randn(1, 24, 2, 16) for _ in range(3)),
                cache=cache,
                layer=layer,
                commit=True,
            )
        cache.end_block(torch.randn(1, 5))
    with pytest.raises(ValueError, match="store_latents=False"):
        cache.begin_block()
        for layer in range(2):
            attn(
                *(torch.randn(1, 24, 2, 16) for _ in range(3)),
                cache=cache,
                layer=layer,
                commit=True,
            )
        cache.end_block(torch.randn(1, 5), latent=torch.randn(1, 3, 8, 4))
    cache.end_block(torch.randn(1, 5))
    assert cache.block == 4


@pytest.mark.parametrize("local_frames", [9, 10])
def test_joint_window_matches_one_fresh_forward(local_frames):
    """After a joint recache the window holds the K/V of ONE clean forward over its last
    ``min(L_eff, c)`` frames (here the bank is full: ``L_eff = L``; with L = 10 the
    window does not start on a block boundary)."""
    cfg = tiny_config(max_entries=4, dedup=None, local_frames=local_frames)
    torch.manual_seed(0)
    model = TinyVideoDiT(cfg.num_layers, cfg.num_heads, cfg.head_dim, GRID)
    g = torch.Generator().manual_seed(1)
    cond_a, cond_b = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    cache = DySinkCache(cfg, dtype=torch.float32, store_latents=True)
    attn = SinkAttention(cfg)
    attend = lambda layer, q, k, v, commit: attn(q, k, v, cache=cache, layer=layer, commit=commit)
    latents = []
    for i in range(6):
        cache.begin_block()
        noise = torch.randn(1, 3, 8, 4, generator=g)
        latents.append(generate_block(model, noise, cond_a, 3 * i, attend, generator=g))
        cache.end_block(torch.randn(1, 5, generator=g), latent=latents[-1])
    n = cache.recacher.window_frames()
    assert n == local_frames
    lo = 18 - n
    calls = []
    cache.recache(
        lambda lat, first: (
            calls.append((lat.shape[1], first)) or model(lat, 0.0, cond_b, first, attend, True)
        )
    )
    assert calls[-1] == (n, lo) and len(calls) == 1 + 4  # 4 bank entries, one window forward
    store = {}
    window = torch.cat(latents, dim=1)[:, lo:]
    model(window, 0.0, cond_b, lo, _full_attention(store), True)
    T = cfg.tokens_per_frame
    for f in range(lo, 18):
        pos = cache.recacher.frame_slot(f)
        for layer in range(cfg.num_layers):
            got = cache.local_k[layer, 0, pos * T : (pos + 1) * T]
            want = store[layer][0][0, (f - lo) * T : (f - lo + 1) * T]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
