"""Small models, built in code, that reproduce what real third-party models ask of their inputs and tools.

Each one runs in plain onnxruntime at the right sizes and fails at the sizes a naive generator picks
(every dynamic dim 1 or 8, integers in [0, 16)), or trips a tool edgepack uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR = 8


def _model(graph: onnx.GraphProto, *, opset: int = OPSET, ir: int = IR, ml: bool = False) -> onnx.ModelProto:
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("ai.onnx.ml", 3)] if ml else [])
    return helper.make_model(graph, opset_imports=imports, ir_version=ir)


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_value"))


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def save(model: onnx.ModelProto, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    onnx.save_model(model, path)
    return path


def detector() -> onnx.ModelProto:
    """An FPN-like detector: five stride-2 convs, then each deeper map upsampled x2 and added to the one above,
    three times. H and W must be multiples of 32, or an Add cannot broadcast (as in OCR text detectors)."""
    rng = _rng(1)
    nodes, inits = [], []
    previous, channels = "image", 3
    for i in range(5):
        weight = f"w{i}"
        inits.append(
            numpy_helper.from_array((rng.standard_normal((4, channels, 3, 3)) * 0.3).astype(np.float32), weight)
        )
        nodes.append(helper.make_node("Conv", [previous, weight], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        previous, channels = f"r{i}", 4
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    for level, (deep, lateral) in enumerate([("r4", "r3"), ("m3", "r2"), ("m2", "r1")]):
        merged = "maps" if lateral == "r1" else f"m{3 - level}"
        nodes += [
            helper.make_node("Resize", [deep, "", "scales"], [f"up{level}"], mode="nearest"),
            helper.make_node("Add", [f"up{level}", lateral], [merged]),
        ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["batch", 4, None, None])],
        inits,
    )
    return _model(graph)


def spectrogram() -> onnx.ModelProto:
    """An audio front end: reflect-pad 200 samples on each side, frame and project. Needs over 200 samples."""
    rng = _rng(2)
    inits = [
        numpy_helper.from_array(np.array([0, 200, 0, 200], np.int64), "pads"),
        numpy_helper.from_array(np.array([0, 0, -1, 100], np.int64), "frame"),
        numpy_helper.from_array(rng.standard_normal((100, 16)).astype(np.float32) * 0.1, "basis"),
    ]
    nodes = [
        helper.make_node("Pad", ["audio", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Unsqueeze", ["padded", "axis1"], ["wide"]),
        helper.make_node("Slice", ["wide", "start", "stop", "axes"], ["cut"]),
        helper.make_node("Reshape", ["cut", "frame"], ["frames"]),
        helper.make_node("MatMul", ["frames", "basis"], ["spec"]),
    ]
    inits += [
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([400], np.int64), "stop"),
        numpy_helper.from_array(np.array([2], np.int64), "axes"),
    ]
    graph = helper.make_graph(
        nodes,
        "spectrogram",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"])],
        [helper.make_tensor_value_info("spec", TensorProto.FLOAT, ["batch", 1, None, 16])],
        inits,
    )
    return _model(graph)


def embedding(vocabulary: int = 10) -> onnx.ModelProto:
    """A text encoder's first step: int64 token ids into a table of ``vocabulary`` rows (ids 10..15 are out of range)."""
    table = _rng(3).standard_normal((vocabulary, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"], axis=0),
        helper.make_node("ReduceMean", ["embedded"], ["pooled"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(table, "table")],
    )
    return _model(graph)


def voice_activity() -> onnx.ModelProto:
    """A VAD like silero's: audio [batch, samples], a recurrent state [2, batch, 16] whose batch dim is unnamed and
    not first, and a scalar int64 ``sr`` that must be 8000 or 16000 (any other rate reshapes the audio to [sr, sr])."""
    rng = _rng(4)
    hop = {16000: 64, 8000: 32}

    def branch(rate: int) -> onnx.GraphProto:
        nodes = [
            helper.make_node("Reshape", ["audio", f"frame_{rate}"], [f"framed_{rate}"]),
            helper.make_node("ReduceMean", [f"framed_{rate}"], [f"energy_{rate}"], axes=[2], keepdims=0),
            helper.make_node("ReduceMean", [f"energy_{rate}"], [f"level_{rate}"], axes=[1], keepdims=1),
        ]
        return helper.make_graph(
            nodes,
            f"rate_{rate}",
            [],
            [helper.make_tensor_value_info(f"level_{rate}", TensorProto.FLOAT, [None, 1])],
            [numpy_helper.from_array(np.array([0, -1, hop[rate]], np.int64), f"frame_{rate}")],
        )

    refuse = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["sr", "axis0"], ["sr1"]),
            helper.make_node("Concat", ["sr1", "sr1"], ["nothing"], axis=0),
            helper.make_node("Reshape", ["audio", "nothing"], ["refused"]),
        ],
        "other_rate",
        [],
        [helper.make_tensor_value_info("refused", TensorProto.FLOAT, [None, None])],
    )
    eight = helper.make_graph(
        [helper.make_node("If", ["is_8k"], ["level_inner"], then_branch=branch(8000), else_branch=refuse)],
        "maybe_8k",
        [],
        [helper.make_tensor_value_info("level_inner", TensorProto.FLOAT, [None, 1])],
    )
    nodes = [
        helper.make_node("Equal", ["sr", "k16"], ["is_16k"]),
        helper.make_node("Equal", ["sr", "k8"], ["is_8k"]),
        helper.make_node("If", ["is_16k"], ["level"], then_branch=branch(16000), else_branch=eight),
        helper.make_node("MatMul", ["state", "mix"], ["mixed"]),
        helper.make_node("Unsqueeze", ["level", "axis0"], ["level3"]),
        helper.make_node("Add", ["mixed", "level3"], ["state_out"]),
        helper.make_node("ReduceMean", ["state_out"], ["pooled"], axes=[0, 2], keepdims=0),
        helper.make_node("Sigmoid", ["pooled"], ["speech"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(16000, np.int64), "k16"),
        numpy_helper.from_array(np.array(8000, np.int64), "k8"),
        numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.2).astype(np.float32), "mix"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 16]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("speech", TensorProto.FLOAT, [None]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, None, 16]),
        ],
        inits,
    )
    return _model(graph)


