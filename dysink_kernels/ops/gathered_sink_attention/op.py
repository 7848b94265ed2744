"""gathered_sink_attention: argument checks, the custom op, one backend resolution.

Two entries share one path: :func:`gathered_sink_attention` (public, every argument
checked) builds the general form's arguments and calls
:func:`gathered_sink_attention_general` (the package's own callers, whose indices are
trusted); both run ``torch.ops.dysink.gathered_sink_attention``, which resolves
``backend`` once per call and settles empty problems before any backend sees them.
"""

from __future__ import annotations

import math

import torch

from ..._backends import csrc_available
from ..._registry import define_op, register_backend
from ..._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_finite,
    check_index_range,
    check_positive_number,
    check_prefix_len,
    check_same_dtype,
    check_tensor,
)
from .common import SinkAttnStats

OP_NAME = "gathered_sink_attention"

for _name, _fn in (
    ("naive", "gathered_attention_naive"),
    ("sdpa", "gathered_attention_sdpa"),
    ("triton", "gathered_attention_triton"),
):
    register_backend(OP_NAME, _name, f"{__package__}.{_name}:{_fn}")
register_backend(
    OP_NAME,
    "csrc",
    f"{__package__}.csrc:gathered_attention_csrc",
    available=lambda device: device.type == "cpu" and csrc_available(device),
)


def _no_key_result(q: torch.Tensor, n: int, return_stats: bool) -> tuple[torch.Tensor, ...]:
    """What every backend gives when no query attends any key (or there is no query)."""
    B, Sq, H, _ = q.shape
    if not return_stats:
        empty = q.new_empty(0, dtype=torch.float32)
        return torch.zeros_like(q), empty, empty.clone(), empty.clone()
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    zeros = torch.zeros((B, H, Sq), dtype=torch.float32, device=q.device)
    mass = torch.zeros((B, H, n), dtype=torch.float32, device=q.device)
    return torch.zeros_like(q), lse, zeros, mass


def _call(fn, a) -> tuple[torch.Tensor, ...]:
    """Settle head_dim 0 and empty problems, run the backend, flatten its statistics."""
    B, Sq, H, D = a.q.shape
    if D == 0:
        raise ValueError(f"q.shape[3] (head_dim) must be > 0, got shape {tuple(a.q.shape)}")
    n = a.slot_idx.shape[1]
    P, S_e = a.pool_k.shape[:2]
    n_cur = 0 if a.cur_k is None else a.cur_k.shape[1]
    if B * Sq * H == 0 or n * P * S_e + a.local_k.shape[1] + n_cur == 0:
        return _no_key_result(a.q, n, a.return_stats)
    if a.softmax_scale is None:
        a = a._replace(softmax_scale=1.0 / math.sqrt(D))
    if n > 0 and P * S_e == 0:  # listed slots that hold no key: attend none of them
        rest = a._replace(slot_idx=a.slot_idx[:, :0])
        if a.slot_delta is not None:
            rest = rest._replace(slot_delta=a.slot_delta[:, :0])
        out, lse, ent, _ = _call(fn, rest)
        return out, lse, ent, _no_key_result(a.q, n, a.return_stats)[3]
    out, stats = fn(*a[:-1])
    if stats is None:
        empty = out.new_empty(0, dtype=torch.float32)
        return out, empty, empty.clone(), empty.clone()
    return (out, *stats)


def _fake(a) -> tuple[torch.Tensor, ...]:
    """Output metadata: ``out`` like ``q``; contiguous fp32 ``(B, H, Sq)`` / ``(B, H, n)``."""
    B, Sq, H, _ = a.q.shape
    if not a.return_stats:
        empty = a.q.new_empty(0, dtype=torch.float32)
        return torch.empty_like(a.q), empty, empty.clone(), empty.clone()
    lse = a.q.new_empty(B, H, Sq, dtype=torch.float32)
    mass = a.q.new_empty(B, H, a.slot_idx.shape[1], dtype=torch.float32)
    return torch.empty_like(a.q), lse, torch.empty_like(lse), mass


