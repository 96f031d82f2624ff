"""edgepack.coverage, the fix_shapes and coverage stages, and their CLI flags, on models built here."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgepack.coverage import CoverageError, CoverageReport, gate, load_op_list, measure
from edgepack.errors import UsageError
from edgepack.examples import write_example
from edgepack.flags import parse_fixed_dims, parse_input_shapes
from edgepack.profiles import Coverage, load_profile
from edgepack.stages.fix_shapes import apply_shapes, plan_shapes

NNAPI = Coverage(checker="nnapi")
COREML_MLPROGRAM = Coverage(checker="coreml", coreml_format="MLProgram")
COREML_NEURALNETWORK = Coverage(checker="coreml", coreml_format="NeuralNetwork")
TENSORRT = Coverage(checker="tensorrt", op_list="tensorrt-10.3-onnx-ops.txt")
WEBGPU = Coverage(checker="webgpu", op_list="webgpu-1.30.0-onnx-ops.txt")


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, path)
    return path


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _det_model() -> onnx.ModelProto:
    """Two Det nodes (no TensorRT, no WebGPU kernel in the lists) and one Relu: 1/3 of the nodes listed."""
    f = TensorProto.FLOAT
    return _model(
        [
            helper.make_node("Det", ["x"], ["dx"]),
            helper.make_node("Relu", ["dx"], ["rx"]),
            helper.make_node("Det", ["y"], ["dy"]),
        ],
        [
            helper.make_tensor_value_info("x", f, ["batch", 3, 3]),
            helper.make_tensor_value_info("y", f, ["batch", 3, 3]),
        ],
        [helper.make_tensor_value_info("rx", f, ["batch"]), helper.make_tensor_value_info("dy", f, ["batch"])],
    )


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    return write_example("cnn", tmp_path_factory.mktemp("cnn"))


def _onnxruntime_direct(path: Path, tmp: Path, check) -> tuple:
    """onnxruntime's checker called as its own CLI prepares the model."""
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    optimized = tmp / f"direct-{path.name}"
    optimize_model(path, optimized, use_external_initializers=True)
    model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
    return check(model, True), check(model, False)


@pytest.mark.parametrize(
    "settings", [NNAPI, COREML_MLPROGRAM, COREML_NEURALNETWORK], ids=lambda s: f"{s.checker}-{s.coreml_format}"
)
def test_cnn_figures_equal_onnxruntime_checker_before_and_after_fixing_shapes(cnn, tmp_path, settings):
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    if settings.checker == "nnapi":
        check = uc.check_nnapi_partitions
    else:
        table = {
            "MLProgram": "coreml_supported_mlprogram_ops.md",
            "NeuralNetwork": "coreml_supported_neuralnetwork_ops.md",
        }[settings.coreml_format]
        check = lambda model, fixed: uc.check_coreml_partitions(model, fixed, table)  # noqa: E731

    # the expected "after" model: fixed with onnxruntime's functions directly, the shape spelled out
    expected_fixed = onnx.load(cnn)
    make_input_shape_fixed(expected_fixed.graph, "image", [1, 3, 32, 32])
    fix_output_shapes(expected_fixed)
    expected_path = _save(expected_fixed, tmp_path / "expected_fixed.onnx")
    # edgepack's "after" model: no flag given, the batch dim assumed 1
    proto = onnx.load_model(cnn, load_external_data=False)
    shapes, assumed = plan_shapes(proto, {}, {}, {}, where="test")
    assert shapes == {"image": (1, 3, 32, 32)} and assumed == ["image dim 0 (batch)"]
    ours_path = apply_shapes(proto, cnn, tmp_path / "ours", shapes)

    for model_path, ours_model in ((cnn, cnn), (expected_path, ours_path)):
        fixed_info, unfixed_info = _onnxruntime_direct(model_path, tmp_path, check)
        report = measure(ours_model, settings)
        assert report.nodes == fixed_info.num_nodes
        assert report.supported_nodes == fixed_info.num_supported_nodes
        assert report.partitions == fixed_info.num_partitions
        assert set(report.unsupported_ops) == fixed_info.unsupported_ops
        assert report.dynamic_shape_nodes == unfixed_info.num_supported_nodes - fixed_info.num_supported_nodes
        assert not report.partitions_estimated

    before, after = measure(cnn, settings), measure(ours_path, settings)
    assert before.supported_nodes == 0 and before.dynamic_shape_nodes > 0  # dynamic batch: nothing on the accelerator
    assert after.supported_nodes > before.supported_nodes and after.dynamic_shape_nodes == 0
    if settings.checker == "nnapi":
        assert (after.supported_nodes, after.nodes, after.partitions) == (11, 11, 1)


