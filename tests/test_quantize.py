"""Quantization: every recipe on the example models, the accuracy gate, fallbacks, auto-exclude, Constant
weights, already-quantized models, external data, and the CLI's messages. Real models, real onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.accuracy import compare
from edgepack.calibration import generated_validation, random_samples
from edgepack.checked import quiet_session
from edgepack.errors import AccuracyError, UsageError
from edgepack.examples import EXAMPLE_SHAPES, build_example, write_example
from edgepack.onnxio.modelinfo import describe_io, external_locations
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from edgepack.recipes.dynamic import DynamicSettings
from edgepack.recipes.fp16 import Fp16Settings
from edgepack.recipes.quantize import already_quantized, quantize_model
from edgepack.recipes.static import StaticSettings
from edgepack.stages.fix_shapes import apply_shapes
from edgepack.stages.load import load

RECIPES = {
    "dynamic": DynamicSettings(op_types=["Conv", "MatMul", "Gather"]),
    "static": StaticSettings(),
    "fp16": Fp16Settings(),
}


def _figures(reference: Path, candidate: Path, feeds: list[dict]) -> dict:
    """FP32 against a quantized model, both on the exact INT8 kernels bundles ask for (backends.EXACT_INT8):
    the default U8S8 kernels of an x86 host without VNNI saturate."""
    ref = quiet_session(reference)
    got = quiet_session(candidate)
    names = [o.name for o in ref.get_outputs()]
    return compare(
        [dict(zip(names, ref.run(names, f))) for f in feeds], [dict(zip(names, got.run(names, f))) for f in feeds]
    )


def _mlp(path: Path, *, weights_in_constants: bool = False, seed: int = 0) -> Path:
    """x[batch, 16] -> MatMul -> Tanh -> MatMul -> Relu -> MatMul -> y[batch, 10]. Tanh is never quantized,
    so a bad range on x and on the first MatMul's output stays local to the first MatMul."""
    rng = np.random.default_rng(seed)
    shapes = {"w1": (16, 32), "w2": (32, 32), "w3": (32, 10)}
    arrays = {n: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for n, s in shapes.items()}
    nodes, inits = [], []
    for name, array in arrays.items():
        if weights_in_constants:
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
        else:
            inits.append(numpy_helper.from_array(array, name))
    nodes += [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="first_matmul"),
        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "w2"], ["h2"], name="second_matmul"),
        helper.make_node("Relu", ["h2"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w3"], ["y"], name="third_matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def _stage(manifest: dict, name: str) -> dict:
    return next(r for r in manifest["stages"] if r["stage"] == name)


# --- recipes on the example models ------------------------------------------------------------


@pytest.mark.parametrize("example", ["cnn", "transformer"])
@pytest.mark.parametrize("method", ["dynamic", "static", "fp16"])
def test_every_recipe_on_the_examples(tmp_path: Path, example: str, method: str):
    source = write_example(example, tmp_path)
    inputs, _ = describe_io(onnx.load(source))
    result = quantize_model(
        source, tmp_path / "out" / "q.onnx", method, RECIPES[method], calibration=random_samples(inputs).feeds
    )
    figures = _figures(source, result.path, generated_validation(inputs).feeds)
    assert figures["cosine"] > 0.999, figures
    if example == "cnn":
        assert figures["top1_agreement"] == 1.0
    assert result.precision == ("fp16" if method == "fp16" else "int8")
    assert result.low_precision_weights > 0
    expected_ratio = 0.55 if method == "fp16" else 0.4
    assert result.bytes_after < expected_ratio * result.bytes_before, result.report()
    assert result.preprocess.startswith("quant_pre_process")
    io_types = {
        vi.type.tensor_type.elem_type
        for vi in [*onnx.load(result.path).graph.input, *onnx.load(result.path).graph.output]
    }
    assert TensorProto.FLOAT16 not in io_types  # FP16 keeps float32 inputs and outputs


def _fixed_transformer(folder: Path) -> Path:
    """The example transformer with the input shapes fixed, as for a target that needs fixed shapes."""
    source = write_example("transformer", folder)
    return apply_shapes(onnx.load(source), source, folder / "fixed", EXAMPLE_SHAPES["transformer"])


@pytest.mark.parametrize("method", ["dynamic", "static", "fp16"])
def test_a_fixed_shape_transformer_quantizes_to_a_model_onnxruntime_optimizes_again(tmp_path: Path, method: str):
    """quant_pre_process's optimizer fuses MatMul+Add into Reshape+Gemm+Reshape with shape initializers named
    gemm_input_shape...; a second optimization (every session with default settings) fused the remaining
    pairs under the same names and failed with "Attempt to replace the existing tensor"."""
    source = _fixed_transformer(tmp_path)
    inputs, _ = describe_io(onnx.load(source))
    result = quantize_model(
        source, tmp_path / "out" / "q.onnx", method, RECIPES[method], calibration=random_samples(inputs, count=8).feeds
    )
    for model in (result.path, result.path.with_name("q.pre.onnx")):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])  # raised before
    invented = [t.name for t in onnx.load(result.path.with_name("q.pre.onnx")).graph.initializer if "gemm" in t.name]
    assert invented and all(name.startswith("pre_process/") for name in invented), invented
    assert _figures(source, result.path, generated_validation(inputs, count=8).feeds)["cosine"] > 0.999


