"""Check an exported ONNX file against the PyTorch module it came from.

Rules:
1. Both run on the example inputs, then once more for each dynamic dim (a ``dim_param`` of the file's
   inputs) at another size, every axis sharing that dim resized together: a shape fixed while tracing
   passes on the example and fails there.
2. A resized input repeats the example's own slices along the axis, so ids stay in range and masks
   stay masks.
3. The other size is the first of example+1, 2*example, example-1 (at least 2) on which the module
   itself runs; if it runs on none, the axis is not really dynamic and that is the user's error.
4. Outputs are compared in order (the module's outputs flattened) with ``accuracy.compare``; an ONNX
   model that fails to run or returns other shapes counts as infinitely far.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch.utils import _pytree

from ..accuracy import compare
from ..errors import ConversionError, UsageError, first_line

__all__ = ["check_export", "dynamic_dims"]


def check_export(path: Path, model: Any, examples: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Max abs error and cosine of the ONNX file vs ``model`` per input set, and the worst of them."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are reported in the figures, not on the terminal
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises bare Exception subclasses from C++
        raise ConversionError(
            f"onnxruntime cannot load the exported model: {first_line(exc)}", where=str(getattr(model, "origin", path))
        ) from None
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    checks = []
    for case, inputs in _cases(path, model, examples):
        expected = _flatten(model(*inputs))
        if len(expected) != len(output_names):
            raise ConversionError(
                f"the module returns {len(expected)} tensors but the exported model {len(output_names)} outputs",
                where=str(getattr(model, "origin", path)),
            )
        feeds = {name: t.numpy() for name, t in zip(input_names, inputs)}
        reference = dict(zip(output_names, expected))
        try:
            got = dict(zip(output_names, session.run(output_names, feeds)))
            figures = compare([reference], [got])
            notes = [o["note"] for o in figures["outputs"].values() if "note" in o]
            note = "; ".join(notes) or None
        except Exception as exc:  # a shape fixed in the graph fails inside onnxruntime
            figures = {"max_abs_error": float("inf"), "cosine": 0.0}
            note = f"onnxruntime failed: {first_line(exc)}"
        entry = {
            "case": case,
            "shapes": {n: list(t.shape) for n, t in zip(input_names, inputs)},
            "max_abs_error": figures["max_abs_error"],
            "cosine": figures["cosine"],
        }
        if note:
            entry["note"] = note
        checks.append(entry)
    return {
        "max_abs_error": max(c["max_abs_error"] for c in checks),
        "cosine": min(c["cosine"] for c in checks),
        "checks": checks,
    }


def dynamic_dims(path: Path) -> dict[str, list[tuple[int, int]]]:
    """{dim name: [(input index, axis), ...]} of the ONNX file's inputs."""
    proto = onnx.load_model(path, load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [vi for vi in proto.graph.input if vi.name not in initializers]
    dims: dict[str, list[tuple[int, int]]] = {}
    for index, vi in enumerate(inputs):
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.dim_param:
                dims.setdefault(dim.dim_param, []).append((index, axis))
    return dims


def _cases(path: Path, model: Any, examples: tuple[torch.Tensor, ...]):
    yield "example", examples
    for name, places in dynamic_dims(path).items():
        size = examples[places[0][0]].shape[places[0][1]]
        tried = []
        for other in (size + 1, 2 * size, size - 1):
            if other < 2 or other == size or other in tried:
                continue
            tried.append(other)
            inputs = list(examples)
            for index, axis in places:
                inputs[index] = _resized(inputs[index], axis, other)
            try:
                model(*inputs)
            except Exception:
                continue
            yield f"{name}={other}", tuple(inputs)
            break
        else:
            raise UsageError(
                f"dim {name!r} is dynamic, but the module runs only with {name}={size} (tried {', '.join(map(str, tried))})",
                where=str(getattr(model, "origin", path)),
                hint="do not mark that axis dynamic",
            )


def _resized(tensor: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    index = torch.arange(size) % tensor.shape[axis]
    return tensor.index_select(axis, index)


def _flatten(outputs: Any) -> list[np.ndarray]:
    leaves = [t for t in _pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    return [(t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).detach().cpu().numpy() for t in leaves]
