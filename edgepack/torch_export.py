"""Package a PyTorch model: export it to ONNX at the opset the targets' runtimes implement, check the
export against the module, then hand it to the ONNX pipeline. Imported only for PyTorch inputs.

Rules:
1. The model is ``pkg.module:factory`` (a callable returning an ``nn.Module``, or an ``nn.Module``
   attribute; the current folder is importable), a ``.pt2`` file written by ``torch.export.save``,
   an ``nn.Module`` or an ``ExportedProgram``.
2. Example inputs are shapes (``2x3x224x224``, ``2x128:int64``) or tensors, one per ``forward``
   argument. The module must run on them, and an axis marked dynamic needs an example size of at least
   2: torch specializes sizes 0 and 1, which silently fixes the axis.
3. The dynamo exporter runs once, asked for the highest opset every target's runtime implements.
   What was written is read back (opset, IR version, input shapes): every dynamic axis must still be
   dynamic, and the exported program must not have narrowed its range (a Python branch on a size).
4. A target whose runtime is older than the opset written gets a legacy (TorchScript) export at its
   own max opset; if that fails too, the target fails, naming the runtime version the model needs.
5. The IR version is lowered to the target's max where the opset allows it (``onnx.helper.VERSION_TABLE``).
6. Every exported file is checked against the module (``torch_verify``): the figures go into each
   bundle's manifest as the ``export`` stage, and a target whose tolerance they miss fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import AccuracyError, CompatibilityError, ConversionError, EdgepackError, ModelError, UsageError

try:
    import onnxscript  # noqa: F401  the dynamo exporter needs it; fail here with the same hint
    import torch
except ImportError as exc:
    raise UsageError(
        f"this input is a PyTorch model, but {exc.name or 'torch'} is not installed",
        hint="pip install 'edgepack[torch]'",
    ) from None

import onnx
import onnx_ir as ir

from .job import Options
from .pipeline import Result, bundle_path, package_model
from .profiles import Profile
from .stages.save import EXTERNAL_DATA_THRESHOLD, save_model
from .torch_verify import check_export

__all__ = ["package_torch", "parse_example_input", "parse_dynamic", "runtime_for_opset"]

DTYPES = {name: getattr(torch, name) for name in
          ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")}
_SHAPE = re.compile(r"^\d+(x\d+)*$")
_DYNAMIC = re.compile(r"^(?P<input>[^:=]+):(?P<axis>-?\d+)=(?P<name>[A-Za-z_]\w*)$")

ORT_FIRST_RELEASE = {13: "1.6", 14: "1.8", 15: "1.9", 16: "1.11", 17: "1.13", 18: "1.14", 19: "1.15",
                     20: "1.17", 21: "1.18"}
"""The first onnxruntime release implementing each ai.onnx opset (onnxruntime's version matrix)."""


@dataclass(frozen=True)
class TorchModel:
    program: Any
    """An ``nn.Module`` (in eval mode while exporting) or an ``ExportedProgram``."""
    name: str
    origin: str
    """What the user gave, for messages and the manifest."""
    input_names: list[str]
    sha256: str | None = None

    @property
    def exported(self) -> bool:
        return isinstance(self.program, torch.export.ExportedProgram)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return (self.program.module() if self.exported else self.program)(*inputs)


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


# --- what the user gave ------------------------------------------------------------------------


def parse_example_input(text: str) -> tuple[list[int], torch.dtype]:
    """``2x3x224x224`` or ``2x128:int64`` -> (shape, dtype)."""
    shape_text, _, dtype_text = text.strip().partition(":")
    dtype_text = dtype_text or "float32"
    if not _SHAPE.match(shape_text):
        raise UsageError(f"--example-input {text!r}: expected a shape like 2x3x224x224 (sizes joined by x), "
                         "optionally followed by :DTYPE", hint=f"dtypes: {', '.join(DTYPES)}")
    if dtype_text not in DTYPES:
        raise UsageError(f"--example-input {text!r}: unknown dtype {dtype_text!r}", hint=f"dtypes: {', '.join(DTYPES)}")
    return [int(d) for d in shape_text.split("x")], DTYPES[dtype_text]


def parse_dynamic(specs: Any) -> list[tuple[str, int, str]]:
    """``["input:0=batch"]`` or ``{"input": {0: "batch"}}`` -> [(input name or index, axis, dim name)]."""
    if not specs:
        return []
    if isinstance(specs, dict):
        found = []
        for key, axes in specs.items():
            if not isinstance(axes, dict):
                raise UsageError(f"dynamic[{key!r}]: expected a mapping of axis to dim name, e.g. {{0: 'batch'}}")
            for axis, name in axes.items():
                found.append(_dynamic_entry(f"{key}:{axis}={name}"))
        return found
    if isinstance(specs, str):
        specs = [specs]
    return [_dynamic_entry(spec) for spec in specs]


def _dynamic_entry(spec: str) -> tuple[str, int, str]:
    match = _DYNAMIC.match(str(spec).strip())
    if not match:
        raise UsageError(f"--dynamic {spec!r}: expected INPUT:AXIS=NAME, e.g. input:0=batch",
                         hint="INPUT is a forward() argument name or index, NAME a dim name such as batch or seq")
    return match["input"], int(match["axis"]), match["name"]


def resolve(model: Any, name: str | None) -> TorchModel:
    """Rule 1: the module or exported program behind what the user gave."""
    if isinstance(model, torch.export.ExportedProgram):
        return TorchModel(model, name or "model", "ExportedProgram", _program_input_names(model))
    if isinstance(model, torch.nn.Module):
        return TorchModel(model, name or type(model).__name__.lower(), type(model).__name__, _forward_names(model))
    text = os.fspath(model)
    if text.endswith(".pt2"):
        return _load_pt2(Path(text), name)
    module = _import_reference(text)
    return TorchModel(module, name or text.rpartition(":")[2].rpartition(".")[2], text, _forward_names(module))


def _load_pt2(path: Path, name: str | None) -> TorchModel:
    if not path.is_file():
        raise ModelError("no such file", where=str(path))
    try:
        program = torch.export.load(path)
    except Exception as exc:  # torch raises many kinds for a file that is not an ExportedProgram
        raise ModelError(f"not a torch.export program: {type(exc).__name__}: {_first_line(exc)}", where=str(path),
                         hint="write it with torch.export.save(torch.export.export(module, args), 'model.pt2')") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return TorchModel(program, name or path.stem, str(path), _program_input_names(program), digest)


def _import_reference(text: str) -> torch.nn.Module:
    module_name, _, attribute = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}", where=text,
                         hint="run from the folder that holds the package, or install it") from None
    except Exception as exc:
        raise ModelError(f"importing {module_name!r} failed: {type(exc).__name__}: {_first_line(exc)}", where=text) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{module_name!r} has no attribute {part!r}", where=text,
                             hint="use pkg.module:factory, where factory returns an nn.Module (or is one)")
        target = getattr(target, part)
    if not isinstance(target, torch.nn.Module) and callable(target):
        try:
            target = target()
        except Exception as exc:
            raise ModelError(f"calling {attribute}() failed: {type(exc).__name__}: {_first_line(exc)}", where=text,
                             hint="the factory must build the model with no arguments") from None
    if not isinstance(target, torch.nn.Module):
        raise UsageError(f"{attribute} gives a {type(target).__name__}, not a torch.nn.Module", where=text,
                         hint="point at a factory returning an nn.Module, or at an nn.Module instance")
    return target


