"""``python -m dysink_kernels rope-diagnostic``: RoPE phase re-alignment, shown.

A retrieved sink keeps the RoPE phases of its original frames. With Wan's 3D RoPE the
score of a query against a key carrying the same content is
``sum_j |x_j|^2 cos(w_j * distance)`` over the temporal pairs (plus the spatial ones),
so as the sink's temporal distance grows the pairs drift through phase and, at some
distances, partly come back into line in every head at once (the DySink paper ties this to
head homogenisation and sink collapse). In the simulation below the original sink's
attention mass, inter-head similarity and gate ratio swing with the distance, while a
sink re-positioned to a fixed distance (``sink_rope="relative"``) is independent of it.

The simulation gives every token of the query block, the window and the sink the same
per-head content (scaled by ``content``) plus independent noise, so that only the RoPE
phases decide which keys a head prefers; per distance it reports each head's
attention mass on the sink, the inter-head similarity of the heads' attention over
the sink's tokens (mean pairwise cosine), and the gate's ratio (fraction of heads that
score the sink above the window).
"""

from __future__ import annotations

import os

import torch

from ..ops.rope import apply_wan_rope

__all__ = ["plot_rope_diagnostic", "rope_diagnostic"]


def _attend_stats(q, k_sink, k_win):
    """Per-head sink mass, inter-head similarity and the gate's ratio."""
    H, D = q.shape[-2:]
    keys = torch.cat([k_sink, k_win], dim=0)  # ok: host (offline diagnostic)
    scores = torch.einsum("qhd,khd->hqk", q, keys) / D**0.5
    p = torch.softmax(scores, dim=-1)
    n_sink = k_sink.shape[0]
    profile = p[..., :n_sink].mean(dim=1)  # (H, n_sink)
    mass = profile.sum(dim=-1)  # (H,)
    unit = torch.nn.functional.normalize(profile, dim=-1)
    sim = unit @ unit.T
    similarity = (sim.sum() - sim.diagonal().sum()) / (H * (H - 1))
    qbar = q.mean(dim=0)
    ratio = ((qbar * k_sink.mean(0)).sum(-1) > (qbar * k_win.mean(0)).sum(-1)).float().mean()
    return mass, similarity, ratio


@torch.no_grad()
def rope_diagnostic(
    max_distance: int = 1200,
    points: int = 241,
    heads: int = 12,
    head_dim: int = 128,
    grid_hw: tuple[int, int] = (2, 4),
    frames_per_block: int = 3,
    window_frames: int = 6,
    content_scale: float = 0.6,
    seed: int = 0,
) -> dict:
    """Curves over the sink's temporal distance (in frames) for original and
    re-positioned sinks. Returns lists keyed by ``distance``, ``original_*`` and
    ``relative_*`` (``mass_mean``, ``mass_std``, ``similarity``, ``gate_ratio``)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid_hw
    tpf = h * w
    fpb = frames_per_block
    content = content_scale * torch.randn(heads, head_dim, generator=g)

    def tokens(n_frames: int) -> torch.Tensor:
        noise = torch.randn(n_frames * tpf, heads, head_dim, generator=g)
        return content.expand(n_frames * tpf, heads, head_dim) + noise

    cur = max_distance + window_frames + fpb  # current block's first frame
    q = apply_wan_rope(tokens(fpb)[None], (fpb, h, w), (cur, 0, 0))[0]
    win = apply_wan_rope(tokens(window_frames)[None], (window_frames, h, w),
                         (cur - window_frames, 0, 0))[0]  # fmt: skip
    sink_content = tokens(fpb)[None]
    fixed = window_frames + fpb  # re-positioned: just before the window
    k_rel = apply_wan_rope(sink_content, (fpb, h, w), (cur - fixed, 0, 0))[0]
    rel = _attend_stats(q, k_rel, win)

    out: dict = {"distance": [], "heads": heads, "head_dim": head_dim}
    for key in ("mass_mean", "mass_std", "similarity", "gate_ratio"):
        out[f"original_{key}"] = []
        out[f"relative_{key}"] = []
    distances = torch.linspace(fixed, max_distance, points).round().long()
    for d in distances.tolist():  # ok: host (offline diagnostic)
        k_orig = apply_wan_rope(sink_content, (fpb, h, w), (cur - d, 0, 0))[0]
        mass, sim, ratio = _attend_stats(q, k_orig, win)
        out["distance"].append(d)
        for prefix, (m, s, r) in (("original", (mass, sim, ratio)), ("relative", rel)):
            out[f"{prefix}_mass_mean"].append(float(m.mean()))
            out[f"{prefix}_mass_std"].append(float(m.std()))
            out[f"{prefix}_similarity"].append(float(s))
            out[f"{prefix}_gate_ratio"].append(float(r))
    return out


def plot_rope_diagnostic(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = result["distance"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True, layout="constrained")
    panels = (
        ("similarity", "inter-head similarity\nof sink attention"),
        ("mass_mean", "mean sink mass\nacross heads"),
        ("gate_ratio", "gate ratio (heads\npreferring the sink)"),
    )
    for ax, (key, label) in zip(axes, panels):
        ax.plot(d, result[f"original_{key}"], label="original RoPE phases", lw=1)
        ax.plot(d, result[f"relative_{key}"], label="re-positioned (sink_rope='relative')",
                lw=1.5, ls="--")  # fmt: skip
        ax.set_ylabel(label)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_title(
        f"Wan 3D RoPE: a sink's attention vs its temporal distance "
        f"({result['heads']} heads, head_dim {result['head_dim']})"
    )
    axes[-1].set_xlabel("temporal distance of the sink from the current block (latent frames)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
