"""Every transformation is checked (edgepack/checked.py), what onnxruntime runs is packaged, default recipes fall back.

Each model reproduces a third-party model edgepack used to refuse or crash on, though plain onnxruntime
runs it: If/Loop bodies with Constant weights (onnx-ir PassError), a subgraph returning an outer-scope
value (onnx-ir and onnxruntime's optimizer drop the Identity onnxruntime needs), an IR-3 model whose
initializers are not graph inputs, an ai.onnx.ml classifier ending in ZipMap, sequence I/O, and models
whose profile-default quantization misses the accuracy gate.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx_ir.passes.common import IdentityEliminationPass

from edgepack.errors import AccuracyError, CompatibilityError, ModelError, UsageError
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from edgepack.recipes.quantize import prepare
from tests import shaped_models

THIRD_PARTY_NOISE = (
    "Traceback",
    "ONNX Runtime Model Optimization Failed",
    "[W:onnxruntime",
    "[E:onnxruntime",
    "internal error",
)


def _package(tmp_path: Path, name: str, targets=("linux-x64",), **options):
    path = shaped_models.save(getattr(shaped_models, name)(), tmp_path, name)
    return package_model(path, [load_profile(t) for t in targets], Options(output=tmp_path / "out", **options))


def _report(result, stage: str) -> dict:
    return next(r for r in result.manifest["stages"] if r["stage"] == stage)


@pytest.mark.parametrize("name", ["if_with_constant_weights", "loop_with_constant_weights"])
def test_a_pass_that_raises_is_skipped_with_a_notice(tmp_path, name):
    [result] = _package(tmp_path, name, quantize="none")
    assert result.ok, result.error
    optimize = _report(result, "optimize")
    skipped = [s for s in optimize["steps"] if s["status"] == "skipped"]
    assert [s["step"] for s in skipped] == ["IdentityEliminationPass"] and "same rank" in skipped[0]["reason"]
    assert any(s["status"] == "applied" for s in optimize["steps"])  # the other passes still ran
    assert "IdentityEliminationPass skipped" in optimize["notice"]
    assert _report(result, "self_test")["passed"]


def test_outer_scope_subgraph_output_is_repaired_and_nothing_third_party_is_printed(tmp_path, cli):
    path = shaped_models.save(shaped_models.outer_scope_subgraph_output(), tmp_path, "outer")
    done = cli("package", path, "-t", "linux-x64", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    for noise in THIRD_PARTY_NOISE:
        assert noise not in done.stderr and noise not in done.stdout, noise
    manifest = json.loads((tmp_path / "out" / "outer-linux-x64" / "manifest.json").read_text())
    optimize = next(r for r in manifest["stages"] if r["stage"] == "optimize")
    assert "Identity added for subgraph output 'passed'" in optimize["notice"]
    assert "notice: optimize:" in done.stdout


def test_quantization_pre_processing_output_is_repaired_and_quiet(tmp_path, capfd):
    """The model onnx-ir's IdentityEliminationPass writes makes onnxruntime's optimizer fail inside
    quant_pre_process (an ERROR log and a traceback); the checked step repairs what it wrote, silently."""
    model = ir.from_proto(shaped_models.outer_scope_subgraph_output())
    IdentityEliminationPass()(model)
    broken = tmp_path / "broken.onnx"
    ir.save(model, broken)
    with pytest.raises(Exception, match="outer scope value"):
        ort.InferenceSession(str(broken), providers=["CPUExecutionProvider"])
    capfd.readouterr()
    done, notice = prepare(broken, tmp_path / "pre.onnx", external=False)
    assert capfd.readouterr() == ("", "")
    ort.InferenceSession(str(tmp_path / "pre.onnx"), providers=["CPUExecutionProvider"])
    assert done == "quant_pre_process" and "Identity added for subgraph output" in notice


def test_ir3_model_whose_initializers_are_not_inputs_packages_everywhere(tmp_path):
    [python, nnapi] = _package(
        tmp_path,
        "ir3_initializers_not_inputs",
        targets=("linux-x64", "android-nnapi"),
        input_shapes={"x": (1, 4)},
        min_accelerated_fraction=0.0,
    )
    assert python.ok, python.error
    assert nnapi.ok, nnapi.error
    assert "W in initializer but not in graph input" in _report(python, "load")["notice"]
    for result in (python, nnapi):  # written as IR 4: no later step (checker, shape inference, quantizer) refuses it
        assert [s["stage"] for s in result.manifest["stages"] if "notice" in s] == ["load"], result.manifest
        assert _report(result, "self_test")["passed"]
    assert _report(python, "quantize")["recipe"] == "dynamic"


def test_a_notice_every_bundle_shares_is_printed_once(tmp_path, cli):
    path = shaped_models.save(shaped_models.ir3_initializers_not_inputs(), tmp_path, "ir3")
    done = cli("package", path, "-t", "linux-x64", "-t", "rpi-arm64", "-o", tmp_path / "out", "--quantize", "none")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("W in initializer but not in graph input") == 1, done.stdout
    assert "notice (every bundle above): load: onnx.checker: W in initializer" in done.stdout


def test_a_model_onnxruntime_refuses_is_still_refused(tmp_path):
    """onnx.checker findings are notices only when onnxruntime loads the model."""
    model = shaped_models.ir3_initializers_not_inputs()
    model.graph.node[1].attribute.append(helper.make_attribute("slope", 0.5))  # Relu has no such attribute
    path = tmp_path / "broken.onnx"
    onnx.save_model(model, path)
    with pytest.raises(ModelError, match="the ONNX checker rejects the model") as caught:
        package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "out"))
    assert "onnxruntime refuses it too" in caught.value.hint and "Unrecognized attribute: slope" in caught.value.hint


@pytest.mark.parametrize("target", ["linux-x64", "browser-wasm"])
def test_zipmap_classifier_with_a_sequence_of_maps_output_packages(tmp_path, target):
    [result] = _package(tmp_path, "zipmap_classifier", targets=(target,))
    assert result.ok, result.error
    outputs = {o["name"]: o["dtype"] for o in result.manifest["model"]["outputs"]}
    assert outputs == {"label": "int64", "probabilities": "sequence_type"}
    self_test = _report(result, "self_test")
    assert self_test["passed"] and self_test["outputs"]["probabilities"]["max_abs_error"] < 1e-6
    # onnx-ir cannot read map types: its passes were skipped, and the notice says why (not which graph it was in)
    assert "onnx-ir cannot read the model: Map types are not supported yet." in _report(result, "load")["notice"]
    if target == "browser-wasm":  # onnxruntime-web returns tensors only: the loader fetches the label alone
        assert _report(result, "bundle")["notice"] == (
            "onnxruntime-web cannot return probabilities (sequence): the loader's run() returns the other outputs (label)"
        )
    else:
        assert "notice" not in _report(result, "bundle")


def test_a_map_input_is_refused_for_the_browser_before_the_bundle_is_written(tmp_path):
    [result] = _package(tmp_path, "dict_vectorizer", targets=("browser-wasm",))
    assert not result.ok and isinstance(result.error, CompatibilityError)
    assert str(result.error).startswith(
        "browser-wasm: onnxruntime-web takes tensors only, and this model takes features (map)"
    )
    assert "Python target" in result.error.hint
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing half-written"


def test_sequence_inputs_and_outputs_package_and_run_through_the_shim(tmp_path):
    [result] = _package(tmp_path, "sequence_io")
    assert result.ok, result.error
    from edgepack.runtime_shim import edgepack_shim

    model = edgepack_shim.load(result.bundle, check_runtime=False)
    items = [np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)]
    got = model.run({"items": items, "x": np.full((2, 3), 2.0, np.float32)})
    assert len(got["more"]) == 3 and got["joined"].shape == (6, 3)


def test_map_input_packages_with_keys_from_its_vocabulary(tmp_path):
    [result] = _package(tmp_path, "dict_vectorizer")
    assert result.ok, result.error
    assert result.manifest["model"]["inputs"] == [{"name": "features", "dtype": "map_type", "shape": None}]
    assert _report(result, "self_test")["passed"]


def test_default_recipe_that_misses_the_gate_ships_fp32_with_a_notice(tmp_path):
    [result] = _package(tmp_path, "int8_outlier")
    assert result.ok, result.error
    quantize = _report(result, "quantize")
    assert quantize["recipe"] == "none" and result.manifest["model"]["precision"] == "fp32"
    assert quantize["default_fallback"]["from"] == "dynamic" and quantize["default_fallback"]["to"] == "none"
    assert "the profile's default recipe dynamic missed" in quantize["notice"] and "shipped FP32" in quantize["notice"]
    assert any("default recipe dynamic missed" in n for n in result.notices)


def test_default_fp16_that_misses_the_gate_ships_fp32(tmp_path):
    [result] = _package(tmp_path, "fp16_underflow", targets=("jetson-orin-trt",))
    assert result.ok, result.error
    assert _report(result, "quantize")["default_fallback"]["from"] == "fp16"


def test_explicit_recipe_stays_strict(tmp_path):
    [result] = _package(tmp_path, "int8_outlier", quantize="dynamic")
    assert not result.ok and isinstance(result.error, AccuracyError)


def test_unnamed_question_mark_dim_suggests_input_shape_not_fix_dim(tmp_path):
    """Some exporters name a dynamic dim '?': --fix-dim ?=N cannot fix it, --input-shape can."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "?"])],
    )
    path = shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path, "q"
    )
    [result] = package_model(path, [load_profile("android-nnapi")], Options(output=tmp_path / "out"))
    assert isinstance(result.error, UsageError)
    assert "--input-shape x=1,N" in result.error.hint and "--fix-dim" not in result.error.hint
    [fixed] = package_model(
        path,
        [load_profile("android-nnapi")],
        Options(output=tmp_path / "out", input_shapes={"x": (1, 5)}, min_accelerated_fraction=0.0),
    )
    assert fixed.ok, fixed.error


