"""select_sinks: argument checks, the custom op, one backend resolution.

:func:`select_sinks` (public) checks its arguments and runs
``torch.ops.dysink.select_sinks`` (:data:`select_sinks_op`, also called directly by
the cache, whose inputs are trusted). The op resolves ``backend`` once per call,
answers empty problems itself and hands its backend at most ``P`` (the slot count)
as ``k``, padding the result to ``(B, k)``.
"""

from __future__ import annotations

import torch

from ..._registry import define_op, register_backend
from ..._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_count,
    check_dim,
    check_index_range,
    check_not_above,
    check_tensor,
)

OP_NAME = "select_sinks"

for _name in ("naive", "triton", "csrc"):
    register_backend(OP_NAME, _name, f"{__package__}.{_name}:select_sinks_{_name}")


def _padding(B: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    slot = torch.full((B, k), -1, dtype=torch.int32, device=device)
    return slot, torch.full((B, k), float("-inf"), dtype=torch.float32, device=device)


def _call(fn, a) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer empty problems, bound the backend's ``k`` by ``P``, pad to ``(B, k)``."""
    B, M, F = a.query_feat.shape
    P = a.slot_feat.shape[0]
    k = min(a.k, P)
    if B * M * F * k == 0:  # no sample, no query row, no feature or nothing to pick
        return _padding(B, a.k, a.query_feat.device)
    slot, score = fn(*a[:4], k, *a[5:-1])
    if k == a.k:
        return slot, score
    slot_out, score_out = _padding(B, a.k, slot.device)
    slot_out[:, :k] = slot
    score_out[:, :k] = score
    return slot_out, score_out


def _fake(a) -> tuple[torch.Tensor, torch.Tensor]:
    B = a.query_feat.shape[0]
    return (
        a.query_feat.new_empty(B, a.k, dtype=torch.int32),
        a.query_feat.new_empty(B, a.k, dtype=torch.float32),
    )


select_sinks_op = define_op(
    OP_NAME,
    "(Tensor query_feat, Tensor slot_feat, Tensor slot_owner, Tensor slot_frame, int k, "
    "Tensor exclude_lo, Tensor exclude_hi, int sink_frames=0, Tensor? slot_prior=None, "
    'float prior_mix=0., str backend="auto") -> (Tensor, Tensor)',
    fake=_fake,
    call=_call,
)


def select_sinks(
    query_feat: torch.Tensor,
    slot_feat: torch.Tensor,
    slot_owner: torch.Tensor,
    slot_frame: torch.Tensor,
    *,
    k: int,
    exclude_lo: torch.Tensor,
    exclude_hi: torch.Tensor,
    sink_frames: int = 0,
    slot_prior: torch.Tensor | None = None,
    prior_mix: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the ``k`` bank slots most relevant to each sample's recent blocks.

    ``score[b, p]`` is the mean cosine between slot ``p``'s feature and the query
    rows of sample ``b`` (rows that are all zeros are padding and are ignored; a
    sample with no valid row retrieves nothing). Candidates are the slots owned by
    ``b`` whose frame lies neither in ``[exclude_lo[b], exclude_hi[b])`` nor in
    ``[0, sink_frames)``. The top ``k`` by score (ties: lower frame, then lower
    slot) are returned ordered by frame ascending.

    Args:
        query_feat: ``(B, M, F)`` features of the last blocks of each sample.
        slot_feat: ``(P, F)`` bank features.
        slot_owner: ``(P,)`` int sample owning each slot, ``-1`` = free.
        slot_frame: ``(P,)`` int first frame index of each entry.
        k: how many slots to return, ``0 <= k <= P`` (fewer candidates than ``k``
            give padding). The op itself (``select_sinks_op``, for trusted callers)
            also takes ``k > P``: its backends still see at most ``P``.
        exclude_lo, exclude_hi: ``(B,)`` int, frames ``[lo, hi)`` are excluded
            (``lo <= hi``).
        sink_frames: frames ``[0, sink_frames)`` are excluded (static sinks).
        slot_prior: ``(B, P)`` fp32 prior in ``[0, 1]`` blended into the score as
            ``(1 - prior_mix) * cosine + prior_mix * prior`` (usage-aware relevance).
        prior_mix: weight of ``slot_prior`` in ``[0, 1]``.
        backend: ``"auto"`` or a registered backend name.

    Returns:
        ``(slot_idx, score)``: ``(B, k)`` int32 slots (``-1`` padding after the
        chosen ones) and ``(B, k)`` fp32 scores aligned with them (``-inf`` for
        padding).

    Raises:
        TypeError, ValueError: wrong types, ranks, sizes, devices, ``k`` below 0 or
            above ``P``, ``sink_frames`` below 0, ``exclude_lo > exclude_hi``.
        IndexError: an owner outside ``[-1, B)``. Value checks run on the host for
            CPU tensors and as device asserts otherwise.
    """
    check_tensor(query_feat, "query_feat", 3, FLOAT_DTYPES)
    device = query_feat.device
    B, _, F = query_feat.shape
    check_tensor(slot_feat, "slot_feat", 2, FLOAT_DTYPES, device=device)
    check_dim(slot_feat, "slot_feat", 1, F, "feature dim")
    P = slot_feat.shape[0]
    for name, t in (("slot_owner", slot_owner), ("slot_frame", slot_frame)):
        check_tensor(t, name, 1, INDEX_DTYPES, device=device)
        check_dim(t, name, 0, P, "slots")
    for name, t in (("exclude_lo", exclude_lo), ("exclude_hi", exclude_hi)):
        check_tensor(t, name, 1, INDEX_DTYPES, device=device)
        check_dim(t, name, 0, B, "batch")
    check_count(k, "k")
    if k > P:  # refused before anything of size k is allocated
        raise ValueError(f"k={k} is more than the {P} slots of slot_feat (k <= P)")
    check_count(sink_frames, "sink_frames")
    if slot_prior is not None:
        check_tensor(slot_prior, "slot_prior", 2, (torch.float32,), device=device)
        check_dim(slot_prior, "slot_prior", 0, B, "batch")
        check_dim(slot_prior, "slot_prior", 1, P, "slots")
    if isinstance(prior_mix, bool) or not isinstance(prior_mix, (int, float)):
        raise ValueError(f"prior_mix must be a number in [0, 1], got {prior_mix!r}")
    if not 0.0 <= prior_mix <= 1.0:
        raise ValueError(f"prior_mix must be a number in [0, 1], got {prior_mix!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    check_index_range(slot_owner, "slot_owner", -1, B - 1)
    check_not_above(exclude_lo, exclude_hi, "exclude_lo", "exclude_hi")
    return select_sinks_op(
        query_feat, slot_feat, slot_owner, slot_frame, k, exclude_lo, exclude_hi,
        sink_frames, slot_prior, float(prior_mix), backend,
    )  # fmt: skip
