"""Shared drivers for the end-to-end tests: a tiny model run through the module or
through the reference-style emulation, with every decision logged."""

from __future__ import annotations

import torch

from dysink_kernels import DySinkCache, DySinkConfig, SinkAttention
from dysink_kernels.tools.models import TinyVideoDiT, generate_block

from reference_pipeline import ReferencePipeline

LAYERS, HEADS, HEAD_DIM, GRID = 2, 2, 16, (2, 4)  # 8 tokens per frame
SCENES = [0, 0, 1, 1, 2, 0, 0, 3, 1, 1, 2, 2, 0, 3, 3, 1, 0, 2, 2, 1, 3, 0, 1, 2]


def tiny_config(**kw) -> DySinkConfig:
    base = dict(num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, tokens_per_frame=8)
    base.update(kw)
    return DySinkConfig(**base)


def features(
    batch: int, blocks: int, dim: int = 12, seed: int = 1, early_repeat: bool = True
) -> torch.Tensor:
    """(blocks, B, F) features: scenes that come back, some near-duplicates (dedup)."""
    g = torch.Generator().manual_seed(seed)
    scenes = torch.randn(4, dim, generator=g)
    out = torch.empty(blocks, batch, dim)
    for i in range(blocks):
        for b in range(batch):
            noise_scale = [0.02, 0.3, 0.6][(i + b) % 3]
            scene = SCENES[(i + 2 * b) % len(SCENES)]
            if early_repeat and b == 1 and i < 5:  # sample 1 repeats early: small bank
                noise_scale, scene = 0.01, 3
            out[i, b] = scenes[scene] + noise_scale * torch.randn(dim, generator=g)
    return out


def run(cfg, batch, blocks, attend_factory, feats, seed=0, dtype=torch.float32):
    """Generate ``blocks`` blocks with a tiny model shaped like ``cfg``; returns the
    latents of every block (decisions go to the factory's log)."""
    torch.manual_seed(seed)
    model = TinyVideoDiT(cfg.num_layers, cfg.num_heads, cfg.head_dim, GRID).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    conds = torch.randn(blocks, batch, 8, generator=g).to(dtype)
    begin, attend, end = attend_factory()
    outs = []
    for i in range(blocks):
        begin()
        noise = torch.randn(batch, cfg.frames_per_block, 8, 4, generator=g).to(dtype)
        outs.append(
            generate_block(model, noise, conds[i], i * cfg.frames_per_block, attend, generator=g)
        )
        end(None if cfg.feature == "mean_key" else feats[i])
    return torch.stack(outs)


def module_factory(cfg, batch, log, holder=None, on_call=None, **cache_kw):
    """Drive a fresh DySinkCache; ``holder`` receives it, ``on_call(cache, layer)`` runs
    after every attention call (invariant checks)."""

    def factory():
        cache = DySinkCache(cfg, batch_size=batch, dtype=torch.float32, **cache_kw)
        attn = SinkAttention(cfg)
        if holder is not None:
            holder.append(cache)

        def attend(layer, q, k, v, commit):
            out = attn(q, k, v, cache=cache, layer=layer, commit=commit)
            st = cache.stats(layer)
            frames = cache.bank.frame.tolist()
            kept = [[frames[s] for s in row if s >= 0] for row in st.kept_idx.tolist()]
            got = cache.retrieved_frames().tolist()
            got = [[f for f in row if f >= 0] for row in got]
            sinks = [True] * batch if st.sink_kept is None else st.sink_kept.tolist()
            log.append((cache.block, layer, commit, got, kept, sinks))
            if on_call is not None:
                on_call(cache, layer)
            return out

        return cache.begin_block, attend, cache.end_block

    return factory


def reference_factory(cfg, batch, holder, **kw):
    def factory():
        ref = ReferencePipeline(cfg, batch, **kw)
        holder.append(ref)
        return ref.begin_block, ref.attend, ref.end_block

    return factory


def compare(cfg, batch=1, blocks=20, bank_slots=32, feats=None, on_call=None, backend="auto"):
    """Run the module and the emulation on the same inputs; every logged decision must
    match and the generated latents agree within 2e-4."""
    feats = features(batch, blocks) if feats is None else feats
    log: list = []
    holder: list = []
    ours = run(
        cfg, batch, blocks,
        module_factory(cfg, batch, log, on_call=on_call, bank_slots=bank_slots, backend=backend),
        feats,
    )  # fmt: skip
    ref_out = run(
        cfg, batch, blocks, reference_factory(cfg, batch, holder, bank_slots=bank_slots), feats
    )
    ref = holder[0]
    assert len(log) == len(ref.log)
    for mine, theirs in zip(log, ref.log):
        assert mine == theirs, f"decision differs: module {mine} vs reference {theirs}"
    torch.testing.assert_close(ours, ref_out, atol=2e-4, rtol=2e-4)
    return log, ref
