"""The ahead-of-time kernel report and its CI gates (compiles for sm_80/sm_90, no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dysink_kernels._backends import triton_installed
from dysink_kernels.tools.kernel_report import check_report

pytestmark = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")


@pytest.fixture(scope="module", params=["sm_90", "sm_80"])
def report(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "dysink_kernels", "kernels", "--arch", request.param, "--json"],
        capture_output=True, text=True, env=env, check=False, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return request.param, json.loads(out.stdout)


def test_every_kernel_compiles_without_spills_and_fits(report):
    arch, rows = report
    assert rows, "no kernel in the report"
    assert check_report(rows) == [], check_report(rows)
    for r in rows:
        assert r["arch"] == arch
        for key in (
            "name",
            "config",
            "registers",
            "spill_bytes",
            "shared_bytes",
            "tensor_core_ops",
        ):
            assert key in r


def test_attention_production_configs_present(report):
    arch, rows = report
    attn = [r for r in rows if r["name"].startswith("gathered_attn")]
    names = {r["name"] for r in attn}
    assert {"gathered_attn[module]", "gathered_attn[module+stats]"} <= names
    for r in attn:
        assert r["config"]["D"] == 128 and r["config"]["dtype"] == "bf16"
        assert r["tensor_core_ops"] > 0
        if arch == "sm_90":
            assert r["hgmma"] > 0, "no wgmma on Hopper"


def test_gate_catches_problems():
    rows = [
        {"name": "k", "arch": "sm_90", "config": {}, "compiled": True, "registers": 255,
         "spill_bytes": 8, "local_memory_ops": 2, "shared_bytes": 300_000, "hgmma": 0,
         "hmma": 0, "tensor_core_ops": 0, "needs_tensor_cores": True},
        {"name": "j", "arch": "sm_80", "config": {}, "compiled": False, "error": "boom"},
    ]  # fmt: skip
    problems = " ".join(check_report(rows))
    assert "spills" in problems and "shared memory" in problems and "HGMMA" in problems
    assert "does not compile" in problems
