"""4-bit weight-only recipes (edgepack/recipes/int4.py): int4 and q4f16 bundles convert, self-test and run in the
shim; embedding tables become GatherBlockQuantized in the uint8 form the ORT format can hold; targets
without the kernels refuse before any work; --tune builds and times int4. Real models, real onnxruntime."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepack.accuracy import compare
from edgepack.errors import CompatibilityError, ConversionError, ProfileError
from edgepack.examples import build_example, write_example
from edgepack.onnxio.modelinfo import describe_io
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from edgepack.recipes.kernels import kernel_gaps
from edgepack.recipes.quantize import quantize_model
from edgepack.recipes.search import host_arch
from edgepack.samples import generate_inputs


def _stage(manifest: dict, name: str) -> dict:
    return next(r for r in manifest["stages"] if r["stage"] == name)


def _package(model: Path, target, out: Path, recipe: str, **options):
    profile = target if not isinstance(target, str) else load_profile(target)
    (result,) = package_model(model, [profile], Options(output=out, quantize=recipe, **options))
    return result


def _custom_profile(tmp_path: Path, base: str, name: str, replacements: dict[str, str]):
    text = Path(load_profile(base).source).read_text(encoding="utf-8").replace(f"name: {base}", f"name: {name}")
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return load_profile(str(path))


def _shim_run(bundle: Path, feeds: dict[str, np.ndarray], folder: Path) -> dict[str, np.ndarray]:
    np.savez(folder / "inputs.npz", **feeds)
    done = subprocess.run(
        [sys.executable, "edgepack_shim.py", "run", folder / "inputs.npz", "-o", folder / "out.npz"],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return dict(np.load(folder / "out.npz"))


def test_int4_bundle_converts_self_tests_and_runs_in_the_shim(tmp_path: Path):
    source = write_example("transformer", tmp_path)
    result = _package(source, "linux-x64", tmp_path / "out", "int4")
    assert result.ok, result.error
    manifest = result.manifest
    assert manifest["model"]["precision"] == "int4" and manifest["model"]["format"] == "ort"
    quantize = _stage(manifest, "quantize")
    assert quantize["result"]["quantized_ops"] == {"GatherBlockQuantized": 2, "MatMulNBits": 6}
    assert quantize["result"]["notes"] == {"matmuls_left_in_float": 2, "embeddings_quantized": 2}  # attention's own
    assert quantize["options"] == {
        "block_size": 32,
        "symmetric": False,
        "accuracy_level": 4,
        "op_types": ["MatMul", "Gather"],
        "max_int8_share": 0.5,
    }
    assert quantize["result"]["size_ratio"] < 0.2 and quantize["passed"]
    assert _stage(manifest, "self_test")["summary"].startswith("passed (int4")
    config = (result.bundle / "required_operators_and_types.config").read_text()
    contrib = next(line for line in config.splitlines() if line.startswith("com.microsoft;1;"))
    assert "MatMulNBits" in contrib and "GatherBlockQuantized" in contrib

    feeds = generate_inputs(describe_io(build_example("transformer"))[0], seed=3, count=1)[0]
    got = _shim_run(result.bundle, feeds, tmp_path)
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    figures = compare([{"last_hidden_state": reference}], [got])
    assert figures["cosine"] >= load_profile("linux-x64").quantization.tolerance.min_cosine, figures


MIXED = {  # a gate the transformer example's int4 model misses (cosine 0.9932), and room for every MatMul in INT8
    "    min_cosine: 0.99\n": "    min_cosine: 0.995\n",
    "  dynamic:\n": "  int4:\n    max_int8_share: 1.0\n  dynamic:\n",
}


def test_auto_exclude_puts_the_costliest_matmuls_in_dynamic_int8_as_few_as_the_gate_needs(tmp_path: Path):
    source = write_example("transformer", tmp_path)
    profile = _custom_profile(tmp_path, "linux-x64", "tight-x64", MIXED)
    strict = _package(source, profile, tmp_path / "strict", "int4")
    assert not strict.ok and "--auto-exclude" in strict.error.hint, strict.error

    result = _package(source, profile, tmp_path / "out", "int4", auto_exclude=True)
    assert result.ok, result.error
    quantize = _stage(result.manifest, "quantize")
    int8 = quantize["result"]["excluded_nodes"]
    ranked = [entry["node"] for entry in quantize["sensitivity"]]
    assert all(entry["cosine_gain_per_million_weights"] > 0 for entry in quantize["sensitivity"])
    assert 0 < len(int8) < 6 and sorted(int8) == sorted(ranked[: len(int8)]), (int8, ranked)
    tried = {len(a["excluded_nodes"]): a["passed"] for a in quantize["attempts"]}
    assert tried[0] is False and tried[len(int8) - 1] is False and tried[len(int8)] is True, quantize["attempts"]
    assert quantize["passed"] and quantize["figures"]["cosine"] >= 0.995
    ops = quantize["result"]["quantized_ops"]
    assert ops["MatMulInteger"] == len(int8) and ops["MatMulNBits"] == 6 - len(int8), ops
    assert quantize["result"]["notes"]["matmuls_in_dynamic_int8"] == len(int8)
    assert f"{len(int8)} node(s) in dynamic INT8" in quantize["summary"]
    assert _stage(result.manifest, "self_test")["summary"].startswith("passed (int4")
    config = (result.bundle / "required_operators_and_types.config").read_text()
    assert "MatMulInteger" in config and "MatMulNBits" in config

    feeds = generate_inputs(describe_io(build_example("transformer"))[0], seed=3, count=1)[0]
    got = _shim_run(result.bundle, feeds, tmp_path)
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert compare([{"last_hidden_state": reference}], [got])["cosine"] >= 0.99


def test_auto_exclude_keeps_a_matmul_in_4_bits_and_says_what_to_raise(tmp_path: Path):
    source = write_example("transformer", tmp_path)
    replacements = {**MIXED, "    min_cosine: 0.99\n": "    min_cosine: 0.9999\n"}
    result = _package(
        source, _custom_profile(tmp_path, "linux-x64", "tighter-x64", replacements), tmp_path, "int4", auto_exclude=True
    )
    assert not result.ok and "misses the profile's tolerance" in result.error.message, result.error
    assert "(with 5 node(s) in dynamic INT8)" in result.error.message
    assert "max_int8_share (now 1.0)" in result.error.hint


@pytest.mark.parametrize("symmetric", [False, True])
def test_embeddings_are_stored_as_uint8_with_bits_4_and_the_model_moves_to_opset_21(tmp_path: Path, symmetric: bool):
    source = write_example("transformer", tmp_path)
    recipe = replace(load_profile("linux-x64").quantization.settings("int4"), symmetric=symmetric)
    result = quantize_model(source, tmp_path / "q" / "q.onnx", "int4", recipe, target=load_profile("linux-x64"))
    proto = onnx.load(result.path)
    assert next(o.version for o in proto.opset_import if o.domain == "") == 21 and proto.ir_version >= 10
    inits = {t.name: t for t in proto.graph.initializer}
    for node in (n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"):
        table = inits[node.input[0]]
        assert table.data_type == onnx.TensorProto.UINT8 and table.dims[1] * 2 == 64  # two 4-bit values a byte
        assert {a.name: a.i for a in node.attribute}["bits"] == 4
    # the uint8 form gives what the 4-bit form the quantizer wrote would: the whole model against FP32
    feeds = generate_inputs(describe_io(proto)[0], seed=5, count=4)
    ref = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    figures = compare([{"y": ref.run(None, f)[0]} for f in feeds], [{"y": got.run(None, f)[0]} for f in feeds])
    assert figures["cosine"] > 0.99, figures


def test_q4f16_bundle_has_fp16_activations_and_float32_io(tmp_path: Path):
    source = write_example("transformer", tmp_path)
    result = _package(source, "browser-webgpu", tmp_path / "out", "q4f16", ort_web=_ort_web_tarball())
    assert result.ok, result.error
    assert result.manifest["model"]["precision"] == "q4f16"
    quantize = _stage(result.manifest, "quantize")
    assert quantize["result"]["quantized_ops"]["MatMulNBits"] == 6
    assert "GatherBlockQuantized" not in quantize["result"]["quantized_ops"]  # the profile keeps embeddings in float
    assert quantize["options"]["accuracy_level"] == 0
    config = (result.bundle / "required_operators_and_types.config").read_text()
    assert "MLFloat16" in config and "com.microsoft;1;MatMulNBits" in config
    model = result.manifest["model"]
    assert {i["dtype"] for i in model["inputs"]} == {"int64"} and {o["dtype"] for o in model["outputs"]} == {"float32"}


def _ort_web_tarball() -> Path:
    from edgepack.bundle import ortweb

    return ortweb.fetch_tarball(ortweb.pinned_version(load_profile("browser-webgpu"))).path


@pytest.mark.parametrize(
    "target, names",
    [
        ("android-nnapi", "nnapi_supported_ops.md"),
        ("ios-coreml", "coreml_supported_mlprogram_ops.md"),
        ("jetson-orin-trt", "tensorrt-10.3-onnx-ops.txt"),
        ("android-xnnpack", "xnnpack-1.31-onnx-ops.txt"),
    ],
)
def test_an_accelerator_without_the_kernel_refuses_before_any_work(tmp_path: Path, target: str, names: str):
    missing = tmp_path / "does-not-exist.onnx"  # never read: the refusal comes first
    message = _refusal(
        package_model(missing, [load_profile(target)], Options(output=tmp_path / "out", quantize="int4"))
    )
    assert "MatMulNBits" in message and names in message and "1.17" in message and "int4 recipe" in message
    assert not (tmp_path / "out").exists()


def _refusal(results) -> str:
    """The one target's refusal: a failed result holding a CompatibilityError, as a message."""
    [result] = results
    assert not result.ok and isinstance(result.error, CompatibilityError), result
    return str(result.error)


