"""Write a model in a work folder, with external data when it has or needs it."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

__all__ = ["save_model", "EXTERNAL_DATA_THRESHOLD"]

EXTERNAL_DATA_THRESHOLD = 64 << 20
"""Above 64 MiB of weights a model is written with a side file: protobuf cannot hold more than 2 GiB, and
writing weights inline makes onnx-ir serialize the whole model in memory (about 4x its size at peak;
with a side file the weights are streamed)."""


def save_model(model: ir.Model, path: Path) -> Path:
    """Subgraph (If/Loop body) initializers count too: onnx-ir re-writes them into the side file with the
    rest, and an external tensor left behind would point at a file that is not in the work folder."""
    tensors = [
        v.const_value for graph in model.graphs() for v in graph.initializers.values() if v.const_value is not None
    ]
    has_external = any(isinstance(t, ir.ExternalTensor) for t in tensors)
    weights = sum(t.nbytes for t in tensors)
    _inline_external_attributes(model)
    if has_external or weights > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=f"{path.name}.data")
    else:
        ir.save(model, path)
    _drop_initializer_value_infos(path)
    return path


def _drop_initializer_value_infos(path: Path) -> None:
    """onnx-ir writes a value_info for every initializer. onnxruntime's quantizers rewrite some weights in
    place (dynamic INT8 transposes a Gemm's B into a MatMul's) and leave that record stale, and onnx's shape
    inference then refuses the model ("Inferred shape and existing shape differ"): an initializer's type
    is its own, so the records go (the weights, in a side file or not, are not read)."""
    import onnx

    from .modelinfo import drop_initializer_value_infos

    proto = onnx.load_model(path, load_external_data=False)
    if drop_initializer_value_infos(proto):
        onnx.save_model(proto, path)


def _inline_external_attributes(model: ir.Model) -> None:
    """Tensors held in node attributes are not re-written as external data by onnx-ir: read them into memory
    (large ones were lifted to initializers at load; what is left is small)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for name, attr in list(node.attributes.items()):
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy(), name=attr.value.name))
            elif attr.type == ir.AttributeType.TENSORS and any(isinstance(t, ir.ExternalTensor) for t in attr.value):
                node.attributes[name] = ir.AttrTensors(
                    name,
                    [ir.tensor(t.numpy(), name=t.name) if isinstance(t, ir.ExternalTensor) else t for t in attr.value],
                )
