"""sink_gate and gate_from_means: argument checks, the custom ops, one backend resolution.

:func:`sink_gate` (public) checks its arguments and runs ``torch.ops.dysink.sink_gate``
(:data:`sink_gate_op`). ``torch.ops.dysink.gate_from_means`` (:data:`gate_from_means`)
is the same vote on precomputed means, which ``DySinkCache`` keeps as running key sums
of its window; the cache calls it directly (its inputs are trusted). Each op resolves
``backend`` once per call and answers empty problems itself.
"""

from __future__ import annotations

import torch

from ..._registry import define_op, register_backend
from ..._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_index_range,
    check_prefix_len,
    check_same_dtype,
    check_tensor,
)

OP_NAME = "sink_gate"
SCOPES = ("batch", "sample")

for _name in ("naive", "triton", "csrc"):
    register_backend(OP_NAME, _name, f"{__package__}.{_name}:sink_gate_{_name}")
register_backend("gate_from_means", "naive", f"{__package__}.naive:gate_from_means")
for _name in ("triton", "csrc"):
    register_backend("gate_from_means", _name, f"{__package__}.{_name}:gate_from_means_{_name}")
# Vote counts alone (head parallelism sums them across ranks before deciding): the
# oracle, a PyTorch device implementation ("torch", for devices without a kernel)
# and the two kernels.
register_backend("gate_votes", "naive", f"{__package__}.naive:gate_votes")
register_backend("gate_votes", "torch", f"{__package__}.votes:gate_votes_torch")
for _name in ("triton", "csrc"):
    register_backend("gate_votes", _name, f"{__package__}.{_name}:gate_votes_{_name}")


def _fake(a) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``(B, n)`` kept slots (the dtype of ``slot_idx``) and fp32 ratios."""
    return a.slot_idx.new_empty(a.slot_idx.shape), a.slot_idx.new_empty(
        a.slot_idx.shape, dtype=torch.float32
    )


def _contiguous(result: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    kept, ratio = result
    return kept.contiguous(), ratio.contiguous()


def _nothing_to_judge(a) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every slot kept with ratio 0 when there is no slot, sample or head."""
    B, n = a.slot_idx.shape
    if B * n * a.slot_mean_k.shape[1] * a.slot_mean_k.shape[0] != 0:
        return None
    ratio = torch.zeros((B, n), dtype=torch.float32, device=a.slot_idx.device)
    return a.slot_idx.contiguous().clone(), ratio


def _call(fn, a) -> tuple[torch.Tensor, torch.Tensor]:
    """Refuse head_dim 0; answer empty problems (no slot, sample, head or query)."""
    if a.q.shape[3] == 0:
        raise ValueError(f"q.shape[3] (head_dim) must be > 0, got shape {tuple(a.q.shape)}")
    empty = _nothing_to_judge(a)
    if empty is None and a.q.shape[1] == 0:  # no query: no head votes
        ratio = torch.zeros(a.slot_idx.shape, dtype=torch.float32, device=a.slot_idx.device)
        empty = a.slot_idx.contiguous().clone(), ratio
    return _contiguous(fn(*a[:-1])) if empty is None else empty


def _call_means(fn, a) -> tuple[torch.Tensor, torch.Tensor]:
    empty = _nothing_to_judge(a)
    return _contiguous(fn(*a[:-1])) if empty is None else empty


_SCOPE_ARGS = 'float tau=0.8, str scope="batch", str backend="auto") -> (Tensor, Tensor)'
sink_gate_op = define_op(
    OP_NAME,
    "(Tensor q, Tensor k, Tensor slot_mean_k, Tensor slot_idx, Tensor k_len, " + _SCOPE_ARGS,
    fake=_fake,
    call=_call,
)
# ``qbar, kbar_local (B, H, D)`` fp32 mean query and mean window key per head.
gate_from_means = define_op(
    "gate_from_means",
    "(Tensor qbar, Tensor kbar_local, Tensor slot_mean_k, Tensor slot_idx, " + _SCOPE_ARGS,
    fake=_fake,
    call=_call_means,
)


