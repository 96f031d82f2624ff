"""Export a PyTorch model to one ONNX file and read back what was written.

Rules:
1. The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) gets ``torch.export.Dim``s for the
   dynamic axes, the ``forward`` argument names as input names, and external data only above
   ``EXTERNAL_DATA_THRESHOLD`` of weights.
2. What was written is read back: the opset (the exporter may ignore the request), the IR version and
   the input shapes. Every axis asked to be dynamic must still be dynamic, and the exported program
   must not have narrowed its range: a Python branch on a size keeps one branch for every size.
3. The legacy (TorchScript) exporter takes the input and output names and dynamic axes of the dynamo
   export, so every target's model has the same interface.
4. The exporters' progress prints, warnings, logged tracebacks and native graph dumps stay off the
   terminal; warnings become notes for the report. A failed export is one error: value-dependent
   control flow and axes that cannot stay dynamic are named as such, with the user's line of code.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from ..errors import ConversionError, EdgepackError, first_line
from ..onnxio.save import EXTERNAL_DATA_THRESHOLD
from .inputs import TorchModel

__all__ = ["Export", "export_dynamo", "export_legacy"]


@dataclass
class Export:
    """One ONNX file written by an exporter, as read back from disk."""

    path: Path
    exporter: str
    requested_opset: int
    opset: int
    ir_version: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    check: dict[str, Any] = field(default_factory=dict)


def export_dynamo(
    model: TorchModel, examples: tuple[torch.Tensor, ...], axes: dict[int, dict[int, str]], opset: int, path: Path
) -> Export:
    """Rules 1 and 2: the dynamo exporter, then what it wrote, read back and checked."""
    kwargs: dict[str, Any] = {}
    if not model.exported:
        if axes:
            dims = {name: torch.export.Dim(name) for per_input in axes.values() for name in per_input.values()}
            kwargs["dynamic_shapes"] = tuple(
                {a: dims[n] for a, n in axes.get(i, {}).items()} or None for i in range(len(examples))
            )
        if len(model.input_names) >= len(examples):
            kwargs["input_names"] = model.input_names[: len(examples)]
        kwargs["output_names"] = _output_names(model(*examples))
    external = _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    started = time.perf_counter()
    with _quiet() as notes:
        try:
            program = torch.onnx.export(
                model.program, examples, path, dynamo=True, opset_version=opset, external_data=external, **kwargs
            )
        except Exception as exc:
            raise _export_error(exc, model) from exc
    seconds = time.perf_counter() - started
    if not model.exported:
        assert program is not None  # dynamo=True always returns an ONNXProgram; None is the legacy exporter's
        _check_ranges(program.exported_program, examples, axes, model)
    exported = _read_back(path, "dynamo", opset, seconds, notes)
    _check_dynamic(path, axes, model)
    return exported


def export_legacy(model: TorchModel, examples: tuple[torch.Tensor, ...], like: Path, opset: int, path: Path) -> Export:
    """Rule 3: the TorchScript exporter at ``opset``, with the names and dynamic axes of the dynamo export."""
    reference = onnx.load_model(like, load_external_data=False)
    initializers = {t.name for t in reference.graph.initializer}
    inputs = [vi for vi in reference.graph.input if vi.name not in initializers]
    dynamic = {
        vi.name: {a: d.dim_param for a, d in enumerate(vi.type.tensor_type.shape.dim) if d.dim_param}
        for vi in [*inputs, *reference.graph.output]
    }
    program = model.program.module() if model.exported else model.program
    started = time.perf_counter()
    with _quiet() as notes:
        torch.onnx.export(
            program,
            examples,
            path,
            dynamo=False,
            opset_version=opset,
            input_names=[vi.name for vi in inputs],
            output_names=[vi.name for vi in reference.graph.output],
            dynamic_axes={k: v for k, v in dynamic.items() if v},
        )
    return _read_back(path, "legacy", opset, time.perf_counter() - started, notes)


def _read_back(path: Path, exporter: str, requested: int, seconds: float, notes: list[str]) -> Export:
    proto = onnx.load_model(path, load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return Export(path, exporter, requested, opset, proto.ir_version, seconds, notes)


def _check_dynamic(path: Path, axes: dict[int, dict[int, str]], model: TorchModel) -> None:
    proto = onnx.load_model(path, load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [vi for vi in proto.graph.input if vi.name not in initializers]
    for index, per_input in axes.items():
        if index >= len(inputs):
            raise ConversionError(
                f"the exported model has {len(inputs)} inputs; input {index} was dropped (unused?)",
                where=model.origin,
                hint="remove the unused forward() argument and its example input",
            )
        dims = inputs[index].type.tensor_type.shape.dim
        for axis, name in per_input.items():
            if not dims[axis].dim_param:
                raise ConversionError(
                    f"axis {axis} of input {inputs[index].name!r} was asked to be dynamic ({name}) but the exported "
                    f"model fixes it to {dims[axis].dim_value}",
                    where=model.origin,
                    hint="the module's code fixes that size (e.g. a reshape with a constant); make it size-agnostic",
                )


def _check_ranges(
    program: Any, examples: tuple[torch.Tensor, ...], axes: dict[int, dict[int, str]], model: TorchModel
) -> None:
    """A Python branch on a dynamic size narrows its range in the exported program; the ONNX graph keeps
    only the branch taken for the example, silently wrong outside that range."""
    placeholders = [
        n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs
    ]
    for index, per_input in axes.items():
        value = placeholders[index].meta.get("val") if index < len(placeholders) else None
        if value is None:
            continue
        for axis, name in per_input.items():
            size = value.shape[axis]
            if not isinstance(size, torch.SymInt):
                continue
            bounds = program.range_constraints.get(size.node.expr)
            low, high = (_bound(bounds.lower), _bound(bounds.upper)) if bounds is not None else (None, None)
            if (high is not None) or (low is not None and low > 2):
                valid = f"{low if low is not None else 0} <= {name} <= {high if high is not None else 'any'}"
                raise ConversionError(
                    f"the module branches on the size of dynamic axis {name!r}: the export is only valid for {valid} "
                    f"(example {examples[index].shape[axis]}), and the ONNX graph would keep one branch for every size",
                    where=model.origin,
                    hint="replace the Python `if` on the size by torch.cond or tensor ops, or do not mark the axis dynamic",
                )


def _bound(value: Any) -> int | None:
    try:
        number = int(value)
    except Exception:  # sympy's infinities raise all kinds
        return None
    return number if abs(number) < 1 << 62 else None


def _output_names(outputs: Any) -> list[str] | None:
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if isinstance(outputs, (list, tuple)) and all(isinstance(o, torch.Tensor) for o in outputs):
        return [f"output_{i}" for i in range(len(outputs))]
    if isinstance(outputs, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in outputs.items()
    ):
        return list(outputs)
    return None


def _weight_bytes(model: TorchModel) -> int:
    tensors = (
        model.program.state_dict.values() if model.exported else [*model.program.parameters(), *model.program.buffers()]
    )
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def _quiet():
    """The exporters print progress, log warnings and tracebacks (a failed opset down-conversion) and
    warn: keep their first lines as notes for the report instead of the user's terminal."""
    notes: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            line = record.getMessage().strip().splitlines()[0] if record.getMessage().strip() else ""
            if record.levelno >= logging.WARNING and line and "torchvision" not in line:
                notes.append(line[:300])

    handler = Collect()
    loggers = [
        logging.getLogger(name)
        for name in (
            "torch.onnx",
            "onnxscript",
            "torch.export",
            "torch._export",
            "torch.fx.experimental.symbolic_shapes",
            "torch._subclasses",
        )
    ]
    saved = [(lg, lg.level, lg.propagate, lg.handlers) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.setLevel(logging.WARNING)
        lg.propagate = False
    try:
        with _native_output_silenced(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield notes
    finally:
        for lg, level, propagate, handlers in saved:
            lg.handlers = handlers
            lg.setLevel(level)
            lg.propagate = propagate


@contextlib.contextmanager
def _native_output_silenced():
    """The TorchScript exporter prints its whole graph from C++ when it fails: point the process's
    stdout and stderr at /dev/null meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _export_error(exc: Exception, model: TorchModel) -> EdgepackError:
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    at = _user_frame(root)
    text = str(root)
    if "data-dependent" in text or type(root).__name__ in (
        "GuardOnDataDependentSymNode",
        "DataDependentOutputException",
    ):
        return ConversionError(
            f"the module's control flow depends on tensor values{at}: torch.export cannot put a Python `if` on a "
            "tensor's value in a graph",
            where=model.origin,
            hint="compute both results and pick one with torch.where, or use torch.cond",
        )
    if "Constraints violated" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("  - Not all")][:4]
        return ConversionError(
            f"a dynamic axis cannot stay dynamic: {' '.join(lines)}",
            where=model.origin,
            hint="the module fixes that axis's size; make the code size-agnostic or drop it from --dynamic",
        )
    return ConversionError(
        f"torch.onnx.export failed: {type(root).__name__}: {first_line(root)}{at}",
        where=model.origin,
        hint="rerun with --debug for the exporter's traceback",
    )


def _user_frame(exc: BaseException) -> str:
    """' at file:line (code)' for the innermost frame outside torch and edgepack, if any."""
    skip = (str(Path(torch.__file__).parent), str(Path(__file__).parent), "<frozen")
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(skip) and "site-packages" not in f.filename
    ]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {frame.filename}:{frame.lineno} (`{(frame.line or '').strip()}`)"
