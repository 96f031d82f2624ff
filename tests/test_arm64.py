"""rpi-arm64 bundles really run on ARM64: their shim, under qemu-user 10 as a Cortex-A72 (Raspberry Pi 4) with
the PyPI aarch64 onnxruntime, verifies the bundle, refuses a tampered one, and gives the host's outputs within
the profile's tolerance. The sysroot comes from tests/support/arm64.py (cached after the first build).

The times printed at the end are emulated times on this x86-64 host: qemu is 10-270x slower than a real
Pi, so they say nothing about device speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepack.checked import quiet_session
from edgepack.examples import build_example
from edgepack.profiles import load_profile
from tests.support.arm64 import EmulationUnavailable, ensure_sysroot
from tests.support.host import saturates_u8s8

pytestmark = [pytest.mark.arm64, pytest.mark.slow]

TARGET = "rpi-arm64"
SHIM = "edgepack_shim.py"


def example_inputs(name: str) -> dict[str, np.ndarray]:
    """Small inputs (batch 2): every emulated instruction costs 10-270 native ones."""
    rng = np.random.default_rng(7)
    if name == "cnn":
        return {"image": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    mask = np.ones((2, 16), dtype=np.int64)
    mask[1, 11:] = 0  # padding in the second sequence, so the attention mask matters
    return {"input_ids": rng.integers(0, 1000, (2, 16), dtype=np.int64), "attention_mask": mask}


@pytest.fixture(scope="module")
def measured(request):
    """Lines for the closing summary; printed past pytest's capture so they show in every run."""
    lines: list[str] = []
    yield lines
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not lines:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line("ARM64 emulation (qemu-user on this x86-64 host: NOT Raspberry Pi speed)")
        for line in lines:
            reporter.write_line(f"  {line}")