def _forward_names(module: torch.nn.Module) -> list[str]:
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _program_input_names(program: torch.export.ExportedProgram) -> list[str]:
    return list(program.graph_signature.user_inputs)


def example_inputs(given: Any, model: TorchModel) -> tuple[torch.Tensor, ...]:
    """Rule 2: tensors from shapes (seeded: floats N(0, 1), integers in [0, 16), booleans True) or as given."""
    if given is None or (isinstance(given, (list, tuple)) and not given):
        if model.exported and model.program.example_inputs:
            args, kwargs = model.program.example_inputs
            if not kwargs:
                return tuple(args)
        raise UsageError("a PyTorch model needs example inputs", where=model.origin,
                         hint="give one --example-input SHAPE[:DTYPE] per forward() argument, e.g. --example-input 2x3x224x224")
    if isinstance(given, (str, torch.Tensor)):
        given = [given]
    if isinstance(given, dict):
        raise UsageError("example inputs are positional: give a tuple with one tensor or shape per forward() argument",
                         where=model.origin)
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for item in given:
        if isinstance(item, torch.Tensor):
            tensors.append(item.detach())
            continue
        if not isinstance(item, str):
            raise UsageError(f"example input {item!r}: expected a tensor or a shape like 2x3x224x224")
        shape, dtype = parse_example_input(item)
        if dtype == torch.bool:
            tensors.append(torch.ones(shape, dtype=dtype))
        elif dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            tensors.append(torch.randint(0, 16, shape, generator=generator).to(dtype))
    return tuple(tensors)


