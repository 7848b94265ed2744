"""The small-ops suite: ``select_sinks``, ``sink_gate``, ``gate_from_means`` and the
bank insert on every backend, next to a plain device-to-device copy of the same bytes."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dysink_kernels import FrameBank, available_backends, select_sinks, sink_gate
from dysink_kernels.ops.sink_gate import gate_from_means

from measure import (
    Recorder,
    Timing,
    dtype_name,
    free_memory,
    past_deadline,
    time_kernel,
    triton_reason,
)
from plans import Plan, SmallOpsShape

# ----------------------------------------------------------------------------- small ops
SMALL_OPS = ("select_sinks", "sink_gate", "gate_from_means", "bank_insert")
COPY_PROVIDER = "d2d_copy"


def small_op_cases(
    device: torch.device, *, allow_interpreter: bool = False
) -> list[tuple[str, str, str | None]]:
    """(op, backend, skip reason) for every registered backend, plus the plain copy."""
    out = []
    for op in SMALL_OPS:
        usable = set(available_backends(op, device))
        for name in available_backends(op):
            reason = None if name in usable else f"{name!r} is not available on {device.type}"
            if reason is None and name == "triton":
                reason = triton_reason(device, allow_interpreter)
            out.append((op, name, reason))
    out.append(("bank_insert", COPY_PROVIDER, None))
    return out


def small_op_call(
    op: str, backend: str, shape: SmallOpsShape, device: torch.device, seed: int = 0
) -> tuple[Callable[[], object], int]:
    """``(callable, bytes it reads and writes)`` for one small op on ``backend``."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = shape
    B, P, H, D, n = s.batch, s.slots, s.heads, s.head_dim, s.top_k

    def rnd(*size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=dtype)

    slot_idx = (torch.arange(n, dtype=torch.int32, device=device) * 7 % P).expand(B, n)
    slot_idx = slot_idx.contiguous()
    if op == "select_sinks":
        qf = F.normalize(rnd(B, s.query_blocks, s.feature_dim), dim=-1)
        sf = F.normalize(rnd(P, s.feature_dim), dim=-1)
        owner = torch.zeros(P, dtype=torch.int32, device=device)
        frame = torch.arange(P, dtype=torch.int32, device=device) * 3
        lo = torch.full((B,), 3 * (P - 3), dtype=torch.int32, device=device)
        hi = torch.full((B,), 3 * P, dtype=torch.int32, device=device)
        kw = dict(k=n, exclude_lo=lo, exclude_hi=hi, backend=backend)
        return lambda: select_sinks(qf, sf, owner, frame, **kw), qf.nbytes + sf.nbytes
    if op == "sink_gate":
        q = rnd(B, s.sq, H, D, dtype=s.dtype)
        k = rnd(B, s.window, H, D, dtype=s.dtype)
        mean_k = rnd(P, H, D) / math.sqrt(s.window)
        return lambda: sink_gate(q, k, mean_k, slot_idx, backend=backend), q.nbytes + k.nbytes
    if op == "gate_from_means":
        qbar, kbar, mean_k = rnd(B, H, D), rnd(B, H, D), rnd(P, H, D)
        nbytes = qbar.nbytes + kbar.nbytes + B * n * H * D * 4
        return lambda: gate_from_means(qbar, kbar, mean_k, slot_idx, 0.8, "batch", backend), nbytes
    if op == "bank_insert":
        size = (s.insert_layers, 1, s.insert_tokens, H, D)
        src_k, src_v = rnd(*size, dtype=s.dtype), rnd(*size, dtype=s.dtype)
        nbytes = 2 * (src_k.nbytes + src_v.nbytes)  # read + write
        if backend == COPY_PROVIDER:
            dst_k, dst_v = torch.empty_like(src_k), torch.empty_like(src_v)
            return lambda: (dst_k.copy_(src_k), dst_v.copy_(src_v)), nbytes
        bank = FrameBank(
            s.insert_layers,
            1,
            2,
            s.insert_tokens,
            H,
            D,
            dtype=s.dtype,
            device=device,
            feature_dim=s.feature_dim,
        )
        pos = torch.arange(s.insert_tokens, device=device)
        feat = rnd(1, s.feature_dim)
        frame = torch.zeros((), dtype=torch.int64, device=device)
        return lambda: bank.insert(src_k, src_v, pos, feat, frame, None, backend=backend), nbytes
    raise ValueError(f"unknown small op {op!r}")


def small_op_row(
    rec: Recorder, op: str, backend: str, shape: SmallOpsShape, timing: Timing, nbytes: int
) -> dict:
    note = "GB/s counts bytes read + written" if op == "bank_insert" else "GB/s counts bytes read"
    return rec.add(
        suite="small_ops",
        case=op,
        provider=backend,
        shape=shape.label(op),
        dtype=dtype_name(shape.dtype),
        kind="measured",
        **timing.fields(),
        gbps=nbytes / timing.median_s / 1e9,
        note=note,
    )


def run_small_ops(
    rec: Recorder,
    plan: Plan,
    device: torch.device,
    *,
    allow_interpreter: bool = False,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    for op, backend, reason in small_op_cases(device, allow_interpreter=allow_interpreter):
        if reason is not None or past_deadline(deadline):
            rec.add(
                suite="small_ops",
                case=op,
                provider=backend,
                kind="skipped",
                note=reason or "deadline",
            )
            continue
        fn = None
        try:
            fn, nbytes = small_op_call(op, backend, plan.small, device)
            timing = time_kernel(fn, device, rounds=plan.small_rounds)
            row = small_op_row(rec, op, backend, plan.small, timing, nbytes)
            log(
                f"  small_ops {op:16} {backend:9} {row['median_ms'] * 1e3:10.1f} us "
                f"{row['gbps']:8.1f} GB/s"
            )
        except Exception as err:
            rec.failed("small_ops", op, backend, err)
            log(f"  small_ops {op} {backend}: FAILED {err}")
        finally:
            fn = None
            free_memory(device)
