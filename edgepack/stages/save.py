"""Write a model in a work folder, with external data when it has or needs it."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

__all__ = ["save_model", "EXTERNAL_DATA_THRESHOLD"]

EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Above 1 GiB of weights a model is written with a side file: protobuf cannot hold more than 2 GiB."""


def save_model(model: ir.Model, path: Path) -> Path:
    has_external = any(isinstance(t.const_value, ir.ExternalTensor) for t in model.graph.initializers.values())
    weights = sum(t.const_value.nbytes for t in model.graph.initializers.values() if t.const_value is not None)
    if has_external or weights > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=f"{path.name}.data")
    else:
        ir.save(model, path)
    return path
