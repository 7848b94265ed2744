"""The pipeline and scaling suites: one block (``begin_block``, 4 denoising steps + 1
clean pass over every layer, ``end_block``) of ``DySinkCache`` + ``SinkAttention``
next to ``reference_style.py``, an emulation of the published per-block code, on the
same synthetic q/k/v: latency, host syncs, host<->device bytes, peak memory; then the
same per-block cost against bank entries, window length and top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from dysink_kernels import DySinkCache, SinkAttention

from measure import (
    Recorder,
    SyncCounter,
    Timing,
    cuda_sync_counter,
    dtype_name,
    free_memory,
    past_deadline,
    synchronize,
    time_wall,
)
from plans import PipelineShape, Plan, Workload
from reference_style import ReferenceStylePipeline

PIPELINES = ("ours", "reference_style")


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
        # A pure window (top_k=0) has no bank at all.
        cap = max(entries + 1, shape.top_k) if shape.top_k > 0 else 0
        cfg = shape.config(max_entries=cap or None)
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

    def begin_block(self) -> None:
        self.cache.begin_block()

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, commit: bool = False
    ) -> torch.Tensor:
        """One self-attention call of ``layer`` (the model's attention callback)."""
        return self.attn(q, k, v, cache=self.cache, layer=layer, commit=commit)

    def end_block(self, feature: torch.Tensor) -> None:
        self.cache.end_block(feature=feature)

    def block_feature(self) -> torch.Tensor:
        """The caller's feature of the current block (the workload's)."""
        return self.work.feature(self.cache.block)

    def first_frame(self) -> int:
        """First frame of the current block (host bookkeeping)."""
        return self.cache.frame

    def run_block(self) -> None:
        """One block on the workload's synthetic q/k/v."""
        s = self.shape
        self.begin_block()
        for _ in range(s.steps):
            for layer in range(s.layers):
                self.attend(layer, *self.work.qkv(self._call))
                self._call += 1
        for layer in range(s.layers):
            self.attend(layer, *self.work.qkv(self._call), commit=True)
            self._call += 1
        self.end_block(self.block_feature())

    def moved_bytes(self) -> tuple[int, int]:
        """Host->device and device->host bytes so far: none, the bank lives on the device."""
        return 0, 0


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
        return ReferenceStylePipeline(shape, device, work, entries=entries)
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
        free_memory(device)


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
        if past_deadline(deadline):
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
            if past_deadline(deadline):
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
