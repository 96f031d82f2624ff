"""Models with external data go through every stage with no extra step: several side files, tensors at
offsets inside one file, a subfolder. Models too large for the ORT format ship as ONNX + external data
with a notice, or fail where the profile forbids it; a 0-byte model never reaches a bundle."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgepack.stages.convert as convert_stage
from edgepack.bundle.manifest import read_manifest, verify_bundle
from edgepack.errors import ConversionError
from edgepack.pipeline.job import Artifact, Job, Options, Source
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from edgepack.stages.bundle import Bundle
from tests.external_models import (
    B1,
    IR_VERSION,
    OPSET,
    W1,
    W2,
    expected_output,
    external_tensor,
    tree_digest,
    write_split_model,
)
from tests.support.manifests import minimal_content

X = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
TARGETS = Path(__file__).resolve().parent.parent / "targets"


def _profile_file(tmp_path: Path, base: str, style: str | None = None, allow_fallback: bool | None = None) -> Path:
    """A built-in profile with ``ort_format`` changed, as a user's own .yaml."""
    text = (TARGETS / f"{base}.yaml").read_text()
    lines = []
    for line in text.splitlines():
        if style and line.strip().startswith("style:"):
            line = f"  style: {style}"
        if line.strip().startswith("allow_onnx_fallback:"):
            continue
        lines.append(line)
        if allow_fallback is not None and line.startswith("ort_format:"):
            lines.append(f"  allow_onnx_fallback: {str(allow_fallback).lower()}")
    path = tmp_path / f"{base}-custom.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _shim_run(bundle_dir: Path, feeds: dict) -> dict:
    """Load the bundle through the shim it ships with, as the device does."""
    spec = importlib.util.spec_from_file_location(f"shim_{abs(hash(bundle_dir))}", bundle_dir / "edgepack_shim.py")
    shim = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = shim  # dataclasses in the shim look their module up there
    spec.loader.exec_module(shim)
    return shim.load(bundle_dir).run(feeds)


def _stage(manifest: dict, name: str) -> dict:
    return next(r for r in manifest["stages"] if r["stage"] == name)


def test_several_side_files_at_offsets_packaged_to_ort(tmp_path):
    model = write_split_model(tmp_path / "in")
    before = tree_digest(tmp_path / "in")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgepack",
            "package",
            str(model),
            "--target",
            "rpi-arm64",
            "--quantize",
            "none",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    bundle_dir = out / "mlp-rpi-arm64"
    manifest = read_manifest(bundle_dir)
    assert manifest["model"]["file"] == "model/mlp.ort"
    assert "external data 2 file(s)" in _stage(manifest, "load")["summary"]
    assert _stage(manifest, "self_test")["passed"]
    assert verify_bundle(bundle_dir).ok
    # the weights were read at their offsets: the bundle computes what numpy computes
    np.testing.assert_allclose(_shim_run(bundle_dir, {"x": X})["y"], expected_output(X), rtol=1e-5, atol=1e-5)
    assert tree_digest(tmp_path / "in") == before


def test_style_none_bundles_side_file_0644_and_checksummed(tmp_path):
    model = write_split_model(tmp_path / "in")
    (tmp_path / "in" / "b.bin").chmod(0o600)  # as onnx.save_model writes side files
    profile = load_profile(str(_profile_file(tmp_path, "rpi-arm64", style="none")))
    [result] = package_model(model, [profile], Options(output=tmp_path / "out", quantize="none"))
    assert result.ok, result.error
    manifest = result.manifest
    assert manifest["model"]["file"] == "model/mlp.onnx"
    assert manifest["model"]["external_data"] == ["model/mlp.onnx.data"]
    side = result.bundle / "model" / "mlp.onnx.data"
    assert stat.S_IMODE(side.stat().st_mode) == 0o644
    assert stat.S_IMODE((result.bundle / "model" / "mlp.onnx").stat().st_mode) == 0o644
    assert manifest["files"]["model/mlp.onnx.data"]["size"] == side.stat().st_size == W1.nbytes + B1.nbytes + W2.nbytes
    assert verify_bundle(result.bundle).ok
    np.testing.assert_allclose(_shim_run(result.bundle, {"x": X})["y"], expected_output(X), rtol=1e-5, atol=1e-5)


def _subgraph_model(folder: Path) -> Path:
    """y = If(sum(x) > 0, x @ Wsub (a branch initializer), x @ Wconst (a Constant node)), both tensors external."""
    folder.mkdir(parents=True)
    (folder / "sub.bin").write_bytes(bytes(16) + W1.tobytes() + (2 * W1).tobytes())
    then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wsub"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", W1.shape[1]])],
        [external_tensor("Wsub", W1, "sub.bin", 16)],
    )
    other = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wconst"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", W1.shape[1]])],
    )
    constant = helper.make_node("Constant", [], ["Wconst"])
    constant.attribute.add(name="value", type=onnx.AttributeProto.TENSOR).t.CopyFrom(
        external_tensor("Wconst", 2 * W1, "sub.bin", 16 + W1.nbytes)
    )
    nodes = [
        constant,
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes,
        "branchy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", W1.shape[1]])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    (folder / "branchy.onnx").write_bytes(model.SerializeToString())
    return folder / "branchy.onnx"