def test_cli_fp16_fixed_shape_transformer_packages(tmp_path: Path):
    """The README's example on the fp16 target with fixed shapes, with no flags (it was an internal error)."""
    done = _cli("package", "--example", "transformer", "--target", "ios-coreml", "-o", "out", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    quantize = _stage(
        json.loads((tmp_path / "out" / "transformer-ios-coreml" / "manifest.json").read_text()), "quantize"
    )
    assert quantize["recipe"] == "fp16" and quantize["passed"]


def test_a_model_onnxruntime_cannot_load_in_the_gate_is_a_clear_error(tmp_path: Path):
    """A model written by onnxruntime's own optimizer with fixed shapes does not load again with optimizations on
    (onnxruntime 1.31 names a second fusion's initializers like the first's): refused at load in onnxruntime's
    words, no internal error."""
    fixed = _fixed_transformer(tmp_path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(str(fixed), options, providers=["CPUExecutionProvider"])
    done = _cli(
        "package",
        str(tmp_path / "ort_optimized.onnx"),
        "--target",
        "linux-x64",
        "--quantize",
        "fp16",
        "-o",
        "out",
        cwd=tmp_path,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "onnxruntime cannot load the model" in done.stderr
    assert "Attempt to replace the existing tensor" in done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "ort_optimized-linux-x64").exists()


def test_calibration_methods_all_run(tmp_path: Path):
    source = write_example("cnn", tmp_path)
    inputs, _ = describe_io(onnx.load(source))
    calibration = random_samples(inputs, count=8).feeds
    for method in ("entropy", "percentile"):
        result = quantize_model(
            source,
            tmp_path / method / "q.onnx",
            "static",
            StaticSettings(),
            calibration=calibration,
            calibration_method=method,
        )
        assert _figures(source, result.path, generated_validation(inputs, count=8).feeds)["cosine"] > 0.99, method


# --- the pipeline: defaults, fallbacks, gate --------------------------------------------------


def test_static_default_without_calibration_falls_back_and_says_so(tmp_path: Path):
    messages: list[str] = []
    source = write_example("transformer", tmp_path)
    (result,) = package_model(
        source,
        [load_profile("rpi-arm64")],
        Options(output=tmp_path / "build", calibration_method="entropy"),
        progress=messages.append,
    )
    assert result.ok, result.error
    report = _stage(result.manifest, "quantize")
    assert report["recipe"] == "dynamic" and report["profile_default"] == "static"
    assert report["unused_options"] == "--calibration-method: not used by the dynamic recipe"
    assert report["fallback"]["reason"] == "no calibration data given (--calibration)"
    assert "fallback from static" in report["summary"]
    assert any("NOTE: the profile's default is static quantization" in m for m in messages)
    assert result.manifest["model"]["precision"] == "int8"
    self_test = _stage(result.manifest, "self_test")
    assert self_test["tolerance"] == "quantization.tolerance" and self_test["passed"]


def test_static_with_random_calibration_is_marked_and_self_tested(tmp_path: Path):
    source = write_example("cnn", tmp_path)
    options = Options(output=tmp_path / "build", quantize="static", calibration="random")
    (result,) = package_model(source, [load_profile("rpi-arm64")], options)
    assert result.ok, result.error
    report = _stage(result.manifest, "quantize")
    assert report["calibration"] == {"origin": "random", "samples": 32, "random": True}
    assert report["options"]["per_channel"] is True and report["options"]["calibration_method"] == "minmax"
    assert report["passed"] and report["figures"]["top1_agreement"] == 1.0
    assert report["result"]["size_ratio"] < 0.4
    self_test = _stage(result.manifest, "self_test")
    assert self_test["passed"] and self_test["top1_agreement"] == 1.0 and "size_after_conversion" in self_test


def test_fp32_bundles_keep_the_strict_fp32_tolerance(tmp_path: Path):
    source = write_example("cnn", tmp_path)
    (result,) = package_model(source, [load_profile("rpi-arm64")], Options(output=tmp_path / "b", quantize="none"))
    self_test = _stage(result.manifest, "self_test")
    assert "tolerance" not in self_test and "(<= 0.001)" in self_test["summary"]


def _badly_calibrated(tmp_path: Path) -> tuple[Path, Path]:
    """One calibration sample 1000x too large: x's range (and the first MatMul's) is so wide that every
    ordinary input quantizes to zero. The held-out samples (the last fifth) are ordinary."""
    model = _mlp(tmp_path / "mlp.onnx")
    x = np.random.default_rng(5).standard_normal((40, 16)).astype(np.float32)
    x[0] *= 1000
    np.save(tmp_path / "calib.npy", x)
    return model, tmp_path / "calib.npy"


def test_gate_rejects_a_bad_recipe_and_says_by_how_much_and_what_to_try(tmp_path: Path):
    model, calibration = _badly_calibrated(tmp_path)
    options = Options(output=tmp_path / "build", quantize="static", calibration=str(calibration))
    (result,) = package_model(model, [load_profile("linux-x64")], options)
    assert not result.ok and isinstance(result.error, AccuracyError)
    message = str(result.error)
    assert "static quantization misses the profile's tolerance on 8 validation sample(s)" in message
    assert "below the required 0.99" in message and "points below the required 98.0%" in message
    assert "--auto-exclude" in result.error.hint and "--calibration-method" in result.error.hint
    assert not (tmp_path / "build" / "mlp-linux-x64").exists()
    assert not list((tmp_path / "build").glob(".*partial"))


def test_auto_exclude_leaves_the_sensitive_node_in_float(tmp_path: Path):
    model, calibration = _badly_calibrated(tmp_path)
    options = Options(output=tmp_path / "build", quantize="static", calibration=str(calibration), auto_exclude=True)
    (result,) = package_model(model, [load_profile("linux-x64")], options)
    assert result.ok, result.error
    report = _stage(result.manifest, "quantize")
    assert report["result"]["excluded_nodes"] == ["first_matmul"]
    assert report["sensitivity"][0]["node"] == "first_matmul"
    assert [a["passed"] for a in report["attempts"]] == [False, True]
    assert report["result"]["quantized_ops"]["QuantizeLinear"] >= 2  # the rest is still quantized


def test_explicit_static_without_calibration_refuses(tmp_path: Path):
    source = write_example("cnn", tmp_path)
    (result,) = package_model(source, [load_profile("rpi-arm64")], Options(output=tmp_path / "b", quantize="static"))
    assert isinstance(result.error, UsageError)
    assert "static quantization needs calibration data (--calibration)" in str(result.error)
    assert "--calibration random" in result.error.hint
    assert not (tmp_path / "b" / "cnn-rpi-arm64").exists()


def test_a_profile_can_refuse_instead_of_falling_back(tmp_path: Path):
    text = (
        Path(load_profile("rpi-arm64").source)
        .read_text()
        .replace("without_calibration: dynamic", "without_calibration: refuse")
    )
    (tmp_path / "strict.yaml").write_text(text.replace("name: rpi-arm64", "name: strict"))
    source = write_example("cnn", tmp_path)
    (result,) = package_model(source, [load_profile(str(tmp_path / "strict.yaml"))], Options(output=tmp_path / "b"))
    assert isinstance(result.error, UsageError)
    assert "the profile's default recipe is static quantization, which needs calibration data" in str(result.error)


# --- model forms ------------------------------------------------------------------------------


def test_weights_held_in_constant_nodes_end_up_quantized(tmp_path: Path):
    model = _mlp(tmp_path / "consts.onnx", weights_in_constants=True)
    assert not onnx.load(model).graph.initializer
    (tmp_path / "work").mkdir()
    source = load(model, tmp_path / "work")
    assert source.info["passes"]["LiftConstantsToInitializersPass"] == "applied"
    inputs, _ = describe_io(onnx.load(source.reference))
    for method, recipe in (("static", StaticSettings()), ("dynamic", DynamicSettings())):
        result = quantize_model(
            source.reference, tmp_path / method / "q.onnx", method, recipe, calibration=random_samples(inputs).feeds
        )
        quantized = onnx.load(result.path)
        eight_bit = {
            t.name
            for t in quantized.graph.initializer
            if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and t.dims and np.prod(t.dims) >= 16 * 10
        }
        assert len(eight_bit) == 3, (method, eight_bit)
        assert not any(
            t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 16 * 10 for t in quantized.graph.initializer
        )
        assert not any(n.op_type == "Constant" and np.prod(n.attribute[0].t.dims) >= 16 for n in quantized.graph.node)


def test_already_quantized_models_are_not_quantized_again(tmp_path: Path):
    source = write_example("transformer", tmp_path)
    once = quantize_model(source, tmp_path / "once" / "transformer.onnx", "dynamic", DynamicSettings())
    assert already_quantized(once.path)["MatMulInteger"] > 0
    (result,) = package_model(
        once.path,
        [load_profile("linux-x64")],
        Options(output=tmp_path / "build", quantize="static", calibration="random"),
    )
    assert result.ok, result.error
    report = _stage(result.manifest, "quantize")
    assert report["recipe"] == "none" and "MatMulInteger" in report["already_quantized"]
    assert "not applied" in report["summary"]


@pytest.mark.parametrize("method", ["dynamic", "static", "fp16"])
def test_external_data_is_kept_through_every_recipe(tmp_path: Path, method: str):
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(
        build_example("cnn"),
        folder / "cnn.onnx",
        save_as_external_data=True,
        location="cnn.onnx.data",
        size_threshold=0,
    )
    (tmp_path / "work").mkdir()
    source = load(folder / "cnn.onnx", tmp_path / "work")
    inputs, _ = describe_io(onnx.load(source.reference, load_external_data=False))
    result = quantize_model(
        source.reference,
        tmp_path / "out" / "q.onnx",
        method,
        RECIPES[method],
        calibration=random_samples(inputs, count=8).feeds,
    )
    assert result.external_data
    assert external_locations(onnx.load(result.path, load_external_data=False))
    assert (result.path.parent / "q.onnx.data").is_file()
    assert _figures(source.reference, result.path, generated_validation(inputs, count=8).feeds)["cosine"] > 0.999


def test_a_retry_rewrites_external_data_instead_of_appending(tmp_path: Path):
    """auto-exclude quantizes into the same path again: onnx appends to an existing side file."""
    model = build_example("cnn")
    onnx.save_model(
        model, tmp_path / "cnn.onnx", save_as_external_data=True, location="cnn.onnx.data", size_threshold=0
    )
    inputs, _ = describe_io(model)
    sizes = []
    for _ in range(2):
        result = quantize_model(
            tmp_path / "cnn.onnx",
            tmp_path / "out" / "q.onnx",
            "static",
            StaticSettings(),
            calibration=random_samples(inputs, count=4).feeds,
        )
        sizes.append((tmp_path / "out" / "q.onnx.data").stat().st_size)
    assert sizes[0] == sizes[1]
    ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])


