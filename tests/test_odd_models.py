"""Models from the corners of the ONNX world, built in code, packaged for real: a rank-0 input, an IR-3 model
whose weights are graph inputs, an IR-8 model with an input that has an initializer default."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.accuracy import check, compare
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from edgepack.runtime_shim import edgepack_shim
from tests import shaped_models


def _scaled_by_a_scalar() -> onnx.ModelProto:
    """y = unsqueeze(t, 0) * x: a rank-0 t gives y of shape [4], a t of shape [1] gives [1, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["t", "axis"], ["u"]), helper.make_node("Mul", ["u", "x"], ["y"])],
        "scalar",
        [
            helper.make_tensor_value_info("t", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([0], np.int64), "axis")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _conv(ir: int, opset: int, *, weights_as_inputs: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    if weights_as_inputs:
        inputs += [
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [4]),
        ]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "conv",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def test_a_rank_0_input_stays_rank_0_in_the_shim_and_the_self_test(tmp_path):
    path = shaped_models.save(_scaled_by_a_scalar(), tmp_path, "scalar")
    [result] = package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "out", quantize="none"))
    assert result.ok, result.error
    feeds = {"t": np.array(2.0, np.float32), "x": np.arange(4, dtype=np.float32)}
    [expected] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = edgepack_shim.load(result.bundle, check_runtime=False).run(feeds)["y"]
    assert got.shape == expected.shape == (4,)
    np.testing.assert_array_equal(got, expected)


def test_the_same_numbers_in_another_shape_miss_every_tolerance():
    reference = [{"y": np.arange(4, dtype=np.float32)}]
    figures = compare(reference, [{"y": np.arange(4, dtype=np.float32).reshape(1, 4)}])
    assert (
        figures["cosine"] == 0.0 and "shape [1, 4] differs from the reference's [4]" in figures["outputs"]["y"]["note"]
    )
    assert any("shape [1, 4]" in miss for miss in check(figures, min_cosine=0.99))


@pytest.mark.parametrize("target", ["linux-x64", "android-nnapi"])
def test_an_ir_3_model_with_its_weights_as_inputs_packages_as_ir_4_without_a_skipped_step(tmp_path, target):
    path = shaped_models.save(_conv(3, 8, weights_as_inputs=True), tmp_path, "old")
    [result] = package_model(path, [load_profile(target)], Options(output=tmp_path / "out", quantize="none"))
    assert result.ok, result.error
    assert [i["name"] for i in result.manifest["model"]["inputs"]] == ["x"]
    notices = [r.get("notice") or "" for r in result.manifest["stages"]]
    assert not any("skipped" in n for n in notices), notices
    assert not any("initializer default" in n for n in notices), notices  # IR 3 had to list them: nothing to say


def test_inputs_with_an_initializer_default_are_named_when_they_become_constants(tmp_path):
    path = shaped_models.save(_conv(8, 17, weights_as_inputs=True), tmp_path, "defaults")
    [result] = package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "out", quantize="none"))
    assert result.ok, result.error
    load = next(r for r in result.manifest["stages"] if r["stage"] == "load")
    assert "2 graph input(s) with an initializer default ('w', 'b') are packaged as constants" in load["notice"]
    assert [i["name"] for i in result.manifest["model"]["inputs"]] == ["x"]


