"""Hostile and broken models are refused by ``edgepack package`` with one clear error and nothing written.

Each case runs the real CLI in a subprocess and checks: a non-zero exit code, stderr holding exactly
one ``edgepack: error:`` message that names the problem and no traceback, no output folder, and the
input files byte-for-byte (and mode) unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgepack.errors import ModelError
from edgepack.stages.load import parse_model
from tests.external_models import (
    B1,
    IR_VERSION,
    OPSET,
    W1,
    W2,
    external_tensor,
    mlp_graph,
    tree_digest,
    write_inline_model,
    write_split_model,
)


def _save(folder: Path, model: onnx.ModelProto, name: str = "model.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def _with_w2_at(folder: Path, location: str, offset: int = 0, length: int | None = None) -> Path:
    inits = [
        helper.make_tensor("W1", TensorProto.FLOAT, W1.shape, W1.ravel()),
        helper.make_tensor("B1", TensorProto.FLOAT, B1.shape, B1),
        external_tensor("W2", W2, location, offset, length),
    ]
    return _save(folder, mlp_graph(inits))


def _graph_model(nodes, inputs=("x",), outputs=("y",), opsets=(("", OPSET),)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in outputs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=IR_VERSION)


def _if_model(branch_input: str) -> onnx.ModelProto:
    """An If whose then-branch reads ``branch_input`` from the outer scope."""
    then = helper.make_graph(
        [helper.make_node("Neg", [branch_input], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="branch"),
    ]
    model = _graph_model(nodes)
    model.graph.initializer.append(helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]))
    return model


# --- the cases: each builds its input below `root` and returns (model path, what the error must say)


def dotdot_location(root):
    (root / "outside.bin").write_bytes(W2.tobytes())
    return _with_w2_at(root / "in", "../outside.bin"), "points outside the model's folder"


def absolute_location(root):
    (root / "abs.bin").write_bytes(W2.tobytes())
    return _with_w2_at(root / "in", str(root / "abs.bin")), "points outside the model's folder"


def symlink_leading_out(root):
    (root / "secret.bin").write_bytes(W2.tobytes())
    (root / "in").mkdir()
    os.symlink(root / "secret.bin", root / "in" / "w2.bin")
    return _with_w2_at(root / "in", "w2.bin"), "link leading outside"


def nul_byte_location(root):
    return _with_w2_at(root / "in", "w2\x00.bin"), "cannot be read"


def missing_side_file(root):
    return _with_w2_at(root / "in", "w2.bin"), "'w2.bin' is missing"


def truncated_side_file(root):
    model = write_split_model(root / "in")
    data = (root / "in" / "b.bin").read_bytes()
    (root / "in" / "b.bin").write_bytes(data[: len(data) // 2])
    return model, "shorter than the tensor's offset+length"


def offset_past_end(root):
    (root / "in").mkdir()
    (root / "in" / "w2.bin").write_bytes(W2.tobytes())
    return _with_w2_at(
        root / "in", "w2.bin", offset=4096
    ), f"shorter than the tensor's offset+length ({4096 + W2.nbytes})"


def offset_not_a_number(root):
    model = _with_w2_at(root / "in", "w2.bin")
    (root / "in" / "w2.bin").write_bytes(W2.tobytes())
    proto = onnx.load_model(model, load_external_data=False)
    for entry in proto.graph.initializer[2].external_data:
        if entry.key == "offset":
            entry.value = "-12"
    return _save(root / "in", proto), "offset '-12' is not a non-negative integer"


def truncated_protobuf(root):
    data = write_inline_model(root / "in").read_bytes()
    (root / "in" / "mlp.onnx").write_bytes(data[: len(data) // 2])
    return root / "in" / "mlp.onnx", "protobuf cannot be parsed"


def text_file(root):
    (root / "in").mkdir()
    (root / "in" / "notes.onnx").write_text("this is a README, not a model\n" * 20)
    return root / "in" / "notes.onnx", "not"


def random_bytes(root):
    (root / "in").mkdir()
    (root / "in" / "noise.onnx").write_bytes(np.random.default_rng(3).bytes(4096))
    return root / "in" / "noise.onnx", "not"


def zero_bytes(root):
    (root / "in").mkdir()
    (root / "in" / "empty.onnx").write_bytes(b"")
    return root / "in" / "empty.onnx", "empty (0 bytes)"


def folder_as_model(root):
    write_inline_model(root / "in" / "model.onnx")
    return root / "in" / "model.onnx", "is a folder"


def no_such_file(root):
    (root / "in").mkdir()
    return root / "in" / "nothere.onnx", "no such file"


def unknown_op(root):
    return (
        _save(root / "in", _graph_model([helper.make_node("Frobnicate", ["x"], ["y"])])),
        "no runtime of any target can run these ops (unknown op or domain): Frobnicate (x1)",
    )


def unknown_domain(root):
    model = _graph_model(
        [helper.make_node("Blur", ["x"], ["y"], domain="com.example.vision")],
        opsets=(("", OPSET), ("com.example.vision", 1)),
    )
    return _save(root / "in", model), "com.example.vision::Blur"


def cycle(root):
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="second"),
        helper.make_node("Neg", ["b"], ["y"], name="last"),
    ]
    return _save(root / "in", _graph_model(nodes)), "the graph has a cycle"


def input_nothing_produces(root):
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")]
    return _save(root / "in", _graph_model(nodes)), "input 'ghost' of node 'add' (Add) is produced by no node"


def subgraph_input_nothing_produces(root):
    return _save(
        root / "in", _if_model("ghost")
    ), "value 'ghost' read inside the subgraphs of node 'branch' (If) is produced by no node"


CASES = [
    dotdot_location,
    absolute_location,
    symlink_leading_out,
    nul_byte_location,
    missing_side_file,
    truncated_side_file,
    offset_past_end,
    offset_not_a_number,
    truncated_protobuf,
    text_file,
    random_bytes,
    zero_bytes,
    folder_as_model,
    no_such_file,
    unknown_op,
    unknown_domain,
    cycle,
    input_nothing_produces,
    subgraph_input_nothing_produces,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_refused_with_one_clear_error_and_nothing_written(case, tmp_path):
    model, says = case(tmp_path)
    before = tree_digest(tmp_path)
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
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("edgepack: error:"), proc.stderr
    assert proc.stderr.count("edgepack: error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    assert says in proc.stderr, proc.stderr
    assert not out.exists()
    assert tree_digest(tmp_path) == before


def test_outer_scope_values_in_subgraphs_are_accepted(tmp_path):
    """The structure check must not refuse a branch that reads a value of the enclosing graph."""
    proto = parse_model(_save(tmp_path, _if_model("r")))
    assert proto.graph.node[-1].op_type == "If"


def test_cycle_through_a_subgraph_is_found(tmp_path):
    """The If reads 'late' inside its branch, and 'late' is computed from the If's output."""
    then = helper.make_graph(
        [helper.make_node("Neg", ["late"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["i"], then_branch=then, else_branch=other, name="branch"),
        helper.make_node("Relu", ["i"], ["late"], name="after"),
        helper.make_node("Neg", ["late"], ["y"]),
    ]
    model = _graph_model(nodes)
    model.graph.initializer.append(helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]))
    with pytest.raises(ModelError, match="cycle: node 'branch' \\(If\\) -> node 'after' \\(Relu\\) -> node 'branch'"):
        parse_model(_save(tmp_path, model))


@pytest.mark.parametrize("writer", [write_split_model, write_inline_model])
def test_every_truncation_of_a_model_is_refused(tmp_path, writer):
    """Cut at any byte, a model either fails to parse or parses incomplete: both must be one ModelError."""
    model = writer(tmp_path)
    data = model.read_bytes()
    step = max(1, len(data) // 150)
    for cut in [*range(0, len(data), step), len(data) - 1]:
        model.write_bytes(data[:cut])
        with pytest.raises(ModelError):
            parse_model(model)
    model.write_bytes(data)
    assert parse_model(model).graph.name == "mlp"


def test_a_model_whose_opset_import_was_cut_off_is_named_so(tmp_path):
    proto = onnx.load_model(write_inline_model(tmp_path), load_external_data=False)
    del proto.opset_import[:]
    with pytest.raises(ModelError, match="use domain\\(s\\) ai.onnx but it imports no opset"):
        parse_model(_save(tmp_path, proto))