def test_list_checkers_count_unsupported_ops_and_estimate_partitions(tmp_path):
    path = _save(_det_model(), tmp_path / "det.onnx")
    for settings in (TENSORRT, WEBGPU):
        report = measure(path, settings)
        assert (report.supported_nodes, report.nodes) == (1, 3)
        assert report.unsupported_ops == {"ai.onnx:Det": 2}
        assert report.partitions == 1 and report.partitions_estimated
        assert report.dynamic_shape_nodes is None
        assert settings.op_list in report.source


def test_list_checker_partitions_are_connected_components(tmp_path):
    f = TensorProto.FLOAT
    # Relu -> Det -> Relu: the two Relus are separated by an unsupported node, so two partitions
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Det", ["a"], ["b"]),
            helper.make_node("Relu", ["b"], ["c"]),
        ],
        [helper.make_tensor_value_info("x", f, [2, 3, 3])],
        [helper.make_tensor_value_info("c", f, [2])],
    )
    report = measure(_save(model, tmp_path / "split.onnx"), TENSORRT)
    assert (report.supported_nodes, report.partitions) == (2, 2)


def test_webgpu_list_checks_the_operator_version_at_the_model_opset(tmp_path):
    table, version = load_op_list("webgpu-1.30.0-onnx-ops.txt")
    assert table["Transpose"] == (1, 20) and "1.30.0" in version
    f = TensorProto.FLOAT

    def transpose_model(opset):
        return _model(
            [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), helper.make_node("Neg", ["t"], ["y"])],
            [helper.make_tensor_value_info("x", f, [2, 3])],
            [helper.make_tensor_value_info("y", f, [3, 2])],
            opset=opset,
        )

    at_17 = measure(_save(transpose_model(17), tmp_path / "t17.onnx"), WEBGPU)
    at_21 = measure(_save(transpose_model(21), tmp_path / "t21.onnx"), WEBGPU)
    assert at_17.unsupported_ops == {}
    assert at_21.unsupported_ops == {"ai.onnx:Transpose": 1}  # Transpose-21 has no WebGPU kernel in the list


def test_operator_lists_name_their_source_version():
    table, version = load_op_list("tensorrt-10.3-onnx-ops.txt")
    assert version == "tensorrt_version: 10.3"
    assert "Conv" in table and "Attention" not in table and "STFT" not in table and "Det" not in table
    profile = load_profile("jetson-orin-trt")
    assert profile.execution_providers[0].options["tensorrt_version"] in profile.coverage.op_list


def test_gate_fails_below_the_fraction_and_over_the_partitions(tmp_path):
    report = measure(_save(_det_model(), tmp_path / "det.onnx"), TENSORRT)
    with pytest.raises(CoverageError, match=r"1/3 nodes .* Det x2"):
        gate(report, 0.5, None, where="test")
    assert gate(report, 0.3, None, where="test") == {"min_accelerated_fraction": 0.3, "max_partitions": None}
    with pytest.raises(CoverageError, match="1 tensorrt partitions"):
        gate(report, 0.0, 0, where="test")


