"""Benchmark cases and measurements shared by every benchmark front end.

``pytest benchmarks/ --benchmark-only`` (pytest-benchmark times the calls),
``python -m dysink_kernels bench`` and ``benchmarks/gpu_suite.py`` take their cases,
inputs, callables and result rows from here, so the three measure the same thing.

Suites:

* ``attention``: one attention call per provider (the package's op through each
  backend, ``torch.cat`` + SDPA, flash-attn) over gathered bank slots + a window, and
  over one contiguous KV of the same keys; with and without statistics.
* ``pipeline``: one block (``begin_block``, 4 denoising steps + 1 clean pass over
  every layer, ``end_block``) of ``DySinkCache`` + ``SinkAttention`` next to
  ``benchmarks/reference_style.py``, an emulation of the published per-block code:
  latency, host syncs, host<->device bytes, peak memory.
* ``scaling``: the same per-block cost against bank entries, window length, top-k.
* ``small_ops``: ``select_sinks``, ``sink_gate``, ``gate_from_means`` and the bank
  insert (next to a plain device-to-device copy of the same bytes).
* ``memory``: bank bytes per entry and per minute of video (computed, not measured).

Sizes depend on the device (:func:`plan_for`): the DESIGN 5 reference shapes on a
GPU, small ones on CPU, where the numbers show overheads rather than kernel speed.
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
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ._registry import available_backends
from .bank import FrameBank
from .cache import DySinkCache
from .config import DySinkConfig
from .fp8 import quantize
from .ops.gathered_sink_attention import gathered_attention, gathered_sink_attention
from .ops.select_sinks import select_sinks
from .ops.sink_gate import gate_from_means, sink_gate
from .sink_attention import SinkAttention

__all__ = [
    "COLUMNS",
    "SUITES",
    "AttnProvider",
    "AttnShape",
    "OursPipeline",
    "PipelineShape",
    "Plan",
    "Recorder",
    "Timing",
    "Workload",
    "default_device",
    "environment",
    "main",
    "plan_for",
]

SUITES = ("attention", "pipeline", "scaling", "small_ops", "memory")
PIPELINES = ("ours", "reference_style")
# Frames by which the "+rotate" attention provider re-positions its slots.
REPOSITION_FRAMES = 300.0
COLUMNS = (
    "suite", "case", "provider", "shape", "dtype", "kind", "median_ms", "min_ms", "rounds",
    "tflops", "gbps", "value", "unit", "host_syncs", "cuda_syncs", "h2d_bytes", "d2h_bytes",
    "peak_mem_bytes", "transient_mem_bytes", "note", "device", "device_name", "torch",
    "triton", "date",
)  # fmt: skip
# Max |out - fp32 reference| accepted when a benchmark checks its provider's output.
ATTN_ATOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
INTERPRETER_REASON = (
    "triton on CPU runs only in its interpreter (TRITON_INTERPRET=1): not a speed measurement"
)
# Synthetic reference-style bank entries share one zero buffer beyond this many bytes
# (only the retrieved entries are ever read, so the copies cost the same).
DISTINCT_PREFILL_BYTES = 4 << 30


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
    from . import __version__
    from ._cuda import build_info

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


# ----------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class AttnShape:
    """One attention call: ``window`` local keys plus ``slots`` bank slots of ``slot_tokens``."""

    batch: int
    sq: int
    heads: int
    head_dim: int
    window: int
    slots: int
    slot_tokens: int
    dtype: torch.dtype

    @property
    def n_keys(self) -> int:
        return self.window + self.slots * self.slot_tokens

    @property
    def layout(self) -> str:
        return "gathered" if self.slots else "contiguous"

    def contiguous(self) -> AttnShape:
        """The same keys as one contiguous KV."""
        return replace(self, window=self.n_keys, slots=0)

    def label(self) -> str:
        keys = f"{self.window}+{self.slots}x{self.slot_tokens}" if self.slots else f"{self.window}"
        return f"B={self.batch} Sq={self.sq} H={self.heads} D={self.head_dim} Sk={keys}"

    def flops(self) -> float:
        """``4 * B * H * Sq * Sk * D`` (QK^T and PV), as the Triton module's ``flops``."""
        return 4.0 * self.batch * self.heads * self.sq * self.n_keys * self.head_dim

    def io_bytes(self) -> int:
        """Least traffic: Q and O once, each key and value once."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_token = self.batch * self.heads * self.head_dim * elem
        return per_token * (2 * self.sq + 2 * self.n_keys)


@dataclass(frozen=True)
class PipelineShape:
    """A layer stack driven block by block (q/k/v random, RoPE already "applied")."""

    layers: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    frames_per_block: int = 3
    local_frames: int = 9
    top_k: int = 2
    steps: int = 4
    feature_dim: int = 64
    batch: int = 1
    dtype: torch.dtype = torch.bfloat16

    @property
    def block_tokens(self) -> int:
        return self.frames_per_block * self.tokens_per_frame

    def label(self) -> str:
        return (
            f"layers={self.layers} H={self.heads} D={self.head_dim} "
            f"T={self.tokens_per_frame} block={self.frames_per_block}f L={self.local_frames} "
            f"k={self.top_k} steps={self.steps}+1 F={self.feature_dim}"
        )

    def config(self, **overrides) -> DySinkConfig:
        return DySinkConfig(
            num_layers=self.layers,
            num_heads=self.heads,
            head_dim=self.head_dim,
            tokens_per_frame=self.tokens_per_frame,
            frames_per_block=self.frames_per_block,
            local_frames=self.local_frames,
            top_k=self.top_k,
            **overrides,
        )

    def start_block(self, entries: int) -> int:
        """First block after a synthetic prefill of ``entries`` entries (frames 0, 3, ...):
        late enough that the widest exclusion ``[c - L_eff, c)`` leaves them all eligible
        and the window is full."""
        widest = self.local_frames + self.top_k * self.frames_per_block
        return entries + math.ceil(widest / self.frames_per_block) + 1

    def entry_bytes(self) -> int:
        """K+V of one block over all layers (one bank entry)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.batch * self.block_tokens * self.heads * self.head_dim * elem


@dataclass(frozen=True)
class SmallOpsShape:
    slots: int
    feature_dim: int
    query_blocks: int
    top_k: int
    batch: int
    sq: int
    heads: int
    head_dim: int
    window: int
    insert_layers: int
    insert_tokens: int
    dtype: torch.dtype

    def entry_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.insert_layers * self.insert_tokens * self.heads * self.head_dim * elem

    def label(self, op: str) -> str:
        if op == "select_sinks":
            return (
                f"P={self.slots} F={self.feature_dim} M={self.query_blocks} k={self.top_k} "
                f"B={self.batch}"
            )
        if op == "sink_gate":
            return (
                f"B={self.batch} Sq={self.sq} Sk={self.window} H={self.heads} "
                f"D={self.head_dim} P={self.slots} n={self.top_k}"
            )
        if op == "gate_from_means":
            return f"B={self.batch} H={self.heads} D={self.head_dim} P={self.slots} n={self.top_k}"
        return (
            f"layers={self.insert_layers} tokens={self.insert_tokens} H={self.heads} "
            f"D={self.head_dim} entry={self.entry_bytes() / 1e6:.1f} MB"
        )


