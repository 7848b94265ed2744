"""bank_insert: the custom op behind ``FrameBank`` (not a user-facing op).

``torch.ops.dysink.bank_insert`` (:data:`bank_insert`) inserts one block per sample
into the bank in place: it copies the block's K/V into the chosen slot, writes its
mean keys, feature, owner, frame and stamp, with dedup and FIFO slot choice on the
device (``naive.py`` gives the exact meaning and shapes). It resolves ``backend``
once per call; a call with no sample inserts nothing and reaches no backend.
"""

from __future__ import annotations

import torch

from ..._registry import define_op, register_backend

OP_NAME = "bank_insert"

for _name in ("naive", "triton", "csrc"):
    register_backend(OP_NAME, _name, f"{__package__}.{_name}:bank_insert_{_name}")


def _outputs(feature: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stored (B,) bool, slot (B,) int64)`` buffers, ``B = feature.shape[0]``."""
    B = feature.shape[0]
    return (
        torch.zeros(B, dtype=torch.bool, device=device),
        torch.zeros(B, dtype=torch.int64, device=device),
    )


def _call(fn, a) -> tuple[torch.Tensor, torch.Tensor]:
    if a.feature.shape[0] == 0:  # no sample: nothing stored
        return _outputs(a.feature, a.feature.device)
    return fn(*a[:-1])


bank_insert = define_op(
    OP_NAME,
    "(Tensor(a!) pool_k, Tensor(b!) pool_v, Tensor(c!) pool_mean_k, Tensor(d!) slot_feat, "
    "Tensor(e!) slot_owner, Tensor(f!) slot_frame, Tensor(g!) slot_stamp, Tensor(h!) clock, "
    "Tensor src_k, Tensor src_v, Tensor src_pos, Tensor feature, Tensor frame, "
    'int slots_per_sample, int limit, float? dedup, str backend="auto") -> (Tensor, Tensor)',
    fake=lambda a: _outputs(a.feature, a.feature.device),
    call=_call,
)