def test_external_data_model_packages_quantized(tmp_path: Path):
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
    (result,) = package_model(
        folder / "enc.onnx",
        [load_profile("rpi-arm64")],
        Options(output=tmp_path / "build", quantize="static", calibration="random"),
    )
    assert result.ok, result.error
    assert _stage(result.manifest, "quantize")["result"]["external_data"] is True
    assert (folder / "enc.onnx.data").read_bytes() == before  # the user's files are never modified


# --- CLI --------------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_static_needs_calibration(tmp_path: Path):
    done = _cli(
        "package", "--example", "cnn", "--target", "rpi-arm64", "--quantize", "static", "-o", "out", cwd=tmp_path
    )
    assert done.returncode == 2
    assert "FAILED  rpi-arm64" in done.stdout
    assert "static quantization needs calibration data (--calibration)" in done.stderr
    assert "--calibration random" in done.stderr and "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "out" / "cnn-rpi-arm64").exists()


def test_cli_calibration_mismatch_is_one_clear_message(tmp_path: Path):
    np.save(tmp_path / "calib.npy", np.zeros((4, 3, 16, 16), dtype=np.float32))
    done = _cli(
        "package",
        "--example",
        "cnn",
        "--target",
        "rpi-arm64",
        "--quantize",
        "static",
        "--calibration",
        "calib.npy",
        "-o",
        "out",
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    error = json.loads(done.stdout)["results"][0]["error"]
    assert "calibration input 'image': expected shape [batch, 3, 32, 32]" in error["message"]
    assert "axis 2 is 16, the model needs 32" in error["message"]


def test_cli_quantize_dynamic_with_calibration_method_and_validation(tmp_path: Path):
    np.save(tmp_path / "val.npy", np.random.default_rng(3).standard_normal((6, 3, 32, 32)).astype(np.float32))
    done = _cli(
        "package",
        "--example",
        "cnn",
        "--target",
        "linux-x64",
        "--quantize",
        "static",
        "--calibration",
        "random",
        "--calibration-method",
        "percentile",
        "--validation",
        "val.npy",
        "-o",
        "out",
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((tmp_path / "out" / "cnn-linux-x64" / "manifest.json").read_text())
    report = _stage(manifest, "quantize")
    assert report["options"]["calibration_method"] == "percentile"
    assert report["validation"] == {"origin": "val.npy", "samples": 6}
    assert _stage(manifest, "self_test")["inputs"] == "val.npy"


# --- after conversion -------------------------------------------------------------------------


def test_a_quantized_model_whose_runtime_style_ort_does_not_load_ships_in_fixed_style(tmp_path: Path):
    """A QDQ transformer converted with Runtime style does not load in onnxruntime 1.31 (FACTS.md): android
    forbids shipping ONNX, so the convert stage ships Fixed style, says so, and the self-test passes on it."""
    messages: list[str] = []
    source = write_example("transformer", tmp_path)
    options = Options(
        output=tmp_path / "build", quantize="static", calibration="random", input_shapes=EXAMPLE_SHAPES["transformer"]
    )  # the target needs fixed shapes
    (result,) = package_model(source, [load_profile("android-nnapi")], options, progress=messages.append)
    assert result.ok, result.error
    convert = _stage(result.manifest, "convert")
    if convert.get("fallback") is None:  # an onnxruntime that loads its own Runtime-style file
        assert convert["style"] == "Runtime"
    else:
        assert convert["fallback"] == "Fixed" and convert["style"] == "Fixed"
        assert "cannot load the Runtime-style .ort its converter wrote" in convert["notice"]
        assert any("notice: onnxruntime cannot load the Runtime-style .ort" in m for m in messages)
    assert result.manifest["model"]["file"].endswith(".ort")
    assert _stage(result.manifest, "self_test")["passed"]


def test_weights_reinflated_by_conversion_are_reported(tmp_path: Path):
    """Fixed style folds FP16 weights back to FP32 (FACTS.md): the self-test says so."""
    messages: list[str] = []
    source = write_example("transformer", tmp_path)
    (result,) = package_model(
        source, [load_profile("rpi-arm64")], Options(output=tmp_path / "b", quantize="fp16"), progress=messages.append
    )
    assert result.ok, result.error
    sizes = _stage(result.manifest, "self_test")["size_after_conversion"]
    assert sizes["ort_bytes"] > 1.5 * sizes["onnx_bytes"]
    assert "re-inflated weights; try ort_format.style Runtime" in _stage(result.manifest, "self_test")["size_warning"]
    assert any(m.startswith("[rpi-arm64] WARNING: the .ort is") for m in messages)


# --- profile fields ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (
            "min_top1_agreement: 0.98",
            "min_top1_agreement: 98",
            "'quantization.tolerance.min_top1_agreement': expected a number in [0, 1], found 98",
        ),
        (
            "weight_type: int8",
            "weight_type: int4",
            "'quantization.static.weight_type': expected one of 'uint8', 'int8', found 'int4'",
        ),
        (
            "without_calibration: dynamic",
            "without_calibration: static",
            "'quantization.without_calibration': expected one of",
        ),
    ],
)
def test_quantization_fields_are_validated(tmp_path: Path, old: str, new: str, expected: str):
    from edgepack.errors import ProfileError

    text = Path(load_profile("rpi-arm64").source).read_text()
    assert old in text
    (tmp_path / "p.yaml").write_text(text.replace(old, new))
    with pytest.raises(ProfileError, match=expected.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        load_profile(str(tmp_path / "p.yaml"))


@pytest.mark.parametrize("op_types", [["MatMul", "Gather"], ["MatMul"]], ids=["all-weights", "embeddings-left-float"])
def test_dynamic_int8_of_a_large_model_is_onnxruntimes_own_in_bounded_memory(tmp_path: Path, monkeypatch, op_types):
    """Over LARGE_MODEL (2 GiB; 0 here) the dynamic recipe skips pre-processing and onnxruntime's copying shape
    re-inference (recipes/dynamic.py, rule 2) and leaves weights over KEPT_IN_INFERENCE (4 KiB here) in their
    side file until the quantizer reads them (rule 3, recipes/ondisk.py): what it writes is what quantize_dynamic writes from the
    model file, its shape inference gives the value_info onnxruntime's own gives, and the weights it leaves in
    float are in its own side file, not in the input's."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer

    from edgepack.recipes import dynamic, ondisk

    inline = write_example("transformer", tmp_path)
    theirs = onnx.load(inline)
    ours = onnx.load(inline)
    expected = save_and_reload_model_with_shape_infer(theirs)
    assert dynamic._infer_in_place(ours) is ours
    assert {v.name: v for v in ours.graph.value_info} == {v.name: v for v in expected.graph.value_info}
    assert list(ours.graph.output) == list(expected.graph.output)
    assert ours.metadata_props == expected.metadata_props

    source = tmp_path / "external" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(onnx.load(inline), source, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    monkeypatch.setattr(dynamic, "LARGE_MODEL", 0)
    monkeypatch.setattr(ondisk, "KEPT_IN_INFERENCE", 4096)
    settings = DynamicSettings(op_types=op_types)
    large = quantize_model(source, tmp_path / "large" / "q.onnx", "dynamic", settings)
    assert large.preprocess.startswith("none (a model over 2 GiB")
    plain = tmp_path / "plain.onnx"
    quantize_dynamic(source, plain, op_types_to_quantize=op_types, weight_type=QuantType.QInt8)
    source.parent.rename(tmp_path / "moved")  # the written model must not need the input's side file
    written, reference = onnx.load(large.path), onnx.load(plain)
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in reference.graph.node]
    arrays = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    expected_arrays = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    assert arrays.keys() == expected_arrays.keys()
    for name, array in expected_arrays.items():
        assert arrays[name].dtype == array.dtype and np.array_equal(arrays[name], array), name
    assert ("word_embeddings" in arrays) == ("Gather" not in op_types)  # left in float: read in before saving
    assert large.quantized_ops.get("MatMulInteger", 0) > 0


def test_a_recipe_that_quantizes_nothing_ships_fp32_and_says_so(tmp_path: Path):
    """Dynamic INT8 of a model with no MatMul/Gemm/Conv: the FP32 model ships, held to the FP32 tolerance, not a
    pre-processed copy labelled int8."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])],
        "elementwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    path = tmp_path / "elementwise.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    [result] = package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "out", quantize="dynamic"))
    assert result.ok, result.error
    quantize = _stage(result.manifest, "quantize")
    assert quantize["recipe"] == "none" and "found nothing to quantize" in quantize["notice"]
    assert result.manifest["model"]["precision"] == "fp32"
    assert "tolerance" not in _stage(result.manifest, "self_test")  # the FP32 accuracy, not quantization's