@dataclass(frozen=True)
class Plan:
    """Every size and repetition count of one run."""

    name: str
    attn: AttnShape
    pipeline: PipelineShape
    pipeline_entries: int
    scaling: PipelineShape
    bank_points: tuple[int, ...]
    local_points: tuple[int, ...]
    topk_points: tuple[int, ...]
    sweep_entries: int
    small: SmallOpsShape
    n_sets: int
    attn_rounds: int
    pipeline_rounds: int
    scaling_rounds: int
    small_rounds: int
    warmup: int = 1


# The reference shapes (DESIGN 5): Wan2.1-1.3B attention, 4,680 queries against 23,400
# keys as 14,040 window + 2 slots of 4,680.
WAN_LAYER = PipelineShape(
    layers=30, heads=12, head_dim=128, tokens_per_frame=1560, feature_dim=1024
)
GPU_PLAN = Plan(
    name="gpu",
    attn=AttnShape(1, 4680, 12, 128, 14040, 2, 4680, torch.bfloat16),
    pipeline=replace(WAN_LAYER, layers=4),
    pipeline_entries=8,
    scaling=replace(WAN_LAYER, layers=2),
    bank_points=(0, 16, 64, 256),
    local_points=(3, 9, 15),
    topk_points=(0, 1, 2, 4),
    sweep_entries=8,
    small=SmallOpsShape(64, 1024, 3, 2, 1, 4680, 12, 128, 23400, 30, 4680, torch.bfloat16),
    n_sets=3,
    attn_rounds=20,
    pipeline_rounds=5,
    scaling_rounds=3,
    small_rounds=50,
)
# CPU: the reference's proportions (block = 3 frames, window 9 frames + 2 slots) at
# 32 tokens per frame, fp32; the scaling sweeps on a tiny stack.
CPU_PLAN = Plan(
    name="cpu",
    attn=AttnShape(1, 96, 4, 64, 288, 2, 96, torch.float32),
    pipeline=PipelineShape(2, 4, 64, 32, feature_dim=64, dtype=torch.float32),
    pipeline_entries=8,
    scaling=PipelineShape(2, 2, 16, 8, feature_dim=32, dtype=torch.float32),
    bank_points=(0, 1, 4, 16, 64, 256),
    local_points=(3, 6, 9, 12, 15),
    topk_points=(0, 1, 2, 4),
    sweep_entries=8,
    small=SmallOpsShape(64, 64, 3, 2, 1, 96, 4, 64, 480, 2, 96, torch.float32),
    n_sets=1,
    attn_rounds=200,
    pipeline_rounds=60,
    scaling_rounds=40,
    small_rounds=500,
)
CPU_QUICK_PLAN = replace(
    CPU_PLAN,
    name="cpu-quick",
    bank_points=(0, 16, 256),
    local_points=(3, 9, 15),
    topk_points=(0, 2, 4),
    attn_rounds=20,
    pipeline_rounds=10,
    scaling_rounds=5,
    small_rounds=50,
)
# Every code path on the smallest shapes (gpu_suite.py --dry-run).
DRY_PLAN = Plan(
    name="dry-run",
    attn=AttnShape(1, 48, 2, 32, 144, 2, 48, torch.float32),
    pipeline=PipelineShape(2, 2, 32, 16, feature_dim=32, dtype=torch.float32),
    pipeline_entries=4,
    scaling=PipelineShape(2, 2, 16, 8, feature_dim=32, dtype=torch.float32),
    bank_points=(0, 4, 16),
    local_points=(3, 9),
    topk_points=(0, 2),
    sweep_entries=4,
    small=SmallOpsShape(16, 32, 3, 2, 1, 48, 2, 32, 144, 2, 48, torch.float32),
    n_sets=2,
    attn_rounds=2,
    pipeline_rounds=2,
    scaling_rounds=1,
    small_rounds=2,
)


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan_for(device: torch.device | str, *, quick: bool = False, dry: bool = False) -> Plan:
    """The sizes for ``device``: reference shapes on CUDA, small ones on CPU."""
    if dry:
        return DRY_PLAN
    if torch.device(device).type == "cuda":
        return GPU_PLAN
    return CPU_QUICK_PLAN if quick else CPU_PLAN


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, str(dtype)
    )


# ----------------------------------------------------------------------------- attention
# Providers built on torch's SDPA: name -> SDPBackend member (None: torch chooses).
SDPA_PROVIDERS = {
    "cat_sdpa": None,
    "cat_sdpa_flash": "FLASH_ATTENTION",
    "cat_sdpa_cudnn": "CUDNN_ATTENTION",
}


@dataclass(frozen=True)
class AttnProvider:
    """``ours`` (backend "auto"), a package backend by name, or a dense baseline."""

    name: str
    stats: bool = False
    rotate: bool = False  # re-positioned slots (sink_rope="relative")
    fp8: bool = False  # slots read from an fp8 bank

    @property
    def id(self) -> str:
        return (
            self.name + ("+stats" if self.stats else "") + ("+rotate" if self.rotate else "")
            + ("+fp8" if self.fp8 else "")
        )  # fmt: skip

    @property
    def package_backend(self) -> str | None:
        """The ``backend=`` this provider passes to the package's op, if it is one."""
        if self.name == "ours":
            return "auto"
        if self.name in available_backends("gathered_attention"):
            return self.name
        return None


