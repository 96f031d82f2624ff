"""The build report's charts: matplotlib figures written as SVG text, the same bytes on every run.

Rules:
1. Determinism: a fixed ``svg.hashsalt``, text drawn as paths of matplotlib's own DejaVu Sans (no
   system font is looked up, and the page needs none), and no date or creator in the metadata.
2. Each SVG's ids get a prefix of their own, so several charts inlined in one page never share an id.
3. matplotlib is imported here only, when a chart is drawn: ``edgepack package`` does not pay for it
   unless a report is written. Figures are built with ``Figure`` directly, never pyplot (no GUI backend,
   no global figure list).
4. Errors of exactly 0 cannot sit on a log axis: they are drawn at ``ZERO_FLOOR`` and labelled "0".
"""

from __future__ import annotations

import io
import math
import re
from typing import TYPE_CHECKING, Any

from ..accuracy import ERROR_EDGES
from .collect import Bundle

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

__all__ = ["size_chart", "accuracy_chart", "histogram_chart", "coverage_chart", "tune_chart"]

ZERO_FLOOR = 1e-10
WIDTH = 10.4
"""Inches: about the page's column width at 96 dpi, so chart text is drawn near its size in points."""
INK = "#1f2933"
MUTED = "#7b8794"
GRID = "#e4e7eb"
RAW = "#2563eb"
GZIP = "#93c5fd"
GOOD = "#16a34a"
BAD = "#dc2626"
CPU = "#cbd2d9"
ACCENT = "#f59e0b"

_STYLE: dict[RcKeyType, Any] = {
    "svg.hashsalt": "edgepack",
    "svg.fonttype": "path",
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.edgecolor": MUTED,
    "axes.labelcolor": INK,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.titlepad": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.color": INK,
    "ytick.color": INK,
    "legend.frameon": False,
    "path.simplify": False,
}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(figure, prefix: str) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context(_STYLE):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]  # the XML declaration and DOCTYPE do not belong inside HTML
    ids = set(re.findall(r'\bid="([^"]+)"', text))
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', text)
    text = re.sub(
        r'(href="#|url\(#)([^")]+)',
        lambda m: m.group(1) + (f"{prefix}-{m.group(2)}" if m.group(2) in ids else m.group(2)),
        text,
    )
    return text


def _draw(width: float, height: float, prefix: str, draw, *args) -> str:
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        figure = _figure(width, height)
        draw(figure, *args)
        return _svg(figure, prefix)


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value / 1e3:.0f} KB"


def _labels(bundles: list[Bundle]) -> list[str]:
    return [b.label for b in bundles]


def size_chart(bundles: list[Bundle], prefix: str) -> str:
    return _draw(WIDTH, 0.5 * len(bundles) + 1.2, prefix, _size, bundles)