@pytest.fixture(scope="module")
def sysroot(measured):
    try:
        root = ensure_sysroot()
    except EmulationUnavailable as exc:
        pytest.skip(f"ARM64 emulation cannot run on this machine: {exc}")
    info = root.info
    built = (
        f"built now in {root.build_seconds:.0f} s"
        if root.build_seconds is not None
        else f"from cache (first build took {info['build_seconds']} s)"
    )
    measured.append(f"sysroot {root.root} ({info['size_bytes'] / 1e6:.0f} MB, {built})")
    measured.append(
        f"{info['qemu']}, QEMU_CPU={root.cpu}; guest Python {info['guest']['python']}, "
        f"onnxruntime {info['guest']['onnxruntime']}, numpy {info['guest']['numpy']}"
    )
    return root


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("arm64-bundles")
    made = {}
    for name in ("cnn", "transformer"):
        result = subprocess.run(
            [sys.executable, "-m", "edgepack", "package", "--example", name, "--target", TARGET, "-o", str(out), "-q"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        made[name] = out / f"{name}-{TARGET}"
        assert (made[name] / SHIM).is_file()
    return made


def emulated(sysroot, measured, label: str, args, cwd: Path):
    started = time.perf_counter()
    result = sysroot.python(args, cwd=cwd, timeout=600)
    measured.append(f"{label}: {time.perf_counter() - started:.1f} s emulated (exit {result.returncode})")
    return result


HOST_SATURATES_U8S8 = saturates_u8s8()


def differences(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    a, b = actual.astype(np.float64).ravel(), expected.astype(np.float64).ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.max(np.abs(a - b))), cosine


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_shim_verifies_and_runs_the_bundle_on_arm64(name, sysroot, bundles, measured, tmp_path):
    bundle = bundles[name]
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    accuracy = manifest["profile"]["accuracy"]
    # a quantized bundle is held to the profile's quantization tolerance against the FP32 source, as the
    # packager's self-test does; against the same bundle on the host it must still match like FP32 does
    quantized = manifest["model"]["precision"] != "fp32"
    source_min_cosine = (
        manifest["profile"]["quantization"]["tolerance"]["min_cosine"] if quantized else accuracy["min_cosine"]
    )
    inputs = example_inputs(name)
    np.savez(tmp_path / "inputs.npz", **inputs)

    verified = emulated(sysroot, measured, f"{name}: shim verify", [SHIM, "verify"], bundle)
    assert verified.returncode == 0, verified.stderr

    ran = emulated(
        sysroot,
        measured,
        f"{name}: shim run (batch 2)",
        [SHIM, "run", tmp_path / "inputs.npz", "-o", tmp_path / "arm64.npz"],
        bundle,
    )
    assert ran.returncode == 0, ran.stderr
    on_arm64 = dict(np.load(tmp_path / "arm64.npz"))

    # the same command with the host's Python, onnxruntime and CPU
    host_run = subprocess.run(
        [sys.executable, SHIM, "run", tmp_path / "inputs.npz", "-o", tmp_path / "host.npz"],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert host_run.returncode == 0, host_run.stderr
    on_host = dict(np.load(tmp_path / "host.npz"))
    # and the source model, which the profile's tolerance is defined against
    source = ort.InferenceSession(build_example(name).SerializeToString(), providers=["CPUExecutionProvider"])
    from_source = dict(zip([o.name for o in source.get_outputs()], source.run(None, inputs)))

    assert set(on_arm64) == set(on_host) == set(from_source)
    for output, value in on_arm64.items():
        for reference, expected in (("host bundle", on_host[output]), ("source model", from_source[output])):
            assert value.shape == expected.shape and value.dtype == expected.dtype
            max_abs, cosine = differences(value, expected)
            measured.append(f"{name}: {output} arm64 vs {reference}: max abs {max_abs:.2e}, cosine {cosine:.7f}")
            # an x86 host without VNNI saturates the .ort's U8S8 products where ARM does not (backends.EXACT_INT8):
            # there the host bundle is one more approximation of the source, held to the same tolerance
            exact_host = reference == "host bundle" and not (quantized and HOST_SATURATES_U8S8)
            if exact_host or not quantized:
                assert max_abs <= accuracy["max_abs_error"], f"{output} vs {reference}: max abs error {max_abs}"
            assert cosine >= (accuracy["min_cosine"] if exact_host else source_min_cosine), (
                f"{output} vs {reference}: cosine {cosine}"
            )


def test_shim_refuses_a_tampered_bundle_on_arm64(sysroot, bundles, measured, tmp_path):
    bundle = tmp_path / "tampered"
    shutil.copytree(bundles["cnn"], bundle)
    model = bundle / "model" / "cnn.ort"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit: only the checksum can tell
    model.write_bytes(bytes(data))
    np.savez(tmp_path / "inputs.npz", **example_inputs("cnn"))

    verified = emulated(sysroot, measured, "tampered cnn: shim verify", [SHIM, "verify"], bundle)
    assert verified.returncode != 0
    assert "model/cnn.ort" in verified.stdout + verified.stderr and "Traceback" not in verified.stderr

    ran = emulated(
        sysroot,
        measured,
        "tampered cnn: shim run",
        [SHIM, "run", tmp_path / "inputs.npz", "-o", tmp_path / "out.npz"],
        bundle,
    )
    assert ran.returncode != 0
    assert "model/cnn.ort" in ran.stdout + ran.stderr and "Traceback" not in ran.stderr
    assert not (tmp_path / "out.npz").exists()


RUN_MODEL = """\
import os, platform, sys
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
import numpy as np, onnxruntime as ort
model, inputs, output = sys.argv[1:4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
np.savez(output, *session.run(None, dict(np.load(inputs))))
print(platform.machine(), ort.__version__)
"""


def test_int8_onnxruntime_results_on_arm64_match_the_host(sysroot, measured, tmp_path):
    """The known trap: qemu 7.2, or qemu's default `max` CPU, gives int8 results no Pi gives. Dynamic int8
    (MatMulInteger) on the example transformer must match the host within the rpi-arm64 tolerance."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = tmp_path / "transformer.onnx", tmp_path / "transformer.int8.onnx"
    onnx.save_model(build_example("transformer"), fp32)
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    assert "MatMulInteger" in {node.op_type for node in onnx.load(int8).graph.node}
    inputs = example_inputs("transformer")
    np.savez(tmp_path / "inputs.npz", **inputs)
    (tmp_path / "run_model.py").write_text(RUN_MODEL, encoding="utf-8")

    ran = emulated(
        sysroot,
        measured,
        "int8 transformer: plain onnxruntime run",
        ["run_model.py", int8, tmp_path / "inputs.npz", tmp_path / "arm64.npz"],
        tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["aarch64", ort.__version__]
    on_arm64 = np.load(tmp_path / "arm64.npz")["arr_0"]

    # the exact INT8 kernels bundles ask for (backends.EXACT_INT8): an x86 host without VNNI saturates otherwise
    on_host = quiet_session(int8).run(None, inputs)[0]
    fp32_on_host = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    tolerance = load_profile(TARGET).accuracy.max_abs_error
    max_abs, cosine = differences(on_arm64, on_host)
    quantization_error, _ = differences(on_host, fp32_on_host)
    measured.append(
        f"int8 transformer: arm64 vs host int8: max abs {max_abs:.2e}, cosine {cosine:.7f} "
        f"(int8 vs fp32 on the host: {quantization_error:.2e})"
    )
    # the tolerance is far below int8's own error, so a different int8 kernel family would not pass
    assert quantization_error > 10 * tolerance
    assert max_abs <= tolerance
