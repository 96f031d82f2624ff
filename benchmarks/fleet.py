"""Fleets side by side, in one run: --jobs, the bundle cache, and Ray against local worker processes.

Each row is one fresh `edgepack` process (imports included, as CI runs it), wall-clock seconds:

- one model for --targets: `package --jobs 1` vs `package --jobs N` (no cache): the speed-up of worker processes
- a fleet of --models models x --fleet-targets: `build` with an empty cache (cold) vs the same build again (warm)
- the build report alone (`edgepack report` of the fleet's output), which every build of several pairs writes
- the same fleet on a local Ray instance (`--executor ray`, started and stopped by edgepack) vs local processes

Fleet models are the example CNN and transformer with their weights scaled by a different factor each,
so every model has its own bytes. The machine's load average is printed beside each row: on a shared
machine the ratios are what to read.

    .venv/bin/python benchmarks/fleet.py [--model transformer] [--targets all] [--jobs 2]
        [--models 5] [--fleet-targets all]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgepack.examples import EXAMPLE_SHAPES, write_example


def run(args: list[str], cache: Path) -> tuple[float, dict]:
    env = {
        **os.environ,
        "ORT_DISABLE_TELEMETRY": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "EDGEPACK_BUNDLE_CACHE": str(cache),
    }
    load = os.getloadavg()[0]
    started = time.perf_counter()
    force = [] if args[0] == "report" else ["--force"]
    done = subprocess.run(
        [sys.executable, "-m", "edgepack", *args, "--json", *force], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"edgepack {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    summary["load"] = (load + os.getloadavg()[0]) / 2
    return seconds, summary


def fleet_models(folder: Path, count: int) -> list[dict]:
    """Build-file entries, with the examples' documented shapes for the fixed-shape targets."""
    bases = [(write_example(name, folder / "examples"), name) for name in ("cnn", "transformer")]
    models = []
    for i in range(count):
        base, example = bases[i % 2]
        proto = onnx.load(base)
        weight = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1)
        scaled = numpy_helper.to_array(weight) * np.float32(1.0 + 0.01 * (i + 1))
        weight.CopyFrom(numpy_helper.from_array(scaled, weight.name))
        path = folder / f"model{i}.onnx"
        onnx.save_model(proto, path)
        models.append(
            {"model": path.name, "input_shapes": {k: list(v) for k, v in EXAMPLE_SHAPES.get(example, {}).items()}}
        )
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="transformer", help="an example name or an .onnx path (the one-model rows)")
    parser.add_argument("--targets", default="all")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--models", type=int, default=5, help="models in the fleet")
    parser.add_argument("--fleet-targets", default="all")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-fleet-") as scratch:
        root = Path(scratch)
        for folder in ("one", "fleet/examples"):
            (root / folder).mkdir(parents=True)
        model = ["package", args.model] if args.model.endswith(".onnx") else ["package", "--example", args.model]
        out = root / "out"
        one = model + ["--target", args.targets, "-o", str(out), "--no-cache"]
        sequential, s1 = run(one + ["--jobs", "1"], root / "unused")
        parallel, s2 = run(one + ["--jobs", str(args.jobs)], root / "unused")
        pairs = len(s1["results"])
        rows.append((f"{Path(args.model).name} x {pairs} targets, --jobs 1", sequential, s1["load"], ""))
        rows.append(
            (
                f"{Path(args.model).name} x {pairs} targets, --jobs {args.jobs}",
                parallel,
                s2["load"],
                f"{sequential / parallel:.2f}x faster",
            )
        )

        models = fleet_models(root / "fleet", args.models)
        targets = [t.strip() for t in args.fleet_targets.split(",")]
        build_file = root / "fleet" / "edgepack.yaml"
        build_file.write_text(json.dumps({"targets": targets, "models": models}))
        cache = root / "cache"
        build = ["build", str(build_file), "--jobs", str(args.jobs), "-o", str(root / "fleet-out")]
        cold, c = run(build, cache)
        warm, w = run(build, cache)
        pairs = c["pairs"]
        assert w["cache"]["hit"] == pairs, w["cache"]
        rows.append((f"fleet {args.models} models, {pairs} pairs, cold cache", cold, c["load"], ""))
        rows.append(
            (
                f"fleet {args.models} models, {pairs} pairs, warm cache",
                warm,
                w["load"],
                f"{100 * warm / cold:.1f}% of cold",
            )
        )
        # a build of several pairs ends with the build report, which a warm build writes again too
        report, rep = run(["report", str(root / "fleet-out")], cache)
        rows.append(
            (
                "  of which: the build report alone (edgepack report)",
                report,
                rep["load"],
                f"warm without it: {100 * max(warm - report, 0) / cold:.1f}% of cold",
            )
        )
        ray, r = run(build + ["--executor", "ray", "--no-cache"], cache)
        local, lo = run(build + ["--no-cache"], cache)
        rows.append((f"fleet, local processes (--jobs {args.jobs}, no cache)", local, lo["load"], ""))
        rows.append(
            (
                f"fleet, local Ray ({args.jobs} CPUs, no cache)",
                ray,
                r["load"],
                f"{ray - local:+.1f} s ({ray / local:.2f}x)",
            )
        )

    print(f"{os.cpu_count()} cores; load average is the mean of before and after each run")
    print(f"{'run':<52} {'seconds':>8} {'load':>6}  ratio")
    for name, seconds, load, ratio in rows:
        print(f"{name:<52} {seconds:>8.1f} {load:>6.1f}  {ratio}")


if __name__ == "__main__":
    main()