def _size(figure, bundles: list[Bundle]) -> None:
    ax = figure.subplots()
    labels = _labels(bundles)
    rows = range(len(bundles))
    has_gzip = any(b.gzip_bytes for b in bundles)
    height = 0.38 if has_gzip else 0.6
    raw = [b.total_bytes / 1e6 for b in bundles]
    ax.barh([y - (height / 2 if has_gzip else 0) for y in rows], raw, height=height, color=RAW, label="as shipped")
    if has_gzip:
        web = [(y, b.gzip_bytes / 1e6) for y, b in zip(rows, bundles) if b.gzip_bytes]
        ax.barh(
            [y + height / 2 for y, _ in web],
            [v for _, v in web],
            height=height,
            color=GZIP,
            label="gzip (web servers send this)",
        )
        for y, value in web:
            ax.text(value * 1.08, y + height / 2, _mb(value * 1e6), va="center", fontsize=9, color=INK)
    for y, b in zip(rows, bundles):
        ax.text(
            b.total_bytes / 1e6 * 1.08,
            y - (height / 2 if has_gzip else 0),
            _mb(b.total_bytes),
            va="center",
            fontsize=9,
            color=INK,
            fontweight="bold",
        )
    ax.set_xscale("log")
    ax.set_xlim(min(raw + [b.gzip_bytes / 1e6 for b in bundles if b.gzip_bytes]) / 2, max(raw) * 4)
    ax.set_yticks(list(rows), labels)
    ax.invert_yaxis()
    ax.set_xlabel("bundle size, MB (log scale)")
    ax.xaxis.set_major_formatter(_plain_number())
    ax.grid(axis="x", color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_title("Bundle size by target")
    ax.legend(loc="lower right", fontsize=9)


def _plain_number():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


def accuracy_chart(bundles: list[Bundle], prefix: str) -> str:
    return _draw(WIDTH, 0.42 * len(bundles) + 1.5, prefix, _accuracy, bundles)


def _floor(value: float) -> float:
    return max(value, ZERO_FLOOR)


def _accuracy(figure, bundles: list[Bundle]) -> None:
    ax = figure.subplots()
    labels = _labels(bundles)
    rows = list(range(len(bundles)))
    for y, b in zip(rows, bundles):
        test = b.self_test
        if "max_abs_error" not in test:
            continue
        high, mean = _floor(test["max_abs_error"]), _floor(test["mean_abs_error"])
        ax.plot([mean, high], [y, y], color=GRID, linewidth=6, solid_capstyle="round", zorder=1)
        ax.scatter([mean], [y], color=GZIP, edgecolor=RAW, s=55, zorder=3, label="mean |error|" if y == 0 else None)
        ax.scatter(
            [high],
            [y],
            color=RAW if test.get("passed") else BAD,
            s=70,
            zorder=3,
            label="max |error|" if y == 0 else None,
        )
        limit = b.tolerance.get("max_abs_error")
        if limit:
            ax.plot(
                [limit, limit],
                [y - 0.32, y + 0.32],
                color=BAD,
                linewidth=2,
                zorder=2,
                label="allowed max |error|"
                if not any(t.get_label() == "allowed max |error|" for t in ax.lines)
                else None,
            )
        ax.text(
            high * 1.6,
            y,
            f"{test['max_abs_error']:.2g}" if test["max_abs_error"] else "0",
            va="center",
            fontsize=9,
            color=INK,
        )
    ax.set_xscale("log")
    lowest = min([_floor(b.self_test.get("mean_abs_error", 1)) for b in bundles] + [1e-6])
    ax.set_xlim(lowest / 5, 10)
    ax.set_yticks(rows, labels)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("absolute difference from the FP32 model's outputs (log scale)")
    ax.grid(axis="x", color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_title("Output error against the FP32 model, per target")
    figure.legend(loc="outside lower center", fontsize=9, ncols=3)


def histogram_chart(bundles: list[Bundle], output: str, prefix: str) -> str:
    return _draw(WIDTH, 0.36 * len(bundles) + 1.5, prefix, _histogram, bundles, output)


def _bin_labels() -> list[str]:
    def short(v: float) -> str:
        return "0" if v == 0 else ("1" if v == 1 else f"1e{round(math.log10(v))}")

    labels = [f"{short(a)}–{short(b)}" for a, b in zip(ERROR_EDGES, ERROR_EDGES[1:])]
    return labels + [f"≥ {short(ERROR_EDGES[-1])}"]


def _histogram(figure, bundles: list[Bundle], output: str) -> None:
    import numpy as np

    ax = figure.subplots()
    shown = [
        b
        for b in bundles
        if output in b.self_test.get("outputs", {}) and "abs_error_histogram" in b.self_test["outputs"][output]
    ]
    labels = _labels(shown)
    shares = []
    for b in shown:
        counts = np.asarray(b.self_test["outputs"][output]["abs_error_histogram"]["counts"], dtype=float)
        shares.append(counts / counts.sum() if counts.sum() else counts)
    grid = np.asarray(shares)
    # pcolormesh, not imshow: imshow becomes an embedded PNG in SVG, the mesh stays vector
    ax.pcolormesh(
        np.arange(grid.shape[1] + 1) - 0.5,
        np.arange(grid.shape[0] + 1) - 0.5,
        grid,
        cmap="Blues",
        vmin=0,
        vmax=1,
        edgecolors="white",
        linewidth=1.5,
    )
    ax.set_ylim(grid.shape[0] - 0.5, -0.5)
    for (row, col), share in np.ndenumerate(grid):
        if share > 0:
            text = f"{share:.0%}" if share >= 0.01 else "<1%"
            ax.text(col, row, text, ha="center", va="center", fontsize=8.5, color="white" if share > 0.55 else INK)
    ax.set_xticks(range(len(ERROR_EDGES)), _bin_labels(), fontsize=8.5)
    ax.set_yticks(range(len(shown)), labels)
    ax.set_xlabel("absolute difference from the FP32 output, per value")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"Error distribution of output '{output}': share of values in each range")


def coverage_chart(bundles: list[Bundle], prefix: str) -> str:
    rows = sum(2 if b.stage("coverage").get("shapes_fixed") else 1 for b in bundles)
    return _draw(WIDTH, 0.4 * rows + 1.5, prefix, _coverage, bundles)


def _coverage(figure, bundles: list[Bundle]) -> None:
    ax = figure.subplots()
    labels, accelerated, notes = [], [], []
    for label, b in zip(_labels(bundles), bundles):
        report = b.stage("coverage")
        phases = (
            [("before fixing shapes", report["before"]), ("as shipped", report["after"])]
            if report.get("shapes_fixed")
            else [("as shipped", report["after"])]
        )
        for phase, figures in phases:
            labels.append(f"{label} ({report['checker']}), {phase}")
            accelerated.append(100 * figures["accelerated_fraction"])
            partitions = figures["partitions"]
            notes.append(
                f"{figures['supported_nodes']}/{figures['nodes']} nodes, {partitions} partition"
                f"{'' if partitions == 1 else 's'}{' (estimated)' if figures.get('partitions_estimated') else ''}"
            )
    rows = list(range(len(labels)))
    ax.barh(rows, accelerated, color=GOOD, height=0.6, label="on the accelerator")
    ax.barh(rows, [100 - a for a in accelerated], left=accelerated, color=CPU, height=0.6, label="left to the CPU")
    for y, note in zip(rows, notes):
        ax.text(101.5, y, note, va="center", fontsize=9, color=INK)
    gates = {b.stage("coverage")["gate"]["min_accelerated_fraction"] for b in bundles}
    for gate in sorted(gates):
        ax.axvline(100 * gate, color=BAD, linestyle="--", linewidth=1.2)
        ax.text(100 * gate, -0.75, f"gate {gate:.0%}", color=BAD, fontsize=8.5, ha="center")
    ax.set_xlim(0, 100)
    ax.set_yticks(rows, labels)
    ax.set_ylim(len(rows) - 0.5, -1.0)
    ax.set_xlabel("share of the graph's nodes, %")
    ax.set_title("Accelerator coverage")
    figure.legend(loc="outside lower center", ncols=2, fontsize=9)
    ax.spines["left"].set_visible(False)
    ax.tick_params(axis="y", length=0)


def tune_chart(bundle: Bundle, prefix: str) -> str:
    return _draw(WIDTH, 3.8, prefix, _tune, bundle)


def _tune(figure, bundle: Bundle) -> None:
    from matplotlib.lines import Line2D

    from ..recipes.base import TIE

    data: dict[str, Any] = bundle.stage("quantize")["tune"]
    candidates = data["candidates"]
    palette = ["#2563eb", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#ea580c", "#475569"]
    colors = {c["name"]: palette[i % len(palette)] for i, c in enumerate(candidates)}
    timed = [c for c in candidates if "median_ms" in c]
    speed, gate = figure.subplots(1, 2, width_ratios=[5, 4])
    handles = []
    for c in timed:
        won = c["name"] == data["winner"]
        speed.errorbar(
            [c["bytes"] / 1e6],
            [c["median_ms"]],
            yerr=[[0], [c["p90_ms"] - c["median_ms"]]],
            fmt="*" if won else "o",
            markersize=17 if won else 8,
            color=colors[c["name"]],
            markeredgecolor=INK if won else colors[c["name"]],
            ecolor=colors[c["name"]],
            elinewidth=1,
            capsize=3,
            alpha=0.95,
            zorder=4 if won else 3,
        )
        handles.append(
            Line2D(
                [],
                [],
                marker="*" if won else "o",
                markersize=12 if won else 7,
                linestyle="",
                color=colors[c["name"]],
                markeredgecolor=INK if won else colors[c["name"]],
                label=f"{c['name']} (shipped)" if won else c["name"],
            )
        )
    if timed:
        fastest = min(c["median_ms"] for c in timed)
        speed.axhline(fastest * (1 + TIE), color=MUTED, linestyle="--", linewidth=1)
        handles.append(Line2D([], [], color=MUTED, linestyle="--", label=f"fastest + {TIE:.0%}: ties, smallest ships"))
        sizes = [c["bytes"] / 1e6 for c in timed]
        spread = max(sizes) - min(sizes) or max(sizes)
        speed.set_xlim(min(sizes) - 0.15 * spread, max(sizes) + 0.15 * spread)
        speed.set_ylim(0, max(c["p90_ms"] for c in timed) * 1.15)
        speed.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8.5)
    speed.set_xlabel("size as shipped, MB")
    speed.set_ylabel("latency, ms (dot: median, bar: to p90)")
    speed.grid(color=GRID, linewidth=0.8)
    speed.set_axisbelow(True)
    speed.set_title("Latency against size")

    rows = list(range(len(candidates)))
    profile = bundle.manifest["profile"]
    for y, c in zip(rows, candidates):
        if "accuracy" in c:
            miss = _floor(1 - c["accuracy"]["cosine"])
            gate.barh([y], [miss], left=ZERO_FLOOR, height=0.6, color=GOOD if c["gate"] == "passed" else BAD)
            gate.text(
                max(miss, ZERO_FLOOR * 10) * 1.5,
                y,
                f"{c['accuracy']['cosine']:.6f}",
                va="center",
                fontsize=8,
                color=INK,
            )
        # FP32 is held to the profile's accuracy, the others to quantization.tolerance (tune rule 3)
        required = (profile["accuracy"] if c["precision"] == "fp32" else profile["quantization"]["tolerance"])[
            "min_cosine"
        ]
        gate.plot(
            [1 - required] * 2,
            [y - 0.4, y + 0.4],
            color=BAD,
            linewidth=2,
            label="least cosine allowed (gate)" if y == 0 else None,
        )
    gate.set_xscale("log")
    gate.set_xlim(ZERO_FLOOR * 10, 1)
    gate.set_yticks(rows, [c["name"] for c in candidates])
    gate.set_ylim(len(rows) - 0.5, -1.2)
    gate.set_xlabel("1 − cosine vs FP32 (log; left is better)")
    gate.set_title("Accuracy gate (label: cosine)")
    gate.legend(loc="upper right", fontsize=8)
    figure.suptitle(
        f"--tune on {bundle.label}: {len(candidates)} candidates, {data['winner']} shipped",
        x=0.01,
        ha="left",
        fontsize=12,
        fontweight="bold",
    )