def dynamic_axes(entries: list[tuple[str, int, str]], model: TorchModel,
                 examples: tuple[torch.Tensor, ...]) -> dict[int, dict[int, str]]:
    """Resolve ``--dynamic`` entries to {input index: {axis: dim name}}, checking rule 2."""
    names = model.input_names[: len(examples)]
    axes: dict[int, dict[int, str]] = {}
    sizes: dict[str, int] = {}
    for ref, axis, dim in entries:
        index = int(ref) if ref.isdigit() else (names.index(ref) if ref in names else None)
        if index is None or index >= len(examples):
            known = ", ".join(f"{i} ({n})" for i, n in enumerate(names)) or ", ".join(str(i) for i in range(len(examples)))
            raise UsageError(f"--dynamic {ref}:{axis}={dim}: no input {ref!r}", where=model.origin,
                             hint=f"inputs (index and forward() name): {known}")
        shape = examples[index].shape
        if not -len(shape) <= axis < len(shape):
            raise UsageError(f"--dynamic {ref}:{axis}={dim}: input {ref!r} has {len(shape)} axes (shape {list(shape)})",
                             where=model.origin)
        axis %= len(shape)
        size = shape[axis]
        if size < 2:
            raise UsageError(
                f"--dynamic {ref}:{axis}={dim}: the example size of a dynamic axis must be at least 2, found {size}",
                where=model.origin, hint="torch fixes axes of size 0 or 1; use e.g. 2 for a batch axis")
        if sizes.setdefault(dim, size) != size:
            raise UsageError(f"--dynamic: dim {dim!r} has example sizes {sizes[dim]} and {size}",
                             where=model.origin, hint="axes sharing a dim name must have the same example size")
        axes.setdefault(index, {})[axis] = dim
    return axes


# --- export --------------------------------------------------------------------------------------


def export_dynamo(model: TorchModel, examples: tuple[torch.Tensor, ...], axes: dict[int, dict[int, str]],
                  opset: int, path: Path) -> Export:
    """Rule 3: the dynamo exporter, then what it wrote, read back and checked."""
    kwargs: dict[str, Any] = {}
    if not model.exported:
        if axes:
            dims = {name: torch.export.Dim(name) for per_input in axes.values() for name in per_input.values()}
            kwargs["dynamic_shapes"] = tuple({a: dims[n] for a, n in axes.get(i, {}).items()} or None
                                             for i in range(len(examples)))
        if len(model.input_names) >= len(examples):
            kwargs["input_names"] = model.input_names[: len(examples)]
        kwargs["output_names"] = _output_names(model(*examples))
    external = _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    started = time.perf_counter()
    with _quiet() as notes:
        try:
            program = torch.onnx.export(model.program, examples, path, dynamo=True, opset_version=opset,
                                        external_data=external, **kwargs)
        except Exception as exc:
            raise _export_error(exc, model) from exc
    seconds = time.perf_counter() - started
    if not model.exported:
        _check_ranges(program.exported_program, examples, axes, model)
    exported = _read_back(path, "dynamo", opset, seconds, notes)
    _check_dynamic(path, axes, model)
    return exported


