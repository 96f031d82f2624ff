"""Package a ~2.4 GB model (weights in external data) and report time and peak memory.

    python benchmarks/large_model.py                 # build, package for rpi-arm64, report, clean up
    python benchmarks/large_model.py --probes        # also: peak RSS of each suspect step on its own
    python benchmarks/large_model.py --quantizer     # also: onnxruntime's quantize_dynamic on the same model
    python benchmarks/large_model.py --gigabytes 1 --inline   # a model under 2 GiB, weights inline: ORT format
    python benchmarks/large_model.py --quantize none,int4     # package with each recipe in turn

The model is a chain of MatMuls with float32 [D, D] weights, written one layer at a time to a side
file (the builder never holds more than one layer). Each measured step runs in its own subprocess;
its peak RSS comes from ``os.wait4`` (the child and the descendants it waited for) and is printed as
a ratio to the model's size on disk (.onnx + side file). Linux carries a process's RSS high-water mark
across fork and exec, so this parent stays small (no numpy, no onnx) and builds the model in a child too.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

DIM = 8192
OPSET = 17
IR_VERSION = 8


def build_model(folder: Path, gigabytes: float, inline: bool = False) -> Path:
    """A MatMul chain of ``gigabytes`` of float32 weights in ``model.onnx.data``, aligned at 4 KiB offsets
    (``inline``: in the .onnx itself, under 2 GiB only)."""
    import numpy as np
    from onnx import TensorProto, helper

    layers = max(1, round(gigabytes * 1e9 / (DIM * DIM * 4)))
    model_path, data_name = folder / "model.onnx", "model.onnx.data"
    rng = np.random.default_rng(0)
    initializers, nodes, offset = [], [], 0
    with open(folder / data_name, "wb") as data:
        for i in range(layers):
            weight = rng.random((DIM, DIM), dtype=np.float32)
            weight -= 0.5
            weight *= np.sqrt(12.0 / DIM)  # variance 1/DIM: activations stay ~unit scale through the chain
            pad = -offset % 4096
            data.write(b"\0" * pad)
            offset += pad
            data.write(weight.tobytes())
            tensor = TensorProto(
                name=f"w{i}", data_type=TensorProto.FLOAT, dims=[DIM, DIM], data_location=TensorProto.EXTERNAL
            )
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(weight.nbytes))):
                tensor.external_data.add(key=key, value=value)
            initializers.append(tensor)
            offset += weight.nbytes
            del weight
            nodes.append(
                helper.make_node(
                    "MatMul",
                    ["x" if i == 0 else f"h{i}", f"w{i}"],
                    ["y" if i == layers - 1 else f"h{i + 1}"],
                    name=f"matmul{i}",
                )
            )
    if inline:
        from onnx import numpy_helper

        with open(folder / data_name, "rb") as data:
            for tensor in initializers:
                entries = {e.key: int(e.value) for e in tensor.external_data if e.key != "location"}
                data.seek(entries["offset"])
                array = np.frombuffer(data.read(entries["length"]), dtype=np.float32).reshape(DIM, DIM)
                tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        (folder / data_name).unlink()
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", DIM])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    model_path.write_bytes(model.SerializeToString())
    return model_path


def _without_budget(target: str, folder: Path) -> Path:
    """The built-in profile with its size budget raised: an FP32 model this large is over every device budget.
    Its quantization gate is lowered: the outputs of a chain of random MatMuls are no classes (top-1 off), and
    int4's error compounds over nine 8192x8192 layers (cosine 0.982), while this measures memory."""
    from edgepack.profiles import load_profile

    text = Path(load_profile(target).source).read_text(encoding="utf-8")
    lines = [
        (
            "  max_bundle_mb: 100000"
            if line.strip().startswith("max_bundle_mb:")
            else "    min_top1_agreement: 0.0"
            if line.strip().startswith("min_top1_agreement:")
            else "    min_cosine: 0.95"
            if line.startswith("    min_cosine:")
            else line
        )
        for line in text.splitlines()
    ]
    path = folder / f"{target}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def measure(argv: list[str], *, env: dict | None = None, log: Path | None = None) -> dict:
    """Run ``argv``; wall time, exit code and peak RSS (bytes) of the child and what it waited for."""
    started = time.perf_counter()
    with open(log or os.devnull, "wb") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.perf_counter() - started, "exit": child.returncode, "peak_rss": usage.ru_maxrss * 1024}


