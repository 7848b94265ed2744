"""Prompt switches on a tiny diffusers Wan model: switch_prompt recaches every stored block
(bank entries each alone, the window in one forward over its last frames)."""

from __future__ import annotations

import pytest
import torch

from dysink_kernels import DySinkCache, apply_wan_rope
from dysink_kernels.integrations.diffusers_wan import (
    dysink_config_for,
    generate_video,
    switch_prompt,
)

diffusers = pytest.importorskip("diffusers")

LATENT_HW, CHANNELS, TEXT_DIM = (4, 6), 4, 16
GRID_HW = (2, 3)  # patches per frame


class KeyCapture:
    """Stock Wan attention that records each layer's keys before RoPE."""

    def __init__(self, original, store, layer):
        self.original, self.store, self.layer = original, store, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):  # fmt: skip
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        self.store[self.layer] = key.detach().clone()
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def fresh_keys(model, latent, first, prompt):
    """Each layer's keys of a clean pass of one block under ``prompt``, at absolute frames."""
    store = {}
    saved = [b.attn1.processor for b in model.blocks]
    for i, b in enumerate(model.blocks):
        b.attn1.set_processor(KeyCapture(saved[i], store, i))
    try:
        x = latent.flatten(1, 2).transpose(1, 2)  # (1, C, F, H, W)
        model(hidden_states=x, timestep=torch.zeros(1), encoder_hidden_states=prompt,
              return_dict=False)  # fmt: skip
    finally:
        for b, p in zip(model.blocks, saved):
            b.attn1.set_processor(p)
    frames = latent.shape[1] * latent.shape[2]
    return {ly: apply_wan_rope(k, (frames, *GRID_HW), (first, 0, 0)) for ly, k in store.items()}


def test_switch_prompt_recaches_bank_and_window():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
        in_channels=CHANNELS, out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=16,
        ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ).eval()  # fmt: skip
    cfg = dysink_config_for(model, LATENT_HW, feature="mean_key", dedup=0.99, max_entries=4)
    cache = DySinkCache(cfg, dtype=torch.float32, store_latents=True)
    g = torch.Generator().manual_seed(1)
    prompt_a = torch.randn(1, 5, TEXT_DIM, generator=g)
    prompt_b = torch.randn(1, 5, TEXT_DIM, generator=g)
    noise = torch.randn(1, CHANNELS, 3 * 7, *LATENT_HW, generator=g)
    generate_video(model, cache, noise, prompt_a, generator=g)
    features = cache.bank.feature.clone()
    frames = cache.bank.frame.clone()

    n = switch_prompt(model, cache, prompt_b)
    assert n > 0
    assert torch.equal(cache.bank.feature, features) and torch.equal(cache.bank.frame, frames)

    T = cfg.tokens_per_frame
    for slot, first in enumerate(cache.bank.frame.tolist()):
        if first < 0:
            continue
        want = fresh_keys(model, cache.bank_latent[slot : slot + 1], first, prompt_b)
        for layer in range(cfg.num_layers):
            got = cache.bank.k[layer, slot]
            torch.testing.assert_close(got, want[layer][0], atol=2e-4, rtol=2e-4)
            torch.testing.assert_close(
                cache.bank.mean_k[layer, slot], want[layer][0].mean(0), atol=2e-4, rtol=2e-4
            )
    # the window: one clean forward over its last min(L_eff, c) frames (they attend each other)
    n = cache.recacher.window_frames()
    first = cache.frame - n
    rows = [cache.recacher.latent_row(b) for b in range(first // 3, cache.frame // 3)]
    want = fresh_keys(model, cache.window_latent[:, rows].flatten(1, 2), first, prompt_b)
    held = [f for f in cache.recacher.held_frames() if f >= first]
    assert n == 9 and len(held) == 9
    for f in held:
        pos = cache.recacher.frame_slot(f)
        for layer in range(cfg.num_layers):
            got = cache.local_k[layer, 0, pos * T : (pos + 1) * T]
            ref = want[layer][0, (f - first) * T : (f - first + 1) * T]
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)

    # generation continues under the new prompt
    more = generate_video(model, cache, torch.randn(1, CHANNELS, 6, *LATENT_HW, generator=g),
                          prompt_b, generator=g)  # fmt: skip
    assert torch.isfinite(more).all() and cache.block == 9


@pytest.mark.parametrize("model", ["tiny", "wan-tiny"])
def test_demo_switch_leaves_the_blocks_before_it_unchanged(model):
    from dysink_kernels.tools.demo import run_demo, run_wan_demo

    torch.set_num_threads(1)
    run = run_demo if model == "tiny" else run_wan_demo
    kw = dict(blocks=6, layers=2, heads=2, head_dim=16, steps=2, progress=False)
    if model == "wan-tiny":
        kw["latent_hw"] = (4, 6)
    plain = run(**kw).blocks
    switched = run(switch_at=(4,), **kw).blocks
    assert switched[:4] == plain[:4]
    assert switched[4]["recached"] and switched[4] != plain[4]


def test_wan_tiny_demo_recalls_a_scene():
    """Some block retrieves an entry of its own scene from before the entries next to its
    window: a scene that came back is recalled (not only the newest entries)."""
    from dysink_kernels.tools.demo import run_wan_demo

    torch.set_num_threads(1)
    blocks = run_wan_demo(progress=False).blocks
    recalled = [
        (r["block"], f)
        for r in blocks
        for f in r["retrieved"]
        if f < r["window_start"] - 6 and blocks[f // 3]["scene"] == r["scene"]
    ]
    assert recalled, "no scene was recalled"
