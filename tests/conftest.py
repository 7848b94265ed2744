"""Shared fixtures and tolerance helpers for the test-suite."""

from __future__ import annotations

import os
import random

import pytest
import torch

# Without a GPU the Triton backends run in Triton's interpreter on CPU tensors; the
# variable must be set before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def op_backends(op: str) -> list[str]:
    """The backends of ``op`` usable on CPU tensors here (triton through the interpreter,
    csrc when the extension is built): what every per-op test runs over."""
    from dysink_kernels import available_backends

    return available_backends(op, "cpu")


# Tolerances against an fp64 reference, by input dtype (max abs error on O(1) data).
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def atol_for(dtype: torch.dtype) -> float:
    return ATOL[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale=1.0):
    """Compare ``actual`` with an fp64 ``expected`` at the tolerance of ``dtype``."""
    assert not torch.isnan(actual).any(), "NaN in output (an element was not written?)"
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol_for(dtype) * scale, rtol=atol_for(dtype)
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


def pytest_report_header(config):
    return f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
