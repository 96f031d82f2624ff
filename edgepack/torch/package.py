"""Package a PyTorch model: export it once, fit the export to each target's runtime, check it
against the module, then run the ONNX pipeline per target. Imported only for PyTorch inputs.

Rules:
1. The dynamo exporter is asked for the highest opset every selected target's runtime implements
   (the minimum of their ``runtime.max_opset``).
2. A target whose runtime is older than the opset written gets a legacy export at its own max opset
   (one per opset); if that fails, the target fails, naming the runtime version the model needs.
3. The IR version is lowered to the target's ``runtime.max_ir_version`` where the opset allows it
   (``onnx.helper.VERSION_TABLE``); otherwise the target fails.
4. Every exported file is checked against the module (``torch_verify``); a target whose accuracy
   tolerance the figures miss fails. The figures and what was asked and written go into each bundle's
   manifest as the ``export`` stage, ahead of the pipeline's own stages.
5. Targets that share an exported file are packaged together; results come back in the order asked.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch

from ..errors import AccuracyError, CompatibilityError, ConversionError, EdgepackError, UsageError, first_line
from ..onnxio.save import save_model
from ..pipeline.job import Options
from ..pipeline.run import Result, bundle_path, package_model, refuse_existing_output
from ..profiles import Profile
from ..recipes.kernels import unsupported_targets
from .export import Export, export_dynamo, export_legacy
from .inputs import TorchModel, dynamic_axes, eval_mode, example_inputs, parse_dynamic, resolve, run_module
from .verify import check_export

__all__ = ["package_torch", "ir_for_opset", "runtime_for_opset"]

ORT_FIRST_RELEASE = {
    13: "1.6",
    14: "1.8",
    15: "1.9",
    16: "1.11",
    17: "1.13",
    18: "1.14",
    19: "1.15",
    20: "1.17",
    21: "1.18",
}
"""The first onnxruntime release implementing each ai.onnx opset (onnxruntime's version matrix)."""


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
    refused = unsupported_targets(profiles, options)  # the others are packaged (package_model fails these)
    if len(refused) == len(profiles):
        raise next(iter(refused.values()))
    refuse_existing_output(name, [p for p in profiles if p.name not in refused], options)  # before the slow export
    entries = parse_dynamic(dynamic)
    if entries and torch_model.exported:
        raise UsageError(
            "--dynamic does not apply to a .pt2 program: it keeps the dynamic shapes it was exported with",
            where=torch_model.origin,
            hint="set them in torch.export.export(..., dynamic_shapes=...)",
        )
    examples = example_inputs(example_inputs_given, torch_model)
    axes = dynamic_axes(entries, torch_model, examples)
    with eval_mode(torch_model):
        run_module(torch_model, examples)
        with tempfile.TemporaryDirectory(prefix="edgepack-torch-") as scratch:
            return _export_and_package(torch_model, examples, axes, profiles, options, Path(scratch), progress)


def _export_and_package(
    model: TorchModel,
    examples: tuple[torch.Tensor, ...],
    axes: dict[int, dict[int, str]],
    profiles: list[Profile],
    options: Options,
    scratch: Path,
    progress: Callable[[str], None],
) -> list[Result]:
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
        fitted = _fit(profile, model, examples, axes, dynamo, legacy, variants, scratch, progress)
        if isinstance(fitted, EdgepackError):
            failures[profile.name] = fitted
        else:
            path, report = fitted
            groups.setdefault(path, ([], report))[0].append(profile)
    results: dict[str, Result] = {
        p: Result(p, bundle_path(options.output, model.name, _profile(profiles, p)), False, error=e)
        for p, e in failures.items()
    }
    for path, (members, report) in groups.items():
        for result in package_model(path, members, options, name=model.name, progress=progress, origin=[report]):
            results[result.target] = result
    return [results[p.name] for p in profiles]


def _fit(
    profile: Profile,
    model: TorchModel,
    examples: tuple[torch.Tensor, ...],
    axes: dict[int, dict[int, str]],
    dynamo: Export,
    legacy: dict[int, Export | EdgepackError],
    variants: dict[tuple[Path, int], Path],
    scratch: Path,
    progress: Callable[[str], None],
) -> tuple[Path, dict[str, Any]] | EdgepackError:
    """Rules 2 to 4 for one target: the file it gets and its export report, or why it gets none.
    ``legacy`` and ``variants`` cache the exports and IR-stamped copies shared between targets."""
    runtime = profile.runtime
    export, fallback = dynamo, None
    if dynamo.opset > runtime.max_opset:
        if runtime.max_opset not in legacy:
            legacy[runtime.max_opset] = _try_legacy(model, examples, dynamo, runtime.max_opset, scratch, progress)
        found = legacy[runtime.max_opset]
        if isinstance(found, EdgepackError):
            return _too_new(profile, dynamo, found)
        export = found
        fallback = (
            f"the dynamo exporter wrote opset {dynamo.opset} (asked {dynamo.requested_opset}), above the "
            f"runtime's {runtime.max_opset}: re-exported with the legacy exporter at opset {runtime.max_opset}"
        )
    ir_version = min(export.ir_version, runtime.max_ir_version)
    needed = ir_for_opset(export.opset)
    if ir_version < needed:
        return CompatibilityError(
            f"opset {export.opset} needs IR version {needed}, but the target's runtime "
            f"({runtime.package} {runtime.version}) reads up to IR {runtime.max_ir_version}",
            where=f"{model.origin} for target {profile.name}",
            hint=f"lower the opset in the profile (runtime.max_opset) or use a runtime that reads IR {needed}",
        )
    missed = _missed_tolerance(export, profile, model, dynamo)
    if missed:
        return missed
    path = export.path
    if ir_version < export.ir_version:
        key = (export.path, ir_version)
        if key not in variants:
            folder = export.path.parent.with_name(f"{export.path.parent.name}-ir{ir_version}")
            variants[key] = _with_ir(export, ir_version, folder, model.name)
        path = variants[key]
    return path, _report(model, export, dynamo, ir_version, fallback, axes)


def _try_legacy(
    model: TorchModel,
    examples: tuple[torch.Tensor, ...],
    dynamo: Export,
    opset: int,
    scratch: Path,
    progress: Callable[[str], None],
) -> Export | EdgepackError:
    progress(f"export: opset {dynamo.opset} is above a target's {opset}; legacy exporter at opset {opset}")
    folder = scratch / f"legacy-opset{opset}"
    folder.mkdir()
    try:
        export = export_legacy(model, examples, dynamo.path, opset, folder / f"{model.name}.onnx")
    except Exception as exc:  # the TorchScript exporter raises all kinds for unsupported ops and modules
        return ConversionError(f"the legacy exporter failed at opset {opset}: {type(exc).__name__}: {first_line(exc)}")
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
        f"or change the module so that it exports at opset {runtime.max_opset}",
    )


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
        + (
            f"; or use a target whose runtime implements opset {dynamo.opset} ({runtime_for_opset(dynamo.opset)}), "
            "which gets the dynamo export"
            if export is not dynamo
            else ""
        ),
    )


