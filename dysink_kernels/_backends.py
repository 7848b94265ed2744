"""When each optional backend can run. Nothing here imports Triton or the extension.

* ``triton``: CUDA tensors when Triton is installed and a GPU is present; CPU tensors
  only under ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests). The
  variable must be set before Triton is first imported.
* ``csrc``: the compiled extension (``dysink_kernels._C``), C++ on CPU tensors and
  CUDA on GPU tensors when it was built with CUDA.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device) -> bool:
    if not triton_installed():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and triton_interpreting()


def csrc_available(device: torch.device) -> bool:
    from . import _cuda

    return _cuda.available(device)