def _edgepack(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _cli(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI's main() in this process (a fresh interpreter per call costs seconds of imports)."""
    from edgepack.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_package_gate_fails_a_model_with_unsupported_ops_and_passes_when_the_flag_lowers_it(tmp_path, capsys):
    model = _save(_det_model(), tmp_path / "det.onnx")
    out = tmp_path / "out"
    # FP32: the profile's FP16 default wraps the Relu between the FP32-only Dets in Casts (5 nodes, not 3)
    failed = _edgepack(
        "package", model, "--target", "jetson-orin-trt", "--quantize", "none", "-o", out, "-q", cwd=tmp_path
    )
    assert failed.returncode == 6, failed.stderr + failed.stdout
    assert "1/3 nodes" in failed.stderr and "Det x2" in failed.stderr and "--min-accelerated-fraction" in failed.stderr
    assert not out.exists() or not any(out.iterdir())  # nothing left behind

    passed = _cli(
        capsys,
        "package",
        model,
        "--target",
        "jetson-orin-trt",
        "--quantize",
        "none",
        "-o",
        out,
        "-q",
        "--min-accelerated-fraction",
        "0.3",
    )
    assert passed.returncode == 0, passed.stderr + passed.stdout
    bundle = out / "det-jetson-orin-trt"
    manifest = json.loads((bundle / "manifest.json").read_text())
    stage = next(r for r in manifest["stages"] if r["stage"] == "coverage")
    assert stage["after"]["unsupported_ops"] == {"ai.onnx:Det": 2}
    assert stage["gate"] == {"min_accelerated_fraction": 0.3, "max_partitions": None}
    assert "## Accelerator coverage" in (bundle / "REPORT.md").read_text()
    assert "Det x2" in (bundle / "REPORT.md").read_text()

    too_many = _cli(
        capsys,
        "package",
        model,
        "--target",
        "jetson-orin-trt",
        "--quantize",
        "none",
        "-o",
        out,
        "-q",
        "--force",
        "--min-accelerated-fraction",
        "0",
        "--max-partitions",
        "0",
    )
    assert too_many.returncode == 6 and "at most 0" in too_many.stderr
    assert bundle.is_dir()  # the earlier bundle is left as it was


def test_inspect_prints_the_report_before_and_after(cnn, capsys):
    text = _cli(capsys, "inspect", cnn, "--target", "android-nnapi")
    assert text.returncode == 0, text.stderr
    assert "before fixing shapes: 0/11 nodes (0%) on nnapi" in text.stdout
    assert "after fixing shapes:  11/11 nodes (100%) on nnapi, 1 partition" in text.stdout
    as_json = _cli(capsys, "inspect", cnn, "--target", "android-nnapi", "--json")
    coverage = json.loads(as_json.stdout)["coverage"]
    assert coverage["before"]["supported_nodes"] == 0 and coverage["after"]["accelerated_fraction"] == 1.0
    assert coverage["input_shapes"] == {"image": [1, 3, 32, 32]} and coverage["gate_passed"] is True


# --- shape flags ---------------------------------------------------------------------------------


def _transformer_proto(tmp_path) -> onnx.ModelProto:
    return onnx.load(write_example("transformer", tmp_path))


def test_parse_shape_flags():
    assert parse_input_shapes(["image=1,3,224,224", " ids = 1,128"]) == {"image": (1, 3, 224, 224), "ids": (1, 128)}
    assert parse_fixed_dims(["batch=2"]) == {"batch": 2}
    for bad in ("image=1,3,x,224", "image=1.5,3", "image=", "=1,2", "image"):
        with pytest.raises(UsageError):
            parse_input_shapes([bad])
    with pytest.raises(UsageError, match="integer"):
        parse_fixed_dims(["batch=one"])


@pytest.mark.parametrize(
    "shapes, dims, message",
    [
        ({"pixels": (1, 128)}, {}, "does not have"),  # unknown input
        ({}, {"seq_len": 128}, "no input of the model has"),  # unknown dim
        ({"input_ids": (1, 128, 1)}, {}, "rank 3, but input 'input_ids' has rank 2"),  # wrong rank
        ({"input_ids": (0, 128)}, {}, "at least 1"),  # not a size
        ({}, {"sequence": 0}, "at least 1"),
        ({}, {}, r"dynamic dim 1 \('sequence'\)"),  # nothing names the sequence dim
    ],
    ids=["unknown-input", "unknown-dim", "wrong-rank", "zero-size", "zero-dim", "unnamed-sequence"],
)
def test_bad_shape_flags_are_errors(tmp_path, shapes, dims, message):
    with pytest.raises(UsageError, match=message):
        plan_shapes(_transformer_proto(tmp_path), shapes, dims, {}, where="test")


def test_a_sequence_first_input_is_not_taken_as_a_batch(tmp_path):
    """An LSTM's [seq, batch, features] input (layout 0): fixing dim 0 to 1 would ship a one-step model."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["frames"], ["y"])],
        "seq_first",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["seq_len", "batch", 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq_len", "batch", 40])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(UsageError, match=r"dynamic dim 0 \('seq_len'\)") as refused:
        plan_shapes(proto, {}, {}, {}, where="test")
    assert "--input-shape frames=N,1,40" in refused.value.hint and "--fix-dim seq_len=N" in refused.value.hint
    shapes, assumed = plan_shapes(proto, {}, {"seq_len": 50}, {}, where="test")
    assert shapes == {"frames": (50, 1, 40)} and assumed == ["frames dim 1 (batch)"]


def test_a_fixed_dim_cannot_be_changed_and_shared_dims_must_agree(cnn, tmp_path):
    with pytest.raises(UsageError, match="fixed to 3 in the model"):
        plan_shapes(onnx.load(cnn), {"image": (1, 4, 32, 32)}, {}, {}, where="test")
    proto = _transformer_proto(tmp_path)
    shapes, _ = plan_shapes(proto, {"input_ids": (1, 64), "attention_mask": (1, 32)}, {}, {}, where="test")
    with pytest.raises(UsageError, match="share a named dim"):
        apply_shapes(proto, tmp_path / "transformer.onnx", tmp_path / "fixed", shapes)


def test_fix_dim_and_profile_defaults_fill_the_shapes(tmp_path):
    proto = _transformer_proto(tmp_path)
    shapes, assumed = plan_shapes(proto, {}, {"sequence": 32}, {}, where="test")
    assert shapes == {"input_ids": (1, 32), "attention_mask": (1, 32)} and len(assumed) == 2
    shapes, assumed = plan_shapes(proto, {"input_ids": (2, 16)}, {}, {"attention_mask": [2, 16]}, where="test")
    assert shapes == {"input_ids": (2, 16), "attention_mask": (2, 16)} and assumed == []
    fixed = apply_shapes(proto, tmp_path / "transformer.onnx", tmp_path / "fixed", shapes)
    out = onnx.load(fixed).graph.output[0].type.tensor_type.shape
    assert [d.dim_value for d in out.dim] == [2, 16, 64]  # output shapes inferred


def test_package_refuses_a_bad_shape_flag_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    result = _cli(
        capsys,
        "package",
        "--example",
        "cnn",
        "--target",
        "android-nnapi",
        "-o",
        out,
        "-q",
        "--input-shape",
        "image=1,3,32",
    )
    assert result.returncode == 2
    assert "rank 3, but input 'image' has rank 4" in result.stderr
    assert not out.exists() or not any(out.iterdir())
    result = _cli(
        capsys,
        "package",
        "--example",
        "cnn",
        "--target",
        "android-nnapi",
        "-o",
        out,
        "-q",
        "--input-shape",
        "image=1,3,32,a",
    )
    assert result.returncode == 2 and "integers" in result.stderr


def test_fixed_shape_bundle_self_test_runs_on_the_fixed_shapes(tmp_path):
    from edgepack.pipeline.job import Options
    from edgepack.pipeline.run import package_model

    model = write_example("cnn", tmp_path)
    [result] = package_model(
        model, [load_profile("android-nnapi")], Options(output=tmp_path / "out", input_shapes={"image": (2, 3, 32, 32)})
    )
    assert result.ok, result.error
    assert result.manifest["model"]["inputs"][0]["shape"] == [2, 3, 32, 32]
    assert result.manifest["model"]["outputs"][0]["shape"] == [2, 10]
    self_test = next(r for r in result.manifest["stages"] if r["stage"] == "self_test")
    assert self_test["passed"] and self_test["cosine"] > 0.9999
    assert np.isfinite(self_test["max_abs_error"])


def test_dims_named_by_no_symbol_are_fixed_one_by_one(tmp_path):
    """fix_shapes rule 5: Paddle2ONNX names every unknown dim "?"; two of them get different sizes."""
    from edgepack.pipeline.job import Options
    from edgepack.pipeline.run import package_model

    proto = onnx.load(write_example("cnn", tmp_path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for i in (0, 2):
        dims[i].Clear()
        dims[i].dim_param = "?"
    model = tmp_path / "question_marks.onnx"
    onnx.save_model(proto, model)
    [result] = package_model(
        model, [load_profile("android-nnapi")], Options(output=tmp_path / "out", input_shapes={"image": (2, 3, 32, 32)})
    )
    assert result.ok, result.error
    assert result.manifest["model"]["inputs"][0]["shape"] == [2, 3, 32, 32]


def test_fixing_shapes_keeps_external_data_in_a_side_file(cnn, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    onnx.save_model(
        onnx.load(cnn), source / "cnn.onnx", save_as_external_data=True, location="cnn.onnx.data", size_threshold=0
    )
    before = (source / "cnn.onnx.data").read_bytes()
    proto = onnx.load_model(source / "cnn.onnx", load_external_data=False)
    shapes, _ = plan_shapes(proto, {}, {}, {}, where="test")
    fixed = apply_shapes(proto, source / "cnn.onnx", tmp_path / "fixed", shapes)
    assert (tmp_path / "fixed" / "cnn.onnx.data").read_bytes() == before == (source / "cnn.onnx.data").read_bytes()
    assert fixed.stat().st_size < 10_000  # weights not inlined
    assert measure(fixed, NNAPI).supported_nodes == measure(cnn, NNAPI).nodes


def test_package_a_model_with_external_data_for_a_fixed_shape_target(cnn, tmp_path, monkeypatch):
    from edgepack.pipeline.job import Options
    from edgepack.pipeline.run import package_model

    source = tmp_path / "src"
    source.mkdir()
    onnx.save_model(
        onnx.load(cnn), source / "cnn.onnx", save_as_external_data=True, location="cnn.onnx.data", size_threshold=0
    )
    monkeypatch.chdir(source)  # the load stage's onnx.checker call resolves side files from the current folder
    [result] = package_model(source / "cnn.onnx", [load_profile("android-nnapi")], Options(output=tmp_path / "out"))
    assert result.ok, result.error
    coverage = next(r for r in result.manifest["stages"] if r["stage"] == "coverage")
    assert coverage["after"]["supported_nodes"] == coverage["after"]["nodes"] == 11


def test_omitted_optional_inputs_are_not_taken_for_dynamic_shapes(tmp_path):
    """Clip(x, "", max) and Resize(x, "", "", sizes), as torch writes clamp(max=) and interpolate: a fully static
    model whose every node NNAPI takes (onnxruntime's checker alone counts the "" inputs as dynamic)."""
    from onnx import numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Clip", ["x", "", "cmax"], ["c"]),
            helper.make_node("Resize", ["c", "", "", "sizes"], ["y"], mode="linear"),
        ],
        "optional",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])],
        [
            numpy_helper.from_array(np.array(0.5, np.float32), "cmax"),
            numpy_helper.from_array(np.array([1, 3, 32, 32], np.int64), "sizes"),
        ],
    )
    path = tmp_path / "optional.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    report = measure(path, load_profile("android-nnapi").coverage)
    assert (report.supported_nodes, report.nodes, report.dynamic_shape_nodes) == (2, 2, 0), report


