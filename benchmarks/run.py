"""Run the benchmark suites outside pytest and write their results.

    python benchmarks/run.py [--out DIR] [--quick | --dry-run] [--device cuda] [--suites ...]

Writes ``results.csv``, ``results.json``, ``summary.md`` and ``bench.png`` (when
matplotlib is installed) to ``--out`` (default ``bench_out/``), the same files and rows
as ``pytest benchmarks/ --benchmark-only``. The output folder is checked writable
before anything is measured.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from attention import run_attention
from measure import (
    Recorder,
    check_writable,
    configure_cpu_threads,
    default_device,
    environment,
)
from memory import add_memory_rows
from model_scale import run_model_scale
from pipelines import run_pipeline, run_scaling
from plans import plan_for
from report import add_derived_rows, markdown_summary, write_outputs
from small_ops import run_small_ops

SUITES = ("attention", "pipeline", "scaling", "small_ops", "model", "memory")
RUNNERS: dict[str, Callable] = {
    "attention": run_attention,
    "pipeline": run_pipeline,
    "scaling": run_scaling,
    "small_ops": run_small_ops,
    "model": run_model_scale,
}


def parse_suites(text: str) -> list[str]:
    """``"attention,pipeline"`` -> ``["attention", "pipeline"]``; ``ValueError`` on an
    unknown name."""
    suites = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown or not suites:
        raise ValueError(f"unknown suites {unknown}; choose from {','.join(SUITES)}")
    return suites


def main(
    out: str | Path = "bench_out",
    *,
    quick: bool = False,
    dry: bool = False,
    device: str | None = None,
    suites: Iterable[str] = SUITES,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Run ``suites`` on ``device`` (default: CUDA when visible) at the plan for that
    device (``quick``: fewer rounds; ``dry``: the smallest shapes) and write the outputs
    to ``out``; returns the paths written."""
    suites = list(suites)
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise ValueError(f"unknown suites {sorted(unknown)}; choose from {SUITES}")
    check_writable(out)
    dev = torch.device(device) if device else default_device()
    plan = plan_for(dev, quick=quick, dry=dry)
    configure_cpu_threads(dev)
    rec = Recorder(environment(dev))
    log(f"dysink bench: {rec.env['device_name']}, plan {plan.name}, suites {','.join(suites)}")
    for suite in suites:
        if suite in RUNNERS:
            log(f"[{suite}]")
            RUNNERS[suite](rec, plan, dev, log=log)
    if "memory" in suites:
        add_memory_rows(rec)
    add_derived_rows(rec)
    paths = write_outputs(rec, out)
    log("")
    log(markdown_summary(rec.rows, rec.env))
    log("wrote " + ", ".join(str(p) for p in paths))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--out", default="bench_out", help="folder for results.csv/json, summary.md, bench.png"
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds and points (CPU: < 1 min)")
    p.add_argument(
        "--dry-run", action="store_true", help="the smallest shapes, 1-2 rounds (a smoke run)"
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--suites",
        default=",".join(SUITES),
        help="comma-separated subset of " + ",".join(SUITES),
    )
    return p


def cli(argv: list[str] | None = None) -> int:
    """The command line; usage errors exit 2 before anything is measured."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        suites = parse_suites(args.suites)
        check_writable(args.out)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    main(args.out, quick=args.quick, dry=args.dry_run, device=args.device, suites=suites)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
