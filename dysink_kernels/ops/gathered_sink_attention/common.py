"""Types shared by the gathered-attention backends."""

from __future__ import annotations

from typing import NamedTuple

import torch


class SinkAttnStats(NamedTuple):
    """Statistics computed in the same pass as the attention output (all fp32).

    Attributes:
        lse: ``(B, H, Sq)`` natural-log sum-exp of the scaled scores of each query
            (``-inf`` for a query that attends no key).
        entropy: ``(B, H, Sq)`` entropy in nats of each query's attention
            distribution (0 for a query that attends no key).
        slot_mass: ``(B, H, n)`` mean over queries of the probability mass on each
            listed slot (0 for ``-1`` slots).
    """

    lse: torch.Tensor
    entropy: torch.Tensor
    slot_mass: torch.Tensor
