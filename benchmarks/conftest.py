"""pytest-benchmark suites: the device and its sizes, the result rows, where they go.

``pytest benchmarks/ --benchmark-only`` times every case (pytest-benchmark's table is
printed as usual) and writes ``results.csv``, ``results.json``, ``summary.md`` and
``bench.png`` to ``--bench-out`` (or ``$DYSINK_BENCH_OUT``, default ``bench_out/``).
Without ``--benchmark-only`` (nor ``--benchmark-enable``) each case runs once, untimed,
as a smoke test, and nothing is written.

Sizes come from ``plans.plan_for``: the Wan2.1-1.3B reference shapes when
``torch.cuda.is_available()``, small ones on CPU (run with ``$DYSINK_BENCH_THREADS``
torch threads, default 1). Cases, inputs and measurements are the ones ``run.py`` and
``gpu_suite.py`` use. pytest puts this folder on ``sys.path`` (a conftest in a folder
without ``__init__.py``), so the suites import its modules by their plain names.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from measure import Recorder, configure_cpu_threads, default_device, environment
from memory import add_memory_rows
from plans import plan_for
from report import add_derived_rows, write_outputs

DEVICE = default_device()
PLAN = plan_for(DEVICE)
_RECORDER = pytest.StashKey[Recorder]()


def pytest_addoption(parser):
    parser.addoption(
        "--bench-out",
        default=None,
        help="folder for results.csv/json, summary.md and bench.png "
        "(default: $DYSINK_BENCH_OUT or bench_out/)",
    )


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    # After pytest-benchmark's own configure: run each case once unless timing was asked.
    session = getattr(config, "_benchmarksession", None)
    timed = config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False)
    if session is not None and not timed:
        session.disabled = True
    configure_cpu_threads(DEVICE)


def pytest_report_header(config):
    return (
        f"dysink benchmarks: device {DEVICE}, plan {PLAN.name}, "
        f"{torch.get_num_threads()} torch threads, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
    )


@pytest.fixture(scope="session")
def recorder(request) -> Recorder:
    rec = Recorder(environment(DEVICE))
    request.config.stash[_RECORDER] = rec
    return rec


def pytest_sessionfinish(session):
    rec = session.config.stash.get(_RECORDER, None)
    if rec is None or not any(r["kind"] == "measured" for r in rec.rows):
        return
    add_memory_rows(rec)
    add_derived_rows(rec)
    out = Path(
        session.config.getoption("--bench-out", None)
        or os.environ.get("DYSINK_BENCH_OUT")
        or "bench_out"
    )
    paths = write_outputs(rec, out)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("dysink benchmarks wrote " + ", ".join(str(p) for p in paths))
