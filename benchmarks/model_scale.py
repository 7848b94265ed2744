"""The cost of memory at model scale: the time of one whole block of a random-weight
stack shaped like Wan2.1-T2V-1.3B (``dysink_kernels.tools.models.wan_shaped_dit``),
with the plain window, with DySink, and with the reference-style pipeline.

A block is ``begin_block``, 4 denoising forwards of the model (each re-noised to the
next timestep on the device) and one clean forward (``commit=True``), then
``end_block`` with the block's feature. The model's self-attention goes through the
pipeline under test; projections, q/k norms, Wan 3D RoPE at the block's absolute
frame, cross-attention to a fixed random text context and the feed-forward run the
same in every case. Cases, all in one run on one model:

* ``window``: plain window, ``top_k=0`` (the Self-Forcing setting).
* ``dysink``: ``top_k=2``, gate and statistics on, ``bank_entries`` retrievable entries.
* ``dysink+graph``: the same, the block's denoising forwards captured once in a CUDA
  graph and replayed for later blocks (CUDA only: skipped elsewhere, reason recorded).
* ``reference_style``: ``reference_style.py`` (the published per-block code's way: host
  bank, ``.item()``, clones, ``torch.cat``) at the same shape and bank.
* ``longlive``: 3 static sink frames, a 12-frame window, no retrieval.
* ``window_15f``: a plain window of 15 frames, as many keys as DySink attends (9 window
  frames + 2 entries of 3 frames) in its denoising steps: next to ``dysink`` it
  separates the bank's overhead from the longer attention.

Bank entries are synthetic (as in the pipeline suite): features, frames and mean keys
filled in, K/V zeros, which cost the same to attend; every block stores its own entry
and ``prepare()`` frees it again. The feature encoder is left out of every case (the
caller's feature is given).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dysink_kernels.tools.models import TinyVideoDiT, wan_shaped_dit

from measure import (
    Recorder,
    dtype_name,
    free_memory,
    past_deadline,
    time_blocks,
)
from pipelines import OursPipeline, pipeline_counters
from plans import ModelShape, Plan, Workload
from reference_style import ReferenceStylePipeline

TIMESTEPS = (1.0, 0.75, 0.5, 0.25)
BASELINE = "window"
GRAPH_REASON = "CUDA graphs need a CUDA device"


@dataclass(frozen=True)
class ModelCase:
    """One protocol setting of the model-scale benchmark."""

    name: str
    title: str
    pipeline: str = "ours"  # or "reference_style"
    top_k: int = 0
    local_frames: int = 9
    sink_frames: int = 0
    entries: int = 0
    graph: bool = False


def model_cases(shape: ModelShape) -> tuple[ModelCase, ...]:
    """The cases, the plain window first (the others' ratios are to it)."""
    n = shape.bank_entries
    return (
        ModelCase(BASELINE, "plain window (top_k=0)"),
        ModelCase("dysink", f"DySink (top_k=2, gate, stats, {n} entries)", top_k=2, entries=n),
        ModelCase(
            "dysink+graph",
            f"DySink, denoising steps replayed from a CUDA graph ({n} entries)",
            top_k=2,
            entries=n,
            graph=True,
        ),
        ModelCase(
            "reference_style",
            f"reference-style pipeline (top_k=2, {n} entries)",
            pipeline="reference_style",
            top_k=2,
            entries=n,
        ),
        ModelCase("longlive", "LongLive (3 sink frames, 12-frame window)", local_frames=12,
                  sink_frames=3),
        ModelCase(
            "window_15f",
            "plain window of 15 frames (top_k=0): as many keys as DySink's 9 + 2x3 frames",
            local_frames=9 + 2 * shape.frames_per_block,
        ),
    )  # fmt: skip


def case_reason(case: ModelCase, device: torch.device) -> str | None:
    """Why ``case`` cannot run on ``device`` (None when it can)."""
    if case.graph and device.type != "cuda":
        return GRAPH_REASON
    return None


def build_model(shape: ModelShape, device: torch.device) -> TinyVideoDiT:
    """The random-weight model, initialised on ``device`` in ``shape.dtype``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = wan_shaped_dit(
            shape.layers, shape.heads, shape.head_dim, shape.grid_hw, shape.ffn_dim,
            shape.latent_channels, shape.text_dim,
        )  # fmt: skip
    return model.to(shape.dtype).eval().requires_grad_(False)


class ModelRun:
    """A pipeline (``OursPipeline`` or ``ReferenceStylePipeline``) driven by the model,
    with the interface ``pipeline_counters`` expects: ``prepare()``, ``run_block()``,
    ``moved_bytes()``, ``name``, ``device``."""

    def __init__(
        self,
        model: TinyVideoDiT,
        pipe: OursPipeline | ReferenceStylePipeline,
        shape: ModelShape,
        device: torch.device,
        *,
        name: str,
        graph: bool = False,
        seed: int = 0,
    ) -> None:
        self.model, self.pipe, self.shape = model, pipe, shape
        self.device, self.name, self.graphed = torch.device(device), name, graph
        g = torch.Generator(device=self.device).manual_seed(seed)
        size = (1, shape.frames_per_block, shape.tokens_per_frame, shape.latent_channels)

        def rnd(*s: int) -> torch.Tensor:
            return torch.randn(*s, generator=g, device=self.device, dtype=shape.dtype)

        self.noise = [rnd(*size) for _ in TIMESTEPS]
        self.text = rnd(1, shape.text_tokens, shape.text_dim)
        # Static tensors a captured graph reads: the block's input and first frame.
        self.x = torch.empty_like(self.noise[0])
        self.frame = torch.zeros((), dtype=torch.int64, device=self.device)
        self.x0: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _denoise(self) -> torch.Tensor:
        x = x0 = self.x
        for i, t in enumerate(TIMESTEPS):
            x0 = self.model(x, t, self.text, self.frame, self.pipe.attend)
            if i + 1 < len(TIMESTEPS):
                t_next = TIMESTEPS[i + 1]
                x = (1.0 - t_next) * x0 + t_next * self.noise[i + 1]
        return x0

    def _capture(self) -> None:
        """Warm up on a side stream, capture the denoising steps, replay once."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._denoise()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.x0 = self._denoise()
        self.graph.replay()

    def prepare(self) -> None:
        self.pipe.prepare()

    def moved_bytes(self) -> tuple[int, int]:
        return self.pipe.moved_bytes()

    @torch.no_grad()
    def run_block(self) -> None:
        pipe = self.pipe
        pipe.begin_block()
        self.frame.fill_(pipe.first_frame())
        self.x.copy_(self.noise[0])
        if not self.graphed:
            x0 = self._denoise()
        elif self.graph is None:
            self._capture()
            x0 = self.x0
        else:
            self.graph.replay()
            x0 = self.x0
        self.model(x0, 0.0, self.text, self.frame, pipe.attend, commit=True)
        pipe.end_block(pipe.block_feature())


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def memory_parts(run: ModelRun) -> dict[str, int]:
    """Device bytes held by the model, the bank and the window (computed from the
    tensors; the reference-style bank lives in host memory)."""
    model = sum(_nbytes(p) for p in run.model.parameters())
    pipe = run.pipe
    if isinstance(pipe, OursPipeline):
        cache, bank = pipe.cache, pipe.cache.bank
        bank_bytes = _nbytes(bank.k, bank.v, bank.mean_k, bank.feature)
        window = _nbytes(cache.local_k, cache.local_v, cache.frame_ksum)
    else:
        bank_bytes = 0
        window = sum(_nbytes(kv["k"], kv["v"]) for kv in pipe.kv_cache)
    return {"model": model, "bank": bank_bytes, "window": window}


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if abs(nbytes) >= 1e8 else f"{nbytes / 1e6:.3g} MB"


def _memory_note(parts: dict[str, int], counters: dict) -> str:
    held = " + ".join(f"{k} {_size(v)}" for k, v in parts.items())
    peak = counters.get("peak_mem_bytes")
    if peak is None:
        return f"device memory held: {held} (peak not measured off CUDA)"
    rest = _size(peak - sum(parts.values()))
    return f"peak {_size(peak)} = {held} + activations and the rest {rest}"


def make_model_pipe(
    case: ModelCase, shape: ModelShape, device: torch.device
) -> OursPipeline | ReferenceStylePipeline:
    """The pipeline of ``case`` at the model's attention layout."""
    pshape = shape.pipeline(
        local_frames=case.local_frames, top_k=case.top_k, sink_frames=case.sink_frames
    )
    work = Workload(pshape, device, n_sets=1)
    if case.pipeline == "reference_style":
        return ReferenceStylePipeline(pshape, device, work, entries=case.entries)
    return OursPipeline(pshape, device, work, entries=case.entries)


def measure_case(
    case: ModelCase,
    model: TinyVideoDiT,
    shape: ModelShape,
    device: torch.device,
    *,
    rounds: int,
    warmup: int,
) -> tuple[ModelRun, object, dict]:
    """Time ``case`` (``warmup`` untimed blocks first; a graph is captured in the
    first) and count one more block: ``(run, timing, counters)``."""
    pipe = make_model_pipe(case, shape, device)
    run = ModelRun(model, pipe, shape, device, name=case.name, graph=case.graph)
    timing = time_blocks(
        run.run_block, device, rounds=rounds, warmup=max(1, warmup), setup=run.prepare
    )
    counters = pipeline_counters(run, device)
    return run, timing, counters


def model_row(
    rec: Recorder, case: ModelCase, shape: ModelShape, timing, counters: dict, parts: dict
) -> dict:
    notes = [case.title, _memory_note(parts, counters)]
    if case.pipeline == "reference_style" and shape.dtype != torch.float32:
        notes.append("attention: flash-attn when installed, else SDPA")
    return rec.add(
        suite="model",
        case="per_block",
        provider=case.name,
        shape=shape.label(),
        dtype=dtype_name(shape.dtype),
        kind="measured",
        **timing.fields(),
        note="; ".join(notes),
        **counters,
    )


def run_model_scale(
    rec: Recorder,
    plan: Plan,
    device: torch.device,
    *,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Every model-scale case on one model; a case that raises is recorded as failed."""
    shape = plan.model
    if shape is None:
        return
    cases = model_cases(shape)
    try:
        model = build_model(shape, device)
    except Exception as err:
        for case in cases:
            rec.failed("model", "per_block", case.name, err)
        log(f"  model: building the model FAILED {err}")
        return
    for case in cases:
        reason = case_reason(case, device)
        if reason is None and past_deadline(deadline):
            reason = "deadline"
        if reason is not None:
            rec.add(suite="model", case="per_block", provider=case.name, kind="skipped",
                    shape=shape.label(), note=reason)  # fmt: skip
            log(f"  model {case.name}: skipped ({reason})")
            continue
        run = None
        try:
            run, timing, counters = measure_case(
                case, model, shape, device, rounds=plan.model_rounds, warmup=plan.warmup
            )
            row = model_row(rec, case, shape, timing, counters, memory_parts(run))
            log(
                f"  model {case.name:16} {row['median_ms']:10.2f} ms/block "
                f"syncs {counters['host_syncs']}"
            )
        except Exception as err:
            rec.failed("model", "per_block", case.name, err)
            log(f"  model {case.name}: FAILED {err}")
        finally:
            run = None
            free_memory(device)
    model = None
    free_memory(device)
