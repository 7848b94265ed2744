"""What every benchmark needs to measure and record: environment probes, result rows,
timers and host-sync counters.

Nothing here sets ``TRITON_INTERPRET``: the interpreter is not a speed measurement,
and the Triton backends are left out on CPU unless a caller allows it.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import importlib.util
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

COLUMNS = (
    "suite", "case", "provider", "shape", "dtype", "kind", "median_ms", "min_ms", "rounds",
    "tflops", "gbps", "value", "unit", "host_syncs", "cuda_syncs", "h2d_bytes", "d2h_bytes",
    "peak_mem_bytes", "transient_mem_bytes", "note", "device", "device_name", "torch",
    "triton", "date",
)  # fmt: skip
INTERPRETER_REASON = (
    "triton on CPU runs only in its interpreter (TRITON_INTERPRET=1): not a speed measurement"
)


# ----------------------------------------------------------------------------- environment
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({_cpu_cores()} cores, {torch.get_num_threads()} torch threads)"


def configure_cpu_threads(device: torch.device | str) -> None:
    """On CPU, run torch with ``$DYSINK_BENCH_THREADS`` threads (default 1): on a shared
    machine, OpenMP barriers across busy cores turn millisecond ops into hundreds of
    milliseconds, and the thread count is part of what a CPU number means."""
    if torch.device(device).type == "cpu":
        torch.set_num_threads(int(os.environ.get("DYSINK_BENCH_THREADS", "1")))


def environment(device: torch.device | str) -> dict:
    """What a result row needs to be read later: device, versions, date."""
    from dysink_kernels import __version__
    from dysink_kernels._cuda import build_info

    device = torch.device(device)
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "dysink_kernels": __version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_cores": _cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "extension": build_info(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            cuda=torch.version.cuda,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=props.total_memory,
        )
    return env


# ----------------------------------------------------------------------------- rows
class Recorder:
    """Result rows (dicts over :data:`COLUMNS`) of one run, written as CSV and JSON."""

    def __init__(self, env: dict) -> None:
        self.env = env
        self.rows: list[dict] = []

    def add(self, **fields) -> dict:
        unknown = set(fields) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown result columns {sorted(unknown)}")
        row = dict.fromkeys(COLUMNS, "")
        for key in ("device", "device_name", "torch", "triton", "date"):
            row[key] = self.env.get(key) or ""
        row.update({k: v for k, v in fields.items() if v is not None})
        self.rows.append(row)
        return row

    def failed(self, suite: str, case: str, provider: str, error: BaseException) -> dict:
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        return self.add(suite=suite, case=case, provider=provider, kind="failed", note=last[:300])

    def write(self, out_dir: str | Path, stem: str = "results") -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _fmt_cell(v) for k, v in row.items()})
        with open(json_path, "w") as fh:
            json.dump({"environment": self.env, "rows": self.rows}, fh, indent=1, default=str)
        return [csv_path, json_path]


def _fmt_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    rounds: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        return cls(statistics.median(seconds), min(seconds), len(seconds))

    @classmethod
    def from_benchmark(cls, benchmark) -> Timing | None:
        """The pytest-benchmark fixture's statistics (None when benchmarks are disabled)."""
        meta = getattr(benchmark, "stats", None)
        if meta is None:
            return None
        return cls(meta.stats.median, meta.stats.min, meta.stats.rounds)

    def fields(self) -> dict:
        return {
            "median_ms": self.median_s * 1e3,
            "min_ms": self.min_s * 1e3,
            "rounds": self.rounds,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation, so wall time covers the GPU work."""
    if device.type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)

    return run


def rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that cycles through ``calls`` (input sets), so caches do not flatter."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def time_wall(
    fn: Callable[[], object],
    device: torch.device,
    *,
    rounds: int,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Wall time of each call between two synchronisations; ``setup`` runs untimed."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(rounds):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing.of(times)


def time_blocks(
    fn: Callable[[], object],
    device: torch.device,
    *,
    rounds: int,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Per-call time after ``warmup`` calls; ``setup`` runs untimed before each. On CUDA
    between two CUDA events around the call (after a synchronisation, so the stream is
    idle when the call starts); elsewhere :func:`time_wall`."""
    if device.type != "cuda":
        return time_wall(fn, device, rounds=rounds, warmup=warmup, setup=setup)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(rounds):
        if setup is not None:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return Timing.of(times)


def time_kernel(fn: Callable[[], object], device: torch.device, *, rounds: int) -> Timing:
    """GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call),
    median of all its repetitions; CPU: :func:`time_wall`."""
    if device.type != "cuda":
        return time_wall(fn, device, rounds=rounds)
    from triton.testing import do_bench

    times_ms = do_bench(fn, warmup=25, rep=100, return_mode="all")
    return Timing.of([t / 1e3 for t in times_ms])


class SyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: a tensor value read on the host (``.item()``,
    ``int()``, ``bool()``), as ``tests/test_device_path.py`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "_local_scalar_dense" in str(func):
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_sync_counter(device: torch.device):
    """Counts the synchronizing CUDA calls torch flags (``set_sync_debug_mode``):
    ``.item()``, blocking host<->device copies, ``nonzero``... Yields a list that
    holds the count on exit (stays empty off CUDA)."""
    result: list[int] = []
    if device.type != "cuda":
        yield result
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield result
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    result.append(sum("synchroniz" in str(w.message) for w in caught))


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, str(dtype)
    )


def triton_reason(device: torch.device, allow_interpreter: bool) -> str | None:
    if device.type == "cpu" and not allow_interpreter:
        return INTERPRETER_REASON
    return None


# ----------------------------------------------------------------------------- run control
def check_writable(out: str | Path) -> Path:
    """Create ``out`` and prove a file can be written there; raise ``OSError`` (naming
    the folder) otherwise, so that an unwritable folder fails before any work."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise OSError(f"output folder {str(path)!r} is not writable: {err}") from err
    return path


def past_deadline(deadline: float | None) -> bool:
    """Whether the monotonic ``deadline`` (None: none) has passed."""
    return deadline is not None and time.monotonic() > deadline


def free_memory(device: torch.device) -> None:
    """Return cached device memory between cases (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