def _two_nearly_equal_classes() -> onnx.ModelProto:
    """A [batch, 4] classifier whose classes 0 and 1 differ by 0.1% of a score (2 and 3 are far below):
    every input is a near-tie between them, and INT8 noise flips many."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    w[:, 1] = w[:, 0] * 1.001
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["s"]), helper.make_node("Add", ["s", "b"], ["scores"])],
        "near_ties",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0, 0, -100, -100], np.float32), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_top1_flips_at_near_ties_count_on_generated_inputs_only(tmp_path):
    """On made-up inputs a flip between scores within 1% of the output's range agrees (and is counted as such);
    on the user's own validation inputs the same flips miss the gate and the default recipe falls back."""
    path = tmp_path / "near_ties.onnx"
    onnx.save_model(_two_nearly_equal_classes(), path)
    [generated] = package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "generated"))
    assert generated.ok, generated.error
    quantize = _stage(generated.manifest, "quantize")
    assert quantize["recipe"] == "dynamic" and quantize["figures"]["top1_near_ties"] > 0, quantize
    assert quantize["figures"]["top1_agreement"] == 1.0 and "near-tie" in quantize["summary"]

    x = np.random.default_rng(4).standard_normal((32, 1, 16)).astype(np.float32)
    np.savez(tmp_path / "validation.npz", x=x)
    options = Options(output=tmp_path / "given", validation=tmp_path / "validation.npz")
    [given] = package_model(path, [load_profile("linux-x64")], options)
    assert given.ok, given.error
    quantize = _stage(given.manifest, "quantize")
    assert quantize["recipe"] == "none" and "top-1 agreement" in quantize["notice"], quantize


