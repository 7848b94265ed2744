"""The package's ops as ``torch.library`` custom ops (namespace ``dysink``).

Each op is opaque to ``torch.compile`` (a fake implementation gives output shapes,
so ``fullgraph=True`` traces through it) and to CUDA-graph capture (it launches
whatever its backend launches). The ``backend`` argument is a concrete backend
name; the Python wrappers resolve ``"auto"`` before calling. Wan RoPE is plain
PyTorch and needs no registration.
"""

from __future__ import annotations

import torch

from ._registry import resolve_backend

NAMESPACE = "dysink"


def _backend_fn(op: str, backend: str, device: torch.device):
    return resolve_backend(op, backend, device)[1]


# ---------------------------------------------------------------- gathered attention
@torch.library.custom_op(f"{NAMESPACE}::gathered_attention", mutates_args=())
def gathered_attention_op(
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
    slot_delta: torch.Tensor | None,
    rope_theta: float,
    pool_k_scale: torch.Tensor | None,
    pool_v_scale: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _backend_fn("gathered_attention", backend, q.device)
    out, stats = fn(
        q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges, cur_k, cur_v,
        softmax_scale, return_stats, slot_delta, rope_theta, pool_k_scale, pool_v_scale,
    )  # fmt: skip
    if stats is None:
        empty = q.new_empty(0, dtype=torch.float32)
        return out, empty, empty.clone(), empty.clone()
    return out, stats.lse, stats.entropy, stats.slot_mass


@gathered_attention_op.register_fake
def _(q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges, cur_k, cur_v,
      softmax_scale, return_stats, slot_delta, rope_theta, pool_k_scale, pool_v_scale,
      backend):  # fmt: skip
    B, Sq, H, _ = q.shape
    out = torch.empty_like(q)
    if not return_stats:
        empty = q.new_empty(0, dtype=torch.float32)
        return out, empty, empty.clone(), empty.clone()
    lse = q.new_empty(B, H, Sq, dtype=torch.float32)
    return (
        out,
        lse,
        torch.empty_like(lse),
        q.new_empty(B, H, slot_idx.shape[1], dtype=torch.float32),
    )


# ---------------------------------------------------------------------- select_sinks
@torch.library.custom_op(f"{NAMESPACE}::select_sinks", mutates_args=())
def select_sinks_op(
    query_feat: torch.Tensor,
    slot_feat: torch.Tensor,
    slot_owner: torch.Tensor,
    slot_frame: torch.Tensor,
    k: int,
    exclude_lo: torch.Tensor,
    exclude_hi: torch.Tensor,
    sink_frames: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _backend_fn("select_sinks", backend, query_feat.device)
    return fn(query_feat, slot_feat, slot_owner, slot_frame, k, exclude_lo, exclude_hi, sink_frames)


@select_sinks_op.register_fake
def _(query_feat, slot_feat, slot_owner, slot_frame, k, exclude_lo, exclude_hi, sink_frames,
      backend):  # fmt: skip
    B = query_feat.shape[0]
    return (
        query_feat.new_empty(B, k, dtype=torch.int32),
        query_feat.new_empty(B, k, dtype=torch.float32),
    )


# -------------------------------------------------------------------------- the gate
@torch.library.custom_op(f"{NAMESPACE}::sink_gate", mutates_args=())
def sink_gate_op(
    q: torch.Tensor,
    k: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    k_len: torch.Tensor,
    tau: float,
    scope: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _backend_fn("sink_gate", backend, q.device)
    return fn(q, k, slot_mean_k, slot_idx, k_len, tau, scope)


@sink_gate_op.register_fake
def _(q, k, slot_mean_k, slot_idx, k_len, tau, scope, backend):
    return torch.empty_like(slot_idx), slot_idx.new_empty(slot_idx.shape, dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::gate_from_means", mutates_args=())
def gate_from_means_op(
    qbar: torch.Tensor,
    kbar_local: torch.Tensor,
    slot_mean_k: torch.Tensor,
    slot_idx: torch.Tensor,
    tau: float,
    scope: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _backend_fn("gate_from_means", backend, qbar.device)
    return fn(qbar, kbar_local, slot_mean_k, slot_idx, tau, scope)


@gate_from_means_op.register_fake
def _(qbar, kbar_local, slot_mean_k, slot_idx, tau, scope, backend):
    return torch.empty_like(slot_idx), slot_idx.new_empty(slot_idx.shape, dtype=torch.float32)


# ------------------------------------------------------------------------ bank insert
_INSERT_MUTATES = (
    "pool_k", "pool_v", "pool_mean_k", "slot_feat", "slot_owner", "slot_frame", "slot_stamp",
    "clock",
)  # fmt: skip


@torch.library.custom_op(f"{NAMESPACE}::bank_insert", mutates_args=_INSERT_MUTATES)
def bank_insert_op(
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    pool_mean_k: torch.Tensor,
    slot_feat: torch.Tensor,
    slot_owner: torch.Tensor,
    slot_frame: torch.Tensor,
    slot_stamp: torch.Tensor,
    clock: torch.Tensor,
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    src_pos: torch.Tensor,
    feature: torch.Tensor,
    frame: torch.Tensor,
    slots_per_sample: int,
    limit: int,
    dedup: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _backend_fn("bank_insert", backend, pool_k.device)
    return fn(
        pool_k, pool_v, pool_mean_k, slot_feat, slot_owner, slot_frame, slot_stamp, clock,
        src_k, src_v, src_pos, feature, frame, slots_per_sample, limit, dedup,
    )  # fmt: skip


@bank_insert_op.register_fake
def _(pool_k, pool_v, pool_mean_k, slot_feat, slot_owner, slot_frame, slot_stamp, clock,
      src_k, src_v, src_pos, feature, frame, slots_per_sample, limit, dedup, backend):  # fmt: skip
    B = feature.shape[0]
    return feature.new_empty(B, dtype=torch.bool), feature.new_empty(B, dtype=torch.int64)
