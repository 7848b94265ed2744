"""Self-Forcing's call pattern through ``integrations.self_forcing`` (a transcription of
its model and pipeline in ``upstream_wan.py``): with ``top_k=0`` the outputs equal the
upstream's; cache reuse across videos; a 1-frame first block; tiny K/V dicts."""

from __future__ import annotations

import pytest
import torch
from upstream_wan import STEPS, CausalWanModel, SelfForcingPipeline

from dysink_kernels import DySinkCache, DySinkConfig, SinkAttention
from dysink_kernels.integrations import self_forcing
from dysink_kernels.integrations.kv_cache_adapter import tiny_kv_cache

T = 8  # tokens per frame (2 x 4 patches)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(local_attn_size=-1, first_frame=False, seed=0):
    torch.manual_seed(seed)
    model = CausalWanModel(local_attn_size=local_attn_size).eval()
    model.independent_first_frame = first_frame
    return model


def generate(model, frames, videos=1, patch=False, tiny=False, batch=1, **kw):
    kv_tokens = model.blocks[0].self_attn.max_attention_size
    pipe = SelfForcingPipeline(model, kv_tokens)
    handle = self_forcing.enable_dysink(model, tokens_per_frame=T, **kw) if patch else None
    if tiny:
        pipe.kv_cache1 = tiny_kv_cache(len(model.blocks), batch, 2, 16, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    outs = []
    for _ in range(videos):
        noise = torch.randn(batch, frames, T, 4, generator=g)
        cond = torch.randn(batch, 8, generator=g)
        outs.append(pipe.inference(noise, cond, g))
    if handle is not None:
        handle.remove()
    return outs, pipe, handle


@pytest.mark.parametrize(
    "local, first, frames",
    [(-1, False, 21), (6, False, 21), (9, True, 19), (-1, True, 16)],
    ids=["global-21", "window-6", "window-9-first-frame", "global-first-frame"],
)
def test_top_k_0_equals_self_forcing(local, first, frames):
    model = make_model(local, first)
    theirs, pipe, _ = generate(model, frames, videos=2)
    ours, pipe2, handle = generate(model, frames, videos=2, patch=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    c = handle.cache.config
    assert (c.top_k, c.sink_frames, c.gate) == (0, 0, False)
    assert c.local_frames == (21 if local == -1 else local)
    # the second video started a new stream on the same cache (reset by index replacement)
    blocks = (frames - int(first)) // 3 + int(first)
    assert handle.cache.block == blocks - 1 and handle.adapter._in_block  # the last one waits
    # the upstream dicts' indices are kept as the upstream keeps them
    for d, e in zip(pipe2.kv_cache1, pipe.kv_cache1):
        assert int(d["global_end_index"]) == int(e["global_end_index"])
        assert int(d["local_end_index"]) == int(e["local_end_index"])
        assert not d["k"].any(), "the adapter never writes the upstream K/V"


def test_tiny_kv_dicts():
    model = make_model(9)
    theirs, _, _ = generate(model, 15)
    ours, pipe, _ = generate(model, 15, patch=True, tiny=True)
    torch.testing.assert_close(ours[0], theirs[0], atol=2e-5, rtol=2e-5)
    assert all(d["k"].numel() == 0 for d in pipe.kv_cache1)
    assert int(pipe.kv_cache1[0]["local_end_index"]) == 9 * T  # the upstream buffer's size


def native_retrieval(model, cfg, frames, batch):
    """The same model and sampler driven through DySinkCache/SinkAttention directly."""
    cache = DySinkCache(cfg, batch_size=batch, dtype=torch.float32, bank_slots=8)
    attn = SinkAttention(cfg)
    state = {"commit": False}
    originals = []
    from dysink_kernels.integrations._causal_wan import _self_attentions

    def patched(layer, mod):
        def forward(
            x,
            seq_lens,
            grid_sizes,
            freqs,
            block_mask,
            kv_cache=None,
            current_start=0,
            cache_start=None,
            sink=False,
        ):
            b, s = x.shape[:2]
            q = mod.norm_q(mod.q(x)).view(b, s, 2, 16)
            k = mod.norm_k(mod.k(x)).view(b, s, 2, 16)
            v = mod.v(x).view(b, s, 2, 16)
            from upstream_wan import causal_rope_apply

            f0 = current_start // T
            q, k = (
                causal_rope_apply(q, grid_sizes, None, f0),
                causal_rope_apply(k, grid_sizes, None, f0),
            )
            out = attn(q, k, v, cache=cache, layer=layer, commit=state["commit"])
            return mod.o(out.flatten(2))

        return forward

    for i, mod in enumerate(_self_attentions(model)):
        originals.append(mod)
        mod.forward = patched(i, mod)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, frames, T, 4, generator=g)
    cond = torch.randn(batch, 8, generator=g)
    kv = [None] * len(model.blocks)
    out = torch.zeros_like(noise)
    try:
        for start in range(0, frames, 3):
            cache.begin_block()
            x = noise[:, start : start + 3]
            for i, t in enumerate(STEPS):
                x0 = model(
                    x,
                    t=torch.full((batch, 3), t),
                    context=cond,
                    seq_len=0,
                    kv_cache=kv,
                    current_start=start * T,
                )
                if i + 1 < len(STEPS):
                    s = STEPS[i + 1] / 1000.0
                    x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
            out[:, start : start + 3] = x0
            state["commit"] = True
            model(
                x0,
                t=torch.zeros(batch, 3),
                context=cond,
                seq_len=0,
                kv_cache=kv,
                current_start=start * T,
            )
            state["commit"] = False
            cache.end_block()
    finally:
        for mod in originals:
            mod.__dict__.pop("forward", None)
    return out, cache


@pytest.mark.parametrize("batch", [1, 2])
def test_retrieval_equals_the_package_protocol(batch):
    model = make_model(9)
    overrides = dict(top_k=2, gate=True, feature="mean_key", dedup=0.9, tau=0.5)
    cfg = DySinkConfig.self_forcing(2, 2, 16, T, local_frames=9, **overrides)
    ref, ref_cache = native_retrieval(model, cfg, 30, batch)
    ours, _, handle = generate(model, 30, patch=True, batch=batch, bank_slots=8, **overrides)
    assert handle.cache.config == cfg
    torch.testing.assert_close(ours[0], ref, atol=2e-5, rtol=2e-5)
    handle.end_block()  # the last block waits for the next call or an explicit end
    assert torch.equal(handle.cache.bank.frame, ref_cache.bank.frame)
    assert int(handle.cache.bank_size().min()) >= 2


def test_clean_pass_context_skips_the_timestep():
    model = make_model(9)
    handle = self_forcing.enable_dysink(model, tokens_per_frame=T)
    kv = tiny_kv_cache(2, 1, 2, 16, dtype=torch.float32)
    x = torch.randn(1, 3, T, 4)
    cond = torch.randn(1, 8)
    model(x, t=torch.full((1, 3), 500), context=cond, seq_len=0, kv_cache=kv, current_start=0)
    with handle.clean_pass():  # t says noisy, the context says clean
        model(x, t=torch.full((1, 3), 500), context=cond, seq_len=0, kv_cache=kv, current_start=0)
    assert all(handle.adapter._committed)
    handle.remove()
    assert "forward" not in model.blocks[0].self_attn.__dict__


def test_readme_recipe_runs_as_written():
    from types import SimpleNamespace

    from upstream_wan import prompt_embedding, readme_recipe

    class Pipeline(SelfForcingPipeline):
        """Self-Forcing's pipeline attributes the recipe uses, over the transcription."""

        def __init__(self, model):
            super().__init__(model, model.blocks[0].self_attn.max_attention_size)
            self.generator = SimpleNamespace(model=model)
            self.frame_seq_length = T
            self.g = torch.Generator().manual_seed(5)

        def inference(self, noise, text_prompts):
            return super().inference(noise, prompt_embedding(text_prompts), self.g)

    model = make_model(9)
    g = torch.Generator().manual_seed(2)
    noise, noise_2 = torch.randn(2, 12, T, 4, generator=g), torch.randn(2, 12, T, 4, generator=g)
    prompts = ["a cat", "a dog"]
    ref = Pipeline(model)
    want = [ref.inference(noise, prompts), ref.inference(noise_2, prompts)]
    ns = dict(pipeline=Pipeline(model), noise=noise, noise_2=noise_2, prompts=prompts)
    exec(readme_recipe("self_forcing"), ns)
    torch.testing.assert_close(ns["video"], want[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ns["video_2"], want[1], atol=2e-5, rtol=2e-5)
    assert ns["pipeline"].kv_cache1[0]["k"].numel() == 0
    assert ns["handle"].cache.block == 3  # the second video's last block
