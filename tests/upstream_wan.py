"""A small transcription of how Self-Forcing and LongLive call their causal Wan model.

Written for these tests from reading the upstream code (Self-Forcing 33593df,
LongLive 7b56712): the same call structure and KV-cache semantics, none of their
code. A ``CausalWanModel``-like module whose ``blocks[i].self_attn`` receive
``(x, seq_lens, grid_sizes, freqs, block_mask, kv_cache, current_start, cache_start
[, sink_recache_after_switch])``, keep the list of per-layer dicts (``k``, ``v``,
``global_end_index``, ``local_end_index``) with host reads of the indices, roll the
buffer when full (keeping ``sink_size`` frames), and attend the window by slicing
and concatenating. ``variant="longlive"`` computes the update on a copy, returns
``(x, (current_end, local_end_index, info))`` and lets the model apply the updates
after all blocks, protects or rewrites the sink region on a recompute. The
pipelines below transcribe the inference loops: Self-Forcing's (optional 1-frame
first block, index tensors replaced between videos) and LongLive's interactive one
(prompt switches that zero the K/V and recache the last ``min(local_attn_size, c)``
frames in one clean forward).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dysink_kernels import apply_wan_rope


def causal_rope_apply(x, grid_sizes, freqs, start_frame=0):
    """The model module's RoPE (here Wan 3D RoPE from the package); ``freqs`` unused."""
    f, h, w = (int(v) for v in grid_sizes[0].tolist())
    return apply_wan_rope(x.float(), (f, h, w), (start_frame, 0, 0)).to(x.dtype)


def _attention(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.float()).to(q.dtype)


class CausalWanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, local_attn_size, sink_size, frame_tokens, variant):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.local_attn_size, self.sink_size = local_attn_size, sink_size
        self.frame_tokens, self.variant = frame_tokens, variant
        self.max_attention_size = (21 if local_attn_size == -1 else local_attn_size) * frame_tokens
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim), nn.RMSNorm(dim)

    def forward(
        self,
        x,
        seq_lens,
        grid_sizes,
        freqs,
        block_mask,
        kv_cache=None,
        current_start=0,
        cache_start=None,
        sink_recache_after_switch=False,
    ):
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        start_frame = current_start // self.frame_tokens
        rq = causal_rope_apply(q, grid_sizes, freqs, start_frame).type_as(v)
        rk = causal_rope_apply(k, grid_sizes, freqs, start_frame).type_as(v)
        if self.variant == "longlive":
            return self._longlive(rq, rk, v, kv_cache, current_start, sink_recache_after_switch)
        end = current_start + s
        size = kv_cache["k"].shape[1]
        g, loc = kv_cache["global_end_index"].item(), kv_cache["local_end_index"].item()
        sink = self.sink_size * self.frame_tokens
        if self.local_attn_size != -1 and end > g and s + loc > size:
            evict = s + loc - size
            keep = loc - evict - sink
            for key in ("k", "v"):
                t = kv_cache[key]
                t[:, sink : sink + keep] = t[:, sink + evict : sink + evict + keep].clone()
            local_end = loc + end - g - evict
        else:
            local_end = loc + end - g
        kv_cache["k"][:, local_end - s : local_end] = rk
        kv_cache["v"][:, local_end - s : local_end] = v
        lo = max(0, local_end - self.max_attention_size)
        out = _attention(rq, kv_cache["k"][:, lo:local_end], kv_cache["v"][:, lo:local_end])
        kv_cache["global_end_index"].fill_(end)
        kv_cache["local_end_index"].fill_(local_end)
        return self.o(out.flatten(2))

    def _longlive(self, rq, rk, v, kv_cache, current_start, rewrite_sinks):
        s = rq.shape[1]
        end = current_start + s
        size = kv_cache["k"].shape[1]
        g, loc = kv_cache["global_end_index"].item(), kv_cache["local_end_index"].item()
        sink = self.sink_size * self.frame_tokens
        recompute = end <= g and current_start > 0
        tk, tv = kv_cache["k"].clone(), kv_cache["v"].clone()
        info = {"recompute": recompute, "roll": None}
        if self.local_attn_size != -1 and end > g and s + loc > size:
            evict = s + loc - size
            keep = loc - evict - sink
            info["roll"] = (sink, keep, evict)
            for t in (tk, tv):
                t[:, sink : sink + keep] = t[:, sink + evict : sink + evict + keep].clone()
            local_end = loc + end - g - evict
            write = max(local_end - s, sink) if recompute else local_end - s
        else:
            local_end = loc + end - g
            write = max(local_end - s, sink) if recompute else local_end - s
            if rewrite_sinks:
                write = local_end - s
        off = write - (local_end - s)
        tk[:, write:local_end] = rk[:, off:]
        tv[:, write:local_end] = v[:, off:]
        info.update(write=(write, local_end), k=rk[:, off:], v=v[:, off:])
        if sink > 0:
            lo = max(sink, local_end - (self.max_attention_size - sink))
            kk = torch.cat([tk[:, :sink], tk[:, lo:local_end]], dim=1)
            vv = torch.cat([tv[:, :sink], tv[:, lo:local_end]], dim=1)
        else:
            lo = max(0, local_end - self.max_attention_size)
            kk, vv = tk[:, lo:local_end], tv[:, lo:local_end]
        out = _attention(rq, kk, vv)
        return self.o(out.flatten(2)), (end, local_end, info)


