"""An int4 rpi-arm64 bundle runs on ARM64: its shim under qemu-user as a Cortex-A72 with the PyPI aarch64
onnxruntime verifies the bundle and stays within the quantization tolerance of the FP32 source. Against
the same bundle on the x86 host it is compared by cosine, not element-wise: MatMulNBits at accuracy_level
4 quantizes activations to int8 with each CPU's own kernels."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from edgepack.examples import build_example
from tests.test_arm64 import SHIM, TARGET, differences, emulated, example_inputs, measured, sysroot  # noqa: F401

pytestmark = [pytest.mark.arm64, pytest.mark.slow]


def test_int4_bundle_runs_in_the_shim_on_arm64(sysroot, measured, tmp_path):  # noqa: F811
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgepack",
            "package",
            "--example",
            "transformer",
            "--target",
            TARGET,
            "--quantize",
            "int4",
            "-o",
            str(tmp_path / "out"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    bundle = tmp_path / "out" / f"transformer-{TARGET}"
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["model"]["precision"] == "int4"
    inputs = example_inputs("transformer")
    np.savez(tmp_path / "inputs.npz", **inputs)

    verified = emulated(sysroot, measured, "int4 transformer: shim verify", [SHIM, "verify"], bundle)
    assert verified.returncode == 0, verified.stderr
    ran = emulated(
        sysroot,
        measured,
        "int4 transformer: shim run (batch 2)",
        [SHIM, "run", tmp_path / "inputs.npz", "-o", tmp_path / "arm64.npz"],
        bundle,
    )
    assert ran.returncode == 0, ran.stderr
    on_arm64 = np.load(tmp_path / "arm64.npz")["last_hidden_state"]

    host = subprocess.run(
        [sys.executable, SHIM, "run", tmp_path / "inputs.npz", "-o", tmp_path / "host.npz"],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert host.returncode == 0, host.stderr
    on_host = np.load(tmp_path / "host.npz")["last_hidden_state"]
    source = ort.InferenceSession(build_example("transformer").SerializeToString(), providers=["CPUExecutionProvider"])
    from_source = source.run(None, inputs)[0]

    tolerance = manifest["profile"]["quantization"]["tolerance"]["min_cosine"]
    for reference, expected, least in (("host bundle", on_host, 0.999), ("source model", from_source, tolerance)):
        max_abs, cosine = differences(on_arm64, expected)
        measured.append(f"int4 transformer: arm64 vs {reference}: max abs {max_abs:.2e}, cosine {cosine:.7f}")
        assert cosine >= least, f"vs {reference}: cosine {cosine}"
