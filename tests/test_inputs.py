"""Inputs edgepack makes up fit the model (edgepack/inputs.py), and --sample-inputs is one input set as the model takes it.

Every model here runs in plain onnxruntime at real sizes and fails on every dynamic dim set to 1 or 8
with integers in [0, 16): the self-test inputs, not the model, decide whether it packages.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import UsageError
from edgepack.inputs import fit_inputs
from edgepack.onnxio.modelinfo import describe_io
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from tests import shaped_models


def _fit(tmp_path: Path, name: str, **kwargs):
    path = shaped_models.save(getattr(shaped_models, name)(), tmp_path, name)
    return path, fit_inputs(path, describe_io(onnx.load_model(path))[0], **kwargs)


def _runs(path: Path, feeds: dict) -> list:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_detector_gets_height_and_width_multiples_of_32(tmp_path):
    path, plan = _fit(tmp_path, "detector")
    batch, channels, height, width = plan.shapes["image"]
    assert (batch, channels) == (1, 3) and height % 32 == 0 and width % 32 == 0
    assert _runs(path, plan.generate(seed=3, count=1)[0])[0].shape[0] == 1


def test_audio_front_end_gets_more_samples_than_its_reflect_pad(tmp_path):
    _, plan = _fit(tmp_path, "spectrogram")
    assert plan.shapes["audio"][0] == 1 and plan.shapes["audio"][1] > 200


def test_token_ids_stay_below_the_embedding_table(tmp_path):
    path, plan = _fit(tmp_path, "embedding")
    for feeds in plan.generate(seed=1, count=20):
        assert feeds["input_ids"].dtype == np.int64 and 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 10
    _runs(path, plan.generate(seed=1, count=1)[0])


def test_voice_activity_detector_gets_a_rate_and_a_state_of_its_batch(tmp_path):
    path, plan = _fit(tmp_path, "voice_activity")
    feeds = plan.generate(seed=0, count=1)[0]
    assert feeds["sr"].shape == () and int(feeds["sr"]) == 16000
    assert feeds["state"].shape == (2, 1, 16) and feeds["audio"].shape[0] == 1
    _runs(path, feeds)


def test_self_test_shape_wins_and_names_are_shared(tmp_path):
    _, plan = _fit(tmp_path, "detector", given={"image": (1, 3, 96, 128)})
    assert plan.shapes["image"] == (1, 3, 96, 128)
    assert plan.report()["input_shapes"] == {"image": [1, 3, 96, 128]}


def test_ladder_climbs_until_the_reference_runs(tmp_path):
    """A model that needs at least 1000 samples: the first candidate fails, the next runs, both are recorded."""
    inits = [
        numpy_helper.from_array(np.array([0, 999], np.int64), "start"),
        numpy_helper.from_array(np.array([1, 1000], np.int64), "stop"),
    ]
    nodes = [
        helper.make_node("Slice", ["wave", "start", "stop"], ["tail"]),
        helper.make_node("Reshape", ["tail", "one"], ["y"]),
    ]
    inits.append(numpy_helper.from_array(np.array([1, 1], np.int64), "one"))
    graph = helper.make_graph(
        nodes,
        "long",
        [helper.make_tensor_value_info("wave", TensorProto.FLOAT, ["batch", "samples"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        inits,
    )
    path = shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path, "long"
    )
    plan = fit_inputs(path, describe_io(onnx.load_model(path))[0])
    assert plan.shapes["wave"][1] >= 1000
    assert plan.tries[0]["error"] and plan.tries[-1]["error"] is None


@pytest.mark.parametrize("dims", [[None, None], ["batch", "sequence"]])
def test_audio_under_another_name_reaches_hundreds_of_samples(tmp_path, dims):
    """[batch, ?] or [batch, sequence] audio as silero VAD declares it: a reflect Pad of 150 needs more samples
    than an unnamed dim (32) or a sequence (128) gets before the last rung."""
    nodes = [
        helper.make_node("Unsqueeze", ["input", "axis1"], ["wave"]),
        helper.make_node("Pad", ["wave", "pads"], ["padded"], mode="reflect"),
        helper.make_node("ReduceMean", ["padded", "axes"], ["y"], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([0, 0, 150, 0, 0, 150], np.int64), "pads"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        inits,
    )
    path = shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), tmp_path, "vad"
    )
    plan = fit_inputs(path, describe_io(onnx.load_model(path))[0])
    assert plan.shapes["input"][1] > 150
    _runs(path, plan.generate(seed=0, count=1)[0])


def test_an_expand_shape_given_as_an_input_is_ones(tmp_path):
    """ONNX's own expand test model takes the target shape as an int64 input: random integers do not broadcast."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])],
        "expand",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    path = shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), tmp_path, "expand"
    )
    plan = fit_inputs(path, describe_io(onnx.load_model(path))[0])
    feeds = plan.generate(seed=0, count=1)[0]
    assert feeds["shape"].tolist() == [1, 1, 1]
    assert _runs(path, feeds)[0].shape == (1, 3, 1)