def export_legacy(model: TorchModel, examples: tuple[torch.Tensor, ...], like: Path, opset: int, path: Path) -> Export:
    """Rule 4: the TorchScript exporter at ``opset``, with the names and dynamic axes of the dynamo export."""
    reference = onnx.load_model(like, load_external_data=False)
    initializers = {t.name for t in reference.graph.initializer}
    inputs = [vi for vi in reference.graph.input if vi.name not in initializers]
    dynamic = {vi.name: {a: d.dim_param for a, d in enumerate(vi.type.tensor_type.shape.dim) if d.dim_param}
               for vi in [*inputs, *reference.graph.output]}
    program = model.program.module() if model.exported else model.program
    started = time.perf_counter()
    with _quiet() as notes:
        torch.onnx.export(program, examples, path, dynamo=False, opset_version=opset,
                          input_names=[vi.name for vi in inputs], output_names=[vi.name for vi in reference.graph.output],
                          dynamic_axes={k: v for k, v in dynamic.items() if v})
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
            raise ConversionError(f"the exported model has {len(inputs)} inputs; input {index} was dropped (unused?)",
                                  where=model.origin, hint="remove the unused forward() argument and its example input")
        dims = inputs[index].type.tensor_type.shape.dim
        for axis, name in per_input.items():
            if not dims[axis].dim_param:
                raise ConversionError(
                    f"axis {axis} of input {inputs[index].name!r} was asked to be dynamic ({name}) but the exported "
                    f"model fixes it to {dims[axis].dim_value}", where=model.origin,
                    hint="the module's code fixes that size (e.g. a reshape with a constant); make it size-agnostic")


def _check_ranges(program: Any, examples: tuple[torch.Tensor, ...], axes: dict[int, dict[int, str]],
                  model: TorchModel) -> None:
    """A Python branch on a dynamic size narrows its range in the exported program; the ONNX graph keeps
    only the branch taken for the example, silently wrong outside that range."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
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
                    hint="replace the Python `if` on the size by torch.cond or tensor ops, or do not mark the axis dynamic")


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
    if isinstance(outputs, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in outputs.items()):
        return list(outputs)
    return None


def _weight_bytes(model: TorchModel) -> int:
    tensors = (model.program.state_dict.values() if model.exported
               else [*model.program.parameters(), *model.program.buffers()])
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
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._export",
                                                    "torch.fx.experimental.symbolic_shapes", "torch._subclasses")]
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
    if "data-dependent" in text or type(root).__name__ in ("GuardOnDataDependentSymNode", "DataDependentOutputException"):
        return ConversionError(
            f"the module's control flow depends on tensor values{at}: torch.export cannot put a Python `if` on a "
            "tensor's value in a graph", where=model.origin,
            hint="compute both results and pick one with torch.where, or use torch.cond")
    if "Constraints violated" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("  - Not all")][:4]
        return ConversionError(f"a dynamic axis cannot stay dynamic: {' '.join(lines)}", where=model.origin,
                               hint="the module fixes that axis's size; make the code size-agnostic or drop it from --dynamic")
    return ConversionError(f"torch.onnx.export failed: {type(root).__name__}: {_first_line(root)}{at}",
                           where=model.origin, hint="rerun with --debug for the exporter's traceback")


def _user_frame(exc: BaseException) -> str:
    """' at file:line (code)' for the innermost frame outside torch and edgepack, if any."""
    skip = (str(Path(torch.__file__).parent), str(Path(__file__).parent), "<frozen")
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(skip) and "site-packages" not in f.filename]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {frame.filename}:{frame.lineno} (`{(frame.line or '').strip()}`)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


# --- fitting the export to each target -------------------------------------------------------------


def ir_for_opset(opset: int) -> int:
    """The lowest IR version that can carry ai.onnx ``opset`` (the ONNX release that introduced it)."""
    return min((row[1] for row in onnx.helper.VERSION_TABLE if row[2] >= opset), default=onnx.IR_VERSION)


def runtime_for_opset(opset: int) -> str:
    known = ORT_FIRST_RELEASE.get(opset)
    if known:
        return f"onnxruntime {known} or newer"
    return f"an onnxruntime release that implements opset {opset} (newer than {ORT_FIRST_RELEASE[max(ORT_FIRST_RELEASE)]})"


def _with_ir(export: Export, ir_version: int, folder: Path, name: str) -> Path:
    """Rule 5: the same model stamped with a lower IR version (only the header changes)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = ir.load(export.path)
    model.ir_version = ir_version
    return save_model(model, folder / f"{name}.onnx")