def test_a_cpu_runtime_older_than_the_kernel_refuses_naming_the_version(tmp_path: Path):
    old = _custom_profile(tmp_path, "linux-x64", "old-x64", {'version: ">=1.20"': 'version: ">=1.16"'})
    assert "1.16.0" in kernel_gaps(old, "int4")["MatMulNBits"] and "1.17" in kernel_gaps(old, "int4")["MatMulNBits"]
    refused = _refusal(package_model(tmp_path / "none.onnx", [old], Options(output=tmp_path / "out", quantize="int4")))
    assert re.search(r"int4 recipe .*onnxruntime 1\.16\.0 .*MatMulNBits.*from 1\.17", refused), refused


def test_a_profile_defaulting_to_int4_is_refused_where_the_kernel_is_missing(tmp_path: Path):
    profile = _custom_profile(tmp_path, "ios-coreml", "coreml-int4", {"  default: fp16\n": "  default: int4\n"})
    assert "int4 recipe" in _refusal(package_model(tmp_path / "none.onnx", [profile], Options(output=tmp_path / "out")))


def test_tune_where_it_cannot_time_refuses_a_4bit_default_where_the_kernel_is_missing(tmp_path: Path):
    """--tune on a host of another CPU runs the profile's default: refused before any work like without --tune."""
    other = "x86_64" if host_arch() == "arm64" else "arm64"
    profile = _custom_profile(
        tmp_path,
        "ios-coreml",
        "coreml-int4",
        {"  default: fp16\n": "  default: int4\n", "arch: arm64": f"arch: {other}"},
    )
    results = package_model(tmp_path / "none.onnx", [profile], Options(output=tmp_path / "out", tune=True))
    assert "the coreml provider" in _refusal(results)