def test_layer_norms_onnxruntime_registers_in_the_onnx_domain_before_opset_17_package(tmp_path):
    """onnxruntime's transformer optimizer writes LayerNormalization and SimplifiedLayerNormalization in the onnx
    domain at any opset; onnx has no schema for them there, onnxruntime has kernels."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [
            helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1, epsilon=1e-5),
            helper.make_node("SimplifiedLayerNormalization", ["n", "gamma"], ["y"], axis=-1, epsilon=1e-5),
        ],
        "norms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "gamma"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "beta"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    path = shaped_models.save(model, tmp_path, "norms")
    [result] = package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "out", quantize="none"))
    assert result.ok, result.error
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    [expected] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(edgepack_shim.load(result.bundle).run(feeds)["y"], expected, rtol=1e-5, atol=1e-6)


def test_a_qdq_conv_the_runtime_style_converter_fails_on_ships_fixed_or_onnx_and_runs_as_onnxruntime_does(tmp_path):
    """Where the profile forbids ONNX (android-xnnpack) the Fixed style ships, where it allows it (jetson) the ONNX;
    each says why, and each bundle gives what onnxruntime gives on the same kernels."""
    from edgepack.checked import quiet_session

    path = shaped_models.save(shaped_models.qdq_conv(), tmp_path, "qdq_conv")
    targets = ["android-xnnpack", "jetson-orin-trt", "linux-x64"]
    results = package_model(path, [load_profile(t) for t in targets], Options(output=tmp_path / "out"))
    assert all(r.ok for r in results), [str(r.error) for r in results]
    by_target = {r.target: r for r in results}
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    exact = quiet_session(path).run(None, feeds)[0]  # exact int8 kernels where this host has a choice
    for target, (fallback, file) in {
        "android-xnnpack": ("Fixed", "model/qdq_conv.ort"),
        "jetson-orin-trt": ("onnx", "model/qdq_conv.onnx"),
    }.items():
        manifest = by_target[target].manifest
        convert = next(s for s in manifest["stages"] if s["stage"] == "convert")
        assert convert["fallback"] == fallback and "converter fails on the model in Runtime style" in convert["notice"]
        assert manifest["model"]["file"] == file
    for target, result in by_target.items():
        got = edgepack_shim.load(result.bundle, providers=["CPUExecutionProvider"]).run(feeds)["y"]
        self_test = next(s for s in result.manifest["stages"] if s["stage"] == "self_test")
        if "host_int8_kernels" in self_test:  # this host saturates (no VNNI): the .ort computes what plain ort does
            assert "saturate" in self_test["notice"] and not np.array_equal(plain, exact)
            np.testing.assert_allclose(got, plain, atol=1e-5, err_msg=target)
        else:
            np.testing.assert_allclose(got, exact, atol=1e-5, err_msg=target)


def test_a_model_the_checker_passes_and_onnxruntime_refuses_is_refused_at_load_in_its_words(
    tmp_path, cli, clean_failure
):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="n"), helper.make_node("Relu", ["a"], ["y"], name="n")],
        "twins",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path, "twins"
    )
    onnx.checker.check_model(path)
    done = cli("package", path, "--target", "all", "-o", tmp_path / "out")
    clean_failure(done, f"{path}: onnxruntime cannot load the model", "two nodes with same node name (n)")
    assert done.returncode == 3 and "internal error" not in done.stderr and not (tmp_path / "out").exists()


def test_the_shim_writes_and_summarises_a_sequence_output(tmp_path):
    import json
    import subprocess
    import sys

    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Neg", ["x"], ["n"]),
            helper.make_node("SequenceConstruct", ["r", "n"], ["parts"]),
        ],
        "parts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [
            helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4]),
        ],
    )
    path = shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path, "parts"
    )
    [result] = package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "out", quantize="none"))
    assert result.ok, result.error
    x = np.array([[1.0, -2.0, 3.0, -4.0]], np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    shim = [sys.executable, str(result.bundle / "edgepack_shim.py"), "run", str(tmp_path / "in.npz")]
    done = subprocess.run([*shim, "-o", str(tmp_path / "o.npz")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "parts: sequence of 2" in done.stdout
    written = np.load(tmp_path / "o.npz")
    assert sorted(written.files) == ["parts.0", "parts.1", "r"]
    np.testing.assert_array_equal(written["parts.1"], -x)
    done = subprocess.run([*shim, "-o", str(tmp_path / "j.npz"), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)["outputs"]["parts"]
    assert summary["type"] == "sequence" and summary["length"] == 2 and summary["items"][0]["shape"] == [1, 4]
    assert edgepack_shim.json_value([x])["data"][0]["data"] == x.tolist()  # serve's answer for it


def _fp16_trap(kind: str) -> onnx.ModelProto:
    """A MatMul model the FP16 converter (onnxconverter-common) used to break or refuse: a graph output that a node
    (or an If branch) also reads, a sequence output, a float16 input beside float32 weights."""
    w = numpy_helper.from_array(np.random.default_rng(5).standard_normal((8, 8)).astype(np.float32), "w")
    x = helper.make_tensor_value_info(
        "x", TensorProto.FLOAT16 if kind == "float16 input" else TensorProto.FLOAT, [1, 8]
    )
    tensor = helper.make_tensor_value_info
    nodes = [helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT)] if kind == "float16 input" else []
    nodes.append(helper.make_node("MatMul", ["x32" if nodes else "x", "w"], ["hidden"]))
    outputs, initializers = [tensor("y", TensorProto.FLOAT, [1, 8])], [w]
    if kind == "read output":
        nodes.append(helper.make_node("Relu", ["hidden"], ["y"]))
        outputs.append(tensor("hidden", TensorProto.FLOAT, [1, 8]))
    elif kind == "output read in a branch":
        branch = helper.make_graph(
            [helper.make_node("Neg", ["hidden"], ["n"])], "b", [], [tensor("n", TensorProto.FLOAT, [1, 8])]
        )
        nodes += [
            helper.make_node("ReduceSum", ["hidden"], ["total"], keepdims=0),
            helper.make_node("Greater", ["total", "zero"], ["positive"]),
            helper.make_node("If", ["positive"], ["y"], then_branch=branch, else_branch=branch),
        ]
        outputs.insert(0, tensor("hidden", TensorProto.FLOAT, [1, 8]))
        initializers.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    elif kind == "sequence output":
        nodes += [
            helper.make_node("Relu", ["hidden"], ["y"]),
            helper.make_node("SequenceConstruct", ["hidden", "y"], ["parts"]),
        ]
        outputs.append(helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, [1, 8]))
    else:
        nodes.append(helper.make_node("Relu", ["hidden"], ["y"]))
    graph = helper.make_graph(nodes, "trap", [x], outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("kind", ["read output", "output read in a branch", "sequence output", "float16 input"])
def test_fp16_converts_models_its_converter_breaks_or_refuses_and_the_bundle_matches_onnxruntime(tmp_path, kind):
    path = shaped_models.save(_fp16_trap(kind), tmp_path, "trap")
    [result] = package_model(path, [load_profile("jetson-orin-trt")], Options(output=tmp_path / "out"))
    assert result.ok, result.error
    quantize = next(s for s in result.manifest["stages"] if s["stage"] == "quantize")
    assert quantize["recipe"] == "fp16" and "notice" not in quantize, quantize
    dtype = np.float16 if kind == "float16 input" else np.float32
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 8)).astype(dtype)}
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = edgepack_shim.load(result.bundle, providers=["CPUExecutionProvider"]).run(feeds)
    for name, want in zip([o.name for o in onnx.load(path).graph.output], expected):
        assert check(compare([{name: want}], [{name: got[name]}]), min_cosine=0.999) == [], name


def test_an_output_whose_width_depends_on_the_input_packages(tmp_path):
    """Compress on axis 1 keeps the scores above 0.5: y is [1, K], K changing from one input to the next."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["s0"]),
            helper.make_node("Sigmoid", ["s0"], ["s"]),
            helper.make_node("Greater", ["s", "half"], ["keep2d"]),
            helper.make_node("Squeeze", ["keep2d", "ax0"], ["keep"]),
            helper.make_node("Compress", ["s", "keep"], ["y"], axis=1),
        ],
        "compress",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "K"])],
        [
            numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
            numpy_helper.from_array(np.array([0], np.int64), "ax0"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = shaped_models.save(model, tmp_path, "compress")
    results = package_model(
        path, [load_profile(t) for t in ("linux-x64", "jetson-orin-trt")], Options(output=tmp_path / "out")
    )
    assert all(r.ok for r in results), [str(r.error) for r in results]


def _linear_classifier(*, matmul_first: bool) -> onnx.ModelProto:
    """An ai.onnx.ml LinearClassifier giving float32 scores (skl2onnx with zipmap=False), alone or after a MatMul:
    onnxconverter-common keeps the ml op in FP32 but declared its output float16."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("MatMul", ["features", "w"], ["mixed"])] if matmul_first else []
    nodes.append(
        helper.make_node(
            "LinearClassifier",
            ["mixed" if matmul_first else "features"],
            ["label", "scores"],
            domain="ai.onnx.ml",
            classlabels_ints=[0, 1, 2],
            coefficients=rng.standard_normal(12).astype(np.float32).tolist(),
            intercepts=[0.1, -0.2, 0.0],
            post_transform="SOFTMAX",
        )
    )
    initializers = (
        [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")] if matmul_first else []
    )
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3]),
        ],
        initializers,
    )
    # alone, it imports ai.onnx.ml only, as onnxmltools' XGBoost and CatBoost's exports do
    opsets = [helper.make_opsetid("", 17)] if matmul_first else []
    return helper.make_model(graph, opset_imports=[*opsets, helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8)


@pytest.mark.parametrize("matmul_first", [False, True], ids=["ml op alone", "after a matmul"])
def test_fp16_keeps_float32_outputs_and_ships_fp32_when_it_converts_nothing(tmp_path, matmul_first):
    path = shaped_models.save(_linear_classifier(matmul_first=matmul_first), tmp_path, "classifier")
    options = Options(output=tmp_path / "out", min_accelerated_fraction=0.0)
    [result] = package_model(path, [load_profile("jetson-orin-trt")], options)
    assert result.ok, result.error
    quantize = next(s for s in result.manifest["stages"] if s["stage"] == "quantize")
    assert quantize["recipe"] == ("fp16" if matmul_first else "none"), quantize
    if not matmul_first:  # no Cast added either: no ai.onnx opset (the newest) for older runtimes to refuse
        assert "found nothing to quantize" in quantize["notice"]
        assert result.manifest["model"]["opsets"] == {"ai.onnx.ml": 1}
    feeds = {"features": np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)}
    got = edgepack_shim.load(result.bundle, providers=["CPUExecutionProvider"]).run(feeds)
    assert got["scores"].dtype == np.float32 and got["label"].dtype == np.int64
    [label, scores] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got["scores"], scores, atol=2e-3)


def test_a_zipmap_model_onnxruntime_refuses_is_refused_at_load_too(tmp_path, cli, clean_failure):
    """onnx-ir cannot read ZipMap's map types, so no pass loaded the model: load still asks onnxruntime."""
    model = shaped_models.zipmap_classifier()
    for node in model.graph.node:
        node.name = "twin"
    path = shaped_models.save(model, tmp_path, "zipmap_twins")
    done = cli("package", path, "--target", "linux-x64", "-o", tmp_path / "out")
    clean_failure(done, f"{path}: onnxruntime cannot load the model", "two nodes with same node name (twin)")
    assert done.returncode == 3 and "internal error" not in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "producer, how",
    [("skl2onnx", "target_opset={'': 21"), ("tf2onnx", "--opset 21"), ("pytorch", "opset_version=21")],
)
def test_an_opset_newer_than_the_runtime_is_refused_with_its_own_exporters_flag(tmp_path, producer, how):
    """skl2onnx 1.20 writes opset 22 by default, which onnxruntime 1.20 (the profiles' oldest) cannot run."""
    from edgepack.errors import CompatibilityError

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "new",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)], ir_version=10)
    model.producer_name = producer
    path = shaped_models.save(model, tmp_path, "new")
    [result] = package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "out"))
    assert not result.ok and isinstance(result.error, CompatibilityError)
    assert how in result.error.hint and "implements up to opset 21" in result.error.message
