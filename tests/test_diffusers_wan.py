"""DySink on a tiny random-weight diffusers ``WanTransformer3DModel``.

The processor path is checked against a test-local one that applies diffusers'
RoPE tables at absolute frame positions and attends through ``ReferencePipeline``
(explicit ``torch.cat`` of per-frame K/V, host-side decisions), driven by a
test-local copy of the few-step sampler.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dysink_kernels import DySinkCache
from dysink_kernels.integrations.diffusers_wan import (
    DySinkWanAttnProcessor,
    _shift_tables,
    disable_dysink,
    dysink_config_for,
    enable_dysink,
    generate_video,
    wan_tokens_per_frame,
)

from reference_pipeline import ReferencePipeline

diffusers = pytest.importorskip("diffusers")

LATENT_HW = (4, 6)  # 2 x 3 patches per frame: 6 tokens, rows != columns
CHANNELS, TEXT_DIM, TEXT_LEN, FEAT_DIM = 4, 16, 5, 12
TIMESTEPS = (1000, 750, 500, 250)


def tiny_wan(layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
        in_channels=CHANNELS, out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=16,
        ffn_dim=64, num_layers=layers, rope_max_seq_len=64,
    )  # fmt: skip
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """The model's ops are tiny: one thread avoids stalls on a busy 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return tiny_wan()


def scene_features(batch: int, blocks: int, seed: int = 3) -> torch.Tensor:
    """(blocks, B, F) features: scenes that come back, with near-duplicates (dedup)."""
    g = torch.Generator().manual_seed(seed)
    scenes = torch.randn(3, FEAT_DIM, generator=g)
    order = [0, 1, 0, 2, 1, 1, 0, 2]
    out = torch.empty(blocks, batch, FEAT_DIM)
    for i in range(blocks):
        for b in range(batch):
            noise, scene = [0.02, 0.5][(i + b) % 2], order[(i + b) % len(order)]
            if b == 1 and i < 4:  # sample 1 repeats itself early: dedup keeps its bank small
                noise, scene = 0.01, 2
            out[i, b] = scenes[scene] + noise * torch.randn(FEAT_DIM, generator=g)
    return out


def inputs(batch: int, blocks: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, CHANNELS, 3 * blocks, *LATENT_HW, generator=g)
    context = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    return noise, context


def feature_fn_from(feats: torch.Tensor):
    """feature_fn returning the next block's prepared features (ignores the latents)."""
    it = iter(feats)
    return lambda x0: next(it)


class RefWanProcessor:
    """Stock projections and norms, RoPE at absolute frames, ReferencePipeline attention."""

    def __init__(self, model, ref: ReferencePipeline, layer: int, state: dict):
        self.model, self.ref, self.layer, self.state = model, ref, layer, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):  # fmt: skip
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        first = self.state["frame"]
        n = hidden_states.shape[1]
        # diffusers' own tables for frames 0 .. first+f-1; keep this block's rows.
        latent = hidden_states.new_zeros(1, CHANNELS, first + 3, *LATENT_HW)
        cos, sin = (t[:, -n:] for t in self.model.rope(latent))
        q, k = (_rope(x, cos, sin) for x in (q, k))
        out = self.ref.attend(self.layer, q, k, v, self.state["commit"])
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(q)))


