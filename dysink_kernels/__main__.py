"""Command line: ``python -m dysink_kernels {demo,kernels,rope-diagnostic,info}``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch


def _write(line: str) -> None:
    """Print above a live progress bar when tqdm is there."""
    try:
        from tqdm import tqdm

        tqdm.write(line)
    except ImportError:
        print(line, flush=True)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import format_block, run_demo, run_wan_demo, write_outputs

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.threads:
        # The demo's ops are tiny: on a busy small CPU one thread avoids stalls.
        torch.set_num_threads(args.threads)
    switch_at = tuple(int(b) for b in args.switch_at.split(",") if b.strip())
    if args.feature is None:
        args.feature = "mean_key" if args.model == "wan-tiny" else "external"
    print(
        f"dysink demo ({args.model}): {args.blocks} blocks, {args.layers} layers, "
        f"batch {args.batch}, device {args.device}, backend {args.backend}, "
        f"feature {args.feature}, seed {args.seed}"
    )
    run = run_wan_demo if args.model == "wan-tiny" else run_demo
    result = run(
        blocks=args.blocks, layers=args.layers, batch=args.batch, device=args.device,
        backend=args.backend, seed=args.seed, feature=args.feature, steps=args.steps,
        top_k=args.top_k, sink_frames=args.sink_frames, local_frames=args.local_frames,
        tau=args.tau, dtype=dtype, progress=not args.no_progress, switch_at=switch_at,
        on_block=lambda r: _write(format_block(r)),
    )  # fmt: skip
    summary, png = write_outputs(result, args.out)
    stored = sum(r["stored"] for r in result.blocks)
    gated = sum(r["gated"] for r in result.blocks)
    decisions = sum(r["gate_decisions"] for r in result.blocks)
    print(
        f"done in {result.seconds:.1f} s: {stored}/{len(result.blocks)} blocks stored, "
        f"{gated}/{decisions} gate decisions dropped an entry"
    )
    print(f"wrote {summary}" + (f" and {png}" if png else " (no matplotlib: no PNG)"))
    return 0


def info() -> dict:
    """Versions, devices and the backends each op can use."""
    from . import __version__
    from ._registry import available_backends, registered_ops

    out: dict = {
        "dysink_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    from ._cuda import build_info

    out["extension"] = build_info()
    devices = ["cpu"]
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        devices.append("cuda")
    out["backends"] = {
        op: {dev: available_backends(op, dev) for dev in devices} for op in registered_ops()
    }
    return out


def _cmd_info(args: argparse.Namespace) -> int:
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if key != "backends":
            print(f"{key:18} {value}")
    print("backends:")
    for op, per_dev in data["backends"].items():
        print(f"  {op:20} " + "  ".join(f"{d}: {','.join(b)}" for d, b in per_dev.items()))
    return 0


def _cmd_kernels(args: argparse.Namespace) -> int:
    from .tools.kernel_report import check_report, compile_report, format_table

    rows = compile_report(args.arch)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    failures = check_report(rows)
    for line in failures:
        print(f"GATE: {line}", file=sys.stderr)
    return 1 if failures and args.strict else 0


def _cmd_rope_diagnostic(args: argparse.Namespace) -> int:
    from .tools.diagnostics import plot_rope_diagnostic, rope_diagnostic

    result = rope_diagnostic(
        max_distance=args.max_distance, points=args.points, heads=args.heads,
        head_dim=args.head_dim, seed=args.seed,
    )  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rope_diagnostic.json"), "w") as f:
        json.dump(result, f)
    png = plot_rope_diagnostic(result, os.path.join(args.out, "rope_diagnostic.png"))
    for prefix in ("original", "relative"):
        sim = result[f"{prefix}_similarity"]
        print(
            f"{prefix:9} sink: inter-head similarity {min(sim):.3f}..{max(sim):.3f}, "
            f"gate ratio {min(result[f'{prefix}_gate_ratio']):.2f}.."
            f"{max(result[f'{prefix}_gate_ratio']):.2f} over distances "
            f"{result['distance'][0]}..{result['distance'][-1]} frames"
        )
    print(f"wrote {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dysink_kernels", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="autoregressive demo through DySinkCache/SinkAttention")
    d.add_argument("--blocks", type=int, default=24)
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--device", default="cpu")
    d.add_argument("--backend", default="auto")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--model", choices=["tiny", "wan-tiny"], default="tiny",
        help="tiny: models.TinyVideoDiT; wan-tiny: a random-weight diffusers "
        "WanTransformer3DModel through integrations.diffusers_wan (needs diffusers)",
    )  # fmt: skip
    d.add_argument(
        "--feature", choices=["external", "mean_key"], default=None,
        help="default: external for tiny, mean_key for wan-tiny",
    )  # fmt: skip
    d.add_argument("--steps", type=int, default=4, help="denoising steps per block")
    d.add_argument("--top-k", type=int, default=2)
    d.add_argument("--sink-frames", type=int, default=0)
    d.add_argument("--local-frames", type=int, default=9)
    d.add_argument("--tau", type=float, default=0.8)
    d.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    d.add_argument(
        "--switch-at", default="",
        help="comma-separated blocks before which the prompt changes (the cache recaches)",
    )  # fmt: skip
    d.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    d.add_argument("--out", default="demo_out", help="folder for summary.json and timeline.png")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=_cmd_demo)

    k = sub.add_parser("kernels", help="compile every Triton kernel for a GPU arch and report")
    k.add_argument("--arch", default="sm_90", help="sm_80 or sm_90 (no GPU needed)")
    k.add_argument("--json", action="store_true")
    k.add_argument("--strict", action="store_true", help="exit 1 when a CI gate fails")
    k.set_defaults(fn=_cmd_kernels)

    r = sub.add_parser("rope-diagnostic", help="plot RoPE phase re-alignment of distant sinks")
    r.add_argument("--out", default="rope_out")
    r.add_argument("--max-distance", type=int, default=1200)
    r.add_argument("--points", type=int, default=241)
    r.add_argument("--heads", type=int, default=12)
    r.add_argument("--head-dim", type=int, default=128)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(fn=_cmd_rope_diagnostic)

    i = sub.add_parser("info", help="versions, devices and available backends")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
