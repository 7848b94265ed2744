"""Public entry point of sink_gate (DESIGN 3.3) and its dispatch."""

from __future__ import annotations

import torch

from ... import _library  # noqa: F401  (registers torch.ops.dysink.*)
from ..._backends import csrc_available, triton_available
from ..._registry import register_backend, resolve_backend
from ..._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_index_range,
    check_same_dtype,
    check_tensor,
)

OP_NAME = "sink_gate"
SCOPES = ("batch", "sample")

register_backend(
    OP_NAME,
    "naive",
    "dysink_kernels.ops.sink_gate.naive:sink_gate_naive",
    priority={"*": 0},
)
register_backend(
    "gate_from_means",
    "naive",
    "dysink_kernels.ops.sink_gate.naive:gate_from_means",
    priority={"*": 0},
)
register_backend(
    "sink_gate",
    "triton",
    "dysink_kernels.ops.sink_gate.triton:sink_gate_triton",
    available=triton_available,
    priority={"cuda": 10},
)
register_backend(
    "sink_gate",
    "csrc",
    "dysink_kernels.ops.sink_gate.csrc:sink_gate_csrc",
    available=csrc_available,
    priority={"cuda": 5, "cpu": 5},
)
register_backend(
    "gate_from_means",
    "triton",
    "dysink_kernels.ops.sink_gate.triton:gate_from_means_triton",
    available=triton_available,
    priority={"cuda": 10},
)
register_backend(
    "gate_from_means",
    "csrc",
    "dysink_kernels.ops.sink_gate.csrc:gate_from_means_csrc",
    available=csrc_available,
    priority={"cuda": 5, "cpu": 5},
)


def gate_from_means(
    qbar: torch.Tensor,
    kbar_local: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    tau: float,
    scope: str,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's vote on precomputed means (``qbar``, ``kbar_local``: ``(B, H, D)`` fp32).

    Used by ``DySinkCache``, which keeps running key sums of its window instead of
    re-reading it; unchecked.
    """
    name, _ = resolve_backend("gate_from_means", backend, qbar.device)
    return torch.ops.dysink.gate_from_means(
        qbar, kbar_local, slot_mean_k, slot_idx, float(tau), scope, name
    )


def check_tau_scope(tau: float, scope: str) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be a number in [0, 1], got {tau!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def sink_gate_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    k_len: torch.Tensor,
    tau: float,
    scope: str,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchecked dispatch, for callers that built the inputs themselves."""
    name, _ = resolve_backend(OP_NAME, backend, q.device)
    return torch.ops.dysink.sink_gate(q, k, slot_mean_k, slot_idx, k_len, float(tau), scope, name)


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
    Sk = k.shape[1]
    if k_len is None:
        k_len = torch.full((B,), Sk, dtype=torch.int32, device=device)
    else:
        check_tensor(k_len, "k_len", 1, INDEX_DTYPES, device=device)
        check_dim(k_len, "k_len", 0, B, "batch")
        check_index_range(k_len, "k_len", 0, Sk)
    check_index_range(slot_idx, "slot_idx", -1, slot_mean_k.shape[0] - 1)
    return sink_gate_impl(q, k, slot_mean_k, slot_idx, k_len, tau, scope, backend)
