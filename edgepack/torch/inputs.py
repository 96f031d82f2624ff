"""What the user gave for a PyTorch model: the module or program, example inputs, dynamic axes.

Rules:
1. The model is ``pkg.module:factory`` (a callable returning an ``nn.Module``, or an ``nn.Module``
   attribute; the current folder is importable), a ``.pt2`` file written by ``torch.export.save``,
   an ``nn.Module`` or an ``ExportedProgram``.
2. Example inputs are shapes (``2x3x224x224``, ``2x128:int64``) or tensors, one per ``forward``
   argument; generated ones are seeded (floats N(0, 1), integers in [0, 16), booleans True).
   The module must run on them: a wrong shape fails here, in the module's own words.
3. ``--dynamic INPUT:AXIS=NAME`` names an input by ``forward`` argument name or index. An axis marked
   dynamic needs an example size of at least 2 (torch specializes sizes 0 and 1, which silently fixes
   the axis), and axes sharing a name need the same example size.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError, UsageError, first_line

__all__ = [
    "TorchModel",
    "resolve",
    "parse_example_input",
    "parse_dynamic",
    "example_inputs",
    "dynamic_axes",
    "run_module",
    "eval_mode",
]

DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
}
_SHAPE = re.compile(r"^\d+(x\d+)*$")
_DYNAMIC = re.compile(r"^(?P<input>[^:=]+):(?P<axis>-?\d+)=(?P<name>[A-Za-z_]\w*)$")


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
        raise ModelError(
            f"not a torch.export program: {type(exc).__name__}: {first_line(exc)}",
            where=str(path),
            hint="write it with torch.export.save(torch.export.export(module, args), 'model.pt2')",
        ) from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return TorchModel(program, name or path.stem, str(path), _program_input_names(program), digest)


def _import_reference(text: str) -> torch.nn.Module:
    module_name, _, attribute = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(
            f"cannot import {module_name!r}: {exc}",
            where=text,
            hint="run from the folder that holds the package, or install it",
        ) from None
    except Exception as exc:
        raise ModelError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {first_line(exc)}", where=text
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(
                f"{module_name!r} has no attribute {part!r}",
                where=text,
                hint="use pkg.module:factory, where factory returns an nn.Module (or is one)",
            )
        target = getattr(target, part)
    if not isinstance(target, torch.nn.Module) and callable(target):
        try:
            target = target()
        except Exception as exc:
            raise ModelError(
                f"calling {attribute}() failed: {type(exc).__name__}: {first_line(exc)}",
                where=text,
                hint="the factory must build the model with no arguments",
            ) from None
    if not isinstance(target, torch.nn.Module):
        raise UsageError(
            f"{attribute} gives a {type(target).__name__}, not a torch.nn.Module",
            where=text,
            hint="point at a factory returning an nn.Module, or at an nn.Module instance",
        )
    return target


def _forward_names(module: torch.nn.Module) -> list[str]:
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _program_input_names(program: torch.export.ExportedProgram) -> list[str]:
    return list(program.graph_signature.user_inputs)


def parse_example_input(text: str) -> tuple[list[int], torch.dtype]:
    """``2x3x224x224`` or ``2x128:int64`` -> (shape, dtype)."""
    shape_text, _, dtype_text = text.strip().partition(":")
    dtype_text = dtype_text or "float32"
    if not _SHAPE.match(shape_text):
        raise UsageError(
            f"--example-input {text!r}: expected a shape like 2x3x224x224 (sizes joined by x), "
            "optionally followed by :DTYPE",
            hint=f"dtypes: {', '.join(DTYPES)}",
        )
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
        raise UsageError(
            f"--dynamic {spec!r}: expected INPUT:AXIS=NAME, e.g. input:0=batch",
            hint="INPUT is a forward() argument name or index, NAME a dim name such as batch or seq",
        )
    return match["input"], int(match["axis"]), match["name"]


def example_inputs(given: Any, model: TorchModel) -> tuple[torch.Tensor, ...]:
    """Rule 2: tensors from shapes (seeded: floats N(0, 1), integers in [0, 16), booleans True) or as given."""
    if given is None or (isinstance(given, (list, tuple)) and not given):
        if model.exported and model.program.example_inputs:
            args, kwargs = model.program.example_inputs
            if not kwargs:
                return tuple(args)
        raise UsageError(
            "a PyTorch model needs example inputs",
            where=model.origin,
            hint="give one --example-input SHAPE[:DTYPE] per forward() argument, e.g. --example-input 2x3x224x224",
        )
    if isinstance(given, (str, torch.Tensor)):
        given = [given]
    if isinstance(given, dict):
        raise UsageError(
            "example inputs are positional: give a tuple with one tensor or shape per forward() argument",
            where=model.origin,
        )
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


def dynamic_axes(
    entries: list[tuple[str, int, str]], model: TorchModel, examples: tuple[torch.Tensor, ...]
) -> dict[int, dict[int, str]]:
    """Resolve ``--dynamic`` entries to {input index: {axis: dim name}}, checking rule 3."""
    names = model.input_names[: len(examples)]
    axes: dict[int, dict[int, str]] = {}
    sizes: dict[str, int] = {}
    for ref, axis, dim in entries:
        index = int(ref) if ref.isdigit() else (names.index(ref) if ref in names else None)
        if index is None or index >= len(examples):
            known = ", ".join(f"{i} ({n})" for i, n in enumerate(names)) or ", ".join(
                str(i) for i in range(len(examples))
            )
            raise UsageError(
                f"--dynamic {ref}:{axis}={dim}: no input {ref!r}",
                where=model.origin,
                hint=f"inputs (index and forward() name): {known}",
            )
        shape = examples[index].shape
        if not -len(shape) <= axis < len(shape):
            raise UsageError(
                f"--dynamic {ref}:{axis}={dim}: input {ref!r} has {len(shape)} axes (shape {list(shape)})",
                where=model.origin,
            )
        axis %= len(shape)
        size = shape[axis]
        if size < 2:
            raise UsageError(
                f"--dynamic {ref}:{axis}={dim}: the example size of a dynamic axis must be at least 2, found {size}",
                where=model.origin,
                hint="torch fixes axes of size 0 or 1; use e.g. 2 for a batch axis",
            )
        if sizes.setdefault(dim, size) != size:
            raise UsageError(
                f"--dynamic: dim {dim!r} has example sizes {sizes[dim]} and {size}",
                where=model.origin,
                hint="axes sharing a dim name must have the same example size",
            )
        axes.setdefault(index, {})[axis] = dim
    return axes


def run_module(model: TorchModel, examples: tuple[torch.Tensor, ...]) -> None:
    """Rule 2: the module must run on the examples (a wrong shape fails here, in the module's own words)."""
    try:
        model(*examples)
    except Exception as exc:
        shapes = ", ".join(f"{'x'.join(map(str, t.shape))}:{str(t.dtype).removeprefix('torch.')}" for t in examples)
        raise UsageError(
            f"the module fails on the example input(s) {shapes}: {type(exc).__name__}: {first_line(exc)}",
            where=model.origin,
            hint=f"give one --example-input per forward() argument ({', '.join(model.input_names) or '?'}), "
            "in order, with the shapes the module expects",
        ) from None


@contextlib.contextmanager
def eval_mode(model: TorchModel):
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
