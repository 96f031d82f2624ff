"""The Python API: ``edgepack.package(model, targets=[...])`` for an ONNX file or a PyTorch model.

PyTorch is imported only when the model is one (an ``nn.Module``, an ``ExportedProgram``, a
``pkg.module:factory`` reference or a ``.pt2`` file), so ONNX packaging never pays for it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import UsageError
from .pipeline.job import Options
from .pipeline.result import Result
from .profiles import Profile, resolve_targets

__all__ = ["package", "package_source", "package_several", "is_torch_input"]

_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def package(
    model: Any,
    *,
    targets: str | Iterable[str],
    output: str | os.PathLike = "build",
    example_inputs: Any = None,
    dynamic: Any = None,
    name: str | None = None,
    force: bool = False,
    sample_inputs: str | os.PathLike | None = None,
    quantize: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Package ``model`` for each target; one ``Result`` per target, failures included (``result.error``).

    ``model``: a path to an .onnx file, an ``nn.Module``, a ``torch.export.ExportedProgram``, a
    ``"pkg.module:factory"`` reference or a path to a ``.pt2`` file.
    ``example_inputs`` (PyTorch only): a tuple of tensors or of shapes such as ``"2x3x224x224"``/``"2x128:int64"``.
    ``dynamic`` (PyTorch only): ``{"input": {0: "batch"}}`` (input name or index -> axis -> dim name) or
    ``["input:0=batch"]``; a dynamic axis needs an example size of at least 2.
    ``targets``: built-in profile names, ``"all"``, or paths to profile .yaml files.
    """
    profiles = resolve_targets([targets] if isinstance(targets, str) else list(targets))
    options = Options(
        output=Path(output),
        force=force,
        sample_inputs=Path(sample_inputs) if sample_inputs is not None else None,
        quantize=quantize,
    )
    return package_source(
        model,
        profiles,
        options,
        name=name,
        example_inputs=example_inputs,
        dynamic=dynamic,
        progress=progress or (lambda message: None),
    )


def package_source(
    model: Any,
    profiles: list[Profile],
    options: Options,
    *,
    name: str | None = None,
    example_inputs: Any = None,
    dynamic: Any = None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Result]:
    """Route ``model`` to the ONNX pipeline, or through the PyTorch export first. With several targets, the
    build report (edgepack.report) is written beside the bundles."""
    results = _package_source(
        model, profiles, options, name=name, example_inputs=example_inputs, dynamic=dynamic, progress=progress
    )
    _report(profiles, results, options, progress)
    return results


def package_several(
    members: list,
    profiles: list[Profile],
    options: Options,
    *,
    name: str,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Result]:
    """A multi-model bundle per target (edgepack/pipeline/multi.py): ``members`` are ``Member(name, path,
    quantize)``; with several targets the build report is written beside the bundles, as for one model."""
    for member in members:
        if is_torch_input(member.model) or Path(member.model).suffix != ".onnx":
            raise UsageError(
                "a multi-model bundle takes .onnx files",
                where=str(member.model),
                hint="export each model to ONNX first",
            )
    from .pipeline.multi import package_bundle

    results = package_bundle(members, profiles, options, name=name, progress=progress)
    _report(profiles, results, options, progress)
    return results


def _report(profiles: list[Profile], results: list[Result], options: Options, progress: Callable[[str], None]) -> None:
    if len(profiles) > 1 and any(r.ok for r in results):
        from .report import write_report

        written = write_report(options.output, fresh=fresh_bundles(results, options.output))
        progress(f"report: {written.html} and {written.markdown.name} ({len(written.bundles)} bundles)")


def fresh_bundles(results: list[Result], output: Path) -> frozenset[str]:
    """The folder names of the bundles just written or restored (verified then) in ``output``."""
    return frozenset(r.bundle.name for r in results if r.ok and r.bundle.parent == Path(output))


def _package_source(
    model: Any,
    profiles: list[Profile],
    options: Options,
    *,
    name: str | None,
    example_inputs: Any,
    dynamic: Any,
    progress: Callable[[str], None],
) -> list[Result]:
    if is_torch_input(model):
        _require_torch()
        from .torch.package import package_torch

        return package_torch(
            model, profiles, options, name=name, example_inputs_given=example_inputs, dynamic=dynamic, progress=progress
        )
    if example_inputs or dynamic:
        raise UsageError(
            "--example-input and --dynamic apply to PyTorch models only",
            where=str(model),
            hint="an ONNX model's shapes are in the file",
        )
    path = Path(model)
    if path.suffix in (".pt", ".pth"):
        raise UsageError(
            f"a {path.suffix} file holds weights or a pickled module, which edgepack does not load",
            where=str(path),
            hint="point at the code instead (pkg.module:factory), or save a .pt2 with torch.export.save",
        )
    from .pipeline.run import package_model  # here: onnx and onnxruntime load only when a bundle is built

    return package_model(path, profiles, options, name=name, progress=progress)


def is_torch_input(model: Any) -> bool:
    """A PyTorch object, a ``.pt2`` path, or a ``pkg.module:attribute`` reference that is not a file."""
    if not isinstance(model, (str, os.PathLike)):
        return True
    text = os.fspath(model)
    if text.endswith(".pt2"):
        return True
    return bool(_REFERENCE.match(text)) and not Path(text).exists()


def _require_torch() -> None:
    try:
        import onnxscript  # noqa: F401  the dynamo exporter needs it
        import torch  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"this input is a PyTorch model, but {exc.name or 'torch'} is not installed",
            hint="pip install 'edgepack[torch]'",
        ) from None
