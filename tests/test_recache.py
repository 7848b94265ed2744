"""Interactive prompt switches: recache the bank and the window under a new prompt."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import DySinkCache, SinkAttention
from dysink_kernels.tools.models import TinyVideoDiT, generate_block

from harness import GRID, features, tiny_config
from reference_pipeline import ReferencePipeline

BLOCKS_BEFORE, BLOCKS_AFTER = 9, 5


def drive(cfg, batch, use_module: bool, switch: bool = True):
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
        state = ReferencePipeline(cfg, batch)

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
                    lambda lat, first: model(lat, 0.0, cond_b[: lat.shape[0]], first, attend, True)
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


@pytest.mark.parametrize(
    "kw",
    [dict(max_entries=4), dict(sink_frames=3, local_frames=12, tau=0.5)],
    ids=["dysink", "sinks"],
)
def test_recache_equals_emulation_and_generation_continues(kw):
    cfg = tiny_config(**kw)
    ours, log, _ = drive(cfg, 2, use_module=True)
    theirs, ref_log, _ = drive(cfg, 2, use_module=False)
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
    cache.recache(lambda lat, first: model(lat, 0.0, cond_b, first, attend, True))
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