def test_without_gather_block_quantized_embeddings_stay_in_float_and_the_report_says_so(tmp_path: Path):
    profile = _custom_profile(tmp_path, "linux-x64", "x64-1-18", {'version: ">=1.20"': 'version: ">=1.18"'})
    assert set(kernel_gaps(profile, "int4")) == {"GatherBlockQuantized"}
    result = _package(write_example("transformer", tmp_path), profile, tmp_path / "out", "int4")
    assert result.ok, result.error
    report = _stage(result.manifest, "quantize")["result"]
    assert "GatherBlockQuantized" not in report["quantized_ops"] and report["quantized_ops"]["MatMulNBits"] == 6
    assert "no GatherBlockQuantized" in report["notes"]["gather"]


def test_cli_refusal_is_one_clear_message(tmp_path: Path, cli, clean_failure):
    done = cli(
        "package",
        "--example",
        "transformer",
        "--target",
        "linux-x64,android-nnapi",
        "--quantize",
        "int4",
        "-o",
        tmp_path / "out",
    )
    clean_failure(done, "android-nnapi", "MatMulNBits")
    assert (
        done.returncode == CompatibilityError.exit_code
        and not (tmp_path / "out" / "transformer-android-nnapi").exists()
    )
    assert "ok      linux-x64" in done.stdout  # one target's missing kernel does not stop the others


