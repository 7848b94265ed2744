"""CPU backend of gathered attention on PyTorch's fused CPU flash-attention kernel.

Same inputs as ``naive.py`` (it gathers the keys the same way), but the softmax pass
runs in ``aten._scaled_dot_product_flash_attention_for_cpu`` with an additive mask,
which also returns the log-sum-exp. The statistics come from the same kernel:

* ``lse``: returned by the kernel;
* ``entropy = lse - scale * q . E_p[k]``: the expectation of the scores is the
  attention of ``q`` over values equal to the keys (a second call);
* ``slot_mass[j] = mean_q exp(lse_j - lse)``, ``lse_j`` the log-sum-exp over slot
  ``j``'s keys alone (one small call per listed slot).

Several times faster than the oracle on CPU; the oracle stays the reference.
"""

from __future__ import annotations

import torch

from .common import SinkAttnStats
from .naive import gather_keys

__all__ = ["gathered_attention_sdpa"]


def _flash(q, k, v, bias, scale):
    """``(out, lse)`` for ``(B, H, S, D)`` inputs and an additive ``(B, 1, Sq, N)`` bias."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale
    )[:2]


def gathered_attention_sdpa(
    q: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    slot_idx: torch.Tensor,
    local_k: torch.Tensor,
    local_v: torch.Tensor,
    local_ranges: torch.Tensor,
    cur_k: torch.Tensor | None,
    cur_v: torch.Tensor | None,
    softmax_scale: float,
    return_stats: bool,
    slot_delta: torch.Tensor | None = None,
    rope_theta: float = 10000.0,
    pool_k_scale: torch.Tensor | None = None,
    pool_v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SinkAttnStats | None]:
    B, Sq, H, _ = q.shape
    S_e = pool_k.shape[1]
    n = slot_idx.shape[1]
    keys, vals, mask = gather_keys(
        q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges, cur_k, cur_v,
        slot_delta, rope_theta, pool_k_scale, pool_v_scale,
    )  # fmt: skip
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=q.device)
    bias = bias.masked_fill(~mask, float("-inf"))[:, None, None, :].expand(B, 1, Sq, -1)
    qh = q.float().transpose(1, 2)
    kh, vh = keys.transpose(1, 2), vals.transpose(1, 2)
    out, lse = _flash(qh, kh, vh, bias, softmax_scale)
    # The kernel returns lse = 0 (not -inf) for a row with no key: use the mask.
    attended = mask.any(dim=1)[:, None, None].expand(B, H, Sq)
    out = torch.where(attended[..., None], out, 0.0).transpose(1, 2).to(q.dtype)
    if not return_stats:
        return out, None
    expected_k, _ = _flash(qh, kh, kh, bias, softmax_scale)
    scores = softmax_scale * (qh * expected_k).sum(-1)
    entropy = torch.where(attended, lse - scores, 0.0)
    mass = torch.zeros(B, H, n, dtype=torch.float32, device=q.device)
    lse_safe = torch.where(attended, lse, 0.0)
    for j in range(n):
        cols = slice(j * S_e, (j + 1) * S_e)
        _, lse_j = _flash(qh, kh[:, :, cols], vh[:, :, cols], bias[..., cols], softmax_scale)
        listed = (slot_idx[:, j] >= 0)[:, None, None] & attended
        share = torch.where(listed, torch.exp(lse_j - lse_safe), 0.0)
        mass[..., j] = share.mean(dim=-1)
    return out, SinkAttnStats(lse=torch.where(attended, lse, float("-inf")), entropy=entropy,
                              slot_mass=mass)  # fmt: skip