def test_a_step_whose_outputs_differ_is_skipped_and_one_that_agrees_is_kept(tmp_path):
    """Rule 2 of edgepack.checked, on a real session: a changed weight is caught, a faithful rewrite passes."""
    from edgepack.checked import run_checked

    before = shaped_models.save(shaped_models.embedding(), tmp_path, "before")
    feeds = lambda model: [{"input_ids": np.array([[1, 2, 3]], np.int64)}]  # noqa: E731

    def changed() -> Path:
        model = onnx.load(before)
        model.graph.initializer[0].CopyFrom(
            onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(model.graph.initializer[0]) * 1.5, "table")
        )
        return shaped_models.save(model, tmp_path, "changed")

    kept, record = run_checked("scale weights", before, changed, feeds=feeds)
    assert kept == before and record["status"] == "skipped" and "outputs differ" in record["reason"]
    kept, record = run_checked(
        "rewrite", before, lambda: shaped_models.save(onnx.load(before), tmp_path, "same"), feeds=feeds
    )
    assert kept == tmp_path / "same.onnx" and record == {"step": "rewrite", "status": "applied", "checked": "outputs"}
    kept, record = run_checked("crash", before, lambda: 1 / 0, feeds=feeds)
    assert kept == before and record["reason"] == "ZeroDivisionError: division by zero"


