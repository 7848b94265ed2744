"""The command line: demo and info, and bad arguments as usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dysink_kernels.__main__ import main


def test_demo_writes_summary_and_timeline(tmp_path, capsys):
    rc = main(["demo", "--blocks", "8", "--layers", "2", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "block   7" in out and "retrieved" in out and "entropy" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["blocks"]) == 8
    assert summary["config"]["top_k"] == 2
    assert any(b["retrieved"] for b in summary["blocks"])
    png = tmp_path / "timeline.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_mean_key_batch2(tmp_path, capsys):
    rc = main(
        ["demo", "--blocks", "5", "--layers", "2", "--batch", "2", "--feature", "mean_key",
         "--sink-frames", "3", "--local-frames", "12", "--out", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["feature"] == "mean_key"


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"] and "gathered_sink_attention" in data["backends"]
    assert "naive" in data["backends"]["gathered_sink_attention"]["cpu"]


def test_demo_prompt_switch(tmp_path, capsys):
    rc = main(
        ["demo", "--blocks", "8", "--layers", "2", "--switch-at", "4,6", "--out", str(tmp_path),
         "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("new prompt:") == 2
    blocks = json.loads((tmp_path / "summary.json").read_text())["blocks"]
    assert [b["block"] for b in blocks if b["recached"]] == [4, 6]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["demo", "--steps", "0"], "--steps: must be >= 1"),
        (["demo", "--blocks", "-1"], "--blocks: must be >= 1"),
        (["demo", "--blocks", "x"], "--blocks: expected an int"),
        (["demo", "--layers", "0"], "--layers"),
        (["demo", "--batch", "0"], "--batch"),
        (["demo", "--top-k", "-1"], "--top-k"),
        (["demo", "--sink-frames", "-3"], "--sink-frames"),
        (["demo", "--local-frames", "0"], "--local-frames"),
        (["demo", "--threads", "-1"], "--threads"),
        (["demo", "--seed", "-1"], "--seed"),
        (["demo", "--tau", "1.5"], "--tau: must be in [0, 1]"),
        (["demo", "--tau", "nan"], "--tau"),
        (["demo", "--tau", "high"], "--tau: expected a number"),
        (["demo", "--switch-at=-1,100"], "--switch-at: blocks [-1, 100] are outside the run"),
        (["demo", "--blocks", "4", "--switch-at", "4"], "outside the run (1..3)"),
        (["demo", "--switch-at", "0"], "outside the run"),
        (["demo", "--switch-at", "3,3"], "listed twice"),
        (["demo", "--switch-at", "a"], "comma-separated ints"),
        (["demo", "--sink-frames", "2"], "sink_frames (2) must be a multiple"),
        (["demo", "--top-k", "2", "--local-frames", "2"], "local_frames"),
        (["demo", "--backend", "bogus"], "--backend must be one of"),
        (["demo", "--backend", "sdpa"], "--backend must be one of"),  # attention only
        (["demo", "--device", "tpu"], "--device must be cpu, cuda"),
        (["demo", "--dtype", "fp64"], "--dtype: invalid choice"),
        (["kernels", "--arch", "sm_99"], "--arch: invalid choice: 'sm_99'"),
        (["kernels", "--arch", "90"], "--arch: invalid choice"),
        (["rope-diagnostic", "--head-dim", "3"], "--head-dim: must be even"),
        (["rope-diagnostic", "--points", "1"], "--points: must be >= 2"),
        (["rope-diagnostic", "--heads", "0"], "--heads"),
        (["rope-diagnostic", "--max-distance", "0"], "--max-distance"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and needle in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_device_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--device", "cuda"])
    assert info.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_unwritable_out_is_refused_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for cmd in ("demo", "rope-diagnostic"):
        with pytest.raises(SystemExit) as info:
            main([cmd, "--out", str(blocker / "out")])
        assert info.value.code == 2
        err = capsys.readouterr()
        assert "--out" in err.err and "is not a folder" in err.err
        assert err.out == "", "work started before the output folder was checked"


def test_usage_error_in_a_subprocess_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for argv in (["demo", "--steps", "0"], ["kernels", "--arch", "sm_99"]):
        proc = subprocess.run(
            [sys.executable, "-m", "dysink_kernels", *argv],
            capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "usage:" in proc.stderr
