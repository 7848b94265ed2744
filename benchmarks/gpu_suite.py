"""One command for a GPU machine: environment, GPU tests, the attention benchmarks and the
Triton config scan, the small ops, the per-block comparison and its scaling, and the
cost of memory at model scale (one block of a Wan2.1-1.3B-shaped stack per case).

    python benchmarks/gpu_suite.py OUT_DIR              # H100/H200: about 8 minutes at most
    python benchmarks/gpu_suite.py OUT_DIR --dry-run    # every stage on tiny CPU shapes
    python benchmarks/gpu_suite.py OUT_DIR --stages attention   # some stages only

Stages run in order (``--stages`` picks some of them; env and final always run), each
inside a try/except that records a failure and goes on. A hard
deadline (``--budget``, default 480 s) is checked between stages and between benchmark
cases, each stage also has its own share of the time, and the results are rewritten
after every stage, so a run that is cut short still leaves its files. OUT_DIR receives
at most 7 files and no subfolder: env.json, progress.log, tests.log, results.csv,
results.json, summary.md and bench.png (when matplotlib is installed). A compact
summary is printed last, since the machine returns only the tail of the output.

``--dry-run`` (alias ``--cpu``) runs the same stages on CPU with tiny shapes and Triton's
interpreter (``TRITON_INTERPRET=1``, so the Triton code paths run; none of its timings
mean anything), collecting the test files instead of running them: a rehearsal that
the script works end to end before it meets a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_FILES = (
    "tests/test_triton_attn.py",
    "tests/test_triton_small_ops.py",
    "tests/test_device_path.py",
    "tests/test_csrc.py",
)
# Share of the budget each stage may use (the final stage needs little). The shares of
# the stages a run selects (``--stages``) are scaled up to fill the budget.
SHARES = {
    "env": 0.02,
    "tests": 0.34,
    "attention": 0.20,
    "small_ops": 0.07,
    "pipeline": 0.18,
    "model": 0.15,
}
# The stages --stages chooses from, in the order they run (env and final always run).
STAGES = ("tests", "attention", "small_ops", "pipeline", "model")
FINAL_RESERVE = 0.04
MAX_LOG_BYTES = 8 << 20
PACKAGES = ("torch", "triton", "pytest", "pytest-benchmark", "numpy", "matplotlib")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument(
        "--dry-run",
        "--cpu",
        dest="dry_run",
        action="store_true",
        help="every stage on tiny CPU shapes (Triton interpreter)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="hard deadline in seconds (default 480; 110 with --dry-run)",
    )
    p.add_argument("--skip-tests", action="store_true", help="leave out the pytest stage")
    p.add_argument(
        "--stages",
        type=parse_stages,
        default=STAGES,
        help=f"comma-separated stages to run, in this order: {','.join(STAGES)} "
        "(default: all; env and final always run), e.g. --stages attention",
    )
    return p.parse_args(argv)


def parse_stages(text: str) -> tuple[str, ...]:
    """``"attention,model"`` -> the named stages in run order; unknown names are a usage
    error."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(STAGES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown stages {unknown}; choose from {','.join(STAGES)}"
        )
    return tuple(s for s in STAGES if s in names)


def stage_shares(stages: tuple[str, ...]) -> dict[str, float]:
    """Each selected stage's share of the budget: :data:`SHARES` scaled so that env,
    the selected stages and the final reserve fill it."""
    chosen = sum(SHARES[s] for s in stages)
    room = 1.0 - FINAL_RESERVE - SHARES["env"]
    shares = {s: SHARES[s] * room / chosen for s in stages} if chosen else {}
    shares["env"] = SHARES["env"]
    return shares


class Deadline(Exception):
    """Raised by SIGALRM (the hard deadline) or SIGTERM inside whatever is running."""


def _raise_deadline(signum, frame):
    raise Deadline(f"stopped by {signal.Signals(signum).name}")