def test_notices_with_library_messages_keep_bundles_reproducible(tmp_path):
    """The FP16 model onnxruntime refuses names its scratch path in the error; the notice must not carry it."""
    path = shaped_models.save(shaped_models.voice_activity(), tmp_path, "vad")
    manifests = []
    for out in ("a", "second-run"):
        [result] = package_model(
            path,
            [load_profile("ios-coreml")],
            Options(
                output=tmp_path / out,
                min_accelerated_fraction=0.0,
                input_shapes={"audio": (1, 512), "state": (2, 1, 16)},
            ),
        )
        assert result.ok, result.error
        manifests.append((result.bundle / "manifest.json").read_text())
    scratch = f"{tempfile.gettempdir()}/edgepack-"
    assert "shipped FP32 instead" in manifests[0] and "<work file>" in manifests[0] and scratch not in manifests[0]
    assert manifests[0] == manifests[1]


class _DiesWhenRead:
    """Unpickled in the probe's child process, it kills that process with SIGSEGV, as a native crash would."""

    def __reduce__(self):
        return (_segfault_self, ())


def _segfault_self():
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def test_native_crash_tells_a_child_killed_by_a_signal_from_one_that_survives(tmp_path):
    from edgepack.checked import native_crash

    path = shaped_models.save(shaped_models.ir3_initializers_not_inputs(), tmp_path, "m")
    assert native_crash(path, {"x": np.ones((1, 4), np.float32)}) is None
    assert native_crash(tmp_path / "missing.onnx", {}) is None  # a refusal is not a crash
    assert native_crash(path, {"x": _DiesWhenRead()}) == "crashed (SIGSEGV)"
    assert native_crash(path, {"x": np.ones((1, 4), np.float32)}) is None  # a new child after the crash


