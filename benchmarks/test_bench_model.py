"""The cost of memory at model scale: one block of a random-weight Wan2.1-1.3B-shaped
stack (reduced dims on CPU) with the plain window, DySink (eager and replayed from a
CUDA graph), the reference-style pipeline and LongLive settings. Host syncs,
host-to-device bytes and peak device memory come from one more, un-timed block."""

from __future__ import annotations

import pytest

from measure import Timing, default_device, synchronized
from model_scale import (
    ModelRun,
    build_model,
    case_reason,
    make_model_pipe,
    memory_parts,
    model_cases,
    model_row,
)
from pipelines import pipeline_counters
from plans import plan_for

DEVICE = default_device()
PLAN = plan_for(DEVICE)
SHAPE = PLAN.model
CASES = model_cases(SHAPE)


@pytest.fixture(scope="module")
def model():
    return build_model(SHAPE, DEVICE)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_model_block(benchmark, recorder, model, case):
    reason = case_reason(case, DEVICE)
    if reason is not None:
        recorder.add(suite="model", case="per_block", provider=case.name, kind="skipped",
                     shape=SHAPE.label(), note=reason)  # fmt: skip
        pytest.skip(reason)
    run = ModelRun(model, make_model_pipe(case, SHAPE, DEVICE), SHAPE, DEVICE, name=case.name,
                   graph=case.graph)  # fmt: skip
    benchmark.group = f"model per block {SHAPE.label()}"
    benchmark.pedantic(
        synchronized(run.run_block, DEVICE),
        setup=run.prepare,
        rounds=PLAN.model_rounds,
        warmup_rounds=max(1, PLAN.warmup),
    )
    timing = Timing.from_benchmark(benchmark)
    if timing is None:
        return
    counters = pipeline_counters(run, DEVICE)
    if case.pipeline == "ours":
        assert counters["host_syncs"] == 0, counters
    model_row(recorder, case, SHAPE, timing, counters, memory_parts(run))
