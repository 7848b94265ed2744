"""LongLive's call pattern through ``integrations.longlive`` (a transcription of its model
and interactive pipeline in ``upstream_wan.py``): with LongLive's settings (sink 3,
window 12, no gate, ``top_k=0``) the outputs equal the upstream's, prompt-switch
recaches included; the self-attention returns LongLive's tuple; with retrieval on the
outputs equal the package's own protocol."""

from __future__ import annotations

import pytest
import torch
from upstream_wan import STEPS, CausalWanModel, LongLiveInteractivePipeline, causal_rope_apply

from dysink_kernels import DySinkCache, DySinkConfig, SinkAttention
from dysink_kernels.integrations import longlive
from dysink_kernels.integrations._causal_wan import _self_attentions

T = 8


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(local=12, sink=3, seed=0):
    torch.manual_seed(seed)
    return CausalWanModel(local_attn_size=local, sink_size=sink, variant="longlive").eval()


def inputs(batch, frames, n_prompts, seed=1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, frames, T, 4, generator=g)
    conds = [torch.randn(batch, 8, generator=g) for _ in range(n_prompts)]
    return noise, conds, g


def run_upstream(model, frames, switches, batch=1, global_sink=False, patch=None):
    pipe = LongLiveInteractivePipeline(
        model, model.blocks[0].self_attn.max_attention_size, global_sink=global_sink
    )
    handle = None if patch is None else longlive.enable_dysink(model, tokens_per_frame=T, **patch)
    noise, conds, g = inputs(batch, frames, len(switches) + 1)
    try:
        out = pipe.inference(noise, conds, switches, g)
    finally:
        if handle is not None:
            handle.remove()
    return out, pipe, handle


@pytest.mark.parametrize(
    "switches, global_sink, batch",
    [((), False, 1), ((9, 27), False, 1), ((18, 30), False, 2), ((21,), True, 1)],
    ids=["no-switch", "switch-early-and-late", "batch2", "global-sink"],
)
def test_longlive_settings_equal_upstream(switches, global_sink, batch):
    model = make_model()
    theirs, pipe, _ = run_upstream(model, 42, switches, batch, global_sink)
    ours, pipe2, handle = run_upstream(model, 42, switches, batch, global_sink, patch={})
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
    c = handle.cache.config
    assert (c.sink_frames, c.local_frames, c.top_k, c.gate) == (3, 12, 0, False)
    for d, e in zip(pipe2.kv_cache1, pipe.kv_cache1):
        assert int(d["global_end_index"]) == int(e["global_end_index"])
        assert int(d["local_end_index"]) == int(e["local_end_index"])


def test_gating_the_static_sinks_changes_longlive():
    """The issue's first point: ``gate=True`` would also gate LongLive's static sinks."""
    model = make_model()
    theirs, _, _ = run_upstream(model, 30, ())
    gated, _, handle = run_upstream(model, 30, (), patch=dict(gate=True, tau=0.3))
    assert handle.cache.config.gate
    assert not torch.allclose(gated, theirs, atol=1e-4)


def test_self_attention_returns_longlive_tuple():
    model = make_model()
    handle = longlive.enable_dysink(model, tokens_per_frame=T)
    from upstream_wan import build_kv_cache

    kv = build_kv_cache(model, 1, 12 * T)
    x = torch.randn(1, 3, T, 4)
    model(
        x,
        t=torch.full((1, 3), 1000),
        context=torch.randn(1, 8),
        seq_len=0,
        kv_cache=kv,
        current_start=0,
    )
    attn = model.blocks[0].self_attn
    tok = torch.randn(1, 3 * T, model.dim)
    grid = torch.tensor([[3, 2, 4]])
    y, (end, local_end, info) = attn(tok, None, grid, None, None, kv[0], 0, 0, False)
    assert y.shape == tok.shape and (end, local_end, info) == (3 * T, 3 * T, None)
    handle.remove()


