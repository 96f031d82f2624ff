"""One model on one target, as a user would run it: ``edgepack package`` in a subprocess, then the bundle
through its shim, compared with plain onnxruntime. Shared by ``benchmarks/corpus.py`` and
``tests/test_corpus.py``; it uses edgepack only through its command line.

A pair is one of: ok; refused (edgepack's exit code and the first line of its message); crash (exit 1
"internal error", a traceback, a signal, or a timeout); broken (the bundle was built but its outputs disagree
with plain onnxruntime on the same inputs: float outputs by cosine below the profile's gate,
``accuracy.min_cosine`` for an FP32 bundle and ``quantization.tolerance.min_cosine`` for a quantized one;
other outputs exactly). For targets whose profile needs fixed shapes, ``--input-shape`` fixes every input
that has a dynamic dim to its reference shape (what the app would do). edgepack runs in an empty working
directory; files left there are listed in the record as ``stray_files``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.support import corpus

REPO = Path(__file__).resolve().parents[2]
EDGEPACK = [sys.executable, "-m", "edgepack"]
STATUSES = ("ok", "refused", "crash", "broken")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A fetched model with its reference inputs (also pickled for the shim's process) and outputs."""

    model: corpus.Model
    path: Path
    inputs: dict
    inputs_file: Path
    samples_file: Path | None  # the same inputs as an .npz for --sample-inputs; None when one is not a tensor
    reference: dict


def prepare(model: corpus.Model, workdir: Path) -> Prepared:
    """Fetch ``model`` and run it in plain onnxruntime on its reference inputs (raises when it cannot)."""
    path = corpus.model_path(model)
    inputs = corpus.reference_inputs(model)
    names, values = run_reference(path, inputs)
    inputs_file = workdir / "inputs.pkl"
    with open(inputs_file, "wb") as f:
        pickle.dump(inputs, f)
    samples_file = None
    if all(isinstance(v, np.ndarray) for v in inputs.values()):
        samples_file = workdir / "inputs.npz"
        np.savez(samples_file, **inputs)
    return Prepared(model, path, inputs, inputs_file, samples_file, dict(zip(names, values)))


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
        return (
            None
            if np.array_equal(reference, got)
            else f"{int((reference != got).sum())} of {reference.size} values differ"
        )
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


def package_pair(
    prepared: Prepared, profile: dict, workdir: Path, timeout: float = 600, sample_inputs: bool = False
) -> dict:
    """``edgepack package`` of the prepared model for one target profile (as ``edgepack targets --json`` gives
    it), classified; bundles go under ``workdir/<target>``. ``sample_inputs``: also give edgepack the
    reference inputs with ``--sample-inputs`` (when they are all tensors), as a user with real data would."""
    model, path, inputs = prepared.model, prepared.path, prepared.inputs
    target = profile["name"]
    out = workdir / target
    cmd = [*EDGEPACK, "package", str(path), "--target", target, "-o", str(out), "--json", "-q"]
    if profile["shapes"]["fixed"]:
        cmd += fixed_shape_args(path, inputs)
    if sample_inputs and prepared.samples_file is not None:
        cmd += ["--sample-inputs", str(prepared.samples_file)]
    record = {"model": model.id, "target": target, "args": cmd[cmd.index("--target") :]}
    # An empty working directory of its own: whatever edgepack (or a tool it calls) leaves there is reported.
    cwd = workdir / f"{target}.cwd"
    cwd.mkdir()
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return record | {"status": "crash", "why": f"timeout after {timeout:.0f} s", "seconds": timeout}
    record["seconds"] = round(time.perf_counter() - started, 1)
    stray = sorted(p.name for p in cwd.iterdir())
    if stray:
        record["stray_files"] = stray
    message = ""
    try:
        result = json.loads(done.stdout)["results"][0]
        message = (result.get("error") or {}).get("message", "")
    except (ValueError, KeyError, IndexError):
        result = None
    if done.returncode < 0:
        return record | {"status": "crash", "exit": done.returncode, "why": f"killed by signal {-done.returncode}"}
    if "Traceback (most recent call last)" in done.stderr + done.stdout:
        return record | {
            "status": "crash",
            "exit": done.returncode,
            "why": "traceback: " + done.stderr.strip().splitlines()[-1],
        }
    if done.returncode != 0:
        why = first_line(message or done.stderr)
        status = "crash" if done.returncode == 1 or "internal error" in why else "refused"
        return record | {"status": status, "exit": done.returncode, "why": why, "message": message or done.stderr}
    return record | compare_bundle(Path(result["bundle"]), profile, prepared, timeout)


def compare_bundle(bundle: Path, profile: dict, prepared: Prepared, timeout: float) -> dict:
    kind = profile["bundle"]["kind"]
    outputs_file = bundle.parent / "outputs.pkl"
    cmd = [
        sys.executable,
        "-c",
        BUNDLE_RUNNER,
        str(bundle),
        kind,
        str(prepared.inputs_file),
        str(outputs_file),
        str(REPO / "runtime_shim" / "edgepack_shim.py"),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "broken", "why": f"the bundle's shim did not answer in {timeout:.0f} s"}
    if done.returncode != 0:
        return {
            "status": "broken",
            "why": "the bundle's shim failed: " + (done.stderr.strip().splitlines() or ["?"])[-1],
        }
    with open(outputs_file, "rb") as f:
        got = pickle.load(f)
    precision = json.loads((bundle / "manifest.json").read_text())["model"].get("precision", "fp32")
    gate = profile["accuracy"] if precision == "fp32" else profile["quantization"]["tolerance"]
    for name, value in prepared.reference.items():
        if name not in got:
            return {"status": "broken", "why": f"output {name} missing", "precision": precision}
        if (why := agreement(value, got[name], gate["min_cosine"])) is not None:
            return {"status": "broken", "why": f"{name}: {why}", "precision": precision}
    return {"status": "ok", "precision": precision}
