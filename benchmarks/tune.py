"""What ``--tune`` ships for linux-x64, against PyTorch eager, FP32 onnxruntime and the other candidates.

The models are those of benchmarks/quantization.py (seeded weights): a ResNet-18-like CNN at
1x3x224x224 whose batch norms carry statistics measured on its synthetic data (so its logits are not
near-ties) and a BERT-mini-like encoder at sequence 128. Each is packaged with
``edgepack package --target linux-x64 --tune`` (through the Python API) at 1 thread (the linux-x64
profile with ``session.intra_op_num_threads: 1``), with 40 calibration and 32 validation inputs.

Printed per model, all measured side by side on this host:
- the tuner's table: every candidate's median and p90 (interleaved rounds inside the tuner), size and
  accuracy, and which one shipped;
- the shipped bundle (loaded by the runtime shim, as on the device) against PyTorch eager FP32 and FP32
  onnxruntime (.onnx), RUNS interleaved rounds: latency ratios (x > 1: the bundle is faster);
- the shipped candidate against the fastest and the slowest candidate (from the tuner's medians);
- the bundle's model size against the FP32 .onnx, and the gate's accuracy figures.

    python benchmarks/tune.py [--runs 100] [--models cnn,encoder] [--budget 600]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np
import onnxruntime as ort
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import build  # noqa: E402  (the same seeded models as the quantization benchmark)

from edgepack.pipeline.job import Options  # noqa: E402
from edgepack.pipeline.run import package_model  # noqa: E402
from edgepack.profiles import load_profile  # noqa: E402
from edgepack.runtime_shim import edgepack_shim  # noqa: E402


def one_thread_profile(folder: Path):
    data = yaml.safe_load(Path(load_profile("linux-x64").source).read_text())
    data["session"]["intra_op_num_threads"] = 1
    path = folder / "linux-x64.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_profile(str(path))


def write_samples(folder: Path, feeds: list[dict]) -> Path:
    folder.mkdir(parents=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:03d}.npz", **feed)
    return folder


def bench(name: str, runs: int, budget: float, folder: Path) -> None:
    folder.mkdir(parents=True)
    model, path, make_inputs = build(name, folder)
    calibration = write_samples(folder / f"{name}-calib", make_inputs(1000, 40))
    validation = write_samples(folder / f"{name}-valid", make_inputs(2000, 32))
    profile = one_thread_profile(folder)
    options = Options(
        output=folder / "out",
        force=True,
        calibration=str(calibration),
        validation=validation,
        tune=True,
        tune_budget=budget,
    )
    started = time.perf_counter()
    (result,) = package_model(path, [profile], options, name=name)
    if not result.ok:
        raise SystemExit(f"{name}: packaging failed: {result.error}")
    seconds = time.perf_counter() - started
    quantize = next(r for r in result.manifest["stages"] if r["stage"] == "quantize")
    selftest = next(r for r in result.manifest["stages"] if r["stage"] == "self_test")
    tuned = quantize["tune"]
    print(
        f"\n## {name}: packaged with --tune in {seconds:.0f} s (tuning {tuned['seconds']} s of a {budget:g} s budget)"
    )
    print(
        f"{'candidate':<12} {'gate':<7} {'median ms':>10} {'p90 ms':>8} {'runs':>5} {'MB':>7} {'cosine':>9} {'top-1':>7}"
    )
    for c in tuned["candidates"]:
        acc = c.get("accuracy", {})
        top1 = f"{acc['top1_agreement']:.1%}" if "top1_agreement" in acc else "-"
        cos = f"{acc['cosine']:.5f}" if "cosine" in acc else "-"
        median = f"{c['median_ms']:.2f}" if "median_ms" in c else "-"
        p90 = f"{c['p90_ms']:.2f}" if "p90_ms" in c else "-"
        mark = "  <- shipped" if c["name"] == tuned["winner"] else ""
        print(
            f"{c['name']:<12} {c['gate']:<7} {median:>10} {p90:>8} {c.get('runs', 0):>5} {c['bytes'] / 1e6:>7.2f} "
            f"{cos:>9} {top1:>7}{mark}"
        )
    for note in tuned["notes"]:
        print(f"note: {note}")
    print(f"why: {tuned['why']}")

    timed = [c for c in tuned["candidates"] if "median_ms" in c]
    winner = next(c for c in timed if c["name"] == tuned["winner"])
    fastest = min(c["median_ms"] for c in timed)
    slowest = max(timed, key=lambda c: c["median_ms"])

    torch.set_num_threads(1)
    feeds = make_inputs(3000, 1)[0]
    tensors = [torch.from_numpy(v) for v in feeds.values()]
    manifest = edgepack_shim.read_manifest(result.bundle)
    shipped = edgepack_shim.load(result.bundle, providers=["CPUExecutionProvider"], check_runtime=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    fp32 = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    runners = {
        "torch eager FP32": lambda: model(*tensors),
        "onnxruntime FP32": lambda: fp32.run(None, feeds),
        "bundle": lambda: shipped.run(feeds),
    }
    times = {k: [] for k in runners}
    with torch.inference_mode():
        for run in runners.values():
            for _ in range(5):
                run()
        for i in range(runs):
            order = list(runners)[i % 3 :] + list(runners)[: i % 3]
            for key in order:
                start = time.perf_counter()
                runners[key]()
                times[key].append(time.perf_counter() - start)
    medians = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    size = (result.bundle / manifest["model"]["file"]).stat().st_size
    source = path.stat().st_size
    figures = quantize.get("figures", {})
    print(
        f"side by side, {runs} interleaved rounds at 1 thread: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in medians.items())
    )
    print(
        f"shipped {tuned['winner']}: {medians['torch eager FP32'] / medians['bundle']:.2f}x faster than PyTorch eager, "
        f"{medians['onnxruntime FP32'] / medians['bundle']:.2f}x faster than FP32 onnxruntime, "
        f"{slowest['median_ms'] / winner['median_ms']:.2f}x faster than the slowest candidate ({slowest['name']}), "
        f"{winner['median_ms'] / fastest:.3f}x the fastest candidate's median"
    )
    top1 = f", top-1 {figures['top1_agreement']:.1%}" if "top1_agreement" in figures else ""
    print(
        f"size: {size / 1e6:.2f} MB vs FP32 .onnx {source / 1e6:.2f} MB = {size / source:.3f}x; gate passed "
        f"(cosine {figures.get('cosine', 1.0):.5f}{top1}, max abs error {figures.get('max_abs_error', 0.0):.4g} on "
        f"{tuned['validation']['samples']} validation inputs); self-test: {selftest['summary']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--models", default="cnn,encoder")
    parser.add_argument("--budget", type=float, default=600.0, help="--tune-budget per model (seconds)")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="edgepack-tune-bench-") as scratch:
        for name in args.models.split(","):
            bench(name, args.runs, args.budget, Path(scratch) / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
