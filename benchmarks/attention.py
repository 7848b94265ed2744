"""The attention suite: one call per provider over gathered bank slots + a window and
over one contiguous KV of the same keys, with and without statistics.

Providers: the package's op (``ours`` = backend "auto", and each backend by name),
``torch.cat`` + SDPA (on a GPU also forced to the flash and cuDNN backends),
flash-attn when installed, and the re-positioned and fp8-bank options.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dysink_kernels import available_backends
from dysink_kernels.fp8 import quantize
from dysink_kernels.ops.gathered_sink_attention import (
    gathered_sink_attention,
    gathered_sink_attention_general,
)

from measure import (
    Recorder,
    Timing,
    dtype_name,
    free_memory,
    past_deadline,
    rotating,
    time_kernel,
    triton_reason,
)
from plans import AttnShape, Plan

# Frames by which the "+rotate" attention provider re-positions its slots.
REPOSITION_FRAMES = 300.0
# Max |out - fp32 reference| accepted when a benchmark checks its provider's output.
ATTN_ATOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}

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
        if self.name in available_backends("gathered_sink_attention"):
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


def attention_providers(
    device: torch.device, *, allow_interpreter: bool = False
) -> list[tuple[AttnProvider, str | None]]:
    """Every provider, with why it cannot run on ``device`` (``None`` when it can)."""
    device = torch.device(device)
    usable = set(available_backends("gathered_sink_attention", device))
    out: list[tuple[AttnProvider, str | None]] = []
    for name in ("ours", *available_backends("gathered_sink_attention")):
        reason = None
        if name != "ours" and name not in usable:
            reason = f"backend {name!r} is not available on {device.type}"
        elif name == "triton":
            reason = triton_reason(device, allow_interpreter)
        out += [(AttnProvider(name, False), reason), (AttnProvider(name, True), reason)]
        if name == "ours":  # the options beyond the paper, measured against the plain gathered call
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
        return gathered_sink_attention_general(
            inp["q"], pool_k, pool_v, inp["slot_idx"], inp["k"], inp["v"], ranges,
            backend=backend, **kw,
        )[0]  # fmt: skip

    call.reference = lambda: call("naive")  # type: ignore[attr-defined]
    return call


def attention_error(out: torch.Tensor, inp: dict[str, torch.Tensor], call=None) -> float:
    """Max |out - fp32 softmax attention over the concatenated keys| (for the
    re-positioned and fp8 options: against the naive backend with the same options)."""
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
        if past_deadline(deadline):
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
            free_memory(device)


def config_scan(
    rec: Recorder,
    plan: Plan,
    device: torch.device,
    *,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """The Triton kernel at the reference shape for every autotune candidate of its
    head dim, with and without statistics (``AUTOTUNE_CANDIDATES``)."""
    import triton as _triton

    from dysink_kernels.ops.gathered_sink_attention import triton as tri

    shape = plan.attn
    block_d = max(16, _triton.next_power_of_2(shape.head_dim))
    candidates = tri.AUTOTUNE_CANDIDATES[tri.dim_bucket(block_d)]
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
                if past_deadline(deadline):
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
        free_memory(device)