def package_torch(
    model: Any,
    profiles: list[Profile],
    options: Options,
    *,
    name: str | None = None,
    example_inputs_given: Any = None,
    dynamic: Any = None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Result]:
    """Export ``model`` once (plus a legacy export per older runtime), check it, then run the ONNX
    pipeline for each target on the file that fits it. Per-target failures are returned, not raised."""
    torch_model = resolve(model, name)
    name = torch_model.name
    existing = [str(bundle_path(options.output, name, p)) for p in profiles if bundle_path(options.output, name, p).exists()]
    if existing and not options.force:
        raise UsageError(f"output already exists: {', '.join(existing)}", hint="pass --force to replace it")
    entries = parse_dynamic(dynamic)
    if entries and torch_model.exported:
        raise UsageError("--dynamic does not apply to a .pt2 program: it keeps the dynamic shapes it was exported with",
                         where=torch_model.origin, hint="set them in torch.export.export(..., dynamic_shapes=...)")
    examples = example_inputs(example_inputs_given, torch_model)
    axes = dynamic_axes(entries, torch_model, examples)
    with _eval_mode(torch_model):
        _run_module(torch_model, examples)
        with tempfile.TemporaryDirectory(prefix="edgepack-torch-") as scratch:
            return _export_and_package(torch_model, examples, axes, profiles, options, Path(scratch), progress)