def _report(
    model: TorchModel,
    export: Export,
    dynamo: Export,
    ir_version: int,
    fallback: str | None,
    axes: dict[int, dict[int, str]],
) -> dict[str, Any]:
    check = export.check
    dims = sorted({name for per_input in axes.values() for name in per_input.values()}) or [
        c["case"].split("=")[0] for c in check["checks"][1:]
    ]
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
        "dynamic": {
            model.input_names[i] if i < len(model.input_names) else str(i): {str(a): n for a, n in per.items()}
            for i, per in axes.items()
        },
        "notes": export.notes[:10],
        **check,
    }


def _describe(export: Export) -> str:
    check = export.check
    return (
        f"export: {export.exporter} wrote opset {export.opset} (asked {export.requested_opset}), IR {export.ir_version} "
        f"in {export.seconds:.1f} s; vs the module: max abs error {check['max_abs_error']:.3g}, cosine {check['cosine']:.6f}"
    )


def _profile(profiles: list[Profile], name: str) -> Profile:
    return next(p for p in profiles if p.name == name)


def ir_for_opset(opset: int) -> int:
    """The lowest IR version that can carry ai.onnx ``opset`` (the ONNX release that introduced it)."""
    return min((row[1] for row in onnx.helper.VERSION_TABLE if row[2] >= opset), default=onnx.IR_VERSION)


def runtime_for_opset(opset: int) -> str:
    known = ORT_FIRST_RELEASE.get(opset)
    if known:
        return f"onnxruntime {known} or newer"
    return (
        f"an onnxruntime release that implements opset {opset} (newer than {ORT_FIRST_RELEASE[max(ORT_FIRST_RELEASE)]})"
    )


def _with_ir(export: Export, ir_version: int, folder: Path, name: str) -> Path:
    """Rule 3: the same model stamped with a lower IR version (only the header changes)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = ir.load(export.path)
    model.ir_version = ir_version
    return save_model(model, folder / f"{name}.onnx")
