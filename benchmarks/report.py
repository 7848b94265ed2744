"""Derived rows (ratios within one run), the markdown summary and the plot."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from measure import Recorder
from pipelines import PIPELINES
from small_ops import COPY_PROVIDER


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
            note = f"option beyond the paper, target {target} on a GPU"
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
    window = _median(rows, "model", "per_block", "window")
    for r in rows:
        if r["suite"] == "model" and r["kind"] == "measured" and window:
            add(
                "model",
                "per_block",
                f"{r['provider']} / window",
                r["median_ms"] / window,
                "x",
                "ms per block over the plain window's (the cost of memory)",
            )
    dysink = _median(rows, "model", "per_block", "dysink")
    ref = _median(rows, "model", "per_block", "reference_style")
    if dysink and ref:
        add(
            "model",
            "per_block",
            "dysink speed-up over reference_style",
            ref / dysink,
            "x",
            "reference_style time / dysink (>1: dysink faster)",
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
    model = [r for r in rows if r["suite"] == "model" and r["kind"] in ("measured", "skipped")]
    if model:
        out += [
            f"Cost of memory, one block of the whole model ({model[0]['shape']}, "
            f"{model[0]['dtype'] or '-'}):",
            "",
            "| case | median ms / block | min ms | / window | host syncs | H2D MB | peak MB "
            "| note |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        base = _median(model, "model", "per_block", "window")
        for r in model:
            if r["kind"] == "skipped":
                out.append(f"| {r['provider']} | - | - | - | - | - | - | skipped: {r['note']} |")
                continue
            ratio = f"{r['median_ms'] / base:.2f}" if base else "-"
            out.append(
                f"| {r['provider']} | {_num(r['median_ms'])} | {_num(r['min_ms'])} | {ratio} "
                f"| {_num(r['host_syncs'])} | {_mb(r['h2d_bytes'])} | {_mb(r['peak_mem_bytes'])} "
                f"| {r['note']} |"
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
    fig, axes = plt.subplots(3, 3, figsize=(17, 14))
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
    model = [r for r in rows if r["suite"] == "model"]
    _barh(
        axes[2, 0],
        [r["provider"] for r in model],
        [r["median_ms"] for r in model],
        "tab:red",
        "ms per block",
        "cost of memory: one block of the whole model",
    )
    peak = [r for r in model if r["peak_mem_bytes"] not in ("", None)]
    _barh(
        axes[2, 1],
        [r["provider"] for r in peak],
        [r["peak_mem_bytes"] / 1e9 for r in peak],
        "tab:purple",
        "peak GB",
        "whole model: peak device memory",
    )
    _barh(
        axes[2, 2],
        [r["provider"] for r in model],
        [r["host_syncs"] for r in model],
        "tab:gray",
        "host syncs per block",
        "whole model: host syncs",
    )
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
