"""``python -m dysink_kernels demo``: an autoregressive run through DySinkCache.

A random-weight video transformer (``models.TinyVideoDiT``) generates a video
block by block while a "prompt" cycles through scenes that come back, so that
retrieval has something to find. Each block: ``begin_block``, a few denoising
steps, the clean pass, ``end_block`` with a feature from a fixed random "encoder"
of the block's latents (or the model's own mean keys with ``--feature mean_key``).

The demo reads results back to the host after each block to print them; that is
reporting, not part of the per-block path.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from ..cache import DySinkCache
from ..config import DySinkConfig
from ..sink_attention import SinkAttention
from .models import TinyVideoDiT, generate_block

__all__ = ["DemoResult", "run_demo", "run_wan_demo"]


@dataclass
class DemoResult:
    """What the demo measured, one record per block."""

    config: dict
    blocks: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    backend: str = "auto"


def _scene_schedule(n_blocks: int, n_scenes: int, seed: int) -> list[int]:
    """Scenes last 2-4 blocks and come back, like a long video revisiting places."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < n_blocks:
        scene = int(torch.randint(0, n_scenes, (1,), generator=g))
        out += [scene] * int(torch.randint(2, 5, (1,), generator=g))
    return out[:n_blocks]


# With random weights the wan-tiny model's activations hardly depend on its prompt: its
# mean keys (the "mean_key" feature) then differ mostly by the blocks' RoPE positions
# and retrieval returns the newest entries. A stronger cross-attention output makes the
# prompt, i.e. the scene, shape the activations (as a trained model's prompt does), so
# blocks of a scene that comes back are recognised and recalled.
_SCENE_GAIN = 20.0


def _styles(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The prompts' styles, one per prompt, from their own generator and one row at a
    time: prompt switches leave the demo's random stream (and style 0) unchanged."""
    g = torch.Generator().manual_seed(seed + 2)
    return torch.stack([0.5 * torch.randn(shape, generator=g) for _ in range(n)])


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar, or None when disabled or tqdm is missing (it is optional)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="block", leave=False)


def _block_record(
    cache: DySinkCache,
    block: int,
    scene: int,
    retrieved: list[int],
    window_frames: int,
    calls: list[tuple[torch.Tensor, torch.Tensor]],
    stored: torch.Tensor,
    recached: int | None,
) -> dict:
    """One block's line of the demo from the (slot_idx, kept_idx) of its denoising calls
    (sample 0). Reads values back to the host: reporting, not the per-block path."""
    cfg = cache.config
    entropy = [
        float(cache.stats(ly).attn.entropy.mean())  # ok: host (demo reporting)
        for ly in range(cfg.num_layers)
        if cache.stats(ly).attn is not None
    ]
    slots = [s for s, _ in calls]
    kept = [k for _, k in calls]
    per_entry = []
    for j, frame in enumerate(retrieved):
        if frame >= 0:
            drops = sum(int(k[0, j] < 0) for k in kept)
            per_entry.append({"frame": frame, "kept_fraction": 1 - drops / max(len(kept), 1)})
    first = block * cfg.frames_per_block
    return {
        "block": block,
        "frame": first,
        "window_start": first - window_frames,
        "scene": scene,
        "retrieved": [f for f in retrieved if f >= 0],
        "entries": per_entry,
        "gated": sum(int(((s[0] >= 0) & (k[0] < 0)).sum()) for s, k in zip(slots, kept)),
        "gate_decisions": sum(int((s[0] >= 0).sum()) for s in slots),
        "bank_size": int(cache.bank_size()[0]),  # ok: host (demo reporting)
        "stored": bool(stored[0]),  # ok: host (demo reporting)
        "mean_entropy": sum(entropy) / len(entropy) if entropy else None,
        "recached": recached,
    }


