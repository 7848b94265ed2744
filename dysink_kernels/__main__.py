"""Command line: ``python -m dysink_kernels {demo,kernels,rope-diagnostic,info}``."""

from __future__ import annotations

import argparse
import functools
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


def _int_at_least(minimum: int):
    """An argparse type: an int ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def _even_head_dim(text: str) -> int:
    """An argparse type: a positive even head dimension (RoPE turns pairs)."""
    value = _int_at_least(2)(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even, got {value}")
    return value


def _probability(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _block_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated block indices, each listed once."""
    parts = [b.strip() for b in text.split(",") if b.strip()]
    try:
        blocks = tuple(int(b) for b in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if len(set(blocks)) != len(blocks):
        raise argparse.ArgumentTypeError(f"a block is listed twice in {text!r}")
    return tuple(sorted(blocks))


def _writable_dir(path: str) -> str:
    """An argparse type: a folder that exists and takes a file, or can be created
    (checked before any work, so that a run's results are not lost at the end)."""
    import tempfile

    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise argparse.ArgumentTypeError(f"{path!r}: {probe!r} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{path!r} is not writable: {err}") from None
    return path


def _check_demo(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-argument checks of ``demo`` (usage errors before any work)."""
    from . import DySinkConfig
    from ._registry import available_backends, registered_ops

    outside = [b for b in args.switch_at if not 0 < b < args.blocks]
    if outside:
        p.error(f"--switch-at: blocks {outside} are outside the run (1..{args.blocks - 1})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    # The cache passes its backend to every op it dispatches (RoPE takes none).
    cache_ops = [op for op in registered_ops() if op not in ("apply_wan_rope", "rotate_temporal")]
    names = {"auto"} | set.intersection(*(set(available_backends(op, dev)) for op in cache_ops))
    if args.backend not in names:
        p.error(f"--backend must be one of {sorted(names)} on {dev}, got {args.backend!r}")
    try:
        DySinkConfig(
            num_layers=args.layers, num_heads=1, head_dim=2, tokens_per_frame=1,
            top_k=args.top_k, sink_frames=args.sink_frames, local_frames=args.local_frames,
            tau=args.tau,
        )  # fmt: skip
    except ValueError as err:
        p.error(f"demo configuration: {err}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import format_block, run_demo, run_wan_demo, write_outputs

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.threads:
        # The demo's ops are tiny: on a busy small CPU one thread avoids stalls.
        torch.set_num_threads(args.threads)
    switch_at = args.switch_at
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
    count, natural = _int_at_least(1), _int_at_least(0)
    d.add_argument("--blocks", type=count, default=24)
    d.add_argument("--layers", type=count, default=4)
    d.add_argument("--batch", type=count, default=1)
    d.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    d.add_argument("--backend", default="auto", help="auto or a backend every op has")
    d.add_argument("--seed", type=natural, default=0)
    d.add_argument(
        "--model", choices=["tiny", "wan-tiny"], default="tiny",
        help="tiny: models.TinyVideoDiT; wan-tiny: a random-weight diffusers "
        "WanTransformer3DModel through integrations.diffusers_wan (needs diffusers)",
    )  # fmt: skip
    d.add_argument(
        "--feature", choices=["external", "mean_key"], default=None,
        help="default: external for tiny, mean_key for wan-tiny",
    )  # fmt: skip
    d.add_argument("--steps", type=count, default=4, help="denoising steps per block")
    d.add_argument("--top-k", type=natural, default=2)
    d.add_argument("--sink-frames", type=natural, default=0)
    d.add_argument("--local-frames", type=count, default=9)
    d.add_argument("--tau", type=_probability, default=0.8, help="gate threshold in [0, 1]")
    d.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    d.add_argument(
        "--switch-at", type=_block_list, default=(),
        help="comma-separated blocks (1..blocks-1) before which the prompt changes "
        "(the cache recaches)",
    )  # fmt: skip
    d.add_argument(
        "--threads", type=natural, default=1, help="torch CPU threads (0: torch's default)"
    )
    d.add_argument(
        "--out", type=_writable_dir, default="demo_out",
        help="folder for summary.json and timeline.png (checked writable before the run)",
    )  # fmt: skip
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(check=functools.partial(_check_demo, d))
    d.set_defaults(fn=_cmd_demo)

    k = sub.add_parser("kernels", help="compile every Triton kernel for a GPU arch and report")
    from .tools.kernel_report import ARCH_CHOICES  # standard library only

    k.add_argument("--arch", choices=ARCH_CHOICES, default="sm_90", help="GPU arch (no GPU needed)")
    k.add_argument("--json", action="store_true")
    k.add_argument("--strict", action="store_true", help="exit 1 when a CI gate fails")
    k.set_defaults(fn=_cmd_kernels)

    r = sub.add_parser("rope-diagnostic", help="plot RoPE phase re-alignment of distant sinks")
    r.add_argument("--out", type=_writable_dir, default="rope_out")
    r.add_argument("--max-distance", type=count, default=1200)
    r.add_argument("--points", type=_int_at_least(2), default=241)
    r.add_argument("--heads", type=count, default=12)
    r.add_argument("--head-dim", type=_even_head_dim, default=128, help="even, >= 2")
    r.add_argument("--seed", type=natural, default=0)
    r.set_defaults(fn=_cmd_rope_diagnostic)

    i = sub.add_parser("info", help="versions, devices and available backends")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad arguments end in a usage error (exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check = getattr(args, "check", None)
    if check is not None:
        check(args)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
