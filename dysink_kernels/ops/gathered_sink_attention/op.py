"""Public entry point of gathered-sink attention (DESIGN 3.1) and its dispatch."""

from __future__ import annotations

import math

import torch

from ... import _library  # noqa: F401  (registers torch.ops.dysink.*)
from ..._backends import triton_available
from ..._registry import register_backend, resolve_backend
from ..._validate import (
    INDEX_DTYPES,
    check_dim,
    check_index_range,
    check_same_dtype,
    check_tensor,
)
from .common import SinkAttnStats

OP_NAME = "gathered_attention"

register_backend(
    OP_NAME,
    "naive",
    "dysink_kernels.ops.gathered_sink_attention.naive:gathered_attention_naive",
    priority={"*": 0},
)
register_backend(
    OP_NAME,
    "sdpa",
    "dysink_kernels.ops.gathered_sink_attention.sdpa:gathered_attention_sdpa",
    available=lambda device: (
        device.type == "cpu"
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    ),
    priority={"cpu": 5},
)
register_backend(
    OP_NAME,
    "triton",
    "dysink_kernels.ops.gathered_sink_attention.triton:gathered_attention_triton",
    available=triton_available,
    priority={"cuda": 10},
)


def gathered_attention(
    q: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    slot_idx: torch.Tensor,
    local_k: torch.Tensor,
    local_v: torch.Tensor,
    local_ranges: torch.Tensor,
    cur_k: torch.Tensor | None = None,
    cur_v: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    return_stats: bool = False,
    slot_delta: torch.Tensor | None = None,
    rope_theta: float = 10000.0,
    pool_k_scale: torch.Tensor | None = None,
    pool_v_scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, SinkAttnStats | None]:
    """General form used inside the package; inputs are trusted (no checks).

    Attends, for each sample, the listed bank slots, the ``(start, end)`` token
    ranges ``local_ranges (B, R, 2)`` of ``local_k/local_v`` and, when given, all
    of ``cur_k/cur_v``. See ``naive.py`` for the exact meaning.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name, _ = resolve_backend(OP_NAME, backend, q.device)
    out, lse, ent, mass = torch.ops.dysink.gathered_attention(
        q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges, cur_k, cur_v,
        float(scale), bool(return_stats), slot_delta, float(rope_theta), pool_k_scale,
        pool_v_scale, name,
    )  # fmt: skip
    if not return_stats:
        return out, None
    return out, SinkAttnStats(lse=lse, entropy=ent, slot_mass=mass)


def gathered_sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    slot_idx: torch.Tensor,
    *,
    k_len: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_stats: bool = False,
    slot_rotate: torch.Tensor | None = None,
    rope_theta: float = 10000.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, SinkAttnStats | None]:
    """Softmax attention of ``q`` over gathered bank slots plus a local window.

    For each sample ``b`` the result equals softmax attention of ``q[b]`` over the
    concatenation ``[pool[s] for s in slot_idx[b] if s >= 0] + [k[b, :k_len[b]]]``
    (no mask, scale ``softmax_scale``, default ``1/sqrt(D)``), computed in fp32
    and returned in the input dtype. A query that attends no key gets zeros.

    Args:
        q: ``(B, Sq, H, D)`` queries.
        k, v: ``(B, Sk, H, D)`` local window (keys already rotated).
        pool_k, pool_v: ``(P, S_e, H, D)`` one layer's bank pool.
        slot_idx: ``(B, n)`` int32/int64 slots to attend; ``-1`` skips an entry.
        k_len: ``(B,)`` int32/int64 number of valid local keys (a prefix of ``k``);
            ``None`` means all ``Sk``.
        softmax_scale: score scale; ``None`` means ``1/sqrt(D)``.
        return_stats: also return :class:`SinkAttnStats` (``lse``, ``entropy``,
            ``slot_mass``), computed in the same pass.
        slot_rotate: ``(B, n)`` frames by which to re-position each slot's keys
            (their Wan temporal RoPE pairs turn by ``exp(i w_j delta)`` while they are
            read; the pool is not modified). ``None``: keys as stored.
        rope_theta: RoPE base used by ``slot_rotate``.
        backend: ``"auto"``, or a registered backend name (``"naive"``, ...).

    Returns:
        ``(out, stats)``: ``out`` is ``(B, Sq, H, D)`` in ``q.dtype``; ``stats`` is
        ``None`` unless ``return_stats``.

    Raises:
        TypeError: wrong types or dtypes (mixed float dtypes, float indices).
        ValueError: wrong ranks, mismatched sizes or devices, unknown backend.
        IndexError: a slot outside ``[-1, P)`` or ``k_len`` outside ``[0, Sk]``
            (checked on the host for CPU tensors, by a device assert otherwise).
    """
    check_tensor(q, "q", 4)
    device = q.device
    B, _, H, D = q.shape
    check_tensor(k, "k", 4, device=device)
    check_tensor(v, "v", 4, device=device)
    check_tensor(pool_k, "pool_k", 4, device=device)
    check_tensor(pool_v, "pool_v", 4, device=device)
    check_tensor(slot_idx, "slot_idx", 2, INDEX_DTYPES, device=device)
    check_same_dtype({"q": q, "k": k, "v": v, "pool_k": pool_k, "pool_v": pool_v})
    for name, t in (("k", k), ("v", v)):
        check_dim(t, name, 0, B, "batch")
        check_dim(t, name, 2, H, "heads")
        check_dim(t, name, 3, D, "head_dim")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    check_dim(pool_k, "pool_k", 2, H, "heads")
    check_dim(pool_k, "pool_k", 3, D, "head_dim")
    if pool_v.shape != pool_k.shape:
        raise ValueError(
            f"pool_v must have the shape of pool_k {tuple(pool_k.shape)}, got {tuple(pool_v.shape)}"
        )
    check_dim(slot_idx, "slot_idx", 0, B, "batch")
    Sk = k.shape[1]
    if k_len is None:
        k_len = torch.full((B,), Sk, dtype=torch.int32, device=device)
    else:
        check_tensor(k_len, "k_len", 1, INDEX_DTYPES, device=device)
        check_dim(k_len, "k_len", 0, B, "batch")
        check_index_range(k_len, "k_len", 0, Sk)
    check_index_range(slot_idx, "slot_idx", -1, pool_k.shape[0] - 1)
    if softmax_scale is not None and not (
        isinstance(softmax_scale, (int, float)) and softmax_scale > 0
    ):
        raise ValueError(f"softmax_scale must be a positive number, got {softmax_scale!r}")

    if slot_rotate is not None:
        check_tensor(slot_rotate, "slot_rotate", 2, None, device=device)
        if slot_rotate.shape != slot_idx.shape:
            raise ValueError(
                f"slot_rotate must have the shape of slot_idx {tuple(slot_idx.shape)}, got "
                f"{tuple(slot_rotate.shape)}"
            )
        slot_rotate = slot_rotate.float()

    ranges = torch.stack([torch.zeros_like(k_len), k_len], dim=-1).to(torch.int32)[:, None, :]
    return gathered_attention(
        q, pool_k, pool_v, slot_idx, k, v, ranges,
        softmax_scale=softmax_scale, return_stats=return_stats, slot_delta=slot_rotate,
        rope_theta=rope_theta, backend=backend,
    )  # fmt: skip
