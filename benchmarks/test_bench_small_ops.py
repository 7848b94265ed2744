"""The per-block small ops on every available backend: select_sinks, sink_gate (public
op: query and key means, then the votes), gate_from_means, and the bank insert next to
a plain device-to-device copy of the same bytes."""

from __future__ import annotations

import pytest

from measure import Timing, default_device, synchronized
from plans import plan_for
from small_ops import small_op_call, small_op_cases, small_op_row

DEVICE = default_device()
PLAN = plan_for(DEVICE)

CASES = small_op_cases(DEVICE)


@pytest.mark.parametrize(("op", "backend", "reason"), CASES, ids=[f"{o}-{b}" for o, b, _ in CASES])
def test_small_op(benchmark, recorder, op, backend, reason):
    if reason is not None:
        pytest.skip(reason)
    fn, nbytes = small_op_call(op, backend, PLAN.small, DEVICE)
    benchmark.group = f"small_ops {op} {PLAN.small.label(op)}"
    benchmark.pedantic(
        synchronized(fn, DEVICE), rounds=PLAN.small_rounds, warmup_rounds=PLAN.warmup
    )
    timing = Timing.from_benchmark(benchmark)
    if timing is not None:
        small_op_row(recorder, op, backend, PLAN.small, timing, nbytes)