@pytest.mark.parametrize("target", ["android-xnnpack", "linux-x64"])  # a profile without a recipe, one with
def test_a_model_that_came_with_float16_weights_is_kept_and_held_to_the_quantization_tolerance(tmp_path, target):
    from edgepack.recipes.fp16 import Fp16Settings, fp16_model

    source = write_example("transformer", tmp_path)
    path = tmp_path / "half.onnx"
    typed = onnx.shape_inference.infer_shapes(onnx.load_model(source))  # the converter reads value infos
    onnx.save_model(fp16_model(typed, Fp16Settings(), []), path)
    options = Options(output=tmp_path / "out", input_shapes={"input_ids": (1, 16), "attention_mask": (1, 16)})
    [result] = package_model(path, [load_profile(target)], options)
    assert result.ok, result.error
    quantize = _stage(result.manifest, "quantize")
    assert quantize["already_quantized"]["float16 initializers"] > 0 and "kept as it is" in quantize["summary"]
    self_test = _stage(result.manifest, "self_test")
    assert self_test["passed"] and "(fp16, quantization tolerance)" in self_test["summary"], self_test


def test_embeddings_get_no_top1_figure_only_classifier_scores_do():
    rng = np.random.default_rng(0)
    reference = [{"logits": rng.standard_normal((4, 8)), "pooler_output": rng.standard_normal((4, 8))}]
    candidate = [{k: v[:, ::-1].copy() for k, v in reference[0].items()}]  # every arg-max moves
    figures = compare(reference, candidate)
    assert "top1_agreement" in figures["outputs"]["logits"]
    assert "top1_agreement" not in figures["outputs"]["pooler_output"]