def _lstm_tagger(path: Path) -> Path:
    """A torch LSTM + Linear with dynamic batch and sequence (TorchScript exporter): its fp16 model crashes
    onnxruntime 1.31's level-3 optimizer on x86 (SIGSEGV)."""
    torch = pytest.importorskip("torch")

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = torch.nn.LSTM(20, 32, batch_first=True), torch.nn.Linear(32, 5)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    torch.manual_seed(0)
    torch.onnx.export(
        Tagger().eval(),
        (torch.randn(1, 7, 20),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch", 1: "seq"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def test_an_lstm_model_whose_fp16_conversion_crashes_onnxruntime_costs_only_fp16(tmp_path, cli):
    """The quantization gate tries the fp16 model in a child process: fp16 falls back, every target ships."""
    path = _lstm_tagger(tmp_path / "tagger.onnx")
    done = cli("package", path, "-t", "jetson-orin-trt,linux-x64", "-o", tmp_path / "out", "--json", "-j", "1")
    assert done.returncode == 0, done.stderr
    results = {r["target"]: r for r in json.loads(done.stdout)["results"]}
    assert all(r["ok"] for r in results.values()), results
    manifest = json.loads((Path(results["jetson-orin-trt"]["bundle"]) / "manifest.json").read_text())
    quantize = next(s for s in manifest["stages"] if s["stage"] == "quantize")
    assert quantize["recipe"] == "fp16" or "crashed (SIGSEGV)" in quantize["notice"], quantize


def test_a_model_onnxruntime_dies_of_is_refused_cleanly(tmp_path, cli, clean_failure):
    """The fp16 tagger given as the user's model: where onnxruntime dies of it, edgepack refuses it (exit 3)."""
    from edgepack.checked import native_crash
    from edgepack.recipes.fp16 import Fp16Settings, fp16_model

    path = tmp_path / "tagger16.onnx"
    onnx.save_model(fp16_model(onnx.load_model(_lstm_tagger(tmp_path / "tagger.onnx")), Fp16Settings(), []), path)
    done = cli("package", path, "-t", "linux-x64", "-o", tmp_path / "out")
    if native_crash(path) is None:  # a host where onnxruntime survives it: packaged or refused like any model
        assert done.returncode in (0, 2, 3, 4, 5, 6), done.stderr
    else:
        clean_failure(done, "onnxruntime crashed (SIGSEGV) loading the model")
        assert done.returncode == 3 and not (tmp_path / "out").exists()


def test_models_edgepack_writes_hold_no_value_info_for_initializers(tmp_path):
    """onnx-ir writes a value_info per initializer; a quantizer that rewrites a weight in place (dynamic INT8
    turns a Gemm's B into a transposed MatMul weight) would leave it stale and onnx's shape inference refuse."""
    from edgepack.onnxio.save import save_model

    weight = np.random.default_rng(1).standard_normal((10, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    source = shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path, "gemm"
    )
    written = save_model(ir.load(source), tmp_path / "written.onnx")
    proto = onnx.load_model(written)
    assert [vi.name for vi in proto.graph.value_info if vi.name == "w"] == []
    feeds = {"x": np.ones((1, 32), np.float32)}
    expected = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