def _export_and_package(model: TorchModel, examples: tuple[torch.Tensor, ...], axes: dict[int, dict[int, str]],
                        profiles: list[Profile], options: Options, scratch: Path,
                        progress: Callable[[str], None]) -> list[Result]:
    opset = min(p.runtime.max_opset for p in profiles)
    progress(f"export {model.origin} with torch.onnx.export (dynamo) at opset {opset}")
    folder = scratch / f"dynamo-opset{opset}"
    folder.mkdir()
    dynamo = export_dynamo(model, examples, axes, opset, folder / f"{model.name}.onnx")
    dynamo.check = check_export(dynamo.path, model, examples)
    progress(_describe(dynamo))
    legacy: dict[int, Export | EdgepackError] = {}
    variants: dict[tuple[Path, int], Path] = {}
    groups: dict[Path, tuple[list[Profile], dict[str, Any]]] = {}
    failures: dict[str, EdgepackError] = {}
    for profile in profiles:
        runtime = profile.runtime
        export = dynamo
        fallback = None
        if dynamo.opset > runtime.max_opset:
            if runtime.max_opset not in legacy:
                legacy[runtime.max_opset] = _try_legacy(model, examples, dynamo, runtime.max_opset, scratch, progress)
            found = legacy[runtime.max_opset]
            if isinstance(found, EdgepackError):
                failures[profile.name] = _too_new(profile, dynamo, found)
                continue
            export = found
            fallback = (f"the dynamo exporter wrote opset {dynamo.opset} (asked {dynamo.requested_opset}), above the "
                        f"runtime's {runtime.max_opset}: re-exported with the legacy exporter at opset {runtime.max_opset}")
        path = export.path
        ir_version = min(export.ir_version, runtime.max_ir_version)
        if ir_version < ir_for_opset(export.opset):
            failures[profile.name] = CompatibilityError(
                f"opset {export.opset} needs IR version {ir_for_opset(export.opset)}, but the target's runtime "
                f"({runtime.package} {runtime.version}) reads up to IR {runtime.max_ir_version}",
                where=f"{model.origin} for target {profile.name}",
                hint=f"lower the opset in the profile (runtime.max_opset) or use a runtime that reads IR {ir_for_opset(export.opset)}")
            continue
        if ir_version < export.ir_version:
            key = (export.path, ir_version)
            if key not in variants:
                variants[key] = _with_ir(export, ir_version, export.path.parent.with_name(f"{export.path.parent.name}-ir{ir_version}"), model.name)
            path = variants[key]
        missed = _missed_tolerance(export, profile, model, dynamo)
        if missed:
            failures[profile.name] = missed
            continue
        report = _report(model, export, dynamo, ir_version, fallback, axes)
        groups.setdefault(path, ([], report))[0].append(profile)
    results: dict[str, Result] = {p: Result(p, bundle_path(options.output, model.name, _profile(profiles, p)), False, error=e)
                                  for p, e in failures.items()}
    for path, (members, report) in groups.items():
        for result in package_model(path, members, options, name=model.name, progress=progress, origin=[report]):
            results[result.target] = result
    return [results[p.name] for p in profiles]


def _try_legacy(model: TorchModel, examples: tuple[torch.Tensor, ...], dynamo: Export, opset: int, scratch: Path,
                progress: Callable[[str], None]) -> Export | EdgepackError:
    progress(f"export: opset {dynamo.opset} is above a target's {opset}; legacy exporter at opset {opset}")
    folder = scratch / f"legacy-opset{opset}"
    folder.mkdir()
    try:
        export = export_legacy(model, examples, dynamo.path, opset, folder / f"{model.name}.onnx")
    except Exception as exc:  # the TorchScript exporter raises all kinds for unsupported ops and modules
        return ConversionError(f"the legacy exporter failed at opset {opset}: {type(exc).__name__}: {_first_line(exc)}")
    if export.opset > opset:
        return ConversionError(f"the legacy exporter wrote opset {export.opset} when asked for {opset}")
    try:
        export.check = check_export(export.path, model, examples)
    except EdgepackError as exc:
        return exc
    progress(_describe(export))
    return export


def _too_new(profile: Profile, dynamo: Export, legacy_error: EdgepackError) -> CompatibilityError:
    runtime = profile.runtime
    return CompatibilityError(
        f"the model exports at ai.onnx opset {dynamo.opset}, which needs {runtime_for_opset(dynamo.opset)}, but the "
        f"target's runtime ({runtime.package} {runtime.version}) implements up to opset {runtime.max_opset}; "
        f"{legacy_error.message}",
        where=f"{dynamo.path.stem} for target {profile.name}",
        hint=f"use a target whose runtime implements opset {dynamo.opset} (runtime.max_opset >= {dynamo.opset}), "
        f"or change the module so that it exports at opset {runtime.max_opset}")