class Run:
    """Deadline, stage bookkeeping, and the files in OUT_DIR."""

    def __init__(self, out: Path, budget: float, shares: dict[str, float] | None = None) -> None:
        self.out = out
        self.budget = budget
        self.shares = dict(SHARES if shares is None else shares)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget
        self.final_reserve = FINAL_RESERVE * budget
        self.stages: list[dict] = []
        self.tests: list[dict] = []
        self.rec = None
        out.mkdir(parents=True, exist_ok=True)
        self.progress = out / "progress.log"
        self.progress.write_text("")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, line: str) -> None:
        print(line, flush=True)
        with open(self.progress, "a") as fh:
            fh.write(line + "\n")

    def stage_deadline(self, name: str) -> float:
        """Monotonic time by which the stage's cases must stop."""
        own = time.monotonic() + self.shares.get(name, 0.1) * self.budget
        return min(own, self.deadline - self.final_reserve)

    def stage(self, name: str, fn, *, need_s: float = 1.0) -> None:
        if self.left() - self.final_reserve < need_s and name != "final":
            self.log(f"== {name}: skipped ({self.left():.0f} s left)")
            self.stages.append({"stage": name, "status": "skipped", "seconds": 0.0, "note": ""})
            return
        self.log(f"== {name} ({self.left():.0f} s left)")
        start = time.monotonic()
        status, note = "ok", ""
        try:
            fn()
        except Exception as err:
            status = "failed"
            note = "".join(traceback.format_exception_only(type(err), err)).strip()[:300]
            self.log(traceback.format_exc(limit=4))
        seconds = time.monotonic() - start
        self.stages.append({"stage": name, "status": status, "seconds": seconds, "note": note})
        self.log(f"== {name}: {status} in {seconds:.1f} s" + (f": {note}" if note else ""))
        self.flush()

    def flush(self) -> None:
        """Rewrite the results written so far (CSV, JSON, summary.md)."""
        if self.rec is None:
            return
        from report import markdown_summary

        self.rec.env["stages"] = self.stages
        self.rec.env["tests"] = self.tests
        try:
            self.rec.write(self.out)
            summary = markdown_summary(self.rec.rows, self.rec.env)
            (self.out / "summary.md").write_text(summary)
        except Exception as err:  # never lose the run to a report
            self.log(f"  writing results failed: {err}")