def test_a_model_without_matmul_weights_is_a_clear_error(tmp_path: Path):
    result = _package(write_example("cnn", tmp_path), "linux-x64", tmp_path / "out", "int4")
    assert not result.ok and isinstance(result.error, ConversionError)
    assert "no MatMul with a constant 2-D weight" in str(result.error)


def test_int4_keeps_external_data_external(tmp_path: Path):
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(
        build_example("transformer"),
        folder / "enc.onnx",
        save_as_external_data=True,
        location="enc.onnx.data",
        size_threshold=0,
    )
    before = (folder / "enc.onnx.data").read_bytes()
    result = _package(folder / "enc.onnx", "rpi-arm64", tmp_path / "out", "int4")
    assert result.ok, result.error
    assert _stage(result.manifest, "quantize")["result"]["external_data"] is True
    assert (folder / "enc.onnx.data").read_bytes() == before


@pytest.mark.parametrize("op_types", [["MatMul", "Gather"], ["MatMul"]], ids=["embeddings-4bit", "embeddings-float"])
def test_int4_of_a_large_model_reads_each_weight_from_its_side_file(tmp_path: Path, monkeypatch, op_types):
    """Over LARGE_MODEL (0 here) weights over KEPT_IN_INFERENCE (4 KiB here) stay in their side file until the
    quantizer reads them (int4 rule 7, recipes/ondisk.py): the model written is the one the in-memory path
    writes, and what stays in float is in its own side file, not in the input's."""
    from edgepack.recipes import ondisk

    inline = write_example("transformer", tmp_path)
    source = tmp_path / "external" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(onnx.load(inline), source, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    target = load_profile("linux-x64")
    recipe = replace(target.quantization.settings("int4"), op_types=op_types)
    expected = quantize_model(inline, tmp_path / "memory" / "q.onnx", "int4", recipe, target=target)
    monkeypatch.setattr(ondisk, "LARGE_MODEL", 0)
    monkeypatch.setattr(ondisk, "KEPT_IN_INFERENCE", 4096)
    result = quantize_model(source, tmp_path / "disk" / "q.onnx", "int4", recipe, target=target)
    source.parent.rename(tmp_path / "moved")  # the written model must not need the input's side file
    written, reference = onnx.load(result.path), onnx.load(expected.path)
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in reference.graph.node]
    assert ("GatherBlockQuantized" in {n.op_type for n in written.graph.node}) == ("Gather" in op_types)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    expected_arrays = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    assert arrays.keys() == expected_arrays.keys()
    for name, array in expected_arrays.items():
        assert arrays[name].dtype == array.dtype and np.array_equal(arrays[name], array), name


