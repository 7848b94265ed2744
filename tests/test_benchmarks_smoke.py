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
        "run.py", "--dry-run", "--suites", "pipeline,small_ops,memory", "--out", str(out),
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
