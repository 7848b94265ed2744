"""One block (begin, 4 denoising steps + 1 clean pass over every layer, end) of the
package's DySinkCache + SinkAttention next to ``reference_style.py``, on the same
synthetic q/k/v: at the plan's layer stack, then against bank entries, window length
(local_frames) and top_k. Host syncs, host<->device bytes and peak device memory come
from one more, un-timed block."""

from __future__ import annotations

import pytest

from measure import Timing, default_device, synchronized
from pipelines import PIPELINES, make_pipeline, pipeline_counters, pipeline_row, scaling_points
from plans import Workload, plan_for

DEVICE = default_device()
PLAN = plan_for(DEVICE)


def _run(benchmark, recorder, name, shape, *, suite, case, entries, rounds, value=None):
    work = Workload(shape, DEVICE)
    pipe = make_pipeline(name, shape, DEVICE, work, entries=entries)
    benchmark.group = f"{suite} {case}" + ("" if value is None else f"={value}")
    benchmark.extra_info.update(shape=shape.label(), entries=entries)
    benchmark.pedantic(
        synchronized(pipe.run_block, DEVICE),
        setup=pipe.prepare,
        rounds=rounds,
        warmup_rounds=PLAN.warmup,
    )
    timing = Timing.from_benchmark(benchmark)
    if timing is None:
        return
    counters = pipeline_counters(pipe, DEVICE)
    if name == "ours":
        assert counters["host_syncs"] == 0, counters
    pipeline_row(
        recorder,
        suite=suite,
        case=case,
        pipe=pipe,
        shape=shape,
        timing=timing,
        counters=counters,
        entries=entries,
        value=value,
        unit=None if value is None else case,
    )


@pytest.mark.parametrize("name", PIPELINES)
def test_per_block(benchmark, recorder, name):
    _run(
        benchmark,
        recorder,
        name,
        PLAN.pipeline,
        suite="pipeline",
        case="per_block",
        entries=PLAN.pipeline_entries,
        rounds=PLAN.pipeline_rounds,
    )


POINTS = scaling_points(PLAN)


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize(
    ("axis", "value", "shape", "entries"), POINTS, ids=[f"{a}={v}" for a, v, _, _ in POINTS]
)
def test_scaling(benchmark, recorder, name, axis, value, shape, entries):
    _run(
        benchmark,
        recorder,
        name,
        shape,
        suite="scaling",
        case=axis,
        entries=entries,
        rounds=PLAN.scaling_rounds,
        value=value,
    )
