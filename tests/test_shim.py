"""The on-device shim (runtime_shim/edgepack_shim.py) on bundles made by the real packager.

The CLI is exercised as on a device: ``python <bundle>/edgepack_shim.py ...``; the Python API through
the same file as packaged.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepack.accuracy import compare
from edgepack.bundle.manifest import verify_bundle as host_verify
from edgepack.errors import EdgepackError
from edgepack.examples import build_example, write_example
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from edgepack.runtime_shim import edgepack_shim as shim
from tests import shaped_models

TARGETS = Path(__file__).resolve().parent.parent / "targets"


def _profile(tmp: Path, base: str, name: str, **changes) -> Path:
    """A profile YAML: a built-in one with some keys changed (dotted paths)."""
    data = yaml.safe_load((TARGETS / f"{base}.yaml").read_text())
    data["name"] = name
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _package(model: Path, profiles: list, output: Path) -> dict[str, Path]:
    results = package_model(model, [load_profile(str(p)) for p in profiles], Options(output=output))
    failed = [f"{r.target}: {r.error}" for r in results if not r.ok]
    assert not failed, failed
    return {r.target: r.bundle for r in results}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """cnn for linux-x64 and jetson-orin-trt, plus profiles that need onnxruntime>=99 or strict TensorRT;
    the transformer for linux-x64; the cnn with external data, kept as ONNX."""
    tmp = tmp_path_factory.mktemp("shim")
    cnn = write_example("cnn", tmp)
    future = _profile(tmp, "linux-x64", "future-runtime", **{"runtime.version": ">=99"})
    strict = _profile(
        tmp,
        "linux-x64",
        "strict-trt",
        strict_providers=True,
        execution_providers=[
            {"name": "TensorrtExecutionProvider", "options": {"trt_fp16_enable": True}},
            {"name": "CPUExecutionProvider"},
        ],
    )
    found = _package(cnn, ["linux-x64", "jetson-orin-trt", future, strict], tmp / "build")
    found["transformer"] = _package(write_example("transformer", tmp), ["linux-x64"], tmp / "build")["linux-x64"]
    external = tmp / "external" / "cnn.onnx"
    external.parent.mkdir()
    onnx.save_model(
        build_example("cnn"),
        external,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="cnn.onnx.data",
        size_threshold=0,
    )
    onnx_style = _profile(tmp, "linux-x64", "x64-onnx", **{"ort_format.style": "none"})
    found["external"] = _package(external, [onnx_style], tmp / "build-external")["x64-onnx"]
    return found


def test_a_qdq_model_whose_weights_share_a_zero_point_is_packaged_and_runs(tmp_path: Path):
    """Plain onnxruntime runs it; the exact INT8 entry every bundle carries makes onnxruntime 1.31 fail to load it
    on x86 CPUs without VNNI. edgepack's checks and the shim load it without the entry there, and say so."""
    import onnxruntime as ort

    model = shaped_models.save(shaped_models.shared_weight_zero_point(), tmp_path, "qdq")
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)}
    (expected,) = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)
    onnx_style = _profile(tmp_path, "linux-x64", "x64-onnx", **{"ort_format.style": "none"})
    found = _package(model, ["linux-x64", onnx_style], tmp_path / "build")
    for target, bundle in found.items():
        loaded = shim.load(bundle)
        np.testing.assert_array_equal(loaded.run(feeds)["y"], expected, err_msg=target)
    loaded = shim.load(found["x64-onnx"])
    self_test = next(
        s for s in json.loads((found["x64-onnx"] / "manifest.json").read_text())["stages"] if s["stage"] == "self_test"
    )
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.add_session_config_entry("session.x64quantprecision", "1")
    try:  # onnxruntime's own answer on this host (the converter runs only where MLAS reports U8S8 overflow)
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        breaks = False
    except Exception:
        breaks = True
    if breaks:  # the .onnx loads without the entry, and the bundle says so
        assert len(loaded.warnings) == 1 and "session.x64quantprecision=1" in loaded.warnings[0]
        assert "session.x64quantprecision=1" in self_test["notice"]
    else:
        assert loaded.warnings == [] and "notice" not in self_test
    result = subprocess.run(
        [sys.executable, str(found["x64-onnx"] / "edgepack_shim.py"), "bench", "--runs", "2", "--dim", "batch=4"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert ("session.x64quantprecision=1" in result.stderr) == breaks, result.stderr


def test_an_ort_file_onnxruntime_cannot_load_is_not_shipped(tmp_path: Path):
    """onnxruntime 1.31 writes a Runtime-style .ort of an int8-activation QDQ model that it cannot load
    (convert stage, rule 8): a profile that allows it ships ONNX, one that does not ships Fixed style; both
    say so, and both bundles give plain onnxruntime's outputs."""
    import onnxruntime as ort

    from edgepack.onnxio.ort_convert import convert_to_ort

    model = shaped_models.save(shaped_models.shared_weight_zero_point(), tmp_path, "qdq")
    feeds = {"x": np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)}
    (expected,) = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)
    runtime_ort, _ = convert_to_ort(model, tmp_path / "ort", "Runtime", "arm", where="test")
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for key in ("session.load_model_format", "session.enable_saved_runtime_optimizations"):
        options.add_session_config_entry(key, "ORT" if key.endswith("format") else "1")
    try:  # onnxruntime's own answer: does it load the Runtime-style .ort it wrote?
        ort.InferenceSession(str(runtime_ort), options, providers=["CPUExecutionProvider"])
        broken = False
    except Exception:
        broken = True
    found = _package(model, ["jetson-orin-trt", "android-xnnpack"], tmp_path / "build")
    for target, (fallback, file) in {
        "jetson-orin-trt": ("onnx", "model/qdq.onnx"),
        "android-xnnpack": ("Fixed", "model/qdq.ort"),
    }.items():
        manifest = json.loads((found[target] / "manifest.json").read_text())
        convert = next(s for s in manifest["stages"] if s["stage"] == "convert")
        if broken:
            assert convert["fallback"] == fallback and "cannot load the Runtime-style .ort" in convert["notice"]
            assert manifest["model"]["file"] == file, target
        else:
            assert "fallback" not in convert and convert["style"] == "Runtime", target
        loaded = shim.load(found[target], providers=["CPUExecutionProvider"])
        self_test = next(s for s in manifest["stages"] if s["stage"] == "self_test")
        if "host_int8_kernels" in self_test:
            # an x86 host without VNNI: plain onnxruntime saturates here, the arm64 .ort does not (selftest rule 6);
            # against the model's exact numbers (QDQ kept in float) it is off by int8 rounding only
            assert target == "android-xnnpack" and "cannot be measured here" in self_test["notice"]
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            (exact,) = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]).run(None, feeds)
            assert compare([{"y": exact}], [loaded.run(feeds)])["cosine"] > 0.9999
        else:
            np.testing.assert_array_equal(loaded.run(feeds)["y"], expected, err_msg=target)