def native(model, cfg, frames, switches, batch):
    """The same model and pipeline shape driven through DySinkCache/SinkAttention, the
    switch through ``Recacher.rewrite_window`` (the package's own protocol)."""
    cache = DySinkCache(cfg, batch_size=batch, dtype=torch.float32, bank_slots=8)
    attn = SinkAttention(cfg)
    mode = {"commit": False, "recache": None}

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
            f0 = current_start // T
            q, k = (
                causal_rope_apply(q, grid_sizes, None, f0),
                causal_rope_apply(k, grid_sizes, None, f0),
            )
            if mode["recache"] is not None:
                out = cache.recacher.rewrite_window(
                    layer, q, k, v, mode["recache"], sinks="replace"
                )
            else:
                out = attn(q, k, v, cache=cache, layer=layer, commit=mode["commit"])
            return mod.o(out.flatten(2)), (current_start + s, 0, None)

        return forward

    mods = _self_attentions(model)
    for i, mod in enumerate(mods):
        mod.forward = patched(i, mod)
    noise, conds, g = inputs(batch, frames, len(switches) + 1)
    kv = [{"global_end_index": torch.zeros(1), "local_end_index": torch.zeros(1)}] * 2
    model._apply_cache_updates = lambda *a: None
    out = torch.zeros_like(noise)
    seg = 0
    try:
        for start in range(0, frames, 3):
            if seg < len(switches) and start >= switches[seg]:
                seg += 1
                n = min(cfg.local_frames, start)
                mode["recache"] = start - n
                model(
                    out[:, start - n : start],
                    t=torch.zeros(batch, n),
                    context=conds[seg],
                    seq_len=0,
                    kv_cache=kv,
                    current_start=(start - n) * T,
                )
                mode["recache"] = None
            cache.begin_block()
            x = noise[:, start : start + 3]
            for i, t in enumerate(STEPS):
                x0 = model(
                    x,
                    t=torch.full((batch, 3), t),
                    context=conds[seg],
                    seq_len=0,
                    kv_cache=kv,
                    current_start=start * T,
                )
                if i + 1 < len(STEPS):
                    s = STEPS[i + 1] / 1000.0
                    x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
            out[:, start : start + 3] = x0
            mode["commit"] = True
            model(
                x0,
                t=torch.zeros(batch, 3),
                context=conds[seg],
                seq_len=0,
                kv_cache=kv,
                current_start=start * T,
            )
            mode["commit"] = False
            cache.end_block()
    finally:
        for mod in mods:
            mod.__dict__.pop("forward", None)
        del model._apply_cache_updates
    return out, cache


@pytest.mark.parametrize("batch", [1, 2])
def test_retrieval_equals_the_package_protocol(batch):
    overrides = dict(top_k=2, gate=True, tau=0.5, dedup=0.9, feature="mean_key")
    model = make_model(local=9, sink=0)
    cfg = DySinkConfig.longlive(2, 2, 16, T, local_frames=9, sink_frames=0, **overrides)
    ref, ref_cache = native(model, cfg, 36, (21,), batch)
    ours, _, handle = run_upstream(model, 36, (21,), batch, patch=dict(bank_slots=8, **overrides))
    assert handle.cache.config == cfg
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)
    handle.end_block()
    assert torch.equal(handle.cache.bank.frame, ref_cache.bank.frame)
    assert int(handle.cache.bank_size().min()) >= 2


def test_readme_recipe_runs_as_written():
    from types import SimpleNamespace

    from upstream_wan import prompt_embedding, readme_recipe

    class Pipeline(LongLiveInteractivePipeline):
        """LongLive's interactive pipeline attributes the recipe uses, over the transcription."""

        def __init__(self, model):
            super().__init__(model, model.blocks[0].self_attn.max_attention_size)
            self.generator = SimpleNamespace(model=model)
            self.frame_seq_length = T
            self.g = torch.Generator().manual_seed(5)

        def inference(self, noise, text_prompts_list, switch_frame_indices):
            conds = [prompt_embedding(p) for p in text_prompts_list]
            return super().inference(noise, conds, switch_frame_indices, self.g)

    model = make_model()
    noise = torch.randn(1, 30, T, 4, generator=torch.Generator().manual_seed(2))
    prompts, switches = [["a cat"], ["a cat at night"], ["a dog"]], [12, 21]
    want = Pipeline(model).inference(noise, prompts, switches)
    ns = dict(
        pipeline=Pipeline(model),
        noise=noise,
        text_prompts_list=prompts,
        switch_frame_indices=switches,
    )
    exec(readme_recipe("longlive"), ns)
    torch.testing.assert_close(ns["video"], want, atol=2e-5, rtol=2e-5)