def _rope(x, cos, sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


def reference_video(model, cfg, noise, context, feats, generators):
    """The sampler written out again, with ReferencePipeline as the attention."""
    model = copy.deepcopy(model)
    B = noise.shape[0]
    ref = ReferencePipeline(cfg, B, bank_slots=32)
    state = {"frame": 0, "commit": False}
    for i, block in enumerate(model.blocks):
        block.attn1.set_processor(RefWanProcessor(model, ref, i, state))

    def x0_of(x, t):
        ts = torch.full((B,), float(t))
        v = model(x, ts, context, return_dict=False)[0]
        return x - t / 1000 * v

    out = torch.empty_like(noise)
    with torch.no_grad():
        for i in range(noise.shape[2] // 3):
            ref.begin_block()
            state["frame"] = 3 * i
            x = noise[:, :, 3 * i : 3 * i + 3]
            for j, t in enumerate(TIMESTEPS):
                x0 = x0_of(x, t)
                if j + 1 < len(TIMESTEPS):
                    s = TIMESTEPS[j + 1] / 1000
                    fresh = torch.cat([torch.randn(x0[b : b + 1].shape, generator=g)
                                       for b, g in enumerate(generators)])  # fmt: skip
                    x = (1 - s) * x0 + s * fresh
            state["commit"] = True
            x0_of(x0, 0.0)
            state["commit"] = False
            out[:, :, 3 * i : 3 * i + 3] = x0
            ref.end_block(None if cfg.feature == "mean_key" else feats[i])
    return out, ref


def dysink_video(model, cfg, noise, context, feats, generators):
    """generate_video with a decision log in ReferencePipeline's format."""
    B = noise.shape[0]
    cache = DySinkCache(cfg, batch_size=B, dtype=torch.float32, bank_slots=32)
    log: list = []

    def record(layer, commit):
        st = cache.stats(layer)
        frames = cache.bank.frame.tolist()
        kept = [[frames[s] for s in row if s >= 0] for row in st.kept_idx.tolist()]
        got = [[f for f in row if f >= 0] for row in cache.retrieved_frames().tolist()]
        sinks = [True] * B if st.sink_kept is None else st.sink_kept.tolist()
        log.append((cache.block, layer, commit, got, kept, sinks))

    handle = enable_dysink(model, cache, on_attention=record)
    try:
        out = generate_video(
            model, cache, noise, context, TIMESTEPS, generator=generators,
            feature_fn=None if cfg.feature == "mean_key" else feature_fn_from(feats),
        )  # fmt: skip
    finally:
        handle.remove()
    return out, log


def compare_with_reference(model, batch, blocks=6, **kw):
    cfg = dysink_config_for(model, LATENT_HW, **kw)
    noise, context = inputs(batch, blocks)
    feats = scene_features(batch, blocks)
    gens = lambda: [torch.Generator().manual_seed(10 + b) for b in range(batch)]
    ours, log = dysink_video(model, cfg, noise, context, feats, gens())
    theirs, ref = reference_video(model, cfg, noise, context, feats, gens())
    assert len(log) == len(ref.log)
    for mine, expected in zip(log, ref.log):
        assert mine == expected, f"decision differs: module {mine} vs reference {expected}"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    return log, ref


def _dropped(log) -> int:
    return sum(
        len(g) - len(k) for _, _, commit, got, kept, _ in log if not commit
        for g, k in zip(got, kept)
    )  # fmt: skip


def _samples_differ(log) -> bool:
    return any(len({tuple(g) for g in got}) > 1 for _, _, commit, got, _, _ in log if not commit)


def test_config_and_rope_tables(model):
    cfg = dysink_config_for(model, LATENT_HW, top_k=3)
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim) == (2, 2, 32)
    assert cfg.tokens_per_frame == wan_tokens_per_frame(model, LATENT_HW) == 6
    assert cfg.top_k == 3
    with pytest.raises(ValueError, match="divisible"):
        wan_tokens_per_frame(model, (5, 6))
    # Shifting diffusers' tables for frames 0..2 by 7 gives its tables for frames 7..9.
    cos, sin = model.rope(torch.zeros(1, CHANNELS, 3, *LATENT_HW))
    cos10, sin10 = model.rope(torch.zeros(1, CHANNELS, 10, *LATENT_HW))
    c7, s7 = _shift_tables(cos, sin, 7)
    torch.testing.assert_close(c7, cos10[:, -cos.shape[1] :], atol=1e-6, rtol=0)
    torch.testing.assert_close(s7, sin10[:, -sin.shape[1] :], atol=1e-6, rtol=0)


def test_first_block_equals_stock_processor(model):
    cfg = dysink_config_for(model, LATENT_HW)
    noise, context = inputs(2, 1)
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        stock = model(noise, t, context, return_dict=False)[0]
        cache = DySinkCache(cfg, batch_size=2, dtype=torch.float32)
        handle = enable_dysink(model, cache)
        try:
            cache.begin_block()
            ours = model(noise, t, context, return_dict=False)[0]
            with handle.clean_pass():
                model(noise, t, context, return_dict=False)
            cache.end_block(torch.randn(2, FEAT_DIM))
        finally:
            handle.remove()
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_disable_restores_stock_bit_identically():
    model = tiny_wan()
    pristine = copy.deepcopy(model)
    originals = [b.attn1.processor for b in model.blocks]
    cross = [b.attn2.processor for b in model.blocks]
    cfg = dysink_config_for(model, LATENT_HW, feature="mean_key")
    noise, context = inputs(1, 2)
    cache = DySinkCache(cfg, dtype=torch.float32)
    enable_dysink(model, cache)
    assert all(isinstance(b.attn1.processor, DySinkWanAttnProcessor) for b in model.blocks)
    assert [b.attn2.processor for b in model.blocks] == cross, "attn2 must stay untouched"
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_dysink(model, cache)
    generate_video(model, cache, noise, context, generator=torch.Generator().manual_seed(0))
    assert disable_dysink(model) is True
    assert disable_dysink(model) is False
    assert all(b.attn1.processor is p for b, p in zip(model.blocks, originals))
    # generate_video on an unpatched model enables DySink for the call only.
    cache.reset()
    generate_video(model, cache, noise, context, generator=torch.Generator().manual_seed(0))
    assert all(b.attn1.processor is p for b, p in zip(model.blocks, originals))
    t = torch.tensor([500.0])
    with torch.no_grad():
        a = model(noise[:, :, :3], t, context, return_dict=False)[0]
        b = pristine(noise[:, :, :3], t, context, return_dict=False)[0]
    assert torch.equal(a, b)


def test_six_blocks_equal_reference(model):
    log, ref = compare_with_reference(model, batch=1, tau=0.5, local_frames=6)
    assert any(got[0] for _, _, commit, got, _, _ in log if not commit), "nothing retrieved"
    assert 0 < len(ref.banks[0]) < 6, "dedup never skipped or never stored"
    assert _dropped(log) > 0, "the gate never dropped an entry"


def test_mean_key_static_sinks_equal_reference(model):
    log, ref = compare_with_reference(model, batch=1, feature="mean_key", dedup=0.8,
                                      sink_frames=3, local_frames=9, tau=0.5)  # fmt: skip
    assert 1 < len(ref.banks[0]) < 6, "dedup never skipped or never stored"
    assert _dropped(log) > 0 and any(not s[0] for *_, s in log), "the gate never dropped"


@pytest.mark.parametrize(
    "scopes", [("batch", "batch"), ("sample", "sample")], ids=["batch-scope", "sample-scope"]
)
def test_batch3_equals_reference(model, scopes):
    gate_scope, window_scope = scopes
    log, ref = compare_with_reference(
        model, batch=3, gate_scope=gate_scope, window_scope=window_scope, tau=0.5, local_frames=6
    )
    assert _samples_differ(log), "every sample retrieved the same frames: nothing per-sample"
    assert len({len(bank) for bank in ref.banks}) > 1, "per-sample dedup never differed"


def test_batch3_sample_scope_equals_three_single_runs(model):
    blocks = 6
    cfg = dysink_config_for(model, LATENT_HW, gate_scope="sample", window_scope="sample",
                            tau=0.5, local_frames=6)  # fmt: skip
    noise, context = inputs(3, blocks)
    feats = scene_features(3, blocks)
    gens = [torch.Generator().manual_seed(10 + b) for b in range(3)]
    both, log3 = dysink_video(model, cfg, noise, context, feats, gens)
    for b in range(3):
        g = [torch.Generator().manual_seed(10 + b)]
        s = slice(b, b + 1)
        single, log1 = dysink_video(model, cfg, noise[s], context[s], feats[:, s], g)
        torch.testing.assert_close(single, both[s], atol=1e-5, rtol=1e-5)
        for (blk, ly, cm, got, kept, sk), (blk1, ly1, cm1, got1, kept1, sk1) in zip(log3, log1):
            assert (blk, ly, cm) == (blk1, ly1, cm1)
            assert (got[b], kept[b], sk[b]) == (got1[0], kept1[0], sk1[0])
    assert _samples_differ(log3)


def test_bad_input(model):
    cfg = dysink_config_for(model, LATENT_HW)
    cache = DySinkCache(cfg, dtype=torch.float32)
    noise, context = inputs(1, 1)
    with pytest.raises(ValueError, match="feature_fn"):
        generate_video(model, cache, noise, context)
    with pytest.raises(ValueError, match="multiple"):
        generate_video(model, cache, noise[:, :, :2], context, feature_fn=lambda x: x)
    with pytest.raises(ValueError, match="tokens per frame"):
        generate_video(model, cache, torch.randn(1, CHANNELS, 3, 4, 4), context,
                       feature_fn=lambda x: x)  # fmt: skip
    other = dysink_config_for(model, LATENT_HW, num_layers=3)
    with pytest.raises(ValueError, match="does not match"):
        enable_dysink(model, DySinkCache(other, dtype=torch.float32))
    assert all(not isinstance(b.attn1.processor, DySinkWanAttnProcessor) for b in model.blocks)


def test_cli_demo_wan_tiny(tmp_path, capsys):
    from dysink_kernels.__main__ import main

    rc = main(["demo", "--model", "wan-tiny", "--blocks", "5", "--layers", "2", "--batch", "2",
               "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "wan-tiny" in out and "block   4" in out and "retrieved" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["feature"] == "mean_key" and len(summary["blocks"]) == 5
    assert any(b["retrieved"] for b in summary["blocks"])
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