def test_topk_k_and_a_reshape_target_given_as_inputs_get_values_that_always_run(tmp_path):
    graph = helper.make_graph(
        [
            helper.make_node("TopK", ["x", "k"], ["values", "indices"]),
            helper.make_node("Reshape", ["x", "shape"], ["folded"]),
        ],
        "operands",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [
            helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", None]),
            helper.make_tensor_value_info("folded", TensorProto.FLOAT, [None, None]),
        ],
    )
    path = shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path, "operands"
    )
    [result] = package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "out", quantize="none"))
    assert result.ok, result.error
    plan = fit_inputs(path, describe_io(onnx.load_model(path))[0])
    assert [t["error"] for t in plan.tries] == [None]
    feeds = plan.generate(seed=0, count=1)[0]
    assert feeds["k"].tolist() == [1] and feeds["shape"].tolist() == [0, -1]


def _gathered(tmp_path: Path, through: str) -> Path:
    """Gather from a table of 11 columns computed from the input (no initializer tells its size); the indices
    reach it directly, or through an Add of zero that hides where they go."""
    nodes = [helper.make_node("Relu", ["x"], ["table"])]
    if through == "add":
        nodes.append(helper.make_node("Add", ["idx", "zero"], ["at"]))
    nodes.append(helper.make_node("Gather", ["table", "at" if through == "add" else "idx"], ["y"], axis=1))
    graph = helper.make_graph(
        nodes,
        "gathered",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 11]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.array(0, np.int64), "zero")],
    )
    return shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path, f"g-{through}"
    )


def test_indices_into_a_computed_table_stay_below_its_inferred_size(tmp_path):
    path = _gathered(tmp_path, "direct")
    [result] = package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "out", quantize="none"))
    assert result.ok, result.error


def test_random_integers_must_fit_on_every_set_drawn_not_only_the_first(tmp_path):
    """The first set drawn happens to run (indices 10, 0, 6 into 11 columns), the self-test's next two do
    not: the fit refuses up front, naming the user's file and the node, not a later stage the reference."""
    path = _gathered(tmp_path, "add")
    [result] = package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "out", quantize="none"))
    assert not result.ok
    message = str(result.error)
    assert message.startswith("g-add.onnx: edgepack could not build inputs"), message
    assert "node Gather" in message and "give --sample-inputs" in message


def _never_fits(tmp_path: Path) -> Path:
    """Runs only when batch x features is a multiple of 91 (7 x 13): no made-up size is."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "impossible"], ["y"], name="fold")],
        "never",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "features"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 13, None])],
        [numpy_helper.from_array(np.array([7, 13, -1], np.int64), "impossible")],
    )
    return shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path, "never"
    )


def test_no_candidate_runs_says_so_and_asks_for_sample_inputs(tmp_path):
    """The message blames edgepack's inputs, names the last shapes and the node, and says what to give."""
    path = _never_fits(tmp_path)
    with pytest.raises(UsageError) as caught:
        fit_inputs(path, describe_io(onnx.load_model(path))[0])
    message = str(caught.value)
    assert message.startswith(
        "never.onnx: edgepack could not build inputs this model accepts; the last try, shapes {x: 1x"
    )
    assert "failed at node Reshape 'fold'" in message and "give --sample-inputs" in message
    assert "does not run" not in message


@pytest.mark.parametrize("name", ["detector", "spectrogram", "embedding", "voice_activity"])
def test_models_that_need_fitted_inputs_package_and_record_the_shapes(tmp_path, name):
    path = shaped_models.save(getattr(shaped_models, name)(), tmp_path, name)
    [result] = package_model(path, [load_profile("linux-x64")], Options(output=tmp_path / "out"))
    assert result.ok, result.error
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    self_test = next(r for r in manifest["stages"] if r["stage"] == "self_test")
    assert self_test["passed"] and set(self_test["input_shapes"]) == {i["name"] for i in manifest["model"]["inputs"]}
    assert self_test["tries"][-1]["error"] is None


def test_sample_inputs_win_where_no_made_up_input_fits(tmp_path):
    """With the profile's default (dynamic INT8) the gate and every checked step run on the user's one input set."""
    path = _never_fits(tmp_path)
    np.savez(tmp_path / "one.npz", x=np.random.default_rng(0).standard_normal((1, 91)).astype(np.float32))
    [result] = package_model(
        path, [load_profile("linux-x64")], Options(output=tmp_path / "out", sample_inputs=tmp_path / "one.npz")
    )
    assert result.ok, result.error
    stages = {r["stage"]: r for r in result.manifest["stages"]}
    assert stages["self_test"]["sample_sets"] == 1 and stages["self_test"]["inputs"] == str(tmp_path / "one.npz")
    assert all(step["checked"] == "outputs" for step in stages["optimize"]["steps"])


