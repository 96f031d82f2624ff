"""Stage, coverage: how much of the model the target's accelerator takes, before and after fixing shapes.

Rules:
1. Profiles with ``coverage.checker: none`` are skipped (their provider is the CPU).
2. "before" is the loaded model as the user gave it; "after" is the model this stage receives (shapes
   fixed, optimized). Both are measured with edgepack.coverage, so the figures are comparable.
3. The gate is the profile's ``coverage.min_accelerated_fraction`` and ``coverage.max_partitions``, or
   the ``--min-accelerated-fraction`` / ``--max-partitions`` flags; missing it fails the target.
"""

from __future__ import annotations

from ..coverage import format_report, gate, measure
from ..pipeline.job import Artifact, Job

__all__ = ["coverage"]


def coverage(artifact: Artifact, job: Job) -> tuple[Artifact, dict]:
    settings = job.profile.coverage
    if settings.checker == "none":
        return artifact, {"stage": "coverage", "summary": "no accelerator to check (coverage.checker: none)", "checker": "none"}
    before = measure(job.source.reference, settings)
    after = measure(artifact.path, settings)
    min_fraction = settings.min_accelerated_fraction if job.options.min_accelerated_fraction is None else job.options.min_accelerated_fraction
    max_partitions = settings.max_partitions if job.options.max_partitions is None else job.options.max_partitions
    applied = gate(after, min_fraction, max_partitions, where=f"{job.source.path} for target {job.profile.name}")
    report = {
        "stage": "coverage",
        "summary": after.summary(),
        "checker": after.checker,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "shapes_fixed": job.profile.shapes.fixed,
        "gate": applied,
        "lines": format_report(before, after, fixed_shapes=job.profile.shapes.fixed),
    }
    return artifact, report