@pytest.mark.parametrize("size", [24, 8])
def test_block_size_must_be_a_power_of_two_of_at_least_16(tmp_path: Path, size: int):
    text = Path(load_profile("linux-x64").source).read_text() + f"  int4:\n    block_size: {size}\n"
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(
        ProfileError,
        match=rf"'quantization.int4.block_size': expected a power of two, at least 16 "
        rf"\(MatMulNBits\), found {size}",
    ):
        load_profile(str(tmp_path / "p.yaml"))


@pytest.mark.slow
def test_tune_builds_gates_and_times_int4(tmp_path: Path):
    profile = _custom_profile(
        tmp_path,
        "linux-x64",
        "host",
        {
            "arch: x86_64": f"arch: {host_arch()}",
            "intra_op_num_threads: 0 ": "intra_op_num_threads: 1 ",
            "tune_candidates: [fp32, dynamic_u8, dynamic_s8, static_u8s8, static_s8s8, fp16, int4]": "tune_candidates: [fp32, dynamic_s8, int4]",
        },
    )
    result = package_model(
        write_example("transformer", tmp_path), [profile], Options(output=tmp_path / "out", tune=True, tune_budget=60)
    )[0]
    assert result.ok, result.error
    rows = {c["name"]: c for c in _stage(result.manifest, "quantize")["tune"]["candidates"]}
    assert set(rows) == {"fp32", "dynamic_s8", "int4"}
    assert rows["int4"]["precision"] == "int4" and rows["int4"]["gate"] == "passed" and rows["int4"]["runs"] >= 5
    assert rows["int4"]["bytes"] < rows["dynamic_s8"]["bytes"] < rows["fp32"]["bytes"]
    print(json.dumps({n: {k: r.get(k) for k in ("bytes", "median_ms")} for n, r in rows.items()}))


def test_webgpu_coverage_counts_the_4bit_ops_as_on_the_accelerator(tmp_path: Path):
    from edgepack.coverage import measure

    profile = load_profile("browser-webgpu")
    result = quantize_model(
        write_example("transformer", tmp_path),
        tmp_path / "q" / "q.onnx",
        "int4",
        load_profile("linux-x64").quantization.settings("int4"),
        target=load_profile("linux-x64"),
    )
    report = measure(result.path, profile.coverage)
    assert not any(op.startswith("com.microsoft:") for op in report.unsupported_ops), report.unsupported_ops
    tensorrt = measure(result.path, load_profile("jetson-orin-trt").coverage)
    assert tensorrt.unsupported_ops["com.microsoft:MatMulNBits"] == 6


@pytest.mark.parametrize("data_type", [onnx.TensorProto.INT4, onnx.TensorProto.UINT4])
def test_repacking_a_table_as_uint8_keeps_every_4bit_value(data_type: int):
    """Every 4-bit value, in both signs, through onnxruntime's GatherBlockQuantized before and after."""
    from onnx import helper, numpy_helper

    from edgepack.recipes.int4 import _repack_tables_as_uint8

    rows, width, block = 8, 32, 16
    low = -8 if data_type == onnx.TensorProto.INT4 else 0
    values = np.random.default_rng(0).permutation(np.arange(rows * width) % 16 + low).reshape(rows, width)
    inits = [
        helper.make_tensor("table", data_type, [rows, width], values.ravel().tolist()),
        numpy_helper.from_array(np.linspace(0.5, 2, rows * 2, dtype=np.float32).reshape(rows, 2), "scales"),
    ]
    inputs = ["table", "ids", "scales"]
    if data_type == onnx.TensorProto.UINT4:
        inits.append(helper.make_tensor("zp", data_type, [rows, 2], [3, 11] * rows))
        inputs.append("zp")
    node = helper.make_node(
        "GatherBlockQuantized", inputs, ["y"], domain="com.microsoft", block_size=block, gather_axis=0, quantize_axis=1
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [rows])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    ids = {"ids": np.arange(rows, dtype=np.int64)[::-1].copy()}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    _repack_tables_as_uint8(model)
    assert model.graph.initializer[0].data_type == onnx.TensorProto.UINT8
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    np.testing.assert_array_equal(after, before)
    assert len(np.unique(before)) > 16  # the values really vary