def run_demo(
    blocks: int = 24,
    layers: int = 4,
    heads: int = 4,
    head_dim: int = 32,
    grid_hw: tuple[int, int] = (4, 6),
    batch: int = 1,
    device: str = "cpu",
    backend: str = "auto",
    seed: int = 0,
    feature: str = "external",
    steps: int = 4,
    top_k: int = 2,
    sink_frames: int = 0,
    local_frames: int = 9,
    tau: float = 0.8,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    on_block=None,
    switch_at: tuple[int, ...] = (),
) -> DemoResult:
    """Run the demo loop and return per-block records (see ``DemoResult``).

    ``switch_at``: blocks before which the "prompt" (a style added to every scene's
    conditioning) changes; the cache then recaches every stored block under it.
    """
    dev = torch.device(device)
    cfg = DySinkConfig(
        num_layers=layers, num_heads=heads, head_dim=head_dim,
        tokens_per_frame=grid_hw[0] * grid_hw[1], top_k=top_k, sink_frames=sink_frames,
        local_frames=local_frames, tau=tau, feature=feature,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = TinyVideoDiT(layers, heads, head_dim, grid_hw).to(dev, dtype)
    cache = DySinkCache(
        cfg, batch_size=batch, device=dev, dtype=dtype, backend=backend,
        store_latents=bool(switch_at),
    )  # fmt: skip
    attn = SinkAttention(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    n_scenes = 4
    scene_cond = torch.randn(n_scenes, 8, generator=g)
    encoder = torch.randn(64, model.tokens_per_frame * model.latent_channels, generator=g)
    schedule = _scene_schedule(blocks, n_scenes, seed)
    timesteps = tuple(1.0 - i / steps for i in range(steps))
    styles = _styles(len(switch_at) + 1, (8,), seed)
    prompt = 0

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: list[torch.Tensor] = []

    def attend(layer, q, k, v, commit):
        out = attn(q, k, v, cache=cache, layer=layer, commit=commit)
        if not commit:
            st = cache.stats(layer)
            calls.append((st.slot_idx.clone(), st.kept_idx.clone()))
        return out

    result = DemoResult(config=cfg.to_dict(), device=str(dev), backend=backend)
    bar = _progress_bar(blocks, "dysink demo", progress)
    start = time.perf_counter()
    for i in range(blocks):
        calls.clear()
        recached = None
        if i in switch_at:
            prompt += 1

            def recache_block(lat, first, style=styles[prompt]):
                scene = scene_cond[schedule[first // cfg.frames_per_block]] + style
                cond_r = scene.expand(lat.shape[0], 8).to(dev, dtype)
                model(lat, 0.0, cond_r, first, attend, True)

            recached = cache.recache(recache_block)
        cache.begin_block()
        retrieved = cache.retrieved_frames()[0].tolist()  # ok: host (demo reporting)
        window_frames = int(cache.window_tokens[0]) // cfg.tokens_per_frame  # ok: host (demo)
        noise = torch.randn(batch, cfg.frames_per_block, model.tokens_per_frame, 4, generator=g)
        cond = scene_cond[schedule[i]] + styles[prompt] + 0.05 * torch.randn(8, generator=g)
        cond = cond.expand(batch, 8)
        x0 = generate_block(
            model, noise.to(dev, dtype), cond.to(dev, dtype), cache.frame, attend, timesteps,
            generator=g,
        )  # fmt: skip
        feat = None
        if feature == "external":
            # Stand-in for a vision encoder: a fixed projection of the block's
            # latents, centred on the running mean so that scenes stand apart.
            pooled = x0.float().mean(dim=1).flatten(1).cpu()  # ok: host (demo's stand-in encoder)
            seen.append(pooled)
            centre = torch.stack(seen).mean(dim=0)
            feat = ((pooled - centre) @ encoder.T).to(dev)
        latent = x0 if switch_at else None
        stored = cache.end_block(feat, latent=latent)
        record = _block_record(
            cache, i, schedule[i], retrieved, window_frames, calls, stored, recached
        )
        result.blocks.append(record)
        if on_block is not None:
            on_block(record)
        if bar is not None:
            bar.update(1)
    result.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return result


def run_wan_demo(
    blocks: int = 24,
    layers: int = 4,
    heads: int = 4,
    head_dim: int = 32,
    latent_hw: tuple[int, int] = (8, 12),
    batch: int = 1,
    device: str = "cpu",
    backend: str = "auto",
    seed: int = 0,
    feature: str = "mean_key",
    steps: int = 4,
    top_k: int = 2,
    sink_frames: int = 0,
    local_frames: int = 9,
    tau: float = 0.8,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    on_block=None,
    switch_at: tuple[int, ...] = (),
) -> DemoResult:
    """The demo on a random-weight diffusers ``WanTransformer3DModel`` (nothing downloaded),
    its cross-attention output scaled by ``_SCENE_GAIN`` so that scenes show in its keys.

    DySink goes in through ``integrations.diffusers_wan`` (``enable_dysink`` and
    ``generate_video``, flow-matching timesteps ``1000 .. 1000/steps``); the prompt
    embedding cycles through scenes as in ``run_demo``. Records have the same fields.
    """
    from diffusers import WanTransformer3DModel

    from ..integrations.diffusers_wan import (
        dysink_config_for,
        enable_dysink,
        generate_video,
        switch_prompt,
    )

    dev = torch.device(device)
    text_dim, text_len, channels, n_scenes = 32, 8, 4, 4
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=channels, out_channels=channels, text_dim=text_dim, freq_dim=32,
        ffn_dim=2 * heads * head_dim, num_layers=layers, rope_max_seq_len=64,
    )  # fmt: skip
    # diffusers builds in fp32; casting warns that it keeps some modules in fp32
    # only through from_pretrained, so the default dtype skips the cast.
    with torch.no_grad():  # see _SCENE_GAIN
        for blk in model.blocks:
            blk.attn2.to_out[0].weight.mul_(_SCENE_GAIN)
    model = (model.to(dev) if dtype == torch.float32 else model.to(dev, dtype)).eval()
    cfg = dysink_config_for(
        model, latent_hw, top_k=top_k, sink_frames=sink_frames, local_frames=local_frames,
        tau=tau, feature=feature,
    )  # fmt: skip
    cache = DySinkCache(
        cfg, batch_size=batch, device=dev, dtype=dtype, backend=backend,
        store_latents=bool(switch_at),
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    scene_ctx = torch.randn(n_scenes, text_len, text_dim, generator=g)
    styles = _styles(len(switch_at) + 1, (text_len, text_dim), seed)
    prompt_of = [sum(1 for s in switch_at if s <= i) for i in range(blocks)]
    encoder = torch.randn(64, channels * latent_hw[0] * latent_hw[1], generator=g)
    schedule = _scene_schedule(blocks, n_scenes, seed)
    noise = torch.randn(batch, channels, cfg.frames_per_block * blocks, *latent_hw, generator=g)
    contexts = [
        (scene_ctx[schedule[i]] + styles[prompt_of[i]]
         + 0.05 * torch.randn(text_len, text_dim, generator=g))
        .expand(batch, -1, -1).to(dev, dtype)
        for i in range(blocks)
    ]  # fmt: skip
    timesteps = tuple(1000.0 * (1 - i / steps) for i in range(steps))

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: list[torch.Tensor] = []
    window: dict = {}

    def on_attention(layer: int, commit: bool) -> None:
        if commit:
            return
        if not calls and "retrieved" not in window:  # first call: what begin_block laid out
            window["retrieved"] = cache.retrieved_frames()[0].tolist()  # ok: host (demo)
            window["frames"] = int(cache.window_tokens[0]) // cfg.tokens_per_frame  # ok: host
        st = cache.stats(layer)
        calls.append((st.slot_idx.clone(), st.kept_idx.clone()))

    def feature_fn(x0: torch.Tensor) -> torch.Tensor:
        # Stand-in for a vision encoder, as in run_demo: a fixed projection of the
        # block's latents, centred on the running mean.
        pooled = x0.float().mean(dim=2).flatten(1).cpu()  # ok: host (demo's stand-in encoder)
        seen.append(pooled)
        centre = torch.stack(seen).mean(dim=0)
        return ((pooled - centre) @ encoder.T).to(dev)

    result = DemoResult(config=cfg.to_dict(), device=str(dev), backend=backend)
    bar = _progress_bar(blocks, "dysink wan-tiny demo", progress)

    def record_block(i: int, x0: torch.Tensor, stored: torch.Tensor) -> None:
        record = _block_record(
            cache, i, schedule[i], window.get("retrieved", []), window.get("frames", 0), calls,
            stored, window.get("recached"),
        )  # fmt: skip
        calls.clear()
        window.clear()
        result.blocks.append(record)
        if on_block is not None:
            on_block(record)
        if bar is not None:
            bar.update(1)
        if i + 1 in switch_at:  # between blocks: the next block uses the new prompt
            window["recached"] = switch_prompt(model, cache, contexts[i + 1])

    handle = enable_dysink(model, cache, on_attention=on_attention)
    start = time.perf_counter()
    try:
        generate_video(
            model, cache, noise.to(dev), lambda i: contexts[i], timesteps, generator=g,
            feature_fn=feature_fn if feature == "external" else None, on_block=record_block,
        )  # fmt: skip
    finally:
        handle.remove()
    result.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return result


def format_block(r: dict) -> str:
    ent = "n/a" if r["mean_entropy"] is None else f"{r['mean_entropy']:.3f}"
    return (
        f"block {r['block']:3d} frame {r['frame']:4d} scene {r['scene']} | "
        f"retrieved {r['retrieved']!s:12} | gated {r['gated']:2d}/{r['gate_decisions']:<3d} | "
        f"bank {r['bank_size']:3d} {'stored ' if r['stored'] else 'skipped'} | "
        f"entropy {ent} nats"
        + ("" if not r.get("recached") else f" | new prompt: {r['recached']} recache forwards")
    )


def write_outputs(result: DemoResult, out_dir: str) -> tuple[str, str | None]:
    """Write ``summary.json`` and ``timeline.png`` (when matplotlib is there)."""
    os.makedirs(out_dir, exist_ok=True)
    summary = os.path.join(out_dir, "summary.json")
    payload = {
        "config": result.config,
        "device": result.device,
        "backend": result.backend,
        "seconds": result.seconds,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "blocks": result.blocks,
    }
    with open(summary, "w") as f:
        json.dump(payload, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return summary, None
    blocks = result.blocks
    fig, (ax0, ax1, ax2) = plt.subplots(
        3, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [4, 1, 1]},
        layout="constrained",
    )  # fmt: skip
    xs = [r["block"] for r in blocks]
    fpb = result.config["frames_per_block"]
    ax0.fill_between(
        xs, [r["window_start"] for r in blocks], [r["frame"] + fpb for r in blocks],
        step="mid", color="0.85", label="local window",
    )  # fmt: skip
    for r in blocks:
        for e in r["entries"]:
            color = plt.cm.RdYlGn(e["kept_fraction"])
            ax0.scatter(r["block"], e["frame"], color=color, s=60, edgecolor="k", lw=0.4)
            ax0.annotate(
                str(blocks[e["frame"] // fpb]["scene"]), (r["block"], e["frame"]),
                fontsize=6, ha="center", va="center",
            )  # fmt: skip
    sc = plt.cm.ScalarMappable(cmap="RdYlGn", norm=plt.Normalize(0, 1))
    cax = ax0.inset_axes([1.01, 0.0, 0.015, 1.0])
    fig.colorbar(sc, cax=cax, label="kept fraction after the gate")
    switches = [r["block"] for r in blocks if r.get("recached")]
    for k, b in enumerate(switches):
        for ax in (ax0, ax1, ax2):
            label = "prompt switch (recache)" if ax is ax0 and k == 0 else None
            ax.axvline(b - 0.5, color="tab:blue", lw=0.8, ls=":", label=label)
    ax0.set_ylabel("frame of retrieved entry")
    ax0.set_title("DySink demo: retrieved entries (dots, labelled with the scene they show)")
    ax0.legend(loc="upper left")
    ax1.step(xs, [r["bank_size"] for r in blocks], where="mid")
    ax1.set_ylabel("bank entries")
    for r in blocks:
        ax1.annotate(str(r["scene"]), (r["block"], 1.04), xycoords=("data", "axes fraction"),
                     fontsize=6, ha="center")  # fmt: skip
    ent = [r["mean_entropy"] for r in blocks]
    if all(e is not None for e in ent):
        ax2.plot(xs, ent, color="tab:purple", lw=1)
    ax2.set_ylabel("entropy\n(nats)")
    ax2.set_xlabel("block (the scene of each block is printed above the bank panel)")
    png = os.path.join(out_dir, "timeline.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return summary, png