def _fake_votes(a) -> torch.Tensor:
    return a.slot_idx.new_empty(a.slot_idx.shape, dtype=torch.float32)


def _call_votes(fn, a) -> torch.Tensor:
    B, n = a.slot_idx.shape
    if B * n * a.slot_mean_k.shape[1] * a.slot_mean_k.shape[0] == 0:
        return torch.zeros((B, n), dtype=torch.float32, device=a.slot_idx.device)
    return fn(*a[:-1])


# ``(B, n)`` fp32: per retrieved slot, how many heads score it above the window
# (``qbar . kbar(slot) > qbar . kbar_local``); ``-1`` slots get 0.
gate_votes = define_op(
    "gate_votes",
    '(Tensor qbar, Tensor kbar_local, Tensor slot_mean_k, Tensor slot_idx, str backend="auto") '
    "-> Tensor",
    fake=_fake_votes,
    call=_call_votes,
)


def check_tau_scope(tau: float, scope: str) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be a number in [0, 1], got {tau!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def sink_gate(
    q: torch.Tensor,
    k: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    *,
    k_len: torch.Tensor | None = None,
    tau: float = 0.8,
    scope: str = "batch",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop retrieved slots that most heads would attend more than the local window.

    ``qbar[b, h]`` is the mean of ``q[b, :, h]``; ``kbar_local[b, h]`` the mean of
    ``k[b, :k_len[b], h]`` (zero when empty); an entry's mean key is
    ``slot_mean_k[slot]``. Voter ``(b, h)`` counts against the entry when
    ``qbar . kbar(entry) > qbar . kbar_local`` (strict). ``ratio`` is the fraction
    of voters against; the entry is dropped when ``ratio > tau`` (strict).

    ``scope="batch"`` (the reference): when every sample has the same number of
    valid slots, the j-th valid slots of all samples are judged together, the
    voters being all ``(b, h)``; otherwise each sample is judged alone.
    ``scope="sample"``: each sample is always judged alone (voters ``(h,)``).

    Args:
        q: ``(B, Sq, H, D)`` chunk queries (RoPE applied).
        k: ``(B, Sk, H, D)`` local window keys.
        slot_mean_k: ``(P, H, D)`` per-slot mean key of this layer (fp32).
        slot_idx: ``(B, n)`` int slots, ``-1`` = none.
        k_len: ``(B,)`` valid local keys (prefix of ``k``); ``None`` = ``Sk``.
        tau: drop threshold in ``[0, 1]``.
        scope: ``"batch"`` or ``"sample"``.
        backend: ``"auto"`` or a registered backend name.

    Returns:
        ``(kept_idx, ratio)``: ``slot_idx`` with dropped entries set to ``-1``
        (same dtype), and ``(B, n)`` fp32 ratios (0 for ``-1`` slots).
    """
    check_tensor(q, "q", 4)
    device = q.device
    B, _, H, D = q.shape
    check_tensor(k, "k", 4, device=device)
    check_same_dtype({"q": q, "k": k})
    check_dim(k, "k", 0, B, "batch")
    check_dim(k, "k", 2, H, "heads")
    check_dim(k, "k", 3, D, "head_dim")
    check_tensor(slot_mean_k, "slot_mean_k", 3, FLOAT_DTYPES, device=device)
    check_dim(slot_mean_k, "slot_mean_k", 1, H, "heads")
    check_dim(slot_mean_k, "slot_mean_k", 2, D, "head_dim")
    check_tensor(slot_idx, "slot_idx", 2, INDEX_DTYPES, device=device)
    check_dim(slot_idx, "slot_idx", 0, B, "batch")
    check_tau_scope(tau, scope)
    k_len = check_prefix_len(k_len, k, device)
    check_index_range(slot_idx, "slot_idx", -1, slot_mean_k.shape[0] - 1)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    return sink_gate_op(q, k, slot_mean_k, slot_idx, k_len, float(tau), scope, backend)