# ----------------------------------------------------------------------------- stages
def stage_env(run: Run, device, dry: bool) -> None:
    from dysink_kernels.__main__ import info

    from measure import Recorder, environment

    env = environment(device)
    env["mode"] = "dry-run (CPU, tiny shapes, Triton interpreter)" if dry else "gpu"
    env["budget_s"] = run.budget
    env["argv"] = sys.argv
    env["packages"] = {}
    for name in PACKAGES:
        try:
            env["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env["packages"][name] = None
    try:
        env["info"] = info()
    except Exception as err:  # the backend table is a nicety
        env["info"] = f"failed: {err}"
    (run.out / "env.json").write_text(json.dumps(env, indent=1, default=str))
    run.rec = Recorder(env)
    extra = f", {env.get('sm_count')} SMs, CUDA {env.get('cuda')}" if device.type == "cuda" else ""
    run.log(f"device {env['device_name']}{extra}; torch {env['torch']}, triton {env['triton']}")


def _pytest(run: Run, label: str, args: list[str], timeout: float) -> None:
    """One pytest subprocess (own session, killed with its children on timeout); its
    output is appended to tests.log and its last summary line kept for the report."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *args,
        "-q",
        "-rfE",
        "--tb=short",
        "--color=no",
        "-p",
        "no:cacheprovider",
    ]
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as tmp:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=tmp, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
        except BaseException:  # the hard deadline: do not leave pytest running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        tmp.seek(0)
        text = tmp.read()
    seconds = time.monotonic() - start
    matches = re.findall(
        r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|error|errors|"
        r"tests? collected|xfailed|xpassed).*?)\s*=*$",
        text,
        re.M,
    )
    summary = matches[-1] if matches else (text.strip().splitlines() or ["(no output)"])[-1]
    failures = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    run.tests.append(
        {
            "label": label,
            "rc": rc,
            "seconds": seconds,
            "summary": summary[:200],
            "failures": failures[:20],
        }
    )
    log = run.out / "tests.log"
    with open(log, "a") as fh:
        fh.write(
            f"\n===== {label}: {' '.join(cmd)}\n===== rc={rc} in {seconds:.1f} s "
            f"(timeout {timeout:.0f} s)\n"
        )
        budget = MAX_LOG_BYTES - (log.stat().st_size if log.exists() else 0)
        if len(text) > budget:
            text = text[: budget // 2] + "\n[... cut ...]\n" + text[-budget // 2 :]
        fh.write(text)
    run.log(f"  pytest {label}: rc={rc}, {summary} ({seconds:.0f} s)")


def stage_tests(run: Run, dry: bool) -> None:
    until = run.stage_deadline("tests")
    files = [f for f in TEST_FILES if (REPO / f).is_file()]
    missing = sorted(set(TEST_FILES) - set(files))
    if missing:
        run.log(f"  test files not present (skipped): {', '.join(missing)}")
    share = 0.4 if files else 1.0
    _pytest(run, "tests -m gpu", ["tests", "-m", "gpu"], timeout=share * (until - time.monotonic()))
    if not files:
        return
    if dry:  # the interpreter would take minutes: check that the files collect
        _pytest(
            run,
            "kernel test files (collect only)",
            [*files, "--collect-only"],
            timeout=until - time.monotonic(),
        )
    else:  # the gpu-marked tests of these files already ran above
        _pytest(
            run,
            "kernel test files, not gpu-marked",
            [*files, "-m", "not gpu"],
            timeout=until - time.monotonic(),
        )


def stage_attention(run: Run, plan, device, dry: bool) -> None:
    from dysink_kernels import available_backends

    from attention import config_scan, run_attention

    until = run.stage_deadline("attention")
    run_attention(run.rec, plan, device, allow_interpreter=dry, deadline=until, log=run.log)
    run.flush()
    if "triton" in available_backends("gathered_sink_attention", device):
        config_scan(run.rec, plan, device, deadline=until, log=run.log)
    else:
        run.log("  config scan: triton is not available here")


def stage_small_ops(run: Run, plan, device, dry: bool) -> None:
    from small_ops import run_small_ops

    run_small_ops(
        run.rec,
        plan,
        device,
        allow_interpreter=dry,
        deadline=run.stage_deadline("small_ops"),
        log=run.log,
    )


def stage_pipeline(run: Run, plan, device) -> None:
    from pipelines import run_pipeline, run_scaling

    until = run.stage_deadline("pipeline")
    run_pipeline(run.rec, plan, device, deadline=until, log=run.log)
    run.flush()
    run_scaling(run.rec, plan, device, deadline=until, log=run.log)


def stage_model(run: Run, plan, device) -> None:
    from model_scale import run_model_scale

    run_model_scale(run.rec, plan, device, deadline=run.stage_deadline("model"), log=run.log)


def stage_final(run: Run) -> None:
    from memory import add_memory_rows
    from report import add_derived_rows, plot

    add_memory_rows(run.rec)
    add_derived_rows(run.rec)
    run.flush()
    png = plot(run.rec.rows, run.rec.env, run.out / "bench.png")
    run.log("  plot: " + (str(png) if png else "matplotlib is not installed (no PNG)"))


# ----------------------------------------------------------------------------- summary
def _f(x, fmt: str) -> str:
    return "-" if x in ("", None) else format(x, fmt)


def compact_summary(run: Run) -> str:
    rec = run.rec
    env = rec.env if rec else {}
    rows = rec.rows if rec else []
    measured = [r for r in rows if r["kind"] == "measured"]
    out = [
        f"=== dysink gpu_suite: {env.get('device_name')} (SMs {env.get('sm_count', '-')}, "
        f"CUDA {env.get('cuda', '-')}), torch {env.get('torch')}, triton {env.get('triton')}, "
        f"{env.get('date')}, {time.monotonic() - run.t0:.0f} s of {run.budget:.0f}",
        "stages: "
        + "; ".join(f"{s['stage']} {s['status']} {s['seconds']:.0f}s" for s in run.stages),
    ]
    for t in run.tests:
        out.append(f"tests [{t['label']}] rc={t['rc']}: {t['summary']} ({t['seconds']:.0f}s)")
        out += [f"  {line[:160]}" for line in t["failures"][:8]]
    attn = [r for r in measured if r["suite"] == "attention"]
    if attn:
        out.append(f"attention [{attn[0]['shape']} {attn[0]['dtype']}] ms | TFLOP/s | note:")
        out += [
            f"  {r['case'][:6]:6} {r['provider']:15} {r['median_ms']:9.3f} "
            f"{r['tflops']:8.1f}  {r['note']}"
            for r in attn
        ]
    scan = [r for r in measured if r["suite"] == "config_scan"]
    if scan:
        out.append("config scan (gathered) ms | TFLOP/s:")
        out += [
            f"  {r['provider']:34} {r['median_ms']:8.3f} {r['tflops']:7.1f}"
            + ("  <- default" if "default" in r["note"] else "")
            for r in scan
        ]
    small = [r for r in measured if r["suite"] == "small_ops"]
    if small:
        out.append("small ops us | GB/s:")
        out += [
            f"  {r['case']:16} {r['provider']:9} {r['median_ms'] * 1e3:10.1f} {r['gbps']:8.1f}"
            for r in small
        ]
    pipe = [r for r in measured if r["suite"] == "pipeline"]
    if pipe:
        out.append(f"per block [{pipe[0]['shape']} {pipe[0]['dtype']}]:")
        out += [
            f"  {r['provider']:15} {r['median_ms']:9.2f} ms  syncs {r['host_syncs']} "
            f"cuda_syncs {_f(r['cuda_syncs'], 'd')}  h2d {_f(r['h2d_bytes'] / 1e6, '.1f')} MB "
            f"d2h {_f(r['d2h_bytes'] / 1e6, '.1f')} MB  peak "
            f"{_f(r['peak_mem_bytes'] / 1e6 if r['peak_mem_bytes'] != '' else '', '.0f')} MB"
            for r in pipe
        ]
    scal = [r for r in measured if r["suite"] == "scaling"]
    if scal:
        out.append(f"scaling ms/block ours/reference_style [{scal[0]['shape']}]:")
        for axis in ("bank_entries", "local_frames", "top_k"):
            pts = {}
            for r in scal:
                if r["case"] == axis:
                    pts.setdefault(r["value"], {})[r["provider"]] = r["median_ms"]
            if pts:
                cells = [
                    f"{v}: {_f(p.get('ours'), '.1f')}/{_f(p.get('reference_style'), '.1f')}"
                    for v, p in pts.items()
                ]
                out.append(f"  {axis}: " + ", ".join(cells))
    model = [r for r in measured if r["suite"] == "model"]
    if model:
        out.append(
            f"cost of memory, whole model per block [{model[0]['shape']} {model[0]['dtype']}]:"
        )
        out += [
            f"  {r['provider']:16} {r['median_ms']:9.1f} ms  syncs {r['host_syncs']} "
            f"h2d {_f(r['h2d_bytes'] / 1e6, '.1f')} MB  peak "
            f"{_f(r['peak_mem_bytes'] / 1e6 if r['peak_mem_bytes'] != '' else '', '.0f')} MB"
            for r in model
        ]
    derived = [r for r in rows if r["kind"] == "derived"]
    if derived:
        out.append("derived:")
        out += [
            f"  {r['suite']}/{r['case']}: {r['provider']} = {r['value']:.3g}{r['unit']}"
            for r in derived
            if r["suite"] != "scaling"
        ]
    failed = [r for r in rows if r["kind"] == "failed"]
    if failed:
        out.append(f"failed ({len(failed)}):")
        out += [f"  {r['suite']}/{r['case']}/{r['provider']}: {r['note'][:150]}" for r in failed]
    skipped = {}
    for r in rows:
        if r["kind"] == "skipped":
            skipped.setdefault(r["note"], []).append(f"{r['case']}/{r['provider']}")
    for note, which in skipped.items():
        out.append(
            f"skipped ({note[:80]}): {', '.join(which[:8])}"
            + (f" +{len(which) - 8}" if len(which) > 8 else "")
        )
    files = sorted(p.name for p in run.out.iterdir() if p.is_file())
    out.append(f"files in {run.out}: {', '.join(files)}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # Before anything imports Triton: its interpreter runs the kernels on CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"
    budget = args.budget or (110.0 if args.dry_run else 480.0)
    from measure import check_writable

    try:  # before any work: an unwritable folder would lose the run
        check_writable(args.out)
    except OSError as err:
        print(f"gpu_suite.py: error: {err}", file=sys.stderr)
        return 2
    stages = tuple(s for s in args.stages if not (s == "tests" and args.skip_tests))
    run = Run(args.out, budget, stage_shares(stages))

    import torch

    from measure import Recorder, configure_cpu_threads
    from plans import plan_for

    if args.dry_run:
        device = torch.device("cpu")
        configure_cpu_threads(device)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        run.log("no CUDA device is visible: nothing to measure (use --dry-run on CPU)")
        run.stage("env", lambda: stage_env(run, torch.device("cpu"), False))
        print(compact_summary(run))
        return 2
    plan = plan_for(device, dry=args.dry_run)
    run.log(
        f"gpu_suite: plan {plan.name}, budget {budget:.0f} s, stages {','.join(stages)}, "
        f"out {args.out}"
    )
    steps = {
        "tests": (lambda: stage_tests(run, args.dry_run), 20),
        "attention": (lambda: stage_attention(run, plan, device, args.dry_run), 10),
        "small_ops": (lambda: stage_small_ops(run, plan, device, args.dry_run), 5),
        "pipeline": (lambda: stage_pipeline(run, plan, device), 10),
        "model": (lambda: stage_model(run, plan, device), 10),
    }

    # The hard deadline interrupts whatever runs when the final stage's reserve begins.
    signal.signal(signal.SIGALRM, _raise_deadline)
    signal.signal(signal.SIGTERM, _raise_deadline)
    signal.alarm(max(1, int(budget - run.final_reserve)))
    try:
        run.stage("env", lambda: stage_env(run, device, args.dry_run))
        if run.rec is None:  # keep the later stages usable without the env stage
            run.rec = Recorder({"device": device.type, "device_name": str(device)})
        for name in stages:
            fn, need_s = steps[name]
            run.stage(name, fn, need_s=need_s)
    except Deadline as err:  # between stages
        run.log(f"== {err}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if run.rec is not None:
            run.stage("final", lambda: stage_final(run))
        print(compact_summary(run), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