def flash_attn_func():
    """``flash_attn.flash_attn_func`` when flash-attn is installed, else None."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_func as fn
    except ImportError:
        return None
    return fn


def triton_reason(device: torch.device, allow_interpreter: bool) -> str | None:
    if device.type == "cpu" and not allow_interpreter:
        return INTERPRETER_REASON
    return None


def attention_providers(
    device: torch.device, *, allow_interpreter: bool = False
) -> list[tuple[AttnProvider, str | None]]:
    """Every provider, with why it cannot run on ``device`` (``None`` when it can)."""
    device = torch.device(device)
    usable = set(available_backends("gathered_attention", device))
    out: list[tuple[AttnProvider, str | None]] = []
    for name in ("ours", *available_backends("gathered_attention")):
        reason = None
        if name != "ours" and name not in usable:
            reason = f"backend {name!r} is not available on {device.type}"
        elif name == "triton":
            reason = triton_reason(device, allow_interpreter)
        out += [(AttnProvider(name, False), reason), (AttnProvider(name, True), reason)]
        if name == "ours":  # DESIGN 4 options, measured against the plain gathered call
            out += [(AttnProvider(name, True, rotate=True), reason),
                    (AttnProvider(name, True, fp8=True), reason)]  # fmt: skip
    for name, backend in SDPA_PROVIDERS.items():
        reason = "needs a GPU" if backend and device.type != "cuda" else None
        out.append((AttnProvider(name), reason))
    fa_reason = None
    if flash_attn_func() is None:
        fa_reason = "flash_attn is not installed"
    elif device.type != "cuda":
        fa_reason = "needs a GPU"
    out.append((AttnProvider("flash_attn"), fa_reason))
    return out


def attention_cases(
    plan: Plan, device: torch.device, *, allow_interpreter: bool = False
) -> list[tuple[AttnShape, AttnProvider, str | None]]:
    """(shape, provider, skip reason): gathered slots + window, then one contiguous KV."""
    providers = attention_providers(device, allow_interpreter=allow_interpreter)
    return [
        (shape, provider, reason)
        for shape in (plan.attn, plan.attn.contiguous())
        for provider, reason in providers
        if shape.slots > 0 or not (provider.rotate or provider.fp8)
    ]


def attention_inputs(
    shape: AttnShape, device: torch.device, *, n_sets: int = 1, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``n_sets`` independent input sets; the sets attend different pool slots."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, Sq, H, D = shape.batch, shape.sq, shape.heads, shape.head_dim

    def rnd(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=shape.dtype)

    n = shape.slots
    pool_k = rnd(max(1, n * n_sets), max(1, shape.slot_tokens), H, D)
    pool_v = rnd(max(1, n * n_sets), max(1, shape.slot_tokens), H, D)
    sets = []
    for i in range(n_sets):
        slots = torch.arange(i * n, (i + 1) * n, dtype=torch.int32, device=device)
        sets.append(
            {
                "q": rnd(B, Sq, H, D),
                "k": rnd(B, shape.window, H, D),
                "v": rnd(B, shape.window, H, D),
                "pool_k": pool_k,
                "pool_v": pool_v,
                "slot_idx": slots.expand(B, n).contiguous(),
            }
        )
    return sets


def concat_kv(inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the reference attends: the gathered slots' K/V then the window, each a new
    tensor made by ``torch.cat`` (no copy when there is no slot)."""
    slot_idx = inp["slot_idx"]
    if slot_idx.shape[1] == 0:
        return inp["k"], inp["v"]
    B = slot_idx.shape[0]
    idx = slot_idx.reshape(-1).long()
    H, D = inp["k"].shape[2:]
    gk = inp["pool_k"].index_select(0, idx).reshape(B, -1, H, D)
    gv = inp["pool_v"].index_select(0, idx).reshape(B, -1, H, D)
    # ok: host (the baseline concatenates, as the published code does)
    return torch.cat([gk, inp["k"]], dim=1), torch.cat([gv, inp["v"]], dim=1)  # ok: host


def sdpa_bshd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """SDPA on ``(B, S, H, D)`` tensors through ``(B, H, S, D)`` views; ``backend`` names
    an ``SDPBackend`` member to force (``None``: torch chooses)."""
    ctx = contextlib.nullcontext()
    if backend is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(getattr(SDPBackend, backend))
    with ctx:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
    return out.transpose(1, 2)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention as the published code calls it: flash-attn when installed (CUDA,
    16-bit), else SDPA."""
    fa = flash_attn_func()
    if fa is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return fa(q, k, v)
    return sdpa_bshd(q, k, v)


def attention_call(provider: AttnProvider, inp: dict[str, torch.Tensor]) -> Callable:
    """A zero-argument callable that runs ``provider`` on ``inp`` and returns the output."""
    backend = provider.package_backend
    if backend is not None and (provider.rotate or provider.fp8):
        return _option_call(provider, inp, backend)
    if backend is not None:
        stats = provider.stats

        def ours() -> torch.Tensor:
            return gathered_sink_attention(
                inp["q"],
                inp["k"],
                inp["v"],
                inp["pool_k"],
                inp["pool_v"],
                inp["slot_idx"],
                return_stats=stats,
                backend=backend,
            )[0]

        return ours
    if provider.name in SDPA_PROVIDERS:
        sdpa_backend = SDPA_PROVIDERS[provider.name]

        def cat_sdpa() -> torch.Tensor:
            k, v = concat_kv(inp)
            return sdpa_bshd(inp["q"], k, v, sdpa_backend)

        return cat_sdpa
    if provider.name == "flash_attn":
        fa = flash_attn_func()

        def flash() -> torch.Tensor:
            k, v = concat_kv(inp)
            return fa(inp["q"], k, v)

        return flash
    raise ValueError(f"unknown attention provider {provider.name!r}")


def _option_call(provider: AttnProvider, inp: dict[str, torch.Tensor], backend: str) -> Callable:
    """The gathered call with re-positioned slots or an fp8 bank (the internal op form)."""
    B, Sk = inp["k"].shape[:2]
    ranges = torch.tensor([0, Sk], dtype=torch.int32, device=inp["k"].device).expand(B, 1, 2)
    kw: dict = {"return_stats": provider.stats}
    pool_k, pool_v = inp["pool_k"], inp["pool_v"]
    if provider.rotate:
        kw["slot_delta"] = torch.full(
            inp["slot_idx"].shape, REPOSITION_FRAMES, device=ranges.device
        )
    if provider.fp8:
        pool_k, s_k = quantize(pool_k, (1, 3))
        pool_v, s_v = quantize(pool_v, (1, 3))
        kw.update(pool_k_scale=s_k[:, 0, :, 0], pool_v_scale=s_v[:, 0, :, 0])

    def call(backend: str = backend) -> torch.Tensor:
        return gathered_attention(
            inp["q"], pool_k, pool_v, inp["slot_idx"], inp["k"], inp["v"], ranges,
            backend=backend, **kw,
        )[0]  # fmt: skip

    call.reference = lambda: call("naive")  # type: ignore[attr-defined]
    return call


def attention_error(out: torch.Tensor, inp: dict[str, torch.Tensor], call=None) -> float:
    """Max |out - fp32 softmax attention over the concatenated keys| (for the DESIGN 4
    options: against the naive backend with the same options)."""
    if call is not None and hasattr(call, "reference"):
        return float((out.float() - call.reference().float()).abs().max())
    k, v = concat_kv(inp)
    ref = sdpa_bshd(inp["q"].float(), k.float(), v.float())
    return float((out.float() - ref).abs().max())


def attention_row(
    rec: Recorder,
    shape: AttnShape,
    provider: AttnProvider,
    timing: Timing,
    error: float | None = None,
    note: str = "",
) -> dict:
    parts = [note] if note else []
    if error is not None:
        parts.append(f"max_err={error:.2e}")
    return rec.add(
        suite="attention",
        case=shape.layout,
        provider=provider.id,
        shape=shape.label(),
        dtype=dtype_name(shape.dtype),
        kind="measured",
        **timing.fields(),
        tflops=shape.flops() / timing.median_s / 1e12,
        gbps=shape.io_bytes() / timing.median_s / 1e9,
        note="; ".join(parts),
    )


def run_attention(
    rec: Recorder,
    plan: Plan,
    device: torch.device,
    *,
    allow_interpreter: bool = False,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Every attention case; a case that raises is recorded as failed and skipped."""
    for shape, provider, reason in attention_cases(
        plan, device, allow_interpreter=allow_interpreter
    ):
        if reason is not None:
            rec.add(
                suite="attention",
                case=shape.layout,
                provider=provider.id,
                kind="skipped",
                shape=shape.label(),
                note=reason,
            )
            continue
        if _past(deadline):
            rec.add(
                suite="attention",
                case=shape.layout,
                provider=provider.id,
                kind="skipped",
                note="deadline",
            )
            continue
        try:
            inputs = attention_inputs(shape, device, n_sets=plan.n_sets)
            calls = [attention_call(provider, inp) for inp in inputs]
            error = attention_error(calls[0](), inputs[0], calls[0])
            timing = time_kernel(rotating(calls), device, rounds=plan.attn_rounds)
            note = "CHECK FAILED" if error > ATTN_ATOL[shape.dtype] else ""
            row = attention_row(rec, shape, provider, timing, error, note)
            log(
                f"  attention {shape.layout:10} {provider.id:16} {row['median_ms']:9.3f} ms "
                f"{row['tflops']:8.2f} TFLOP/s"
            )
        except Exception as err:
            rec.failed("attention", shape.layout, provider.id, err)
            log(f"  attention {shape.layout} {provider.id}: FAILED {err}")
        finally:
            inputs = calls = None
            _free(device)


