"""Facts about an ONNX model, read from its protobuf without loading external data.

Used by ``edgepack inspect``, by the compatibility check and by the manifest.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from ..errors import ModelError

__all__ = [
    "describe_io",
    "is_tensor",
    "format_shape",
    "iter_graphs",
    "iter_nodes",
    "opsets",
    "external_locations",
    "summarize",
    "dtype_name",
    "drop_initializer_value_infos",
]


def dtype_name(elem_type: int) -> str:
    """ONNX element type -> numpy-style name ('float32', 'int64', ...)."""
    try:
        return helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _value_info(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": vi.name, "dtype": kind or "unknown", "shape": None}
    tensor = vi.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return {"name": vi.name, "dtype": dtype_name(tensor.elem_type), "shape": shape}


def is_tensor(io: dict[str, Any]) -> bool:
    """Whether a ``describe_io`` entry is a tensor (not a sequence, map or optional, whose dtype names the kind)."""
    return not io["dtype"].endswith("_type")


def describe_io(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Real inputs (initializers listed as inputs, as in IR 3 models, are left out) and outputs.

    A dim is an int when fixed, its symbolic name when named, None when unnamed and dynamic.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_value_info(vi) for vi in model.graph.input if vi.name not in initializers]
    outputs = [_value_info(vi) for vi in model.graph.output]
    return inputs, outputs


def format_shape(shape: list | None) -> str:
    """[batch, 3, 224, 224]: '?' for an unnamed dynamic dim, '?' alone when not even the rank is known."""
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph below it (If branches, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for graph in iter_graphs(model.graph):
        yield from graph.node


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {(o.domain or "ai.onnx"): o.version for o in model.opset_import}


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that can hold weights: initializers, sparse initializers' values, Constant attributes."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def external_locations(model: onnx.ModelProto) -> list[tuple[str, str, int, int | None]]:
    """(tensor name, location, offset, length) for every tensor stored outside the .onnx file."""
    found = []
    for tensor in iter_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        offset, length = _position(entries, "offset", tensor.name), _position(entries, "length", tensor.name)
        found.append((tensor.name, entries.get("location", ""), offset or 0, length))
    return found


def _position(entries: dict[str, str], key: str, tensor: str) -> int | None:
    text = entries.get(key)
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        raise ModelError(
            f"tensor {tensor!r}: external data {key} {text!r} is not a non-negative integer",
            hint="the model is malformed; re-export it",
        )
    return int(text)


def summarize(model: onnx.ModelProto, path: Path | None = None) -> dict[str, Any]:
    """What `edgepack inspect` prints: IR, opsets, op counts, I/O, size, external data, subgraphs."""
    inputs, outputs = describe_io(model)
    ops = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in iter_nodes(model)
    )
    graphs = list(iter_graphs(model.graph))
    locations = external_locations(model)
    side_files = sorted({loc for _, loc, _, _ in locations})
    size = path.stat().st_size if path else None
    external_bytes = 0
    if path:
        for loc in side_files:
            side = path.parent / loc
            external_bytes += side.stat().st_size if side.is_file() else 0
    quantized_ops = {
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLinear",
        "MatMulNBits",
    }
    return {
        "file": str(path) if path else None,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": model.ir_version,
        "opsets": opsets(model),
        "inputs": inputs,
        "outputs": outputs,
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "subgraphs": len(graphs) - 1,
        "initializers": sum(len(g.initializer) for g in graphs),
        "constant_nodes": ops.get("Constant", 0),
        "quantized": any(op.split("::")[-1] in quantized_ops for op in ops),
        "size_bytes": size,
        "external_data": {"files": side_files, "tensors": len(locations), "bytes": external_bytes},
        "local_functions": [f"{f.domain}::{f.name}" for f in model.functions],
    }


def drop_initializer_value_infos(model: onnx.ModelProto) -> bool:
    """Remove the value_info records of initializers, in every graph (an initializer's type and shape are its
    own; onnx-ir writes a record for each, which a weight rewritten in place leaves stale); whether any went."""
    changed = False
    for graph in iter_graphs(model.graph):
        weights = {t.name for t in graph.initializer}
        kept = [vi for vi in graph.value_info if vi.name not in weights]
        if len(kept) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(kept)
            changed = True
    return changed
