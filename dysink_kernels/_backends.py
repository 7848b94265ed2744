"""When each optional backend can run, and which one ``backend="auto"`` picks.

Nothing here imports Triton or the extension.

* ``triton``: CUDA tensors when Triton is installed and a GPU is present; CPU tensors
  only under ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests). The
  variable must be set before Triton is first imported.
* ``csrc``: the compiled extension (``dysink_kernels._C``), C++ on CPU tensors and
  CUDA on GPU tensors when it was built with CUDA (gathered attention: CPU only).
* ``sdpa``: gathered attention on CPU tensors in PyTorch, over the whole local buffer
  with masks, as two fp32 matrix products per query block (the name is historical).
* ``naive``: the plain PyTorch oracle, always available.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

# The one table behind ``backend="auto"``: for each device type and op, the backends
# to try in order; the first one usable on the tensors' device wins, ``naive`` when
# none is. An op or device type missing here gets ``naive``.
#
# How it was chosen:
# * CPU rows are measured: the benchmark suite (``pytest benchmarks/ --benchmark-only``,
#   README "Benchmarks") timed the C++ small ops at 3.2-6.4x faster than the oracle, and
#   the C++ attention (attended keys only) faster than ``sdpa`` (the whole buffer,
#   masked), itself faster than the oracle, on a 2-core x86 CPU machine.
# * CUDA rows are NOT measured: no GPU run of the benchmark exists yet, so they keep
#   the rule the package started with (Triton first, then the CUDA extension). A C++
#   small op may well beat Triton's there (a Triton launch costs tens of microseconds
#   of Python); replace these rows with what the small-ops benchmark measures on a GPU.
AUTO: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {
        "gathered_sink_attention": ("triton",),
        "select_sinks": ("triton", "csrc"),
        "sink_gate": ("triton", "csrc"),
        "gate_from_means": ("triton", "csrc"),
        "gate_votes": ("triton", "csrc", "torch"),
        "bank_insert": ("triton", "csrc"),
    },
    "cpu": {
        "gathered_sink_attention": ("csrc", "sdpa"),
        "select_sinks": ("csrc",),
        "sink_gate": ("csrc",),
        "gate_from_means": ("csrc",),
        "gate_votes": ("csrc", "torch"),
        "bank_insert": ("csrc",),
    },
}


def auto_order(op: str, device: torch.device) -> tuple[str, ...]:
    """Backends ``auto`` tries for ``op`` on ``device``, best first, ``naive`` last."""
    return (*AUTO.get(device.type, {}).get(op, ()), "naive")


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


def sdpa_available(device: torch.device) -> bool:
    # Plain PyTorch matrix products on CPU tensors (the name is historical: the
    # backend no longer calls scaled_dot_product_attention).
    return device.type == "cpu"


# Availability by backend name: every op's backend of that name runs where this says.
AVAILABLE = {
    "naive": lambda device: True,
    "sdpa": sdpa_available,
    "triton": triton_available,
    "csrc": csrc_available,
}
