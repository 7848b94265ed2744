"""The benchmark scripts in ``benchmarks/`` run end to end (tiny shapes, subprocesses)
and refuse an unwritable output folder before measuring anything."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def _script(name: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python benchmarks/<name> args`` from ``cwd`` (not the repository: the script
    must find its sibling modules by itself), with this checkout's package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_run_dry_writes_results(tmp_path):
    out = tmp_path / "out"
    proc = _script(
        "run.py", "--dry-run", "--suites", "pipeline,small_ops,model,memory", "--out", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"results.csv", "results.json", "summary.md"} <= {p.name for p in out.iterdir()}
    rows = _rows(out / "results.csv")
    measured = {(r["suite"], r["provider"]) for r in rows if r["kind"] == "measured"}
    assert ("pipeline", "ours") in measured and ("pipeline", "reference_style") in measured
    assert any(r["suite"] == "small_ops" for r in rows)
    assert any(r["suite"] == "memory" and r["kind"] == "computed" for r in rows)
    ours = next(r for r in rows if r["suite"] == "pipeline" and r["provider"] == "ours")
    assert ours["host_syncs"] == "0"
    # The model-scale benchmark at reduced dims: every case but the CUDA graph one.
    model = {r["provider"]: r for r in rows if r["suite"] == "model" and r["kind"] != "derived"}
    for name in ("window", "dysink", "reference_style", "longlive"):
        assert model[name]["kind"] == "measured", model[name]
        assert float(model[name]["median_ms"]) > 0
    assert model["dysink+graph"]["kind"] == "skipped"
    assert "CUDA" in model["dysink+graph"]["note"]
    assert model["dysink"]["host_syncs"] == "0" and int(model["reference_style"]["host_syncs"]) > 0
    ratios = {r["provider"] for r in rows if r["suite"] == "model" and r["kind"] == "derived"}
    assert "dysink / window" in ratios
    assert "Cost of memory" in (out / "summary.md").read_text()


def test_wan_shaped_model_rope_on_device_matches_host_frame():
    """A first frame given as a device tensor (what a captured CUDA graph needs) rotates
    like the same frame given as an int; the default tiny model is unchanged by the
    Wan-shaped options."""
    import torch

    from dysink_kernels.tools.models import TinyVideoDiT, wan_shaped_dit

    torch.manual_seed(0)
    model = wan_shaped_dit(2, 2, 16, (2, 3), ffn_dim=40, latent_channels=4, text_dim=12)
    x = torch.randn(1, 3, 6, 4)
    text = torch.randn(1, 5, 12)
    seen = {}

    def attend(name):
        def fn(layer, q, k, v, commit):
            seen[name, layer] = (q, k)
            return v

        return fn

    a = model(x, 0.5, text, 9, attend("int"))
    b = model(x, 0.5, text, torch.tensor(9), attend("tensor"))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for layer in range(2):
        for u, w in zip(seen["int", layer], seen["tensor", layer]):
            torch.testing.assert_close(u, w, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    tiny = TinyVideoDiT()
    assert not tiny.cross_attn and tiny.blocks[0].cross is None
    assert [n for n, _ in tiny.named_parameters()][:6] == [
        "embed.weight", "embed.bias", "time.weight", "time.bias", "cond.weight", "cond.bias",
    ]  # fmt: skip


@pytest.mark.parametrize("script", ["run.py", "gpu_suite.py"])
def test_unwritable_out_fails_before_any_work(tmp_path, script):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "out"  # a folder under a regular file can never be created
    args = ["--out", str(out)] if script == "run.py" else [str(out), "--dry-run"]
    proc = _script(script, *args, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-1000:]
    assert "not writable" in proc.stderr
    assert "dysink bench:" not in proc.stdout and "== env" not in proc.stdout


def test_run_rejects_unknown_suite(tmp_path):
    proc = _script("run.py", "--suites", "attention,nope", "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "unknown suites" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_gpu_suite_dry_run_stages(tmp_path):
    out = tmp_path / "out"
    proc = _script(
        "gpu_suite.py", str(out), "--dry-run", "--stages", "small_ops", "--budget", "90",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    stages = json.loads((out / "results.json").read_text())["environment"]["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [
        ("env", "ok"),
        ("small_ops", "ok"),
        ("final", "ok"),
    ]
    suites = {r["suite"] for r in _rows(out / "results.csv")}
    assert "small_ops" in suites and not suites & {"attention", "pipeline", "scaling"}


def test_gpu_suite_rejects_unknown_stage(tmp_path):
    proc = _script(
        "gpu_suite.py", str(tmp_path / "out"), "--stages", "attention,nope", cwd=tmp_path
    )
    assert proc.returncode == 2 and "unknown stages" in proc.stderr
    assert not (tmp_path / "out").exists()
