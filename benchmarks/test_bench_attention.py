"""One attention call per provider: gathered slots + window, and one contiguous KV of
the same keys; the package's op (``ours`` = backend "auto", and each backend by name,
with and without statistics), ``torch.cat`` + SDPA (on a GPU also forced to the flash
and cuDNN backends) and flash-attn when installed. Each provider's output is checked
against fp32 attention over the concatenated keys before it is timed."""

from __future__ import annotations

import pytest

from attention import (
    ATTN_ATOL,
    attention_call,
    attention_cases,
    attention_error,
    attention_inputs,
    attention_row,
)
from measure import Timing, default_device, rotating, synchronized
from plans import plan_for

DEVICE = default_device()
PLAN = plan_for(DEVICE)

CASES = attention_cases(PLAN, DEVICE)


@pytest.mark.parametrize(
    ("shape", "provider", "reason"), CASES, ids=[f"{s.layout}-{p.id}" for s, p, _ in CASES]
)
def test_attention(benchmark, recorder, shape, provider, reason):
    if reason is not None:
        pytest.skip(reason)
    inputs = attention_inputs(shape, DEVICE, n_sets=PLAN.n_sets)
    calls = [attention_call(provider, inp) for inp in inputs]
    error = attention_error(calls[0](), inputs[0], calls[0])
    assert error <= ATTN_ATOL[shape.dtype], f"{provider.id}: max error {error:.3g}"
    benchmark.group = f"attention {shape.layout} {shape.label()}"
    benchmark.extra_info.update(flops=shape.flops(), provider=provider.id)
    benchmark.pedantic(
        synchronized(rotating(calls), DEVICE),
        rounds=PLAN.attn_rounds,
        warmup_rounds=PLAN.warmup,
    )
    timing = Timing.from_benchmark(benchmark)
    if timing is not None:
        attention_row(recorder, shape, provider, timing, error)
