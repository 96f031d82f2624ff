"""Stage 7, manifest: describe the bundle once (a typed ``Content``, edgepack/bundle/manifest.py), write it
as ``manifest.json`` (for machines) and ``REPORT.md`` (for people).

The manifest says how the device must load the model (runtime range, providers, session options),
what the model takes and returns, what every stage did, and the checksum of every file.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import onnx

from ..backends import session_entries
from ..bundle.manifest import (
    Content,
    ModelEntry,
    ProviderEntry,
    RuntimeEntry,
    SessionEntry,
    SourceModel,
    Tensor,
    write_manifest,
)
from ..onnxio.modelinfo import describe_io, format_shape, opsets
from ..pipeline.job import Artifact, Job
from ..pipeline.stage import Stage, StageResult

__all__ = ["Manifest", "ManifestResult", "REPORT", "finalize", "describe", "report_text"]

REPORT = "REPORT.md"


@dataclass(frozen=True, kw_only=True)
class ManifestResult(StageResult):
    stage = "manifest"
    summary: str
    files: int
    bytes: int


class Manifest(Stage):
    """Written here so the self-test loads the bundle as the device will (checksums verified), and again by
    ``finalize`` once every stage has reported."""

    name = "manifest"

    def run(self, artifact: Artifact, job: Job) -> ManifestResult:
        written = write_manifest(job.staging, describe(artifact, job).to_dict())
        total = sum(entry["size"] for entry in written["files"].values())
        return ManifestResult(
            summary=f"{len(written['files'])} files, {total / 1e6:.2f} MB checksummed",
            files=len(written["files"]),
            bytes=total,
        )


def finalize(artifact: Artifact, job: Job) -> dict[str, Any]:
    """Write REPORT.md and the manifest again, now that every stage (self-test included) has reported."""
    content = describe(artifact, job)
    (job.staging / REPORT).write_text(report_text(content), encoding="utf-8")
    return write_manifest(job.staging, content.to_dict())


def describe(artifact: Artifact, job: Job) -> Content:
    profile = job.profile
    proto = onnx.load_model(artifact.onnx_path, load_external_data=False)
    inputs, outputs = describe_io(proto)
    entries = session_entries(profile, artifact.format, artifact.ort_style)
    model_file = artifact.path.relative_to(job.staging).as_posix()
    side_files = sorted(
        p.relative_to(job.staging).as_posix() for p in artifact.path.parent.glob(artifact.path.name + ".*data")
    )
    return Content(
        target=profile.name,
        profile=profile,
        bundle_kind=profile.bundle.kind,
        model=ModelEntry(
            file=model_file,
            format=artifact.format,
            ort_style=artifact.ort_style,
            external_data=side_files,
            precision=artifact.precision,
            ir_version=proto.ir_version,
            opsets=opsets(proto),
            inputs=[Tensor(**io) for io in inputs],
            outputs=[Tensor(**io) for io in outputs],
            source=SourceModel(name=job.source.path.name, sha256=job.source.info["sha256"], bytes=job.source.bytes),
        ),
        runtime=RuntimeEntry(
            package=profile.runtime.package,
            version=profile.runtime.version,
            execution_providers=[ProviderEntry(name=ep.name, options=ep.options) for ep in profile.execution_providers],
            strict_providers=profile.strict_providers,
            session_options=SessionEntry(
                intra_op_num_threads=profile.session.intra_op_num_threads,
                graph_optimization_level=profile.session.graph_optimization_level,
                config_entries=entries,
            ),
        ),
        reduced_ops_config=artifact.ops_config.name if artifact.ops_config else None,
        tools=_tool_versions(),
        stages=job.records(),
    )


def _tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("edgepack", "onnx", "onnxruntime", "onnx-ir", "onnxconverter-common", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def report_text(content: Content) -> str:
    model = content.model
    lines = [
        f"# {model.source.name} for {content.target}",
        "",
        content.profile.description,
        "",
        f"- model: `{model.file}` ({model.format}{', ' + model.ort_style + ' style' if model.ort_style else ''}, {model.precision})",
        f"- runtime: {content.runtime.package} {content.runtime.version}",
        f"- execution providers: {', '.join(ep.name for ep in content.runtime.execution_providers)}",
        "",
        "| input | dtype | shape |",
        "|---|---|---|",
        *[f"| {io.name} | {io.dtype} | {format_shape(io.shape)} |" for io in model.inputs],
        "",
        "| output | dtype | shape |",
        "|---|---|---|",
        *[f"| {io.name} | {io.dtype} | {format_shape(io.shape)} |" for io in model.outputs],
        "",
        "## Stages",
        "",
        *[f"- **{r['stage']}**: {r['summary']}" for r in content.stages],
        "",
        *_coverage_section(content.stages),
    ]
    notices = [f"- **{r['stage']}**: {r['notice']}" for r in content.stages if r.get("notice")]
    if notices:
        lines += ["## Notices", "", *notices, ""]
    return "\n".join(lines)


def _coverage_section(stages: list[dict[str, Any]]) -> list[str]:
    found = [r for r in stages if r["stage"] == "coverage" and r.get("lines")]
    if not found:
        return []
    report = found[0]
    gate = report["gate"]
    limits = f"at least {gate['min_accelerated_fraction']:.0%} of nodes" + (
        f", at most {gate['max_partitions']} partition(s)" if gate["max_partitions"] is not None else ""
    )
    return ["## Accelerator coverage", "", *[f"- {line}" for line in report["lines"]], f"- gate: {limits} (passed)", ""]
