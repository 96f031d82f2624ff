"""The build report as text: ``report.html`` (one self-contained page, charts inline) and ``report.md``.

Rules:
1. The page loads nothing: styles and SVG charts are inline, and its Content-Security-Policy forbids
   every fetch, so it reads the same offline, from a file, or attached to a ticket.
2. Every value taken from a manifest is escaped: a manifest is data, never markup.
3. The summary table comes first; notices and fallbacks come right after it, highlighted.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from . import charts
from .collect import Bundle

__all__ = ["render_html", "render_markdown"]

STYLE = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --good:#15803d; --bad:#b91c1c; --warn:#92400e; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 24px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 18px 0 8px; }
.lead { color: var(--muted); margin: 0 0 20px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px; margin: 0 0 18px; }
nav { margin: 0 0 18px; font-size: 14px; }
nav a { color: #1d4ed8; margin-right: 14px; text-decoration: none; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
th, td { text-align: left; padding: 6px 9px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.scroll { overflow-x: auto; }
table.summary td { white-space: nowrap; }
table.summary td.wrap { white-space: normal; min-width: 140px; }
table.narrow { width: auto; min-width: 40%; }
small { color: var(--muted); }
.ok { color: var(--good); font-weight: 600; }
.bad { color: var(--bad); font-weight: 600; }
.warn { color: var(--warn); font-weight: 600; }
.badge { display: inline-block; min-width: 22px; padding: 0 7px; border-radius: 11px; text-align: center; font-size: 12.5px; font-weight: 600; }
.badge.warn { background: #fef3c7; color: var(--warn); }
.badge.none { background: var(--bg); color: var(--muted); }
.notice { border-left: 4px solid #f59e0b; background: #fffbeb; padding: 8px 12px; margin: 8px 0; border-radius: 0 6px 6px 0; }
.notice b { color: var(--warn); }
.broken { border-left-color: var(--bad); background: #fef2f2; }
figure { margin: 6px 0 14px; }
figure svg { width: 100%; height: auto; display: block; }
code { font: 12.5px ui-monospace, "DejaVu Sans Mono", monospace; background: var(--bg); padding: 1px 4px; border-radius: 4px; }
footer { color: var(--muted); font-size: 13px; text-align: center; }
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'"
SIGNATURE_CLASS = {"unsigned": "warn", "signed": "ok", "verified": "ok", "invalid": "bad"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:.2f} MB"


def _err(value: float | None) -> str:
    return "" if value is None else ("0" if value == 0 else f"{value:.3g}")


def _cos(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _coverage_cell(b: Bundle) -> str:
    report = b.stage("coverage")
    if report.get("checker", "none") == "none" or "after" not in report:
        return "CPU only"
    after = report["after"]
    partitions = after["partitions"]
    return f"{after['accelerated_fraction']:.0%} {report['checker']}, {partitions} partition{'' if partitions == 1 else 's'}"


def _integrity_cell(b: Bundle) -> tuple[str, bool]:
    found = b.integrity
    if found.get("ok"):
        return f"ok, {found['checked']} files", True
    problems = [f"{len(found[k])} {k}" for k in ("missing", "extra", "changed") if found.get(k)]
    return ", ".join(problems) or "not checked", False


def _summary_rows(bundles: list[Bundle]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for b in bundles:
        if b.error:
            rows.append({"bundle": b.folder, "error": b.error})
            continue
        test = b.self_test
        integrity, intact = _integrity_cell(b)
        model = b.manifest["model"]
        rows.append(
            {
                "bundle": b.label,
                "kind": b.kind,
                "model": f"{model['precision']} · {model['format']}{' ' + model['ort_style'] if model.get('ort_style') else ''}",
                "recipe": b.recipe,
                "size": _mb(b.total_bytes),
                "gzip": _mb(b.gzip_bytes),
                "cosine": _cos(test.get("cosine")),
                "max_err": _err(test.get("max_abs_error")),
                "top1": _pct(test.get("top1_agreement")),
                "coverage": _coverage_cell(b),
                "self_test": "passed" if test.get("passed") else "FAILED",
                "passed": bool(test.get("passed")),
                "integrity": integrity,
                "intact": intact,
                "signature": b.signature,
                "notices": len(b.notices),
            }
        )
    return rows


SUMMARY_COLUMNS = [
    ("bundle", "Target", ""),
    ("kind", "Kind", ""),
    ("model", "Model", ""),
    ("recipe", "Recipe", ""),
    ("size", "Size", "num"),
    ("gzip", "gzip", "num"),
    ("cosine", "Cosine", "num"),
    ("max_err", "Max |err|", "num"),
    ("top1", "Top-1", "num"),
    ("coverage", "Accelerator", ""),
    ("self_test", "Self-test", ""),
    ("integrity", "Checksums", ""),
    ("signature", "Signature", ""),
    ("notices", "Notices", "num"),
]


# --- HTML ------------------------------------------------------------------------------------


def render_html(bundles: list[Bundle]) -> str:
    good = [b for b in bundles if not b.error]
    counter = iter(range(1, 1000))

    def chart(draw: Callable[..., str], *args) -> str:
        return f"<figure>{draw(*args, f'c{next(counter)}')}</figure>"

    models = sorted({b.model_name for b in good})
    title = f"edgepack build report: {', '.join(models) or 'no bundle'}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="lead">{len(bundles)} bundle(s) in this folder, compared from their manifests'
        f"{_e(_source_line(good))}. Sizes in MB of 10<sup>6</sup> bytes; errors are absolute differences from "
        "the FP32 model's outputs, measured by each bundle's self-test.</p>",
        _nav(good),
        _summary_html(bundles),
        _notices_html(bundles),
    ]
    if good:
        parts.append(_section("size", "Size", chart(charts.size_chart, good) + _size_table(good)))
        parts.append(
            _section(
                "accuracy",
                "Accuracy against FP32",
                chart(charts.accuracy_chart, good) + _accuracy_table(good) + _histograms_html(good, chart),
            )
        )
        covered = [
            b for b in good if b.stage("coverage").get("checker", "none") != "none" and "after" in b.stage("coverage")
        ]
        if covered:
            parts.append(
                _section(
                    "coverage", "Accelerator coverage", chart(charts.coverage_chart, covered) + _coverage_table(covered)
                )
            )
        parts.append(_section("tune", "Choosing the recipe (--tune)", _tune_html(good, chart)))
        parts.append(_section("integrity", "Checksums and signatures", _integrity_table(bundles)))
        parts.append(_section("tools", "Tool versions", _tools_table(good)))
    parts.append("<footer>Written by <code>edgepack report</code>; the same bundles give the same bytes.</footer>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _source_line(bundles: list[Bundle]) -> str:
    sources = sorted({(b.model_name, b.manifest["model"]["source"]["sha256"][:12]) for b in bundles})
    return "".join(f" ({name}, sha256 {digest}…)" for name, digest in sources)


def _nav(bundles: list[Bundle]) -> str:
    links = [
        ("summary", "Summary"),
        ("notices", "Notices"),
        ("size", "Size"),
        ("accuracy", "Accuracy"),
        ("coverage", "Coverage"),
        ("tune", "--tune"),
        ("integrity", "Checksums"),
        ("tools", "Tools"),
    ]
    if not any(b.stage("coverage").get("checker", "none") != "none" for b in bundles):
        links.remove(("coverage", "Coverage"))
    return "<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in links) + "</nav>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _table(head: list[tuple[str, str]], rows: list[list[str]], css: str = "") -> str:
    """``head``: (title, css class); cells are HTML already escaped."""
    out = [f'<div class="scroll"><table class="{css}"><thead><tr>']
    out += [f'<th class="{cls}">{_e(title)}</th>' for title, cls in head]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="{cls}">{cell}</td>' for (_, cls), cell in zip(head, row)) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _summary_html(bundles: list[Bundle]) -> str:
    """The summary, narrower than the Markdown one: kind under the target, gzip under the size."""
    head = [
        ("Target", ""),
        ("Precision · recipe", ""),
        ("Size", "num"),
        ("Cosine", "num"),
        ("Max |err|", "num"),
        ("Top-1", "num"),
        ("Self-test", ""),
        ("Accelerator", "wrap"),
        ("Integrity", ""),
        ("Notices", "num"),
    ]
    rows = []
    for row in _summary_rows(bundles):
        if "error" in row:
            rows.append(
                [f"<b>{_e(row['bundle'])}</b>", f'<span class="bad">unreadable: {_e(row["error"])}</span>']
                + [""] * (len(head) - 2)
            )
            continue
        precision = row["model"].split(" · ")[0]
        gzip = f"<br><small>gzip {_e(row['gzip'])}</small>" if row["gzip"] else ""
        signature = SIGNATURE_CLASS[row["signature"]]
        rows.append(
            [
                f"<b>{_e(row['bundle'])}</b><br><small>{_e(row['kind'])} · {_e(row['model'].split(' · ', 1)[1])}</small>",
                _e(precision if row["recipe"] in (precision, "none") else f"{precision} · {row['recipe']}"),
                f"<b>{_e(row['size'])}</b>{gzip}",
                _e(row["cosine"]),
                _e(row["max_err"]),
                _e(row["top1"]),
                f'<span class="{"ok" if row["passed"] else "bad"}">{_e(row["self_test"])}</span>',
                _e(row["coverage"]),
                f'<span class="{"ok" if row["intact"] else "bad"}">{_e(row["integrity"])}</span>'
                f'<br><span class="{signature}">{_e(row["signature"])}</span>',
                f'<span class="badge {"warn" if row["notices"] else "none"}">{row["notices"]}</span>',
            ]
        )
    return _section("summary", "Summary", _table(head, rows, "summary"))


def _notices_html(bundles: list[Bundle]) -> str:
    items = []
    for b in bundles:
        if b.error:
            items.append(f'<div class="notice broken"><b>{_e(b.folder)}</b>: manifest unreadable: {_e(b.error)}</div>')
            continue
        if not b.integrity.get("ok", True):
            text, _ = _integrity_cell(b)
            items.append(
                f'<div class="notice broken"><b>{_e(b.label)}</b>: files do not match the manifest: {_e(text)}</div>'
            )
        if b.signature == "invalid":
            items.append(f'<div class="notice broken"><b>{_e(b.label)}</b>: {_e(b.signature_detail)}</div>')
        for stage, text in b.notices:
            items.append(f'<div class="notice"><b>{_e(b.label)}</b> · {_e(stage)}: {_e(text)}</div>')
    body = "".join(items) if items else "<p>No notice: every bundle used its profile's defaults as they are.</p>"
    return _section("notices", "Notices and fallbacks", body)


def _size_table(bundles: list[Bundle]) -> str:
    head = [
        ("Target", ""),
        ("Model file", "num"),
        ("Runtime shipped", "num"),
        ("Loader, docs, configs", "num"),
        ("Total", "num"),
        ("gzip", "num"),
        ("Budget", "num"),
        ("Files", "num"),
    ]
    rows = []
    for b in bundles:
        sizes = b.sizes
        budget = b.manifest["profile"].get("budget", {}).get("max_bundle_mb")
        rows.append(
            [
                _e(b.label),
                _mb(sizes["model"]),
                _mb(sizes["runtime"]) if sizes["runtime"] else "",
                _mb(sizes["other"]),
                f"<b>{_mb(b.total_bytes)}</b>",
                _mb(b.gzip_bytes),
                f"{budget:g} MB" if budget else "",
                str(len(b.manifest.get("files", {}))),
            ]
        )
    return _table(head, rows)


def _accuracy_table(bundles: list[Bundle]) -> str:
    head = [
        ("Target", ""),
        ("Precision", ""),
        ("Cosine", "num"),
        ("Max |err|", "num"),
        ("Mean |err|", "num"),
        ("Top-1", "num"),
        ("Held to", ""),
        ("Inputs", ""),
        ("Result", ""),
    ]
    rows = []
    for b in bundles:
        test, tol = b.self_test, b.tolerance
        limits = [f"cosine ≥ {tol['min_cosine']:g}"] if tol.get("min_cosine") is not None else []
        if tol.get("max_abs_error") is not None:
            limits.append(f"max |err| ≤ {tol['max_abs_error']:g}")
        if tol.get("min_top1_agreement") is not None:
            limits.append(f"top-1 ≥ {tol['min_top1_agreement']:.0%}")
        rows.append(
            [
                _e(b.label),
                _e(b.manifest["model"]["precision"]),
                _cos(test.get("cosine")),
                _err(test.get("max_abs_error")),
                _err(test.get("mean_abs_error")),
                _pct(test.get("top1_agreement")),
                _e(", ".join(limits)),
                _e(f"{test.get('sample_sets', '?')} {test.get('inputs', '')} set(s)"),
                f'<span class="{"ok" if test.get("passed") else "bad"}">{"passed" if test.get("passed") else "FAILED"}</span>',
            ]
        )
    return _table(head, rows)


def _outputs(bundles: list[Bundle]) -> list[str]:
    names: list[str] = []
    for b in bundles:
        for name, figures in b.self_test.get("outputs", {}).items():
            if "abs_error_histogram" in figures and name not in names:
                names.append(name)
    return names


def _histograms_html(bundles: list[Bundle], chart) -> str:
    names = _outputs(bundles)
    if not names:
        return "<p>No error histogram: these bundles were written before the self-test recorded one.</p>"
    return "<h3>Per-output error distribution</h3>" + "".join(
        chart(charts.histogram_chart, bundles, name) for name in names
    )


def _coverage_table(bundles: list[Bundle]) -> str:
    head = [
        ("Target", ""),
        ("Checker", ""),
        ("Before fixing shapes", ""),
        ("As shipped", ""),
        ("Unsupported ops", ""),
        ("Gate", ""),
    ]
    rows = []
    for b in bundles:
        r = b.stage("coverage")
        before, after = r["before"], r["after"]
        unsupported = ", ".join(f"{op} ×{n}" for op, n in sorted(after.get("unsupported_ops", {}).items())) or "none"
        gate = f"≥ {r['gate']['min_accelerated_fraction']:.0%} of nodes"
        if r["gate"].get("max_partitions") is not None:
            gate += f", ≤ {r['gate']['max_partitions']} partition(s)"
        rows.append(
            [
                _e(b.label),
                _e(r["checker"]),
                _e(_coverage_text(before)),
                _e(_coverage_text(after)),
                _e(unsupported),
                _e(gate),
            ]
        )
    return _table(head, rows)


def _coverage_text(figures: dict[str, Any]) -> str:
    text = (
        f"{figures['supported_nodes']}/{figures['nodes']} nodes ({figures['accelerated_fraction']:.0%}), "
        f"{figures['partitions']} partition(s)"
    )
    if figures.get("dynamic_shape_nodes"):
        text += f", {figures['dynamic_shape_nodes']} held back by dynamic or unknown shapes"
    return text


def _tune_html(bundles: list[Bundle], chart) -> str:
    tuned = [b for b in bundles if b.stage("quantize").get("tune", {}).get("timed")]
    untimed = [b for b in bundles if "tune" in b.stage("quantize") and not b.stage("quantize")["tune"].get("timed")]
    if not tuned and not untimed:
        return "<p>Not used in this build: each bundle has its profile's default recipe (<code>--tune</code> chooses by measurement).</p>"
    parts = []
    for b in tuned:
        data = b.stage("quantize")["tune"]
        parts.append(chart(charts.tune_chart, b))
        head = [
            ("Candidate", ""),
            ("Recipe", ""),
            ("Size", "num"),
            ("Median", "num"),
            ("p90", "num"),
            ("Runs", "num"),
            ("Cosine", "num"),
            ("Gate", ""),
            ("Note", ""),
        ]
        rows = []
        for c in data["candidates"]:
            won = c["name"] == data["winner"]
            gate = c["gate"] + (": " + "; ".join(c["gate_misses"]) if c.get("gate_misses") else "")
            rows.append(
                [
                    f"<b>{_e(c['name'])} (shipped)</b>" if won else _e(c["name"]),
                    _e(c["recipe"]),
                    _mb(c["bytes"]),
                    f"{c['median_ms']:.3f} ms" if "median_ms" in c else "",
                    f"{c['p90_ms']:.3f} ms" if "p90_ms" in c else "",
                    str(c.get("runs", "")),
                    _cos(c.get("accuracy", {}).get("cosine")),
                    f'<span class="{"ok" if c["gate"] == "passed" else "bad"}">{_e(gate)}</span>',
                    _e(c.get("note", "")),
                ]
            )
        parts.append(_table(head, rows))
        parts.append(
            f"<p><b>Why:</b> {_e(data['why'])}. Timed on this {_e(data['host_arch'])} host "
            f"({_e(data['threads'])} thread(s)); {_e(data['timing'])}.</p>"
        )
    if untimed:
        parts.append(
            f"<p><b>Not timed</b> (their CPU is not this machine's, so each kept its profile's default recipe; "
            f"the reasons are under Notices): {_e(', '.join(b.label for b in untimed))}.</p>"
        )
    return "".join(parts)


def _integrity_table(bundles: list[Bundle]) -> str:
    head = [("Bundle folder", ""), ("Files", "num"), ("Checksums", ""), ("Manifest sha256", ""), ("Signature", "")]
    rows = []
    for b in bundles:
        if b.error:
            rows.append([_e(b.folder), "", f'<span class="bad">{_e(b.error)}</span>', "", ""])
            continue
        text, intact = _integrity_cell(b)
        rows.append(
            [
                _e(b.folder),
                str(len(b.manifest.get("files", {}))),
                f'<span class="{"ok" if intact else "bad"}">{_e(text)}</span>',
                f"<code>{_e(str(b.manifest.get('manifest_sha256', ''))[:16])}…</code>",
                f'<span class="{SIGNATURE_CLASS[b.signature]}">{_e(b.signature_detail)}</span>',
            ]
        )
    return (
        _table(head, rows)
        + "<p>Checksums are recomputed now against each manifest (<code>edgepack verify</code> does the same).</p>"
    )


def _tools_table(bundles: list[Bundle]) -> str:
    versions = {b.label: b.manifest.get("tools", {}) for b in bundles}
    tools = sorted({tool for v in versions.values() for tool in v})
    distinct = {tuple(sorted(v.items())) for v in versions.values()}
    if len(distinct) == 1:
        only = next(iter(versions.values()))
        packaging = "<h3>Packaging host (the same for every bundle)</h3>" + _table(
            [("Tool", ""), ("Version", "")], [[_e(t), _e(only[t])] for t in tools], "narrow"
        )
    else:
        head = [("Tool", "")] + [(target, "") for target in versions]
        packaging = "<h3>Packaging host</h3>" + _table(
            head, [[_e(t)] + [_e(v.get(t, "")) for v in versions.values()] for t in tools]
        )
    rows = []
    for b in bundles:
        runtime = b.manifest.get("runtime", {})
        providers = ", ".join(ep["name"] for ep in runtime.get("execution_providers", []))
        tested = b.self_test.get("onnxruntime", "")
        rows.append(
            [_e(b.label), _e(f"{runtime.get('package', '')} {runtime.get('version', '')}"), _e(providers), _e(tested)]
        )
    device = "<h3>Device runtime</h3>" + _table(
        [
            ("Target", ""),
            ("Runtime the bundle needs", ""),
            ("Execution providers, in order", ""),
            ("Self-tested with onnxruntime", ""),
        ],
        rows,
    )
    return packaging + device


# --- Markdown --------------------------------------------------------------------------------


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(_md_cell(h) for h in head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows],
        "",
    ]


def render_markdown(bundles: list[Bundle]) -> str:
    good = [b for b in bundles if not b.error]
    models = sorted({b.model_name for b in good})
    lines = [
        f"# edgepack build report: {', '.join(models) or 'no bundle'}",
        "",
        f"{len(bundles)} bundle(s) in this folder{_source_line(good)}. Charts are in report.html.",
        "",
        "## Summary",
        "",
    ]
    rows = []
    for row in _summary_rows(bundles):
        if "error" in row:
            rows.append([row["bundle"], f"unreadable: {row['error']}"] + [""] * (len(SUMMARY_COLUMNS) - 2))
        else:
            rows.append([row[key] for key, _, _ in SUMMARY_COLUMNS])
    lines += _md_table([title for _, title, _ in SUMMARY_COLUMNS], rows)
    notices = [f"- **{b.label}** ({stage}): {text}" for b in good for stage, text in b.notices]
    notices += [f"- **{b.folder}**: manifest unreadable: {b.error}" for b in bundles if b.error]
    notices += [
        f"- **{b.label}**: files do not match the manifest: {_integrity_cell(b)[0]}"
        for b in good
        if not b.integrity.get("ok", True)
    ]
    notices += [f"- **{b.label}**: {b.signature_detail}" for b in good if b.signature == "invalid"]
    lines += ["## Notices and fallbacks", "", *(notices or ["None."]), ""]
    if not good:
        return "\n".join(lines)
    lines += ["## Size", ""]
    lines += _md_table(
        ["Target", "Model file", "Runtime shipped", "Other", "Total", "gzip"],
        [
            [
                b.label,
                _mb(b.sizes["model"]),
                _mb(b.sizes["runtime"]) if b.sizes["runtime"] else "",
                _mb(b.sizes["other"]),
                _mb(b.total_bytes),
                _mb(b.gzip_bytes),
            ]
            for b in good
        ],
    )
    lines += ["## Accuracy against FP32", ""]
    lines += _md_table(
        ["Target", "Precision", "Cosine", "Max abs error", "Mean abs error", "Top-1", "Self-test"],
        [
            [
                b.label,
                b.manifest["model"]["precision"],
                _cos(b.self_test.get("cosine")),
                _err(b.self_test.get("max_abs_error")),
                _err(b.self_test.get("mean_abs_error")),
                _pct(b.self_test.get("top1_agreement")),
                "passed" if b.self_test.get("passed") else "FAILED",
            ]
            for b in good
        ],
    )
    covered = [
        b for b in good if b.stage("coverage").get("checker", "none") != "none" and "after" in b.stage("coverage")
    ]
    if covered:
        lines += ["## Accelerator coverage", ""]
        lines += _md_table(
            ["Target", "Checker", "Before fixing shapes", "As shipped", "Unsupported ops"],
            [
                [
                    b.label,
                    b.stage("coverage")["checker"],
                    _coverage_text(b.stage("coverage")["before"]),
                    _coverage_text(b.stage("coverage")["after"]),
                    ", ".join(
                        f"{op} x{n}"
                        for op, n in sorted(b.stage("coverage")["after"].get("unsupported_ops", {}).items())
                    )
                    or "none",
                ]
                for b in covered
            ],
        )
    for b in good:
        data = b.stage("quantize").get("tune", {})
        if data.get("timed"):
            lines += [f"## --tune on {b.label}", "", f"{data['winner']} shipped. Why: {data['why']}.", ""]
            lines += _md_table(
                ["Candidate", "Size", "Median ms", "p90 ms", "Cosine", "Gate"],
                [
                    [
                        c["name"],
                        _mb(c["bytes"]),
                        c.get("median_ms", ""),
                        c.get("p90_ms", ""),
                        _cos(c.get("accuracy", {}).get("cosine")),
                        c["gate"],
                    ]
                    for c in data["candidates"]
                ],
            )
    lines += ["## Checksums and signatures", ""]
    lines += _md_table(
        ["Bundle folder", "Checksums", "Signature"],
        [[b.folder, b.error or _integrity_cell(b)[0], "" if b.error else b.signature_detail] for b in bundles],
    )
    lines += ["## Tool versions", ""]
    tools = sorted({t for b in good for t in b.manifest.get("tools", {})})
    if len({tuple(sorted(b.manifest.get("tools", {}).items())) for b in good}) == 1:
        lines += ["The same for every bundle.", ""]
        lines += _md_table(["Tool", "Version"], [[t, good[0].manifest["tools"][t]] for t in tools])
    else:
        lines += _md_table(
            ["Tool", *[b.label for b in good]],
            [[t, *[b.manifest.get("tools", {}).get(t, "") for b in good]] for t in tools],
        )
    return "\n".join(lines)
