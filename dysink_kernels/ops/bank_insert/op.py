"""Dispatch of the bank insert (used by FrameBank; not a user-facing op)."""

from __future__ import annotations

from ..._backends import csrc_available, triton_available
from ..._registry import register_backend, resolve_backend

OP_NAME = "bank_insert"

register_backend(
    OP_NAME,
    "naive",
    "dysink_kernels.ops.bank_insert.naive:bank_insert_naive",
    priority={"*": 0},
)
register_backend(
    "bank_insert",
    "triton",
    "dysink_kernels.ops.bank_insert.triton:bank_insert_triton",
    available=triton_available,
    priority={"cuda": 10},
)
register_backend(
    "bank_insert",
    "csrc",
    "dysink_kernels.ops.bank_insert.csrc:bank_insert_csrc",
    available=csrc_available,
    priority={"cuda": 5, "cpu": 5},
)


def bank_insert(*args, backend: str = "auto", **kwargs):
    """Resolve ``backend`` for the pool's device and run the insert (see ``naive.py``)."""
    _, fn = resolve_backend(OP_NAME, backend, args[0].device)
    return fn(*args, **kwargs)
