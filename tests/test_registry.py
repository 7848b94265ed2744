"""The backend registry and import hygiene."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dysink_kernels import available_backends
from dysink_kernels._registry import resolve_backend


def test_naive_everywhere_and_auto_resolves_on_cpu():
    for op in ("gathered_attention", "select_sinks", "sink_gate", "apply_wan_rope"):
        assert "naive" in available_backends(op)
        name, fn = resolve_backend(op, "auto", torch.device("cpu"))
        assert callable(fn) and name in available_backends(op, "cpu")


def test_unknown_backend_and_op():
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("select_sinks", "fastest", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown op"):
        resolve_backend("no_such_op", "auto", torch.device("cpu"))
    with pytest.raises(TypeError):
        resolve_backend("select_sinks", None, torch.device("cpu"))


def test_import_queries_no_device_and_loads_no_backend():
    """Importing the package must not import triton, initialise CUDA or compile."""
    code = (
        "import sys, torch\n"
        "import dysink_kernels, dysink_kernels.sink_attention\n"
        "assert 'triton' not in sys.modules, 'triton imported at import time'\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