def config_scan(
    rec: Recorder,
    plan: Plan,
    device: torch.device,
    *,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """The Triton kernel at the reference shape for every autotune candidate of its
    head dim, with and without statistics (``_AUTOTUNE_CANDIDATES``)."""
    import triton as _triton

    from .ops.gathered_sink_attention import triton as tri

    shape = plan.attn
    block_d = max(16, _triton.next_power_of_2(shape.head_dim))
    candidates = tri._AUTOTUNE_CANDIDATES[tri._dim_bucket(block_d)]
    default = tri.pick_config(device, shape.head_dim)
    inputs = attention_inputs(shape, device, n_sets=plan.n_sets)
    scale = 1.0 / math.sqrt(shape.head_dim)

    def call(inp: dict, cfg, stats: bool) -> Callable:
        B = inp["q"].shape[0]
        ranges = torch.tensor([[[0, shape.window]]] * B, dtype=torch.int32, device=device)
        return lambda: tri.gathered_attention_triton(
            inp["q"],
            inp["pool_k"],
            inp["pool_v"],
            inp["slot_idx"],
            inp["k"],
            inp["v"],
            ranges,
            None,
            None,
            scale,
            stats,
            config=cfg,
        )[0]

    try:
        for cfg in candidates:
            for stats in (False, True):
                name = f"triton[{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}]" + (
                    "+stats" if stats else ""
                )
                if _past(deadline):
                    rec.add(
                        suite="config_scan",
                        case=shape.layout,
                        provider=name,
                        kind="skipped",
                        note="deadline",
                    )
                    continue
                try:
                    calls = [call(inp, cfg, stats) for inp in inputs]
                    error = attention_error(calls[0](), inputs[0], calls[0])
                    timing = time_kernel(rotating(calls), device, rounds=plan.attn_rounds)
                    is_default = cfg.as_dict() == default.as_dict()
                    note = f"max_err={error:.2e}" + ("; default config" if is_default else "")
                    row = rec.add(
                        suite="config_scan",
                        case=shape.layout,
                        provider=name,
                        shape=shape.label(),
                        dtype=dtype_name(shape.dtype),
                        kind="measured",
                        **timing.fields(),
                        tflops=shape.flops() / timing.median_s / 1e12,
                        note=note,
                    )
                    log(
                        f"  config {name:34} {row['median_ms']:9.3f} ms "
                        f"{row['tflops']:8.2f} TFLOP/s"
                    )
                except Exception as err:
                    rec.failed("config_scan", shape.layout, name, err)
                    log(f"  config {name}: FAILED {err}")
    finally:
        inputs = None
        _free(device)


# ----------------------------------------------------------------------------- pipelines
class Workload:
    """Synthetic q/k/v for every call and one feature per block, shared by every
    pipeline so each sees the same inputs (stateless: indexed by call / block).

    Features are random unit vectors, distinct for ``n_features`` blocks: no block is
    deduplicated, so every block pays for storing its entry."""

    def __init__(
        self,
        shape: PipelineShape,
        device: torch.device,
        *,
        n_sets: int = 2,
        n_features: int = 64,
        seed: int = 0,
    ) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        size = (shape.batch, shape.block_tokens, shape.heads, shape.head_dim)
        self._qkv = [
            tuple(torch.randn(size, generator=g, device=device, dtype=shape.dtype) for _ in "qkv")
            for _ in range(n_sets)
        ]
        feats = torch.randn(n_features, shape.batch, shape.feature_dim, generator=g, device=device)
        self._features = list(F.normalize(feats, dim=-1))

    def qkv(self, call: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._qkv[call % len(self._qkv)]

    def feature(self, block: int) -> torch.Tensor:
        """``(B, F)`` L2-normalised block feature (the caller's encoder output)."""
        return self._features[block % len(self._features)]


class OursPipeline:
    """The package's path: ``DySinkCache`` + ``SinkAttention``, block by block.

    ``entries`` old bank entries are filled in synthetically (features, frames, mean
    keys; the K/V stay zeros, which costs the same to attend), all outside the excluded
    window. Every block stores its own entry (paid for in the block's time) into a
    spare slot, which ``prepare()`` frees again before the next block: each block sees
    the same ``entries`` retrievable entries.
    """

    name = "ours"

    def __init__(
        self,
        shape: PipelineShape,
        device: torch.device,
        work: Workload,
        *,
        entries: int,
        backend: str = "auto",
    ) -> None:
        self.shape, self.device, self.work = shape, torch.device(device), work
        self.entries = entries
        # A free slot for the block's own entry (no eviction); the cache needs top_k.
        cap = max(entries + 1, shape.top_k)
        cfg = shape.config(max_entries=cap)
        self.cache = DySinkCache(
            cfg,
            batch_size=shape.batch,
            device=self.device,
            dtype=shape.dtype,
            bank_slots=cap,
            backend=backend,
            feature_dim=shape.feature_dim,
        )
        self.attn = SinkAttention(cfg)
        self._call = 0
        self._prefill(entries)

    @torch.no_grad()
    def _prefill(self, n: int) -> None:
        s, cache, bank = self.shape, self.cache, self.cache.bank
        g = torch.Generator(device=self.device).manual_seed(1)
        C = bank.slots_per_sample
        for b in range(s.batch):
            lo = b * C
            frames = torch.arange(n, dtype=torch.int32, device=self.device)
            bank.owner[lo : lo + n] = b
            bank.frame[lo : lo + n] = frames * s.frames_per_block
            bank.stamp[lo : lo + n] = frames.long() + 1
            feats = torch.randn(n, s.feature_dim, generator=g, device=self.device)
            bank.feature[lo : lo + n] = F.normalize(feats, dim=-1)
            means = torch.randn(s.layers, n, s.heads, s.head_dim, generator=g, device=self.device)
            bank.mean_k[:, lo : lo + n] = means / math.sqrt(s.block_tokens)
        bank.clock.fill_(n)
        cache.block = s.start_block(n)
        cache.frame_dev.fill_(cache.block * s.frames_per_block)
        recent = torch.randn(cache.recent_feat.shape, generator=g, device=self.device)
        cache.recent_feat.copy_(F.normalize(recent, dim=-1))

    def prepare(self) -> None:
        """Untimed, before each block: free what the last block stored (inserts take the
        first free slot, right after the prefilled ones)."""
        bank = self.cache.bank
        C = bank.slots_per_sample
        for b in range(self.shape.batch):
            bank.owner[b * C + self.entries : (b + 1) * C] = -1
            bank.frame[b * C + self.entries : (b + 1) * C] = -1

    def run_block(self) -> None:
        s, cache, attn = self.shape, self.cache, self.attn
        cache.begin_block()
        for _ in range(s.steps):
            for layer in range(s.layers):
                attn(*self.work.qkv(self._call), cache=cache, layer=layer)
                self._call += 1
        for layer in range(s.layers):
            attn(*self.work.qkv(self._call), cache=cache, layer=layer, commit=True)
            self._call += 1
        cache.end_block(feature=self.work.feature(cache.block))

    def moved_bytes(self) -> tuple[int, int]:
        """Host->device and device->host bytes so far: none, the bank lives on the device."""
        return 0, 0


def reference_style_class():
    """``ReferenceStylePipeline`` from ``benchmarks/reference_style.py`` of the source
    tree this package runs from, or ``None`` (it is not part of the package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "reference_style.py"
    if not path.is_file():
        return None
    name = "dysink_benchmarks_reference_style"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module.ReferenceStylePipeline


def make_pipeline(
    name: str,
    shape: PipelineShape,
    device: torch.device,
    work: Workload,
    *,
    entries: int,
):
    if name == "ours":
        return OursPipeline(shape, device, work, entries=entries)
    if name == "reference_style":
        cls = reference_style_class()
        if cls is None:
            raise LookupError("reference_style lives in the repository's benchmarks/ folder")
        return cls(shape, device, work, entries=entries)
    raise ValueError(f"unknown pipeline {name!r}")


def pipeline_counters(pipe, device: torch.device) -> dict:
    """One more block, un-timed: host syncs (``aten._local_scalar_dense``; on CUDA also
    the synchronizing calls torch flags), host<->device bytes and peak device memory."""
    out: dict = {}
    pipe.prepare()
    synchronize(device)
    h2d, d2h = pipe.moved_bytes()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    counter = SyncCounter()
    with cuda_sync_counter(device) as cuda_syncs, counter:
        pipe.run_block()
    synchronize(device)
    h2d_after, d2h_after = pipe.moved_bytes()
    out.update(host_syncs=counter.count, h2d_bytes=h2d_after - h2d, d2h_bytes=d2h_after - d2h)
    if cuda_syncs:
        out["cuda_syncs"] = cuda_syncs[0]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_mem_bytes=peak, transient_mem_bytes=peak - base)
    return out


def pipeline_row(
    rec: Recorder,
    *,
    suite: str,
    case: str,
    pipe,
    shape: PipelineShape,
    timing: Timing,
    counters: dict,
    entries: int,
    value: float | None = None,
    unit: str | None = None,
) -> dict:
    notes = [f"{shape.layers} layers", f"{entries} bank entries"]
    if pipe.device.type == "cpu" and pipe.name != "ours":
        notes.append("h2d/d2h: bytes a GPU run moves; on CPU the copies stay in host memory")
    return rec.add(
        suite=suite,
        case=case,
        provider=pipe.name,
        shape=shape.label(),
        dtype=dtype_name(shape.dtype),
        kind="measured",
        **timing.fields(),
        value=value,
        unit=unit,
        note="; ".join(notes),
        **counters,
    )


def measure_pipeline(pipe, device: torch.device, *, rounds: int, warmup: int = 1) -> Timing:
    return time_wall(pipe.run_block, device, rounds=rounds, warmup=warmup, setup=pipe.prepare)


def _pipeline_case(
    rec: Recorder,
    name: str,
    shape: PipelineShape,
    device: torch.device,
    *,
    suite: str,
    case: str,
    entries: int,
    rounds: int,
    warmup: int,
    value: float | None = None,
    unit: str | None = None,
    log: Callable[[str], None] = print,
) -> None:
    pipe = work = None
    try:
        work = Workload(shape, device)
        pipe = make_pipeline(name, shape, device, work, entries=entries)
        timing = measure_pipeline(pipe, device, rounds=rounds, warmup=warmup)
        counters = pipeline_counters(pipe, device)
        row = pipeline_row(
            rec,
            suite=suite,
            case=case,
            pipe=pipe,
            shape=shape,
            timing=timing,
            counters=counters,
            entries=entries,
            value=value,
            unit=unit,
        )
        where = f"{case}={value:g}" if value is not None else case
        log(
            f"  {suite} {where:18} {name:16} {row['median_ms']:9.2f} ms/block "
            f"syncs {counters['host_syncs']}"
        )
    except Exception as err:
        rec.failed(suite, case if value is None else f"{case}={value:g}", name, err)
        log(f"  {suite} {case} {name}: FAILED {err}")
    finally:
        pipe = work = None
        _free(device)


def run_pipeline(
    rec: Recorder,
    plan: Plan,
    device: torch.device,
    *,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Per-block latency of ``ours`` and ``reference_style`` at the plan's layer stack."""
    for name in PIPELINES:
        if _past(deadline):
            rec.add(
                suite="pipeline", case="per_block", provider=name, kind="skipped", note="deadline"
            )
            continue
        _pipeline_case(
            rec,
            name,
            plan.pipeline,
            device,
            suite="pipeline",
            case="per_block",
            entries=plan.pipeline_entries,
            rounds=plan.pipeline_rounds,
            warmup=plan.warmup,
            log=log,
        )


def scaling_points(plan: Plan) -> list[tuple[str, int, PipelineShape, int]]:
    """(axis, value, shape, bank entries) of every scaling point."""
    base = plan.scaling
    points = [("bank_entries", n, base, n) for n in plan.bank_points]
    points += [
        ("local_frames", L, replace(base, local_frames=L), plan.sweep_entries)
        for L in plan.local_points
    ]
    points += [("top_k", k, replace(base, top_k=k), plan.sweep_entries) for k in plan.topk_points]
    return points


def run_scaling(
    rec: Recorder,
    plan: Plan,
    device: torch.device,
    *,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Per-block cost against bank entries, window length and top-k."""
    for axis, value, shape, entries in scaling_points(plan):
        for name in PIPELINES:
            if _past(deadline):
                rec.add(
                    suite="scaling",
                    case=axis,
                    provider=name,
                    value=value,
                    kind="skipped",
                    note="deadline",
                )
                continue
            _pipeline_case(
                rec,
                name,
                shape,
                device,
                suite="scaling",
                case=axis,
                entries=entries,
                rounds=plan.scaling_rounds,
                warmup=plan.warmup,
                value=value,
                unit=axis,
                log=log,
            )


# ----------------------------------------------------------------------------- small ops
SMALL_OPS = ("select_sinks", "sink_gate", "gate_from_means", "bank_insert")
COPY_PROVIDER = "d2d_copy"


def small_op_cases(
    device: torch.device, *, allow_interpreter: bool = False
) -> list[tuple[str, str, str | None]]:
    """(op, backend, skip reason) for every registered backend, plus the plain copy."""
    out = []
    for op in SMALL_OPS:
        usable = set(available_backends(op, device))
        for name in available_backends(op):
            reason = None if name in usable else f"{name!r} is not available on {device.type}"
            if reason is None and name == "triton":
                reason = triton_reason(device, allow_interpreter)
            out.append((op, name, reason))
    out.append(("bank_insert", COPY_PROVIDER, None))
    return out


def small_op_call(
    op: str, backend: str, shape: SmallOpsShape, device: torch.device, seed: int = 0
) -> tuple[Callable[[], object], int]:
    """``(callable, bytes it reads and writes)`` for one small op on ``backend``."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = shape
    B, P, H, D, n = s.batch, s.slots, s.heads, s.head_dim, s.top_k

    def rnd(*size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=dtype)

    slot_idx = (torch.arange(n, dtype=torch.int32, device=device) * 7 % P).expand(B, n)
    slot_idx = slot_idx.contiguous()
    if op == "select_sinks":
        qf = F.normalize(rnd(B, s.query_blocks, s.feature_dim), dim=-1)
        sf = F.normalize(rnd(P, s.feature_dim), dim=-1)
        owner = torch.zeros(P, dtype=torch.int32, device=device)
        frame = torch.arange(P, dtype=torch.int32, device=device) * 3
        lo = torch.full((B,), 3 * (P - 3), dtype=torch.int32, device=device)
        hi = torch.full((B,), 3 * P, dtype=torch.int32, device=device)
        kw = dict(k=n, exclude_lo=lo, exclude_hi=hi, backend=backend)
        return lambda: select_sinks(qf, sf, owner, frame, **kw), qf.nbytes + sf.nbytes
    if op == "sink_gate":
        q = rnd(B, s.sq, H, D, dtype=s.dtype)
        k = rnd(B, s.window, H, D, dtype=s.dtype)
        mean_k = rnd(P, H, D) / math.sqrt(s.window)
        return lambda: sink_gate(q, k, mean_k, slot_idx, backend=backend), q.nbytes + k.nbytes
    if op == "gate_from_means":
        qbar, kbar, mean_k = rnd(B, H, D), rnd(B, H, D), rnd(P, H, D)
        nbytes = qbar.nbytes + kbar.nbytes + B * n * H * D * 4
        return lambda: gate_from_means(qbar, kbar, mean_k, slot_idx, 0.8, "batch", backend), nbytes
    if op == "bank_insert":
        size = (s.insert_layers, 1, s.insert_tokens, H, D)
        src_k, src_v = rnd(*size, dtype=s.dtype), rnd(*size, dtype=s.dtype)
        nbytes = 2 * (src_k.nbytes + src_v.nbytes)  # read + write
        if backend == COPY_PROVIDER:
            dst_k, dst_v = torch.empty_like(src_k), torch.empty_like(src_v)
            return lambda: (dst_k.copy_(src_k), dst_v.copy_(src_v)), nbytes
        bank = FrameBank(
            s.insert_layers,
            1,
            2,
            s.insert_tokens,
            H,
            D,
            dtype=s.dtype,
            device=device,
            feature_dim=s.feature_dim,
        )
        pos = torch.arange(s.insert_tokens, device=device)
        feat = rnd(1, s.feature_dim)
        frame = torch.zeros((), dtype=torch.int64, device=device)
        return lambda: bank.insert(src_k, src_v, pos, feat, frame, None, backend=backend), nbytes
    raise ValueError(f"unknown small op {op!r}")


def small_op_row(
    rec: Recorder, op: str, backend: str, shape: SmallOpsShape, timing: Timing, nbytes: int
) -> dict:
    note = "GB/s counts bytes read + written" if op == "bank_insert" else "GB/s counts bytes read"
    return rec.add(
        suite="small_ops",
        case=op,
        provider=backend,
        shape=shape.label(op),
        dtype=dtype_name(shape.dtype),
        kind="measured",
        **timing.fields(),
        gbps=nbytes / timing.median_s / 1e9,
        note=note,
    )


def run_small_ops(
    rec: Recorder,
    plan: Plan,
    device: torch.device,
    *,
    allow_interpreter: bool = False,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    for op, backend, reason in small_op_cases(device, allow_interpreter=allow_interpreter):
        if reason is not None or _past(deadline):
            rec.add(
                suite="small_ops",
                case=op,
                provider=backend,
                kind="skipped",
                note=reason or "deadline",
            )
            continue
        fn = None
        try:
            fn, nbytes = small_op_call(op, backend, plan.small, device)
            timing = time_kernel(fn, device, rounds=plan.small_rounds)
            row = small_op_row(rec, op, backend, plan.small, timing, nbytes)
            log(
                f"  small_ops {op:16} {backend:9} {row['median_ms'] * 1e3:10.1f} us "
                f"{row['gbps']:8.1f} GB/s"
            )
        except Exception as err:
            rec.failed("small_ops", op, backend, err)
            log(f"  small_ops {op} {backend}: FAILED {err}")
        finally:
            fn = None
            _free(device)


# ----------------------------------------------------------------------------- memory
VIDEO_FPS = 16
PIXEL_FRAMES_PER_LATENT = 4  # Wan2.1's VAE: 4 pixel frames per latent frame


def add_memory_rows(rec: Recorder, shape: PipelineShape = WAN_LAYER) -> None:
    """Bank memory at the reference shape, bf16 and fp8 (computed from the shapes, not
    measured)."""
    s = replace(shape, dtype=torch.bfloat16)
    cfg = s.config()
    entry = s.entry_bytes()
    latent_per_minute = 60 * VIDEO_FPS // PIXEL_FRAMES_PER_LATENT
    blocks_per_minute = latent_per_minute // s.frames_per_block
    elem = 2
    fp8_entry = entry // 2 + s.layers * 2 * s.heads * 4  # bytes + fp32 K/V scales
    ring = 2 * s.layers * s.batch * cfg.ring_frames * s.tokens_per_frame * s.heads * s.head_dim
    ref_cache_tokens = (s.local_frames + s.top_k * s.frames_per_block) * s.tokens_per_frame
    ref_cache = 2 * s.layers * ref_cache_tokens * s.heads * s.head_dim * elem
    shape_label = f"Wan2.1-1.3B: {s.layers} layers, H={s.heads}, D={s.head_dim}, " + (
        f"{s.tokens_per_frame} tokens/frame, {s.frames_per_block} frames/block"
    )
    rows = [
        ("bank_entry", "bf16", entry, "K+V of every layer for one block (one entry)"),
        ("bank_entry_mean_k", "fp32", s.layers * s.heads * s.head_dim * 4,
         "per-layer mean keys the package keeps with each entry (for the gate)"),
        ("bank_per_minute", "bf16", blocks_per_minute * entry,
         f"{VIDEO_FPS} fps: {60 * VIDEO_FPS} pixel frames = {latent_per_minute} latent frames = "
         f"{blocks_per_minute} blocks; at most one entry per block, fewer with dedup"),
        ("reference_h2d_per_block", "bf16", s.top_k * entry,
         f"the reference copies its top_k={s.top_k} entries host->device every block"),
        ("window_ring", "bf16", ring * elem,
         f"the package's window ring: {cfg.ring_frames} frames x every layer, K+V"),
        ("reference_kv_cache", "bf16", ref_cache,
         f"the reference's KV cache: {ref_cache_tokens} tokens x every layer, K+V"),
        ("bank_entry", "fp8_e4m3", fp8_entry,
         "bank_dtype=torch.float8_e4m3fn: 1 byte per element plus fp32 K and V scales per "
         "(layer, head)"),
        ("bank_per_minute", "fp8_e4m3", blocks_per_minute * fp8_entry,
         "as bank_per_minute, with the fp8 bank"),
    ]  # fmt: skip
    for case, dtype, value, note in rows:
        rec.add(
            suite="memory",
            case=case,
            provider="computed",
            shape=shape_label,
            dtype=dtype,
            kind="computed",
            value=value,
            unit="bytes" if value is not None else None,
            note=note,
        )


# ----------------------------------------------------------------------------- derived
def _median(rows: list[dict], suite: str, case: str, provider: str, value=None) -> float | None:
    for r in rows:
        if (
            r["kind"] == "measured"
            and r["suite"] == suite
            and r["case"] == case
            and r["provider"] == provider
            and (value is None or r["value"] == value)
        ):
            return r["median_ms"]
    return None


def add_derived_rows(rec: Recorder) -> None:
    """Ratios between rows of this run (kind ``derived``): stats and gather overheads,
    speed-ups over the baselines, bank insert against a plain copy."""
    rows = list(rec.rows)

    def add(suite, case, provider, value, unit, note):
        rec.add(
            suite=suite,
            case=case,
            provider=provider,
            kind="derived",
            value=value,
            unit=unit,
            note=note,
        )

    attn = [r for r in rows if r["suite"] == "attention" and r["kind"] == "measured"]
    for layout in ("gathered", "contiguous"):
        for base in ("ours", "triton", "naive"):
            plain = _median(attn, "attention", layout, base)
            stats = _median(attn, "attention", layout, base + "+stats")
            if plain and stats:
                add(
                    "attention",
                    layout,
                    f"{base}: stats overhead",
                    100 * (stats / plain - 1),
                    "%",
                    "time with statistics / without - 1",
                )
        for p in ("ours", "ours+stats"):
            mine = _median(attn, "attention", layout, p)
            for other in ("cat_sdpa", "cat_sdpa_flash", "cat_sdpa_cudnn", "flash_attn"):
                theirs = _median(attn, "attention", layout, other)
                if mine and theirs:
                    add(
                        "attention",
                        layout,
                        f"{p} speed-up over {other}",
                        theirs / mine,
                        "x",
                        f"{other} time / {p} time (>1: {p} faster)",
                    )
    plain = _median(attn, "attention", "gathered", "ours+stats")
    for option, target in (("ours+stats+rotate", "<= 3%"), ("ours+stats+fp8", "<= 5%")):
        timed = _median(attn, "attention", "gathered", option)
        if plain and timed:
            note = f"DESIGN 4 option, target {target} on a GPU"
            cost = 100 * (timed / plain - 1)
            add("attention", "gathered", f"{option}: cost over ours+stats", cost, "%", note)
    for p in ("ours", "ours+stats", "triton", "triton+stats", "naive"):
        gathered = _median(attn, "attention", "gathered", p)
        contiguous = _median(attn, "attention", "contiguous", p)
        if gathered and contiguous:
            add(
                "attention",
                "gather",
                f"{p}: gather overhead",
                100 * (gathered / contiguous - 1),
                "%",
                "gathered slots + window / one contiguous KV of the same keys - 1",
            )
    ours = _median(rows, "pipeline", "per_block", "ours")
    ref = _median(rows, "pipeline", "per_block", "reference_style")
    if ours and ref:
        add(
            "pipeline",
            "per_block",
            "ours speed-up over reference_style",
            ref / ours,
            "x",
            "reference_style time / ours (>1: ours faster)",
        )
    for r in rows:
        if r["suite"] == "scaling" and r["kind"] == "measured" and r["provider"] == "ours":
            ref = _median(rows, "scaling", r["case"], "reference_style", r["value"])
            if ref:
                add(
                    "scaling",
                    r["case"],
                    f"ours speed-up over reference_style at {r['value']}",
                    ref / r["median_ms"],
                    "x",
                    "reference_style time / ours",
                )
    copy = _median(rows, "small_ops", "bank_insert", COPY_PROVIDER)
    inserts = [
        r
        for r in rows
        if r["suite"] == "small_ops" and r["case"] == "bank_insert" and r["kind"] == "measured"
    ]
    for r in inserts:
        if copy and r["provider"] != COPY_PROVIDER:
            add(
                "small_ops",
                "bank_insert",
                f"{r['provider']} time / {COPY_PROVIDER} time",
                r["median_ms"] / copy,
                "x",
                "insert / plain copy of the same bytes",
            )


# ----------------------------------------------------------------------------- reports
def _num(x, digits: int = 3) -> str:
    if x in ("", None):
        return "-"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1e3):
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def _mb(x) -> str:
    return "-" if x in ("", None) else f"{x / 1e6:,.1f}"


def markdown_summary(rows: Iterable[dict], env: dict) -> str:
    """The measured rows as markdown tables, with ratios computed from the same run."""
    rows = list(rows)
    load = env.get("loadavg")
    out = [
        f"Measured on {env.get('device_name')}, {env.get('date')}; torch {env.get('torch')}, "
        f"triton {env.get('triton')}, dysink_kernels {env.get('dysink_kernels')}"
        + (f"; load average {load[0]:.1f} at the start." if load else "."),
        "",
    ]
    attn = [r for r in rows if r["suite"] == "attention" and r["kind"] == "measured"]
    if attn:
        out += [
            f"Attention, one call ({attn[0]['dtype']}):",
            "",
            "| layout | shape | provider | median ms | min ms | TFLOP/s | cat_sdpa time / this |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for r in attn:
            base = _median(attn, "attention", r["case"], "cat_sdpa")
            ratio = f"{base / r['median_ms']:.2f}" if base else "-"
            out.append(
                f"| {r['case']} | {r['shape']} | {r['provider']} | {_num(r['median_ms'])} | "
                f"{_num(r['min_ms'])} | {_num(r['tflops'])} | {ratio} |"
            )
        out.append("")
    scan = [r for r in rows if r["suite"] == "config_scan" and r["kind"] == "measured"]
    if scan:
        out += [
            "Triton config scan:",
            "",
            "| config | median ms | TFLOP/s | note |",
            "|---|---:|---:|---|",
        ]
        out += [
            f"| {r['provider']} | {_num(r['median_ms'])} | {_num(r['tflops'])} | {r['note']} |"
            for r in scan
        ]
        out.append("")
    pipe = [r for r in rows if r["suite"] == "pipeline" and r["kind"] == "measured"]
    if pipe:
        out += [
            f"Per block ({pipe[0]['shape']}, {pipe[0]['dtype']}):",
            "",
            "| pipeline | median ms / block | min ms | reference_style / this | host syncs "
            "| CUDA syncs | H2D MB | D2H MB | peak MB | note |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        ref = _median(pipe, "pipeline", "per_block", "reference_style")
        for r in pipe:
            ratio = f"{ref / r['median_ms']:.2f}" if ref else "-"
            out.append(
                f"| {r['provider']} | {_num(r['median_ms'])} | {_num(r['min_ms'])} | {ratio} "
                f"| {_num(r['host_syncs'])} "
                f"| {_num(r['cuda_syncs'])} | {_mb(r['h2d_bytes'])} | {_mb(r['d2h_bytes'])} "
                f"| {_mb(r['peak_mem_bytes'])} | {r['note']} |"
            )
        out.append("")
    scal = [r for r in rows if r["suite"] == "scaling" and r["kind"] == "measured"]
    if scal:
        out += [
            f"Scaling, ms per block ({scal[0]['shape']} at the swept value):",
            "",
            "| axis | value | ours | reference_style | reference_style / ours | ours host syncs "
            "| reference host syncs |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        seen = []
        for r in scal:
            key = (r["case"], r["value"])
            if key in seen:
                continue
            seen.append(key)
            pair = {x["provider"]: x for x in scal if (x["case"], x["value"]) == key}
            o, f = pair.get("ours"), pair.get("reference_style")
            ratio = f"{f['median_ms'] / o['median_ms']:.2f}" if o and f else "-"
            out.append(
                f"| {key[0]} | {key[1]} | {_num(o['median_ms']) if o else '-'} | "
                f"{_num(f['median_ms']) if f else '-'} | {ratio} | "
                f"{_num(o['host_syncs']) if o else '-'} | {_num(f['host_syncs']) if f else '-'} |"
            )
        out.append("")
    small = [r for r in rows if r["suite"] == "small_ops" and r["kind"] == "measured"]
    if small:
        out += [
            "Small ops:",
            "",
            "| op | shape | backend | median us | GB/s |",
            "|---|---|---|---:|---:|",
        ]
        out += [
            f"| {r['case']} | {r['shape']} | {r['provider']} | {_num(r['median_ms'] * 1e3)} | "
            f"{_num(r['gbps'])} |"
            for r in small
        ]
        out.append("")
    mem = [r for r in rows if r["suite"] == "memory"]
    if mem:
        out += [
            f"Memory (computed from the shapes, not measured; {mem[0]['shape']}):",
            "",
            "| quantity | dtype | bytes | GB | note |",
            "|---|---|---:|---:|---|",
        ]
        for r in mem:
            gb = "-" if r["value"] in ("", None) else f"{r['value'] / 1e9:.4g}"
            out.append(
                f"| {r['case']} | {r['dtype'] or '-'} | {_num(r['value'])} | {gb} | {r['note']} |"
            )
        out.append("")
    bad = [r for r in rows if r["kind"] == "failed"]
    if bad:
        out += ["Failed:", ""] + [
            f"- {r['suite']}/{r['case']}/{r['provider']}: {r['note']}" for r in bad
        ]
        out.append("")
    return "\n".join(out)


def _barh(
    ax,
    labels: list[str],
    values: list[float],
    color: str,
    xlabel: str,
    title: str,
    log: bool = False,
) -> None:
    ax.set_title(title)
    if not values:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    ax.barh(range(len(values)), values, color=color)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    if log and min(values) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)


def plot(rows: Iterable[dict], env: dict, path: str | Path) -> Path | None:
    """A PNG of the measured rows (matplotlib, imported here); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if r["kind"] == "measured"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    attn = [r for r in rows if r["suite"] in ("attention", "config_scan")]
    _barh(
        axes[0, 0],
        [f"{r['provider']} ({r['case']})" for r in attn],
        [r["tflops"] for r in attn],
        "tab:blue",
        "TFLOP/s",
        "attention, one call",
    )
    pipe = [r for r in rows if r["suite"] == "pipeline"]
    title = "per block" + (f" ({pipe[0]['note'].split(';')[0]})" if pipe else "")
    _barh(
        axes[0, 1],
        [r["provider"] for r in pipe],
        [r["median_ms"] for r in pipe],
        "tab:orange",
        "ms per block",
        title,
    )
    small = [r for r in rows if r["suite"] == "small_ops"]
    _barh(
        axes[0, 2],
        [f"{r['case']} [{r['provider']}]" for r in small],
        [r["median_ms"] * 1e3 for r in small],
        "tab:green",
        "us per call",
        "small ops",
        log=True,
    )
    for ax, axis in zip(axes[1], ("bank_entries", "local_frames", "top_k")):
        ax.set_title(f"scaling: {axis}")
        for name in PIPELINES:
            pts = sorted(
                (r["value"], r["median_ms"])
                for r in rows
                if r["suite"] == "scaling" and r["case"] == axis and r["provider"] == name
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        if axis == "bank_entries":
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(axis)
        ax.set_ylabel("ms per block")
        ax.legend()
    fig.suptitle(f"dysink_kernels benchmarks: {env.get('device_name')}, {env.get('date')}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(rec: Recorder, out_dir: str | Path) -> list[Path]:
    """results.csv, results.json, summary.md and bench.png (when matplotlib is there)."""
    out = Path(out_dir)
    paths = rec.write(out)
    summary = out / "summary.md"
    summary.write_text(markdown_summary(rec.rows, rec.env))
    paths.append(summary)
    png = plot(rec.rows, rec.env, out / "bench.png")
    if png is not None:
        paths.append(png)
    return paths


# ----------------------------------------------------------------------------- CLI
def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


RUNNERS: dict[str, Callable] = {
    "attention": run_attention,
    "pipeline": run_pipeline,
    "scaling": run_scaling,
    "small_ops": run_small_ops,
}


def main(
    out: str | Path = "bench_out",
    *,
    quick: bool = False,
    device: str | None = None,
    suites: Iterable[str] = SUITES,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """``python -m dysink_kernels bench``: run ``suites``, write the outputs to ``out``."""
    dev = torch.device(device) if device else default_device()
    suites = list(suites)
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise ValueError(f"unknown suites {sorted(unknown)}; choose from {SUITES}")
    plan = plan_for(dev, quick=quick)
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