@pytest.fixture
def copy_of(bundles, tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(bundles[name], tmp_path / bundles[name].name))

    return copy


def shim_cli(bundle: Path, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(bundle / "edgepack_shim.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


def assert_one_line_error(done: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if "warning:" not in line]
    assert len(lines) == 1 and lines[0].startswith("edgepack_shim: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def cnn_input(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def text_inputs(batch: int = 2, sequence: int = 8) -> dict:
    rng = np.random.default_rng(1)
    return {
        "input_ids": rng.integers(0, 100, (batch, sequence)).astype(np.int64),
        "attention_mask": np.ones((batch, sequence), np.int64),
    }


# --- tampering is always refused ---------------------------------------------------------------------


def _manifest_offsets(bundle: Path) -> dict[str, int]:
    text = (bundle / "manifest.json").read_bytes()
    model_hash = json.loads(text)["files"]["model/cnn.ort"]["sha256"]
    return {
        "first byte": 0,
        "in the description": text.index(b"x86-64 Linux") + 3,
        "in a file's sha256": text.index(model_hash.encode()) + 10,
        "in a file's size": text.index(b'"size": ') + 8,
        "in its own checksum": text.index(b'"manifest_sha256": "') + 25,
        "in a stage report": text.index(b'"self_test"') + 4,
        "last byte": len(text) - 1,
    }


TAMPERING = [
    "model byte",
    "manifest: first byte",
    "manifest: in the description",
    "manifest: in a file's sha256",
    "manifest: in a file's size",
    "manifest: in its own checksum",
    "manifest: in a stage report",
    "manifest: last byte",
    "deleted model",
    "deleted README",
    "added file",
    "added model file",
    "added bytecode",
    "model replaced by a link",
]


def _tamper(bundle: Path, how: str) -> str:
    """Change ``bundle`` as described; return the file name the refusal must mention."""
    if how == "model byte":
        model = bundle / "model" / "cnn.ort"
        flip_byte(model, model.stat().st_size // 2)
        return "model/cnn.ort"
    if how.startswith("manifest: "):
        flip_byte(bundle / "manifest.json", _manifest_offsets(bundle)[how.split(": ", 1)[1]])
        return "manifest.json"
    if how == "deleted model":
        (bundle / "model" / "cnn.ort").unlink()
        return "model/cnn.ort"
    if how == "deleted README":
        (bundle / "README.md").unlink()
        return "README.md"
    if how == "added file":
        (bundle / "notes.txt").write_text("hello")
        return "notes.txt"
    if how == "added model file":
        shutil.copy(bundle / "model" / "cnn.ort", bundle / "model" / "other.ort")
        return "model/other.ort"
    if how == "added bytecode":
        (bundle / "__pycache__").mkdir()
        (bundle / "__pycache__" / "evil.cpython-311.pyc").write_bytes(b"\0" * 16)
        return "__pycache__/evil.cpython-311.pyc"
    if how == "model replaced by a link":
        outside = bundle.parent / "cnn-elsewhere.ort"
        (bundle / "model" / "cnn.ort").rename(outside)
        (bundle / "model" / "cnn.ort").symlink_to(outside)
        return "model/cnn.ort"
    raise AssertionError(how)


def _host_accepts(bundle: Path) -> bool:
    """`edgepack verify` on the packaging host must agree with the shim."""
    try:
        return host_verify(bundle).ok
    except EdgepackError:
        return False


@pytest.mark.parametrize("how", TAMPERING)
def test_tampered_bundle_is_refused_by_name(copy_of, how):
    bundle = copy_of("linux-x64")
    name = _tamper(bundle, how)
    with pytest.raises(shim.VerificationError, match=re.escape(name)):
        shim.load(bundle)
    assert not _host_accepts(bundle)
    done = shim_cli(bundle, "verify")
    assert_one_line_error(done, 7, name)


@pytest.mark.parametrize("how", ["model byte", "added file", "manifest: in the description"])
def test_run_refuses_a_tampered_bundle_before_running(copy_of, tmp_path, how):
    bundle = copy_of("linux-x64")
    name = _tamper(bundle, how)
    np.savez(tmp_path / "in.npz", image=cnn_input())
    done = shim_cli(bundle, "run", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz"))
    assert_one_line_error(done, 7, name)
    assert not (tmp_path / "out.npz").exists()


def test_host_verify_catches_a_changed_manifest_byte(copy_of):
    bundle = copy_of("linux-x64")
    flip_byte(bundle / "manifest.json", _manifest_offsets(bundle)["in the description"])
    result = host_verify(bundle)
    assert result.changed == ["manifest.json"]


def test_flipped_byte_in_external_data_is_refused(copy_of):
    bundle = copy_of("external")
    side = bundle / "model" / "cnn.onnx.data"
    assert side.is_file() and "model/cnn.onnx.data" in json.loads((bundle / "manifest.json").read_text())["files"]
    before = shim.load(copy_of("linux-x64")).run({"image": cnn_input()})["logits"]
    assert np.allclose(shim.load(bundle).run({"image": cnn_input()})["logits"], before, atol=1e-4)
    flip_byte(side, side.stat().st_size // 2)  # same size: onnxruntime alone would load it and give wrong outputs
    with pytest.raises(shim.VerificationError, match="changed: model/cnn.onnx.data"):
        shim.load(bundle)
    assert_one_line_error(shim_cli(bundle, "verify"), 7, "model/cnn.onnx.data")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_anywhere_is_refused(bundles, tmp_path_factory, data):
    bundle = Path(shutil.copytree(bundles["linux-x64"], tmp_path_factory.mktemp("flip") / "b"))
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    path = data.draw(st.sampled_from(files), label="file")
    offset = data.draw(st.integers(0, path.stat().st_size - 1), label="offset")
    flip_byte(path, offset)
    with pytest.raises(shim.VerificationError, match=re.escape(path.relative_to(bundle).as_posix())):
        shim.verify_bundle(bundle)


def test_import_from_the_bundle_folder_keeps_the_bundle_valid(copy_of):
    bundle = copy_of("linux-x64")
    code = "import edgepack_shim, numpy as np; m = edgepack_shim.load(); print(m.run({'image': np.zeros((1, 3, 32, 32), np.float32)})['logits'].shape)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=bundle, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "(1, 10)" in done.stdout
    assert list((bundle / "__pycache__").glob("edgepack_shim.*.pyc"))  # written by the import, tolerated
    assert shim_cli(bundle, "verify").returncode == 0


def test_no_verify_warns_that_it_is_unsafe_and_runs(copy_of, tmp_path):
    bundle = copy_of("linux-x64")
    (bundle / "notes.txt").write_text("hello")
    np.save(tmp_path / "x.npy", cnn_input())
    done = shim_cli(bundle, "run", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npz"), "--no-verify")
    assert done.returncode == 0, done.stderr
    assert "--no-verify" in done.stderr and "unsafe" in done.stderr
    assert np.load(tmp_path / "y.npz")["logits"].shape == (2, 10)


# --- run: results and bad inputs ---------------------------------------------------------------------


def test_run_cli_matches_the_python_api(bundles, tmp_path):
    bundle = bundles["transformer"]
    feeds = text_inputs()
    np.savez(tmp_path / "in.npz", **feeds)
    done = shim_cli(bundle, "run", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz"), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["ok"] and summary["verified"] and summary["providers"] == ["CPUExecutionProvider"]
    assert summary["outputs"]["last_hidden_state"]["shape"] == [2, 8, 64]
    expected = shim.load(bundle).run(feeds)["last_hidden_state"]
    assert np.array_equal(np.load(tmp_path / "out.npz")["last_hidden_state"], expected)


def test_run_writes_npy_for_a_single_output(bundles, tmp_path):
    np.save(tmp_path / "x.npy", cnn_input())
    done = shim_cli(bundles["linux-x64"], "run", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert done.returncode == 0, done.stderr
    assert np.array_equal(
        np.load(tmp_path / "y.npy"), shim.load(bundles["linux-x64"]).run({"image": cnn_input()})["logits"]
    )


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"image": cnn_input(), "extra": cnn_input()}, "unknown input 'extra': the model's inputs are image"),
        ({}, "missing input 'image'"),
        ({"image": cnn_input().astype(np.float64)}, "input 'image' must be float32, got float64: only lossless casts"),
        ({"image": cnn_input().astype(np.int64)}, "must be float32, got int64"),
        ({"image": cnn_input()[0]}, "input 'image' must have 4 dims [batch, 3, 32, 32], got 3"),
        ({"image": np.zeros((1, 3, 31, 32), np.float32)}, "input 'image' dim 2 must be 32"),
        ({"image": np.zeros((1, 4, 32, 32), np.float32)}, "dim 1 must be 3"),
        ({"image": np.array([["a"]])}, "must be float32, got <U1"),
        ([cnn_input()], "inputs must be a mapping"),
    ],
)
def test_bad_inputs_give_one_clear_error(bundles, feeds, message):
    model = shim.load(bundles["linux-x64"])
    with pytest.raises(shim.InputError) as caught:
        model.run(feeds)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_named_dims_must_agree_across_inputs(bundles):
    feeds = text_inputs()
    feeds["attention_mask"] = feeds["attention_mask"][:, :7]
    with pytest.raises(shim.InputError, match="input 'attention_mask' dim 1 \\('sequence'\\) is 7 but 'sequence' is 8"):
        shim.load(bundles["transformer"]).run(feeds)


def test_dims_named_question_mark_are_independent():
    """PaddleOCR's classifier declares [?, 3, ?, ?]: a 48x192 image is valid, "?" names no shared dim."""
    specs = [{"name": "x", "dtype": "float32", "shape": ["?", 3, "?", "?"]}]
    arrays = shim.check_feeds(specs, {"x": np.zeros((1, 3, 48, 192), np.float32)})
    assert arrays["x"].shape == (1, 3, 48, 192)


def test_lossless_casts_are_made(bundles):
    text = shim.load(bundles["transformer"])
    feeds = text_inputs()
    as_int32 = {name: value.astype(np.int32) for name, value in feeds.items()}
    assert np.array_equal(text.run(as_int32)["last_hidden_state"], text.run(feeds)["last_hidden_state"])
    image = shim.load(bundles["linux-x64"])
    half = cnn_input().astype(np.float16)
    assert np.array_equal(image.run({"image": half})["logits"], image.run({"image": half.astype(np.float32)})["logits"])
    pixels = np.random.default_rng(2).integers(0, 255, (1, 3, 32, 32)).astype(np.uint8)
    assert np.array_equal(
        image.run({"image": pixels})["logits"], image.run({"image": pixels.astype(np.float32)})["logits"]
    )


def test_run_cli_bad_inputs_exit_2_in_one_line(bundles, tmp_path):
    np.savez(tmp_path / "bad.npz", image=cnn_input().astype(np.float64))
    done = shim_cli(bundles["linux-x64"], "run", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "o.npz"))
    assert_one_line_error(done, 2, "input 'image' must be float32, got float64")
    np.save(tmp_path / "one.npy", text_inputs()["input_ids"])
    done = shim_cli(bundles["transformer"], "run", str(tmp_path / "one.npy"), "-o", str(tmp_path / "o.npz"))
    assert_one_line_error(done, 2, "holds one array but the model has 2 inputs")
    done = shim_cli(bundles["linux-x64"], "run", str(tmp_path / "missing.npz"))
    assert_one_line_error(done, 2, "cannot read inputs")
    done = shim_cli(bundles["linux-x64"], "bench", "--runs", "0")
    assert_one_line_error(done, 2, "--runs")
    done = shim_cli(bundles["linux-x64"], "frobnicate")
    assert_one_line_error(done, 2, "invalid choice")


def test_run_from_eight_threads_gives_identical_outputs(bundles):
    model = shim.load(bundles["linux-x64"])
    inputs = [cnn_input(batch=1 + i % 3, seed=i) for i in range(8)]
    expected = [model.run({"image": x})["logits"] for x in inputs]
    start = threading.Barrier(8)
    mismatches, errors = [], []

    def worker(i: int) -> None:
        try:
            start.wait()
            for _ in range(50):
                if not np.array_equal(model.run({"image": inputs[i]})["logits"], expected[i]):
                    mismatches.append(i)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches


# --- session from the manifest, runtime version, providers -------------------------------------------


def test_session_follows_the_manifest(bundles):
    model = shim.load(bundles["jetson-orin-trt"])  # Runtime-style .ort, 6 threads in the profile
    options = model.session.get_session_options()
    assert options.intra_op_num_threads == 6
    assert options.get_session_config_entry("session.load_model_format") == "ORT"
    assert options.get_session_config_entry("session.enable_saved_runtime_optimizations") == "1"
    assert model.wanted_providers[0] == "TensorrtExecutionProvider"
    assert model.providers == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider" in model.fallback


def test_runtime_out_of_range_is_refused_with_the_install_command(bundles, tmp_path):
    bundle = bundles["future-runtime"]
    with pytest.raises(shim.RuntimeMismatch, match=re.escape("-m pip install 'onnxruntime>=99'")):
        shim.load(bundle)
    np.savez(tmp_path / "in.npz", image=cnn_input())
    done = shim_cli(bundle, "run", str(tmp_path / "in.npz"), "-o", str(tmp_path / "o.npz"))
    line = assert_one_line_error(done, 4, "onnxruntime 1.", "needs onnxruntime>=99", "pip install 'onnxruntime>=99'")
    assert "is installed" in line
    assert "DOES NOT MATCH" in shim_cli(bundle, "info").stdout


@pytest.mark.parametrize(
    "spec",
    [
        ">=1.20",
        ">=1.20,<2",
        "==1.31.*",
        "==1.30.*",
        "~=1.31.0",
        "~=1.30",
        "!=1.31.1",
        "<1.31.1",
        "<=1.31.1",
        ">1.31",
        "==1.31.1",
        ">=99",
        "~=2.0",
        "!=1.31.*",
        "> 1.2",
    ],
)
@pytest.mark.parametrize("version", ["1.31.1", "1.20.0", "1.31", "2.1.0"])
def test_version_parser_agrees_with_packaging(spec, version):
    from packaging.specifiers import SpecifierSet

    assert shim._simple_satisfies(version, spec) == SpecifierSet(spec).contains(version, prereleases=True)
    assert shim.version_satisfies(version, spec) == SpecifierSet(spec).contains(version, prereleases=True)


def test_pre_releases_are_compared_by_packaging():
    assert shim.version_satisfies("1.32.0.dev20260101", ">=1.20")
    assert not shim.version_satisfies("1.20.0rc1", ">=1.20")


def test_strict_providers_refuse_a_missing_preferred_provider(bundles, tmp_path):
    with pytest.raises(
        shim.RuntimeMismatch, match="preferred provider TensorrtExecutionProvider is not in this onnxruntime"
    ):
        shim.load(bundles["strict-trt"])  # the profile says strict_providers: true
    np.savez(tmp_path / "in.npz", image=cnn_input())
    args = ("run", str(tmp_path / "in.npz"), "-o", str(tmp_path / "o.npz"))
    assert_one_line_error(shim_cli(bundles["strict-trt"], *args), 4, "TensorrtExecutionProvider", "strict")
    # jetson-orin-trt is not strict: a reported fallback, unless --strict-providers
    relaxed = shim_cli(bundles["jetson-orin-trt"], *args)
    assert (
        relaxed.returncode == 0
        and "warning: running on CPUExecutionProvider, not TensorrtExecutionProvider" in relaxed.stderr
    )
    assert_one_line_error(
        shim_cli(bundles["jetson-orin-trt"], *args, "--strict-providers"), 4, "TensorrtExecutionProvider"
    )
    with pytest.raises(shim.RuntimeMismatch):
        shim.load(bundles["jetson-orin-trt"], strict_providers=True)
    assert (
        shim.load(bundles["jetson-orin-trt"], providers=["CPUExecutionProvider"], strict_providers=True).fallback
        is None
    )


def test_tensorrt_options_are_built_from_the_manifest(bundles, tmp_path):
    manifest = json.loads((bundles["jetson-orin-trt"] / "manifest.json").read_text())
    trt = manifest["runtime"]["execution_providers"][0]
    assert trt["name"] == "TensorrtExecutionProvider"
    sha = manifest["files"][manifest["model"]["file"]]["sha256"]
    options = shim.tensorrt_options(
        trt["options"],
        inputs=manifest["model"]["inputs"],
        precision="fp32",
        model_sha256=sha,
        cache_dir=tmp_path,
        gpu="Orin (nvgpu)",
        trt_version="10.3.0",
    )
    folder = str(tmp_path / "tensorrt" / "Orin-nvgpu-trt10.3.0" / sha[:16])
    assert options["trt_fp16_enable"] == "True"
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"] == folder
    assert options["trt_timing_cache_enable"] == "True" and options["trt_timing_cache_path"] == folder
    assert "tensorrt_version" not in options and "trt_int8_enable" not in options
    assert (
        options["trt_profile_min_shapes"],
        options["trt_profile_opt_shapes"],
        options["trt_profile_max_shapes"],
    ) == ("image:1x3x32x32", "image:1x3x32x32", "image:8x3x32x32")  # batch: [1, 1, 8] in the profile
    assert all(isinstance(v, str) for v in options.values())
    # another GPU or TensorRT version never reads these engines
    other = shim.tensorrt_options(
        trt["options"],
        inputs=manifest["model"]["inputs"],
        precision="fp32",
        model_sha256=sha,
        cache_dir=tmp_path,
        gpu="Orin (nvgpu)",
        trt_version="10.7.0",
    )
    assert other["trt_engine_cache_path"] != folder


def test_tensorrt_profile_shapes_and_int8(bundles):
    inputs = json.loads((bundles["transformer"] / "manifest.json").read_text())["model"]["inputs"]
    shapes = shim.tensorrt_profile_shapes(inputs, {"sequence": [1, 64, 256]})
    assert shapes == {
        "trt_profile_min_shapes": "input_ids:1x1,attention_mask:1x1",
        "trt_profile_opt_shapes": "input_ids:1x64,attention_mask:1x64",
        "trt_profile_max_shapes": "input_ids:16x256,attention_mask:16x256",
    }
    fixed = [{"name": "x", "dtype": "float32", "shape": [1, 3, 8, 8]}]
    assert shim.tensorrt_profile_shapes(fixed, {}) == {}
    options = shim.tensorrt_options(
        {"dynamic_dims": {"batch": [1, 4, 8]}},
        inputs=inputs,
        precision="int8-static",
        model_sha256="0" * 64,
        cache_dir=Path("/c"),
        gpu="g",
        trt_version="10",
    )
    assert options["trt_int8_enable"] == "True" and "dynamic_dims" not in options
    assert "trt_engine_cache_path" not in options
    assert options["trt_profile_opt_shapes"] == "input_ids:4x128,attention_mask:4x128"
    with pytest.raises(shim.ShimError, match="dynamic_dims\\['batch'\\]"):
        shim.tensorrt_profile_shapes(inputs, {"batch": [4, 1, 8]})


def test_telemetry_is_off(bundles, tmp_path):
    np.savez(tmp_path / "in.npz", image=cnn_input())
    # onnxruntime writes no telemetry file when CI=true, which would fail the control below for the wrong reason
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    plain_home, shim_home = tmp_path / "plain", tmp_path / "shim"
    plain = (
        "import onnxruntime as ort, numpy as np, sys; s = ort.InferenceSession(sys.argv[1]); "
        "s.run(None, {'image': np.zeros((1, 3, 32, 32), np.float32)})"
    )
    model = bundles["linux-x64"] / "model" / "cnn.ort"
    done = subprocess.run(
        [sys.executable, "-c", plain, str(model)],
        env={**env, "HOME": str(plain_home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (plain_home / ".cache" / "Microsoft").exists()  # what the shim prevents
    done = shim_cli(
        bundles["linux-x64"],
        "run",
        str(tmp_path / "in.npz"),
        "-o",
        str(tmp_path / "o.npz"),
        env={**env, "HOME": str(shim_home)},
    )
    assert done.returncode == 0, done.stderr
    assert not (shim_home / ".cache").exists()


# --- info and bench ----------------------------------------------------------------------------------


def test_info_text_and_json(bundles):
    done = shim_cli(bundles["jetson-orin-trt"], "info")
    assert done.returncode == 0, done.stderr
    assert "input      image: float32 [batch, 3, 32, 32]" in done.stdout
    assert "output     logits: float32 [batch, 10]" in done.stdout
    assert "wanted TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider" in done.stdout
    assert "will use CPUExecutionProvider (TensorrtExecutionProvider missing: fallback)" in done.stdout
    assert "needs onnxruntime-gpu>=1.20; installed onnxruntime 1." in done.stdout  # the CPU package, here
    assert "(version ok, but the package is onnxruntime, not onnxruntime-gpu)" in done.stdout
    info = json.loads(shim_cli(bundles["transformer"], "info", "--json").stdout)
    assert [i["name"] for i in info["inputs"]] == ["input_ids", "attention_mask"]
    assert info["inputs"][0]["shape"] == ["batch", "sequence"]
    assert info["target"] == "linux-x64" and info["runtime"]["ok"] is True
    assert info["providers"]["will_use"] == ["CPUExecutionProvider"] and info["model"]["format"] == "ort"


def test_bench_without_inputs_uses_the_shapes_and_ids_the_self_test_ran_on(tmp_path):
    """token_type_ids index a 2-row table: bench's made-up ids stay below it, as the self-test's did."""
    from edgepack.pipeline.job import Options
    from edgepack.pipeline.run import package_model
    from edgepack.profiles import load_profile
    from tests import shaped_models

    model = shaped_models.save(shaped_models.token_types(), tmp_path, "bert_like")
    [result] = package_model(model, [load_profile("linux-x64")], Options(output=tmp_path / "out", quantize="none"))
    assert result.ok, result.error
    done = shim_cli(result.bundle, "bench", "--runs", "2", "--json")
    assert done.returncode == 0, done.stderr
    tested = next(s for s in result.manifest["stages"] if s["stage"] == "self_test")
    assert json.loads(done.stdout)["inputs"]["token_type_ids"]["shape"] == tested["input_shapes"]["token_type_ids"]


def test_bench_json_and_text(bundles):
    done = shim_cli(bundles["transformer"], "bench", "--runs", "30", "--dim", "sequence=16", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    latency = result["latency_ms"]
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert result["runs"] == 30 and result["first_run_ms"] > 0 and result["throughput_per_s"] > 0
    assert result["inputs"]["input_ids"] == {"dtype": "int64", "shape": [1, 16]}
    assert result["providers"] == ["CPUExecutionProvider"]
    text = shim_cli(bundles["linux-x64"], "bench", "--runs", "10")
    assert text.returncode == 0, text.stderr
    for label in ("first run", "latency    p50", "p90", "p99", "throughput", "load"):
        assert label in text.stdout


# --- serve -------------------------------------------------------------------------------------------


@pytest.fixture
def server(bundles):
    process = subprocess.Popen(
        [
            sys.executable,
            str(bundles["linux-x64"] / "edgepack_shim.py"),
            "serve",
            "--port",
            "0",
            "--max-request-mb",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        yield int(match.group(1))
    finally:
        process.terminate()
        process.wait(timeout=30)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_serve_round_trip_on_localhost(bundles, server):
    x = cnn_input()
    status, reply = request(server, "POST", "/run", json.dumps({"inputs": {"image": x.tolist()}}).encode())
    assert status == 200, reply
    got = np.array(reply["outputs"]["logits"]["data"], dtype=np.float32)
    assert reply["outputs"]["logits"]["shape"] == [2, 10]
    assert np.array_equal(got, shim.load(bundles["linux-x64"]).run({"image": x})["logits"])
    assert request(server, "GET", "/health") == (200, {"ok": True})
    status, info = request(server, "GET", "/info")
    assert status == 200 and info["inputs"][0]["name"] == "image" and info["providers"] == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    "method, path, body, headers, status, message",
    [
        ("POST", "/run", b"{not json", None, 400, "not JSON"),
        ("POST", "/run", b'{"image": []}', None, 400, 'must be {"inputs"'),
        ("POST", "/run", json.dumps({"inputs": {"img": [1.0]}}).encode(), None, 400, "unknown input 'img'"),
        ("POST", "/run", json.dumps({"inputs": {"image": [[1.0, 2.0]]}}).encode(), None, 400, "must have 4 dims"),
        (
            "POST",
            "/run",
            json.dumps({"inputs": {"image": [[1.0], [2.0, 3.0]]}}).encode(),
            None,
            400,
            "different lengths",
        ),
        ("POST", "/run", json.dumps({"inputs": {"image": "cat"}}).encode(), None, 400, "expected numbers"),
        ("POST", "/run", b"x" * (2 << 20), None, 413, "over the limit"),
        ("POST", "/run", None, {"Transfer-Encoding": "chunked"}, 411, "Content-Length"),
        ("GET", "/nope", None, None, 404, "no such path"),
        ("PUT", "/run", b"{}", None, 405, "use POST /run"),
    ],
)
def test_serve_answers_bad_requests_with_4xx(server, method, path, body, headers, status, message):
    got_status, reply = request(server, method, path, body, headers)
    assert got_status == status and message in reply["error"], reply


def test_serve_json_integers_must_fit(bundles):
    specs = [{"name": "ids", "dtype": "int32", "shape": ["n"]}]
    assert shim.from_json(specs, {"ids": [1, 2]})["ids"].dtype == np.int32
    with pytest.raises(shim.InputError, match="do not fit int32"):
        shim.from_json(specs, {"ids": [2**40]})
