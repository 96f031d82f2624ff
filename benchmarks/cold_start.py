"""Cold start: from process start to the first inference result, three ways, measured side by side.

1. shim:       python <bundle>/edgepack_shim.py run inputs.npz -o out.npz   (checksums verified first)
2. onnxruntime: a plain script that opens an InferenceSession on the bundle's model and runs it once
3. PyTorch:    import torch, build the same network (eager), first forward

Each run is a fresh process. The clock starts just before the process is spawned and stops when its
first line of output arrives, which each variant prints only after the result is written; the time to
process exit is shown too. Variants are interleaved in a rotating order so machine noise hits all of
them alike; medians are printed with the ratios the shim aims at (within 1.3x of plain onnxruntime,
at least 4x faster than PyTorch eager). A frozen shim beside the bundle (``<bundle>.frozen/``) is timed too.

    .venv/bin/python benchmarks/cold_start.py [--runs 15] [--bundle build/cnn-linux-x64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ORT_SCRIPT = """\
import sys
import numpy as np
import onnxruntime as ort
model, inputs, output = sys.argv[1:4]
options = ort.SessionOptions()
if model.endswith(".ort"):
    options.add_session_config_entry("session.load_model_format", "ORT")
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
with np.load(inputs) as data:
    feeds = dict(data)
np.savez(output, *session.run(None, feeds))
print("done", flush=True)
"""

TORCH_SCRIPT = """\
import sys
import numpy as np
import torch
from torch import nn
inputs, output = sys.argv[1:3]

def block(cin, cout, pool):
    layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return layers + ([nn.MaxPool2d(2)] if pool else [])

model = nn.Sequential(*block(3, 16, True), *block(16, 32, True), *block(32, 64, False),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
with np.load(inputs) as data:
    image = torch.from_numpy(data["image"])
with torch.no_grad():
    logits = model(image)
np.savez(output, logits.numpy())
print("done", flush=True)
"""


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """Seconds from spawn to the first line of output, and to exit."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    first = process.stdout.readline()
    result = time.perf_counter() - started
    _, err = process.communicate()
    ended = time.perf_counter() - started
    if process.returncode != 0 or not first:
        raise SystemExit(f"{command[:2]} failed ({process.returncode}): {err.strip()[-500:]}")
    return result, ended


def package_cnn(folder: Path) -> Path:
    from edgepack.bundle.freeze import host_arch
    from edgepack.examples import write_example
    from edgepack.pipeline.job import Options
    from edgepack.pipeline.run import package_model
    from edgepack.profiles import builtin_profile_names, load_profile

    profile = next(
        p
        for p in map(load_profile, builtin_profile_names())
        if p.bundle.kind == "python" and p.device.arch == host_arch()
    )
    result = package_model(write_example("cnn", folder), [profile], Options(output=folder / "build"))[0]
    if not result.ok:
        raise SystemExit(f"packaging failed: {result.error}")
    return result.bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="runs of each variant (default 15)")
    parser.add_argument("--bundle", type=Path, help="a python bundle of the example cnn (default: packaged now)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgepack-cold-") as scratch:
        scratch = Path(scratch)
        bundle = args.bundle.resolve() if args.bundle else package_cnn(scratch)
        import json

        manifest = json.loads((bundle / "manifest.json").read_text())
        model = bundle / manifest["model"]["file"]
        inputs = scratch / "inputs.npz"
        np.savez(inputs, image=np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
        (scratch / "plain_ort.py").write_text(ORT_SCRIPT)
        (scratch / "torch_eager.py").write_text(TORCH_SCRIPT)
        out = str(scratch / "out.npz")
        python = sys.executable
        variants = {
            "shim: python edgepack_shim.py run (verified)": [
                python,
                str(bundle / "edgepack_shim.py"),
                "run",
                str(inputs),
                "-o",
                out,
            ],
            "plain onnxruntime script": [python, str(scratch / "plain_ort.py"), str(model), str(inputs), out],
            "PyTorch eager: import, build, forward": [python, str(scratch / "torch_eager.py"), str(inputs), out],
        }
        frozen = bundle.with_name(bundle.name + ".frozen") / "edgepack_shim"
        if frozen.is_file():
            variants["frozen shim (PyInstaller) run (verified)"] = [str(frozen), "run", str(inputs), "-o", out]
        env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
        names = list(variants)
        for name in names:  # once each, untimed: file caches warm for everyone
            timed(variants[name], env)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for i in range(args.runs):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                samples[name].append(timed(variants[name], env))

    medians = {
        name: (statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs))
        for name, runs in samples.items()
    }
    print(f"cold start, process start -> first inference result; median of {args.runs} interleaved runs each")
    print(f"model: {manifest['model']['file']} of {bundle.name} ({manifest['target']}), batch 1, {sys.platform}")
    width = max(map(len, names))
    for name in names:
        result, ended = medians[name]
        print(f"  {name:<{width}}  {result:.3f} s  (process exit {ended:.3f} s)")
    shim, plain, torch = (medians[name][0] for name in names[:3])
    print(f"  shim / plain onnxruntime = {shim / plain:.2f}x  (aim: <= 1.3x)")
    print(f"  PyTorch / shim           = {torch / shim:.2f}x  (aim: >= 4x)")
    if len(names) > 3:
        print(f"  frozen shim / shim       = {medians[names[3]][0] / shim:.2f}x")


if __name__ == "__main__":
    main()