def test_the_coverage_hint_suggests_input_shapes_only_when_an_input_is_dynamic():
    report = CoverageReport(
        checker="nnapi", nodes=10, supported_nodes=2, partitions=1, partitions_estimated=False, dynamic_shape_nodes=6
    )
    with pytest.raises(CoverageError) as dynamic:
        gate(report, 0.5, None, where="m.onnx")
    assert "--input-shape" in dynamic.value.hint
    with pytest.raises(CoverageError) as fixed:
        gate(dataclasses.replace(report, dynamic_inputs=False), 0.5, None, where="m.onnx")
    assert "--input-shape" not in fixed.value.hint and "every input is fixed" in fixed.value.message


def test_nodes_after_a_microsoft_op_have_shapes_for_the_checker(tmp_path, monkeypatch):
    """onnx's inference types nothing after com.microsoft's FastGelu; onnxruntime's symbolic inference does, so
    the MatMul after it is not held back by an unknown shape."""
    from onnx import numpy_helper

    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("FastGelu", ["h"], ["g"], domain="com.microsoft"),
            helper.make_node("MatMul", ["g", "w2"], ["y"]),
        ],
        "contrib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), n) for n in ("w1", "w2")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    path = tmp_path / "contrib.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=opsets, ir_version=8), path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # onnxruntime's symbolic inference writes scratch files where it runs
    report = measure(path, load_profile("android-nnapi").coverage)
    assert report.dynamic_shape_nodes == 0 and report.unsupported_ops == {"com.microsoft:FastGelu": 1}, report
    assert report.supported_nodes == 2, report
    assert list((tmp_path / "cwd").iterdir()) == []


def test_every_dynamic_input_is_named_in_one_refusal_with_flags_for_all(tmp_path):
    proto = _transformer_proto(tmp_path)
    with pytest.raises(UsageError) as refused:
        plan_shapes(proto, {}, {}, {}, where="test")
    assert "input 'input_ids' has a dynamic dim 1" in refused.value.message
    assert "input 'attention_mask' has a dynamic dim 1" in refused.value.message
    hint = refused.value.hint
    assert "--input-shape input_ids=1,N --input-shape attention_mask=1,N" in hint and "--fix-dim sequence=N" in hint