def if_with_constant_weights() -> onnx.ModelProto:
    """An If whose branches hold their small weights in Constant nodes and return them through an Identity whose
    declared shape has another rank (paddle2onnx writes such branches): onnxruntime runs it with a warning,
    onnx-ir's IdentityEliminationPass raises PassError ("Shapes must have the same rank")."""
    rng = _rng(5)

    def branch(tag: str) -> onnx.GraphProto:
        graph = helper.make_graph(
            [
                _const(f"w_{tag}", (rng.standard_normal((2, 2)) * 0.5).astype(np.float32)),
                helper.make_node("Identity", [f"w_{tag}"], [f"y_{tag}"]),
            ],
            tag,
            [],
            [helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT, [None])],
        )
        graph.value_info.append(helper.make_tensor_value_info(f"w_{tag}", TensorProto.FLOAT, [2, 2]))
        return graph

    nodes = [
        _const("zero", np.array(0.0, np.float32)),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["weight"], then_branch=branch("then"), else_branch=branch("else")),
        helper.make_node("MatMul", ["x", "weight"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "if_constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
    )
    return _model(graph)


def loop_with_constant_weights() -> onnx.ModelProto:
    """A Loop whose body multiplies by a small weight held in a Constant node, three times, and hands the result on
    through an Identity declared with another rank: the same PassError as in an If branch."""
    body = helper.make_graph(
        [
            _const("w_body", (_rng(6).standard_normal((2, 2)) * 0.5).astype(np.float32)),
            helper.make_node("MatMul", ["carried", "w_body"], ["product"]),
            helper.make_node("Identity", ["product"], ["carried_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried", TensorProto.FLOAT, [None, 2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried_out", TensorProto.FLOAT, [None]),
        ],
    )
    body.value_info.append(helper.make_tensor_value_info("product", TensorProto.FLOAT, [None, 2]))
    nodes = [
        _const("trips", np.array(3, np.int64)),
        _const("go", np.array(True)),
        helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "loop_constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
    )
    return _model(graph)


def ir3_initializers_not_inputs() -> onnx.ModelProto:
    """An IR-3 model (onnxruntime's old test data) whose initializer is not listed as a graph input:
    onnx.checker refuses it ("in initializer but not in graph input"), onnxruntime runs it."""
    weight = (_rng(7).standard_normal((4, 3)) * 0.5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "ir3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(weight, "W")],
    )
    return _model(graph, opset=7, ir=3)


def zipmap_classifier() -> onnx.ModelProto:
    """An ai.onnx.ml classifier as skl2onnx writes it: LinearClassifier, Normalizer, then ZipMap, whose output is a
    sequence of maps (class -> probability) that numpy cannot hold."""
    rng = _rng(8)
    nodes = [
        helper.make_node(
            "LinearClassifier",
            ["features"],
            ["label", "scores"],
            domain="ai.onnx.ml",
            classlabels_ints=[0, 1, 2],
            coefficients=rng.standard_normal(12).astype(np.float32).tolist(),
            intercepts=[0.1, -0.2, 0.0],
            multi_class=1,
            post_transform="SOFTMAX",
        ),
        helper.make_node("ZipMap", ["scores"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
    ]
    probabilities = onnx.ValueInfoProto(
        name="probabilities",
        type=helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
        ),
    )
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]), probabilities],
    )
    return _model(graph, ml=True)


def dict_vectorizer() -> onnx.ModelProto:
    """An ai.onnx.ml pipeline taking a map input (feature name -> value), as skl2onnx writes for dict features."""
    features = onnx.ValueInfoProto(
        name="features",
        type=helper.make_map_type_proto(TensorProto.STRING, helper.make_tensor_type_proto(TensorProto.FLOAT, [])),
    )
    nodes = [
        helper.make_node(
            "DictVectorizer", ["features"], ["dense"], domain="ai.onnx.ml", string_vocabulary=["a", "b", "c"]
        ),
        helper.make_node("Mul", ["dense", "weights"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dict_features",
        [features],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(np.array([0.5, -1.0, 2.0], np.float32), "weights")],
    )
    return _model(graph, ml=True)


def sequence_io() -> onnx.ModelProto:
    """A model taking and returning a sequence of tensors (onnx node-conformance cases have such I/O)."""
    seq = helper.make_tensor_sequence_value_info
    nodes = [
        helper.make_node("SequenceInsert", ["items", "x"], ["more"]),
        helper.make_node("ConcatFromSequence", ["more"], ["joined"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "sequences",
        [seq("items", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [seq("more", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("joined", TensorProto.FLOAT, [None, 3])],
    )
    return _model(graph)


def outer_scope_subgraph_output() -> onnx.ModelProto:
    """An If whose then-branch returns an outer-scope value through an Identity. onnxruntime's basic optimizer
    (run by quantization pre-processing) removes the Identity and writes a model onnxruntime refuses to load."""
    rng = _rng(9)
    then = helper.make_graph(
        [helper.make_node("Identity", ["hidden"], ["passed"])],
        "then",
        [],
        [helper.make_tensor_value_info("passed", TensorProto.FLOAT, [None, 16])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["hidden"], ["negated"])],
        "else",
        [],
        [helper.make_tensor_value_info("negated", TensorProto.FLOAT, [None, 16])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["hidden"]),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=then, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes,
        "outer_scope",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [
            numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "w"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    return _model(graph)


def fp16_underflow() -> onnx.ModelProto:
    """Weights below float16's smallest subnormal (6e-8), scaled back up after the MatMul: in FP16 they are 0,
    so FP16 misses any accuracy gate while FP32 is exact."""
    rng = _rng(10)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "scale"], ["y"])],
        "underflow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [
            numpy_helper.from_array((rng.standard_normal((8, 8)) * 1e-9).astype(np.float32), "w"),
            numpy_helper.from_array(np.full((8,), 1e4, np.float32), "scale"),
        ],
    )
    return _model(graph)


def int8_outlier() -> onnx.ModelProto:
    """A MatMul whose weights hold one huge outlier, which a second MatMul takes away again: per-tensor INT8 rounds
    every other weight to 0, so what is left is quantization noise."""
    weight = (_rng(11).standard_normal((32, 32)) * 0.01).astype(np.float32)
    weight[0, 0] = 1000.0
    outlier = np.zeros_like(weight)
    outlier[0, 0] = 1000.0
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["all"]),
        helper.make_node("MatMul", ["x", "w_outlier"], ["big"]),
        helper.make_node("Sub", ["all", "big"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(outlier, "w_outlier")],
    )
    return _model(graph)


def shared_weight_zero_point() -> onnx.ModelProto:
    """A QDQ model (int8 activations and weights, as onnxruntime's quantize_static writes by default) whose two
    int8 weights share one zero-point initializer. Plain onnxruntime runs it; with session.x64quantprecision=1
    on an x86 CPU without VNNI, onnxruntime 1.31's int8-to-uint8 weight converter fails to load it ("Attempt to
    replace the existing tensor")."""
    rng, dim = _rng(), 16
    initializers = [
        numpy_helper.from_array(rng.integers(-127, 128, (dim, dim)).astype(np.int8), "w1"),
        numpy_helper.from_array(rng.integers(-127, 128, (dim, dim)).astype(np.int8), "w2"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zero_point"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero_point"),
    ]
    activation = ["x_scale", "x_zero_point"]
    nodes = [
        helper.make_node("DequantizeLinear", ["w1", "w_scale", "w_zero_point"], ["w1_f"]),
        helper.make_node("DequantizeLinear", ["w2", "w_scale", "w_zero_point"], ["w2_f"]),
        helper.make_node("QuantizeLinear", ["x", *activation], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", *activation], ["x_f"]),
        helper.make_node("MatMul", ["x_f", "w1_f"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", *activation], ["h_q"]),
        helper.make_node("DequantizeLinear", ["h_q", *activation], ["h_f"]),
        helper.make_node("MatMul", ["h_f", "w2_f"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shared_weight_zero_point",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        initializers,
    )
    return _model(graph)


def qdq_conv() -> onnx.ModelProto:
    """A QDQ Conv (uint8 activations, int8 per-channel weights) with a float bias, as quantization tools write
    it. onnxruntime 1.31's converter fails on it in Runtime style ("input arg count is not equal to size of input
    defs in node (conv_bias_dq)", a node its own optimizer adds); on x86 without VNNI its int8 kernels saturate."""
    rng = _rng(6)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(rng.integers(-127, 127, (8, 3, 3, 3)).astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(8, np.int8), "wz"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        inits,
    )
    return _model(graph, opset=13, ir=7)


def token_types() -> onnx.ModelProto:
    """token_type_ids index a 2-row table, as in BERT: ids in [0, 16) make Gather refuse the input."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["types", "token_type_ids"], ["embedded"]),
            helper.make_node("ReduceMean", ["embedded", "axes"], ["pooled"], keepdims=0),
        ],
        "bert_like",
        [helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 4])],
        [
            numpy_helper.from_array(_rng(6).standard_normal((2, 4)).astype(np.float32), "types"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    return _model(graph, opset=18)
