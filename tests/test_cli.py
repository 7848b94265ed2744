"""The command line: demo and info."""

from __future__ import annotations

import json

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
    assert data["torch"] and "gathered_attention" in data["backends"]
    assert "naive" in data["backends"]["gathered_attention"]["cpu"]


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