# The general form: for each sample, the listed bank slots, the (start, end) token
# ranges ``local_ranges (B, R, 2)`` of ``local_k/local_v`` and, when given, all of
# ``cur_k/cur_v``; ``slot_delta (B, n)`` re-positions slots, ``pool_k_scale /
# pool_v_scale (P, H)`` dequantise an fp8 bank (``naive.py`` gives the exact meaning).
# ``softmax_scale=None`` means ``1/sqrt(D)``. Outputs: ``out`` and, with
# ``return_stats``, ``lse``, ``entropy``, ``slot_mass`` (else three empty tensors).
gathered_sink_attention_op = define_op(
    OP_NAME,
    "(Tensor q, Tensor pool_k, Tensor pool_v, Tensor slot_idx, Tensor local_k, "
    "Tensor local_v, Tensor local_ranges, Tensor? cur_k=None, Tensor? cur_v=None, "
    "float? softmax_scale=None, bool return_stats=False, Tensor? slot_delta=None, "
    "float rope_theta=10000., Tensor? pool_k_scale=None, Tensor? pool_v_scale=None, "
    'str backend="auto") -> (Tensor, Tensor, Tensor, Tensor)',
    fake=_fake,
    call=_call,
)


def gathered_sink_attention_general(
    q: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    slot_idx: torch.Tensor,
    local_k: torch.Tensor,
    local_v: torch.Tensor,
    local_ranges: torch.Tensor,
    cur_k: torch.Tensor | None = None,
    cur_v: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_stats: bool = False,
    slot_delta: torch.Tensor | None = None,
    rope_theta: float = 10000.0,
    pool_k_scale: torch.Tensor | None = None,
    pool_v_scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, SinkAttnStats | None]:
    """The general form of :func:`gathered_sink_attention`, for the package's callers.

    Takes ``torch.ops.dysink.gathered_sink_attention``'s arguments (its schema above:
    bank slots, ranges of a local buffer, current keys, re-positioning, fp8 scales)
    and returns ``(out, stats)`` like the public function. Index values are trusted
    (not read); empty problems and ``head_dim`` 0 are settled as in the public form.
    """
    out, lse, ent, mass = gathered_sink_attention_op(
        q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges, cur_k, cur_v,
        softmax_scale, return_stats, slot_delta, rope_theta, pool_k_scale, pool_v_scale,
        backend,
    )  # fmt: skip
    if lse.dim() != 3:  # no statistics asked
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
    Empty problems (zero batch, heads, queries, keys or slots) give empty or
    all-zero results on every backend.

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
        ValueError: wrong ranks, mismatched sizes or devices, ``head_dim`` 0,
            unknown backend.
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
    k_len = check_prefix_len(k_len, k, device)
    check_index_range(slot_idx, "slot_idx", -1, pool_k.shape[0] - 1)
    if softmax_scale is not None:
        check_positive_number(softmax_scale, "softmax_scale")
    check_positive_number(rope_theta, "rope_theta")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if slot_rotate is not None:
        check_tensor(slot_rotate, "slot_rotate", 2, FLOAT_DTYPES + INDEX_DTYPES, device=device)
        if slot_rotate.shape != slot_idx.shape:
            raise ValueError(
                f"slot_rotate must have the shape of slot_idx {tuple(slot_idx.shape)}, got "
                f"{tuple(slot_rotate.shape)}"
            )
        check_finite(slot_rotate, "slot_rotate")
        slot_rotate = slot_rotate.float()

    ranges = torch.stack([torch.zeros_like(k_len), k_len], dim=-1).to(torch.int32)[:, None, :]
    return gathered_sink_attention_general(
        q, pool_k, pool_v, slot_idx, k, v, ranges,
        softmax_scale=None if softmax_scale is None else float(softmax_scale),
        return_stats=bool(return_stats), slot_delta=slot_rotate, rope_theta=float(rope_theta),
        backend=backend,
    )  # fmt: skip