PROBES = {
    "onnx.load (external data read)": "import onnx; m = onnx.load(MODEL)",
    "onnx.load + SerializeToString": "import onnx; m = onnx.load(MODEL)\ntry: m.SerializeToString()\nexcept Exception as e: print(e)",
    "onnx-ir load + save (external data)": "import onnx_ir as ir; m = ir.load(MODEL); ir.save(m, OUT, external_data='out.onnx.data')",
    "onnxruntime session (path, default options)": "import onnxruntime as ort; s = ort.InferenceSession(MODEL, providers=['CPUExecutionProvider'])",
    "onnxruntime session (path, prepacking off)": "import onnxruntime as ort; o = ort.SessionOptions(); "
    "o.add_session_config_entry('session.disable_prepacking', '1'); "
    "s = ort.InferenceSession(MODEL, o, providers=['CPUExecutionProvider'])",
    "edgepack.bundle.manifest.hash_file (side file)": "from edgepack.bundle.manifest import hash_file; hash_file(MODEL + '.data')",
}


def run_probe(name: str, model: Path, scratch: Path) -> dict:
    out = scratch / "probe"
    out.mkdir(exist_ok=True)
    code = f"MODEL = {str(model)!r}\nOUT = {str(out / 'out.onnx')!r}\n" + PROBES[name]
    result = measure([sys.executable, "-c", code], env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    shutil.rmtree(out, ignore_errors=True)
    return result


QUANTIZE = textwrap.dedent("""
    import sys
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8, use_external_data_format=True)
""")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.4, help="weights to generate (default 2.4)")
    parser.add_argument("--target", default="rpi-arm64")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary folder, removed)")
    parser.add_argument("--probes", action="store_true", help="measure each suspect step on its own")
    parser.add_argument("--quantizer", action="store_true", help="measure onnxruntime's quantize_dynamic too")
    parser.add_argument("--inline", action="store_true", help="weights inside the .onnx (needs --gigabytes under 2)")
    parser.add_argument("--keep", action="store_true", help="keep the model and bundle")
    parser.add_argument("--quantize", default="none", help="recipes to package with, comma-separated (default: none)")
    parser.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_into:
        build_model(args.build_into, args.gigabytes, inline=args.inline)
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="edgepack-large-", dir=args.workdir))
    try:
        built = measure(
            [sys.executable, __file__, "--build-into", str(scratch), "--gigabytes", str(args.gigabytes)]
            + (["--inline"] if args.inline else [])
        )
        model = scratch / "model.onnx"
        if built["exit"] != 0 or not model.is_file():
            print("building the model failed", file=sys.stderr)
            return 1
        side = scratch / "model.onnx.data"
        size = model.stat().st_size + (side.stat().st_size if side.exists() else 0)
        print(
            f"model: {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB) in {scratch}, built in {built['seconds']:.1f} s; "
            f"this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB peak RSS"
        )

        rows = []
        log = scratch / "package.log"
        profile = _without_budget(args.target, scratch)
        failed = False
        for recipe in args.quantize.split(","):
            packaged = measure(
                [
                    sys.executable,
                    "-m",
                    "edgepack",
                    "package",
                    str(model),
                    "--target",
                    str(profile),
                    "--quantize",
                    recipe,
                    "-o",
                    str(scratch / "build"),
                ],
                env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
                log=log,
            )
            rows.append((f"edgepack package --target {args.target} --quantize {recipe}", packaged))
            print(log.read_text(encoding="utf-8", errors="replace").rstrip())
            bundle = scratch / "build" / f"model-{args.target}"
            failed = failed or packaged["exit"] != 0
            if packaged["exit"] == 0:
                manifest = json.loads((bundle / "manifest.json").read_text())
                convert = next(r for r in manifest["stages"] if r["stage"] == "convert")
                print(
                    f"bundle: {manifest['model']['file']} + {manifest['model']['external_data']}, "
                    f"convert fallback: {convert.get('fallback')}"
                )
                shutil.rmtree(scratch / "build")
        if args.quantizer:
            rows.append(
                (
                    "onnxruntime quantize_dynamic (use_external_data_format=True)",
                    measure(
                        [sys.executable, "-c", QUANTIZE, str(model), str(scratch / "q.onnx")],
                        env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
                    ),
                )
            )
            for extra in scratch.glob("q.onnx*"):
                extra.unlink()
        if args.probes:
            for name in PROBES:
                rows.append((name, run_probe(name, model, scratch)))

        print("\n| step | exit | time s | peak RSS GB | peak RSS / model size |\n|---|---|---|---|---|")
        for name, r in rows:
            print(
                f"| {name} | {r['exit']} | {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} | {r['peak_rss'] / size:.2f}x |"
            )
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