def _missed_tolerance(export: Export, profile: Profile, model: TorchModel, dynamo: Export) -> EdgepackError | None:
    check = export.check
    tolerance = profile.accuracy
    if check["max_abs_error"] <= tolerance.max_abs_error and check["cosine"] >= tolerance.min_cosine:
        return None
    worst = max(check["checks"], key=lambda c: (c["max_abs_error"], -c["cosine"]))
    note = f" ({worst['note']})" if worst.get("note") else ""
    return AccuracyError(
        f"the exported ONNX model disagrees with the PyTorch module on {worst['case']} inputs {worst['shapes']}: "
        f"max abs error {worst['max_abs_error']:.4g} (allowed {tolerance.max_abs_error:g}), cosine {worst['cosine']:.6f} "
        f"(required {tolerance.min_cosine:g}){note}",
        where=f"{model.origin} for target {profile.name} ({export.exporter} exporter)",
        hint="shapes or values were fixed while tracing; make the module size-agnostic or export with fixed shapes"
        + (f"; or use a target whose runtime implements opset {dynamo.opset} ({runtime_for_opset(dynamo.opset)}), "
           "which gets the dynamo export" if export is not dynamo else ""))


def _report(model: TorchModel, export: Export, dynamo: Export, ir_version: int, fallback: str | None,
            axes: dict[int, dict[int, str]]) -> dict[str, Any]:
    from importlib import metadata

    check = export.check
    dims = sorted({name for per_input in axes.values() for name in per_input.values()}) or [
        c["case"].split("=")[0] for c in check["checks"][1:]]
    ir_text = f"IR {export.ir_version}" + (f" -> {ir_version}" if ir_version != export.ir_version else "")
    return {
        "stage": "export",
        "summary": f"torch.onnx.export ({export.exporter}) opset {export.opset} (asked {export.requested_opset}), {ir_text}, "
        f"{'dynamic ' + ', '.join(dims) if dims else 'static shapes'}; vs the module on {len(check['checks'])} input set(s): "
        f"max abs error {check['max_abs_error']:.3g}, cosine {check['cosine']:.6f}",
        "source": model.origin,
        "sha256": model.sha256,
        "exporter": export.exporter,
        "torch": torch.__version__,
        "onnxscript": metadata.version("onnxscript"),
        "opset_requested": export.requested_opset,
        "opset_written": export.opset,
        "ir_version_written": export.ir_version,
        "ir_version": ir_version,
        "fallback": fallback,
        "external_data": export.path.with_name(export.path.name + ".data").is_file(),
        "dynamo_opset_written": dynamo.opset,
        "dynamic": {model.input_names[i] if i < len(model.input_names) else str(i): {str(a): n for a, n in per.items()}
                    for i, per in axes.items()},
        "notes": export.notes[:10],
        **check,
    }


def _describe(export: Export) -> str:
    check = export.check
    return (f"export: {export.exporter} wrote opset {export.opset} (asked {export.requested_opset}), IR {export.ir_version} "
            f"in {export.seconds:.1f} s; vs the module: max abs error {check['max_abs_error']:.3g}, cosine {check['cosine']:.6f}")


def _profile(profiles: list[Profile], name: str) -> Profile:
    return next(p for p in profiles if p.name == name)


def _run_module(model: TorchModel, examples: tuple[torch.Tensor, ...]) -> None:
    """Rule 2: the module must run on the examples (a wrong shape fails here, in the module's own words)."""
    try:
        model(*examples)
    except Exception as exc:
        shapes = ", ".join(f"{'x'.join(map(str, t.shape))}:{str(t.dtype).removeprefix('torch.')}" for t in examples)
        raise UsageError(f"the module fails on the example input(s) {shapes}: {type(exc).__name__}: {_first_line(exc)}",
                         where=model.origin,
                         hint=f"give one --example-input per forward() argument ({', '.join(model.input_names) or '?'}), "
                         "in order, with the shapes the module expects") from None


@contextlib.contextmanager
def _eval_mode(model: TorchModel):
    """Export in eval mode (dropout off, batch-norm statistics frozen); give the user's module back as it was."""
    if model.exported:
        yield
        return
    modes = {m: m.training for m in model.program.modules()}
    model.program.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