@pytest.mark.parametrize("style", ["none", "Fixed"])
def test_external_data_in_subgraphs_and_constant_nodes(tmp_path, style):
    model = _subgraph_model(tmp_path / "in")
    profile = load_profile(str(_profile_file(tmp_path, "rpi-arm64", style=style)))
    [result] = package_model(model, [profile], Options(output=tmp_path / "out", quantize="none"))
    assert result.ok, result.error
    if style == "none":
        assert result.manifest["model"]["external_data"] == ["model/branchy.onnx.data"]
    positive, negative = np.abs(X), -np.abs(X)
    got = _shim_run(result.bundle, {"x": positive})["y"]
    np.testing.assert_allclose(got, positive @ W1, rtol=1e-5, atol=1e-5)
    got = _shim_run(result.bundle, {"x": negative})["y"]
    np.testing.assert_allclose(got, negative @ (2 * W1), rtol=1e-5, atol=1e-5)


def test_model_bytes_counts_tensors_not_padding(tmp_path):
    model = write_split_model(tmp_path)
    assert convert_stage.model_bytes(model) == model.stat().st_size + W1.nbytes + B1.nbytes + W2.nbytes


def test_model_over_the_ort_limit_ships_as_onnx_with_a_notice(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_stage, "ORT_FORMAT_MAX_BYTES", 512)
    model = write_split_model(tmp_path / "in")
    messages: list[str] = []
    [result] = package_model(
        model, [load_profile("rpi-arm64")], Options(output=tmp_path / "out", quantize="none"), progress=messages.append
    )
    assert result.ok, result.error
    convert = _stage(result.manifest, "convert")
    assert convert["fallback"] == "onnx" and "over the ORT format's limit" in convert["notice"]
    assert any(m.startswith("[rpi-arm64] notice: the model is") for m in messages)
    assert result.to_dict()["notices"] == [f"convert: {convert['notice']}"]
    assert f"## Notices\n\n- **convert**: {convert['notice']}" in (result.bundle / "REPORT.md").read_text()
    assert result.manifest["model"]["format"] == "onnx"
    assert result.manifest["reduced_ops_config"] is None
    files = sorted(p.relative_to(result.bundle).as_posix() for p in (result.bundle / "model").iterdir())
    assert files == ["model/mlp.onnx", "model/mlp.onnx.data"]
    assert all(result.bundle.joinpath(f).stat().st_size > 0 for f in files)
    assert all(f in result.manifest["files"] for f in files)
    assert stat.S_IMODE((result.bundle / files[1]).stat().st_mode) == 0o644
    assert _stage(result.manifest, "self_test")["passed"]
    np.testing.assert_allclose(_shim_run(result.bundle, {"x": X})["y"], expected_output(X), rtol=1e-5, atol=1e-5)


def test_model_over_the_ort_limit_fails_where_the_profile_forbids_onnx(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_stage, "ORT_FORMAT_MAX_BYTES", 512)
    model = write_split_model(tmp_path / "in")
    profile = load_profile(str(_profile_file(tmp_path, "rpi-arm64", allow_fallback=False)))
    assert profile.ort_format.allow_onnx_fallback is False
    [result] = package_model(model, [profile], Options(output=tmp_path / "out", quantize="none"))
    assert not result.ok
    assert isinstance(result.error, ConversionError)
    assert "allow_onnx_fallback: false" in str(result.error)
    assert not (tmp_path / "out").exists()  # not even the output folder
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_mobile_profiles_forbid_the_onnx_fallback():
    """Mobile apps ship a reduced (ORT-format-only) runtime; Python devices load ONNX fine."""
    assert load_profile("rpi-arm64").ort_format.allow_onnx_fallback
    assert not load_profile("android-nnapi").ort_format.allow_onnx_fallback
    assert not load_profile("ios-coreml").ort_format.allow_onnx_fallback


def test_a_zero_byte_model_never_reaches_a_bundle(tmp_path):
    """The ORT converter leaves a 0-byte .ort behind when it fails: the bundle stage refuses it too."""
    empty = tmp_path / "work" / "model.ort"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    staging = tmp_path / "staging"
    staging.mkdir()
    job = Job(
        profile=load_profile("rpi-arm64"),
        options=Options(output=tmp_path),
        workdir=tmp_path / "work",
        source=Source(name="model", path=empty, reference=empty, info={}),
        staging=staging,
        destination=tmp_path / "dest",
    )
    with pytest.raises(ConversionError, match="missing or empty"):
        Bundle().run(Artifact(path=empty, format="ort", ort_style="Fixed"), job)
    assert list(staging.iterdir()) == []


def test_big_bundle_files_are_hashed_once_per_version(tmp_path, monkeypatch):
    """The manifest is written twice per bundle; a model's weights are hashed once, and again only if changed."""
    import edgepack.bundle.manifest as manifest_module

    calls: list[Path] = []
    real = manifest_module.hash_file
    monkeypatch.setattr(manifest_module, "hash_file", lambda path: calls.append(path) or real(path))
    big = tmp_path / "model.onnx.data"
    big.write_bytes(b"\1" * (17 << 20))
    (tmp_path / "model.onnx").write_bytes(b"model")
    content = minimal_content("model.onnx", ["model.onnx.data"])
    first = manifest_module.write_manifest(tmp_path, content)["files"]["model.onnx.data"]
    again = manifest_module.write_manifest(tmp_path, content)["files"]["model.onnx.data"]
    assert first == again and calls.count(big) == 1
    with open(big, "r+b") as f:  # same size, same inode, new content
        f.write(b"\2")
    os.utime(big, ns=(big.stat().st_atime_ns, big.stat().st_mtime_ns + 1_000_000))
    changed = manifest_module.write_manifest(tmp_path, content)["files"]["model.onnx.data"]
    assert changed["sha256"] != first["sha256"] and changed == real(big)
    assert verify_bundle(tmp_path).ok
