"""Lazy loader of the optional compiled extension (``dysink_kernels._C``).

Placeholder until the extension lands (issue 6): nothing is built yet, so the
``csrc`` backend is never available.
"""

from __future__ import annotations

import torch


def available(device: torch.device) -> bool:
    return False