@pytest.mark.parametrize("batch, rate", [(1, 8000), (2, 16000)])
def test_sample_inputs_are_one_set_with_a_scalar_rate(tmp_path, batch, rate):
    """A scalar sr and a state whose first axis is fixed are taken as they are, not split into rows; audio
    [batch, samples] with two rows and the state of that batch are one set of batch 2, not two rows of audio
    against one sr ("different numbers of samples")."""
    path = shaped_models.save(shaped_models.voice_activity(), tmp_path, "vad")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "one.npz",
        audio=rng.standard_normal((batch, 1024)).astype(np.float32),
        state=np.zeros((2, batch, 16), np.float32),
        sr=np.array(rate, np.int64),
    )
    [result] = package_model(
        path,
        [load_profile("linux-x64")],
        Options(output=tmp_path / "out", sample_inputs=tmp_path / "one.npz", quantize="none"),
    )
    assert result.ok, result.error
    self_test = next(r for r in result.manifest["stages"] if r["stage"] == "self_test")
    assert self_test["sample_sets"] == 1 and self_test["inputs"] == str(tmp_path / "one.npz")


def test_sample_inputs_with_dynamic_first_axes_that_are_not_batches(tmp_path):
    """Two rank-1 inputs of different lengths: one input set, not rows that 'hold different numbers of samples'."""
    nodes = [
        helper.make_node("ReduceSum", ["signal"], ["a"], keepdims=0),
        helper.make_node("ReduceSum", ["window"], ["b"], keepdims=0),
        helper.make_node("Mul", ["a", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "lengths",
        [
            helper.make_tensor_value_info("signal", TensorProto.FLOAT, ["samples"]),
            helper.make_tensor_value_info("window", TensorProto.FLOAT, ["taps"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    path = shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path, "lengths"
    )
    np.savez(tmp_path / "one.npz", signal=np.ones(5, np.float32), window=np.ones(3, np.float32))
    [result] = package_model(
        path,
        [load_profile("linux-x64")],
        Options(output=tmp_path / "out", sample_inputs=tmp_path / "one.npz", quantize="none"),
    )
    assert result.ok, result.error
    assert next(r for r in result.manifest["stages"] if r["stage"] == "self_test")["sample_sets"] == 1


def test_self_test_shape_flag_reaches_the_manifest(tmp_path, cli):
    path = shaped_models.save(shaped_models.detector(), tmp_path, "det")
    done = cli(
        "package", path, "-t", "linux-x64", "-o", tmp_path / "out", "--self-test-shape", "image=1,3,96,160", "--json"
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "det-linux-x64" / "manifest.json").read_text())
    self_test = next(r for r in manifest["stages"] if r["stage"] == "self_test")
    assert self_test["input_shapes"] == {"image": [1, 3, 96, 160]}


def test_self_test_shape_is_checked_against_the_model(tmp_path, cli, clean_failure):
    path = shaped_models.save(shaped_models.detector(), tmp_path, "det")
    unknown = cli("package", path, "-t", "linux-x64", "-o", tmp_path / "out", "--self-test-shape", "pixels=1,3,64,64")
    clean_failure(unknown, "--self-test-shape names input 'pixels'", "the model's inputs are: image")
    wrong = cli("package", path, "-t", "linux-x64", "-o", tmp_path / "out", "--self-test-shape", "image=1,4,64,64")
    clean_failure(wrong, "does not fit input 'image' of shape [batch, 3, height, width]")


def test_rate_ladder_reaches_8000_when_16000_is_refused(tmp_path):
    """A model for 8 kHz audio only: the candidates with sr 16000 fail, the one with 8000 runs."""
    refuse = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["sr", "axis0"], ["sr1"]),
            helper.make_node("Concat", ["sr1", "sr1"], ["square"], axis=0),
            helper.make_node("Reshape", ["audio", "square"], ["refused"]),
        ],
        "refuse",
        [],
        [helper.make_tensor_value_info("refused", TensorProto.FLOAT, [None, None])],
    )
    accept = helper.make_graph(
        [helper.make_node("Identity", ["audio"], ["kept"])],
        "accept",
        [],
        [helper.make_tensor_value_info("kept", TensorProto.FLOAT, [None, None])],
    )
    nodes = [
        helper.make_node("Equal", ["sr", "k8"], ["is_8k"]),
        helper.make_node("If", ["is_8k"], ["y"], then_branch=accept, else_branch=refuse),
    ]
    graph = helper.make_graph(
        nodes,
        "eight",
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 256]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        [
            numpy_helper.from_array(np.array(8000, np.int64), "k8"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        ],
    )
    path = shaped_models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path, "eight"
    )
    plan = fit_inputs(path, describe_io(onnx.load_model(path))[0])
    assert int(plan.generate(seed=0, count=1)[0]["sr"]) == 8000 and len(plan.tries) == 2
