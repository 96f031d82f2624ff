"""Stage, coverage: how much of the model the target's accelerator takes, before and after fixing shapes.

Rules:
1. Profiles with ``coverage.checker: none`` are skipped (their provider is the CPU).
2. "before" is the loaded model as the user gave it; "after" is the model this stage receives (shapes
   fixed, optimized, quantized), as ONNX. Both are measured with edgepack.coverage, so the figures are comparable.
3. The gate is the profile's ``coverage.min_accelerated_fraction`` and ``coverage.max_partitions``, or
   the ``--min-accelerated-fraction`` / ``--max-partitions`` flags; missing it fails the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..coverage import format_report, gate, measure
from ..pipeline.job import Artifact, Job
from ..pipeline.stage import Stage, StageResult, optional

__all__ = ["Coverage", "CoverageResult"]


@dataclass(frozen=True, kw_only=True)
class CoverageResult(StageResult):
    stage = "coverage"
    summary: str
    checker: str
    before: dict[str, Any] | None = optional()
    after: dict[str, Any] | None = optional()
    shapes_fixed: bool | None = optional()
    gate: dict[str, Any] | None = optional()
    lines: list[str] | None = optional()
    """The before/after comparison as REPORT.md shows it."""


class Coverage(Stage):
    name = "coverage"

    def applies(self, job: Job) -> bool:
        return job.profile.coverage.checker != "none"

    def skip(self, artifact: Artifact, job: Job) -> CoverageResult:
        return CoverageResult(summary="no accelerator to check (coverage.checker: none)", checker="none")

    def run(self, artifact: Artifact, job: Job) -> CoverageResult:
        settings = job.profile.coverage
        before = measure(job.source.reference, settings)
        after = measure(artifact.onnx_path, settings)
        options = job.options
        min_fraction = (
            settings.min_accelerated_fraction
            if options.min_accelerated_fraction is None
            else options.min_accelerated_fraction
        )
        max_partitions = settings.max_partitions if options.max_partitions is None else options.max_partitions
        applied = gate(after, min_fraction, max_partitions, where=f"{job.source.path} for target {job.profile.name}")
        return CoverageResult(
            summary=after.summary(),
            checker=after.checker,
            before=before.to_dict(),
            after=after.to_dict(),
            shapes_fixed=job.profile.shapes.fixed,
            gate=applied,
            lines=format_report(before, after, fixed_shapes=job.profile.shapes.fixed),
        )