class CausalWanBlock(nn.Module):
    def __init__(self, dim, num_heads, local_attn_size, sink_size, frame_tokens, variant):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = CausalWanSelfAttention(
            dim, num_heads, local_attn_size, sink_size, frame_tokens, variant
        )
        self.cross = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(
        self,
        x,
        e,
        seq_lens,
        grid_sizes,
        freqs,
        context,
        block_mask,
        kv_cache,
        current_start,
        cache_start,
        sink_recache_after_switch,
    ):
        y = self.self_attn(
            self.norm1(x) + e,
            seq_lens,
            grid_sizes,
            freqs,
            block_mask,
            kv_cache,
            current_start,
            cache_start,
            sink_recache_after_switch,
        )
        info = None
        if isinstance(y, tuple):
            y, info = y
        x = x + y
        x = x + self.cross(context)[:, None]
        x = x + self.ffn(self.norm2(x))
        return x if info is None else (x, info)


class CausalWanModel(nn.Module):
    """``x (B, F, tokens_per_frame, C)`` latents of a block -> predicted clean latents."""

    def __init__(
        self,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        grid_hw=(2, 4),
        channels=4,
        local_attn_size=-1,
        sink_size=0,
        variant="self_forcing",
    ):
        super().__init__()
        dim = num_heads * head_dim
        self.grid_hw, self.variant = tuple(grid_hw), variant
        T = grid_hw[0] * grid_hw[1]
        self.num_heads, self.dim = num_heads, dim
        self.local_attn_size, self.sink_size = local_attn_size, sink_size
        self.num_frame_per_block = 3
        self.independent_first_frame = False
        self.embed = nn.Linear(channels, dim)
        self.time = nn.Linear(1, dim)
        self.text = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(
            CausalWanBlock(dim, num_heads, local_attn_size, sink_size, T, variant)
            for _ in range(num_layers)
        )
        self.head = nn.Linear(dim, channels)

    def forward(self, *args, **kwargs):
        return self._forward_inference(*args, **kwargs)

    def _forward_inference(
        self,
        x,
        t,
        context,
        seq_len,
        kv_cache=None,
        crossattn_cache=None,
        current_start=0,
        cache_start=0,
        sink_recache_after_switch=False,
    ):
        B, F, hw, _ = x.shape
        grid_sizes = torch.tensor([[F, *self.grid_hw]] * B)
        seq_lens = torch.tensor([F * hw] * B)
        tok = self.embed(x).flatten(1, 2)
        e = self.time(t.float().reshape(B, -1)[:, :1, None].expand(B, 1, 1) / 1000.0)
        ctx = self.text(context)
        infos = []
        for i, block in enumerate(self.blocks):
            out = block(
                tok,
                e,
                seq_lens,
                grid_sizes,
                None,
                ctx,
                None,
                kv_cache[i],
                current_start,
                cache_start,
                sink_recache_after_switch,
            )
            if isinstance(out, tuple):
                tok, info = out
                infos.append((i, info))
            else:
                tok = out
        if infos:
            self._apply_cache_updates(kv_cache, infos)
        return self.head(tok).view(B, F, hw, -1)

    @staticmethod
    def _apply_cache_updates(kv_cache, infos):
        for i, (end, local_end, info) in infos:
            cache = kv_cache[i]
            if info is not None:
                if info["roll"] is not None:
                    sink, keep, evict = info["roll"]
                    for key in ("k", "v"):
                        t = cache[key]
                        t[:, sink : sink + keep] = t[:, sink + evict : sink + evict + keep].clone()
                a, b = info["write"]
                if b > a:
                    cache["k"][:, a:b] = info["k"]
                    cache["v"][:, a:b] = info["v"]
            if info is None or not info["recompute"]:
                cache["global_end_index"].fill_(end)
                cache["local_end_index"].fill_(local_end)


def build_kv_cache(model, batch, tokens, dtype=torch.float32):
    H, D = model.num_heads, model.dim // model.num_heads
    return [
        {
            "k": torch.zeros(batch, tokens, H, D, dtype=dtype),
            "v": torch.zeros(batch, tokens, H, D, dtype=dtype),
            "global_end_index": torch.tensor([0], dtype=torch.long),
            "local_end_index": torch.tensor([0], dtype=torch.long),
        }
        for _ in model.blocks
    ]


STEPS = (1000, 750, 500, 250)


