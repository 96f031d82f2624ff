"""Built-in example models, generated in code with seeded weights (no download, no torch).

``cnn``: a small image classifier, input ``image`` [batch, 3, 32, 32] float32 -> ``logits`` [batch, 10].
``transformer``: a one-layer encoder (``build_transformer(layers=...)`` stacks more), ``input_ids`` and
``attention_mask`` [batch, sequence] int64 -> ``last_hidden_state`` [batch, sequence, 64].
Both use ai.onnx opset 17 and IR version 8, which every built-in target's runtime loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["EXAMPLES", "build_example", "write_example"]

OPSET = 17
IR_VERSION = 8


def build_cnn(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        std = scale if scale is not None else np.sqrt(2.0 / fan_in)
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name))
        return name

    x = "image"
    channels = [3, 16, 32, 64]
    for i in range(3):
        w = weight(f"conv{i}.weight", (channels[i + 1], channels[i], 3, 3))
        b = weight(f"conv{i}.bias", (channels[i + 1],), 0.05)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{i}"], pads=[1, 1, 1, 1], strides=[1, 1]))
        # batch norm with non-trivial statistics, so optimizers have something to fold
        c = channels[i + 1]
        inits += [
            numpy_helper.from_array((1 + 0.1 * rng.standard_normal(c)).astype(np.float32), f"bn{i}.scale"),
            numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"bn{i}.bias"),
            numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"bn{i}.mean"),
            numpy_helper.from_array((1 + 0.1 * rng.random(c)).astype(np.float32), f"bn{i}.var"),
        ]
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"conv{i}", f"bn{i}.scale", f"bn{i}.bias", f"bn{i}.mean", f"bn{i}.var"],
                [f"bn{i}"],
            )
        )
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"]))
        if i < 2:
            nodes.append(helper.make_node("MaxPool", [f"relu{i}"], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            x = f"pool{i}"
        else:
            x = f"relu{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], axis=1))
    fc_w = weight("fc.weight", (10, 64))
    fc_b = weight("fc.bias", (10,), 0.05)
    nodes.append(helper.make_node("Gemm", ["features", fc_w, fc_b], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes,
        "edgepack_example_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return _finish(graph)


def build_transformer(
    seed: int = 0, vocab: int = 1000, hidden: int = 64, heads: int = 4, ffn: int = 128, layers: int = 1
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    head_dim = hidden // heads

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    def dense(name: str, x: str, n_in: int, n_out: int) -> str:
        w = const(f"{name}.weight", (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32))
        b = const(f"{name}.bias", (0.02 * rng.standard_normal(n_out)).astype(np.float32))
        nodes.append(helper.make_node("MatMul", [x, w], [f"{name}.mm"]))
        nodes.append(helper.make_node("Add", [f"{name}.mm", b], [name]))
        return name

    def layer_norm(name: str, x: str) -> str:
        g = const(f"{name}.gamma", (1 + 0.05 * rng.standard_normal(hidden)).astype(np.float32))
        b = const(f"{name}.beta", (0.05 * rng.standard_normal(hidden)).astype(np.float32))
        nodes.append(helper.make_node("LayerNormalization", [x, g, b], [name], axis=-1, epsilon=1e-5))
        return name

    def split_heads(name: str, x: str) -> str:
        nodes.append(helper.make_node("Reshape", [x, "heads_shape"], [f"{name}.r"]))
        nodes.append(helper.make_node("Transpose", [f"{name}.r"], [name], perm=[0, 2, 1, 3]))
        return name

    const("word_embeddings", (0.5 * rng.standard_normal((vocab, hidden))).astype(np.float32))
    const("position_embeddings", (0.1 * rng.standard_normal((512, hidden))).astype(np.float32))
    const("heads_shape", np.array([0, -1, heads, head_dim], dtype=np.int64))
    const("merge_shape", np.array([0, -1, hidden], dtype=np.int64))
    const("zero", np.array([0], dtype=np.int64))
    const("one", np.array([1], dtype=np.int64))
    const("scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))
    const("mask_fill", np.array(-10000.0, dtype=np.float32))
    const("unsqueeze_axes", np.array([1, 2], dtype=np.int64))
    const("sqrt_half", np.array(np.sqrt(0.5), dtype=np.float32))
    const("half", np.array(0.5, dtype=np.float32))
    const("f_one", np.array(1.0, dtype=np.float32))

    # embeddings: word + position (positions 0..sequence-1)
    nodes += [
        helper.make_node("Gather", ["word_embeddings", "input_ids"], ["tok"]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Slice", ["ids_shape", "one", "heads_shape_end"], ["seq_len"]),
        helper.make_node("Squeeze", ["seq_len", "zero"], ["seq_len_scalar"]),
        helper.make_node("Range", ["zero_scalar", "seq_len_scalar", "one_scalar"], ["positions"]),
        helper.make_node("Gather", ["position_embeddings", "positions"], ["pos"]),
        helper.make_node("Add", ["tok", "pos"], ["emb"]),
    ]
    const("heads_shape_end", np.array([2], dtype=np.int64))
    const("zero_scalar", np.array(0, dtype=np.int64))
    const("one_scalar", np.array(1, dtype=np.int64))
    x = layer_norm("emb_ln", "emb")

    for layer in range(layers):
        # layer 0 keeps the one-layer example's tensor names (and its weights: same draws in the same order)
        p = "" if layer == 0 else f"layer{layer}."
        last = layer == layers - 1
        # self-attention with an additive mask from attention_mask
        q = split_heads(f"{p}q", dense(f"{p}q_proj", x, hidden, hidden))
        k = split_heads(f"{p}k", dense(f"{p}k_proj", x, hidden, hidden))
        v = split_heads(f"{p}v", dense(f"{p}v_proj", x, hidden, hidden))
        nodes += [
            helper.make_node("Transpose", [k], [f"{p}k_t"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [q, f"{p}k_t"], [f"{p}scores_raw"]),
            helper.make_node("Mul", [f"{p}scores_raw", "scale"], [f"{p}scores"]),
        ]
        if layer == 0:
            nodes += [
                helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
                helper.make_node("Unsqueeze", ["mask_f", "unsqueeze_axes"], ["mask_4d"]),
                helper.make_node("Sub", ["f_one", "mask_4d"], ["mask_inv"]),
                helper.make_node("Mul", ["mask_inv", "mask_fill"], ["mask_add"]),
            ]
        nodes += [
            helper.make_node("Add", [f"{p}scores", "mask_add"], [f"{p}scores_masked"]),
            helper.make_node("Softmax", [f"{p}scores_masked"], [f"{p}probs"], axis=-1),
            helper.make_node("MatMul", [f"{p}probs", v], [f"{p}context_h"]),
            helper.make_node("Transpose", [f"{p}context_h"], [f"{p}context_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{p}context_t", "merge_shape"], [f"{p}context"]),
        ]
        attn = dense(f"{p}out_proj", f"{p}context", hidden, hidden)
        nodes.append(helper.make_node("Add", [x, attn], [f"{p}res1"]))
        x = layer_norm(f"{p}attn_ln", f"{p}res1")

        # feed-forward with exact GELU: 0.5 * h * (1 + erf(h / sqrt(2)))
        h = dense(f"{p}ffn_in", x, hidden, ffn)
        nodes += [
            helper.make_node("Mul", [h, "sqrt_half"], [f"{p}gelu_s"]),
            helper.make_node("Erf", [f"{p}gelu_s"], [f"{p}gelu_e"]),
            helper.make_node("Add", [f"{p}gelu_e", "f_one"], [f"{p}gelu_a"]),
            helper.make_node("Mul", [h, f"{p}gelu_a"], [f"{p}gelu_m"]),
            helper.make_node("Mul", [f"{p}gelu_m", "half"], [f"{p}gelu"]),
        ]
        out = dense(f"{p}ffn_out", f"{p}gelu", ffn, hidden)
        nodes.append(helper.make_node("Add", [x, out], [f"{p}res2"]))
        x = "last_hidden_state" if last else f"{p}hidden"
        nodes.append(
            helper.make_node(
                "LayerNormalization",
                [f"{p}res2", *_ln_params(const, rng, hidden, f"{p}out_ln")],
                [x],
                axis=-1,
                epsilon=1e-5,
            )
        )
    graph = helper.make_graph(
        nodes,
        "edgepack_example_transformer",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        inits,
    )
    return _finish(graph)


def _ln_params(const, rng, hidden: int, name: str) -> list[str]:
    return [
        const(f"{name}.gamma", (1 + 0.05 * rng.standard_normal(hidden)).astype(np.float32)),
        const(f"{name}.beta", (0.05 * rng.standard_normal(hidden)).astype(np.float32)),
    ]


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgepack")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


EXAMPLES = {"cnn": build_cnn, "transformer": build_transformer}


def build_example(name: str) -> onnx.ModelProto:
    return EXAMPLES[name]()


def write_example(name: str, folder: Path) -> Path:
    """Write example ``name`` as ``folder/<name>.onnx`` and return its path."""
    path = folder / f"{name}.onnx"
    onnx.save_model(build_example(name), path)
    return path


EXAMPLE_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "transformer": {"input_ids": (1, 128), "attention_mask": (1, 128)},
}
"""Input shapes the examples are packaged with for targets that need fixed shapes: one sequence of 128
tokens (a typical on-device text length). The CNN needs none: only its batch dim is dynamic."""