class SelfForcingPipeline:
    """``CausalInferencePipeline.inference``: blocks of ``num_frame_per_block`` frames
    (``[1, 3, 3, ...]`` with ``independent_first_frame``), few-step denoising with
    re-noising, then a clean pass at ``context_noise = 0``; the KV list is allocated
    once (unless already assigned) and its index tensors replaced for later videos."""

    def __init__(self, model, kv_tokens):
        self.model, self.kv_tokens = model, kv_tokens
        self.kv_cache1 = None

    @torch.no_grad()
    def inference(self, noise, cond, generator):
        m = self.model
        B, F = noise.shape[:2]
        T = m.grid_hw[0] * m.grid_hw[1]
        if self.kv_cache1 is None:
            self.kv_cache1 = build_kv_cache(m, B, self.kv_tokens, noise.dtype)
        else:
            for d in self.kv_cache1:
                d["global_end_index"] = torch.tensor([0], dtype=torch.long)
                d["local_end_index"] = torch.tensor([0], dtype=torch.long)
        sizes = [m.num_frame_per_block] * ((F - int(m.independent_first_frame)) // 3)
        if m.independent_first_frame:
            sizes = [1, *sizes]
        out = torch.zeros_like(noise)
        start = 0
        for n in sizes:
            x = noise[:, start : start + n]
            for i, t in enumerate(STEPS):
                ts = torch.full((B, n), t)
                x0 = m(
                    x,
                    t=ts,
                    context=cond,
                    seq_len=0,
                    kv_cache=self.kv_cache1,
                    current_start=start * T,
                )
                if i + 1 < len(STEPS):
                    s = STEPS[i + 1] / 1000.0
                    fresh = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
                    x = (1 - s) * x0 + s * fresh
            out[:, start : start + n] = x0
            m(
                x0,
                t=torch.zeros(B, n),
                context=cond,
                seq_len=0,
                kv_cache=self.kv_cache1,
                current_start=start * T,
            )
            start += n
        return out


class LongLiveInteractivePipeline:
    """``InteractiveCausalInferencePipeline.inference``: blocks of 3 frames; at each
    switch frame ``c`` the K/V are zeroed (``global_sink=False``) and the last
    ``min(local_attn_size, c)`` frames re-run in one clean forward from frame
    ``c - n`` with ``sink_recache_after_switch``; then the new prompt continues."""

    def __init__(self, model, kv_tokens, global_sink=False):
        self.model, self.kv_tokens, self.global_sink = model, kv_tokens, global_sink
        self.kv_cache1 = None

    @torch.no_grad()
    def inference(self, noise, conds, switch_frames, generator):
        m = self.model
        B, F = noise.shape[:2]
        T = m.grid_hw[0] * m.grid_hw[1]
        if self.kv_cache1 is None:
            self.kv_cache1 = build_kv_cache(m, B, self.kv_tokens, noise.dtype)
        out = torch.zeros_like(noise)
        seg = 0
        for start in range(0, F, 3):
            if seg < len(switch_frames) and start >= switch_frames[seg]:
                seg += 1
                self._recache(out, start, conds[seg])
            x = noise[:, start : start + 3]
            for i, t in enumerate(STEPS):
                x0 = m(
                    x,
                    t=torch.full((B, 3), t),
                    context=conds[seg],
                    seq_len=0,
                    kv_cache=self.kv_cache1,
                    current_start=start * T,
                )
                if i + 1 < len(STEPS):
                    s = STEPS[i + 1] / 1000.0
                    fresh = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
                    x = (1 - s) * x0 + s * fresh
            out[:, start : start + 3] = x0
            m(
                x0,
                t=torch.zeros(B, 3),
                context=conds[seg],
                seq_len=0,
                kv_cache=self.kv_cache1,
                current_start=start * T,
            )
        return out

    def _recache(self, out, c, cond):
        m = self.model
        T = m.grid_hw[0] * m.grid_hw[1]
        if not self.global_sink:
            for d in self.kv_cache1:
                d["k"].zero_()
                d["v"].zero_()
        n = c if m.local_attn_size == -1 else min(m.local_attn_size, c)
        frames = out[:, c - n : c]
        m(
            frames,
            t=torch.zeros(frames.shape[0], n),
            context=cond,
            seq_len=0,
            kv_cache=self.kv_cache1,
            current_start=(c - n) * T,
            sink_recache_after_switch=not self.global_sink,
        )


def readme_recipe(name: str) -> str:
    """The python block that follows ``<!-- recipe: name -->`` in the README."""
    import pathlib

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    after = text.split(f"<!-- recipe: {name} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def prompt_embedding(prompts):
    """Stand-in text encoder: one fixed vector per prompt string."""
    rows = [
        torch.randn(8, generator=torch.Generator().manual_seed(sum(map(ord, p)))) for p in prompts
    ]
    return torch.stack(rows)
