"""The packaging pipeline: one model, loaded once, packaged for each target by the stages below.

    load (once) -> check -> optimize -> quantize -> convert -> bundle -> manifest -> self-test -> budget
    (with fix_shapes before optimize and coverage before convert)

Each stage is ``stage(artifact, job) -> (artifact, report)``; the reports end up in the bundle's
manifest and REPORT.md. A target's bundle is built in a temporary folder and renamed into place only
when every stage passed, so a failure leaves nothing behind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .errors import BudgetError, EdgepackError
from .fileops import atomic_folder
from .job import Artifact, Job, Options, Source
from .profiles import Profile
from .results import Result, bundle_path, refuse_existing_output
from .signing import sign_checked
from .stages.bundle import bundle
from .stages.check import check
from .stages.convert import convert
from .stages.coverage import coverage
from .stages.fix_shapes import fix_shapes
from .stages.manifest import finalize, manifest
from .stages.optimize import optimize
from .stages.quantize import quantize
from .stages.selftest import self_test
from .tune import tune

__all__ = ["STAGES", "Result", "package_model", "bundle_path", "refuse_existing_output"]


def budget(artifact: Artifact, job: Job) -> tuple[Artifact, dict]:
    """Stage 9, budget: the bundle must fit the profile's size budget."""
    total = sum(p.stat().st_size for p in job.staging.rglob("*") if p.is_file())
    limit = job.profile.budget.max_bundle_mb
    if total > limit * 1e6:
        raise BudgetError(f"the bundle is {total / 1e6:.1f} MB, over the profile's budget of {limit:g} MB",
                          where=job.profile.name, hint="quantize the model (--quantize) or raise budget.max_bundle_mb")
    return artifact, {"stage": "budget", "summary": f"{total / 1e6:.2f} MB of {limit:g} MB", "bytes": total}


STAGES: list[Callable[[Artifact, Job], tuple[Artifact, dict]]] = [
    check, optimize, quantize, convert, bundle, manifest, self_test, budget,
]
# fixed shapes before the graph is optimized; coverage of the model as it will be converted
STAGES.insert(STAGES.index(optimize), fix_shapes)
STAGES.insert(STAGES.index(convert), coverage)
# --tune chooses the recipe by measurement; without it, the quantize stage as it is
STAGES[STAGES.index(quantize)] = tune


def package_model(
    model: Path,
    profiles: list[Profile],
    options: Options,
    *,
    name: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
    origin: list[dict[str, Any]] | None = None,
) -> list[Result]:
    """Package ``model`` for every profile. Per-target failures are returned, not raised; a model
    that cannot be loaded at all raises. ``origin``: reports of what made the model (see Source.origin)."""
    name = name or model.stem
    destinations = refuse_existing_output(name, profiles, options)
    # loaded once here; the targets run here, in worker processes or on Ray, each bundle maybe from the cache
    from .executors import ModelWork, package_models

    return package_models([ModelWork(model, name, profiles, options, destinations, origin)], progress)[0]


def _package_one(source: Source, profile: Profile, options: Options, workdir: Path, destination: Path,
                 progress: Callable[[str], None], signing_key=None) -> Result:
    started = time.perf_counter()
    try:
        with atomic_folder(destination, force=options.force) as staging:
            job = Job(profile=profile, options=options, source=source, workdir=workdir, staging=staging,
                      destination=destination, progress=progress)
            job.reports.extend(source.origin)
            job.reports.append(_load_report(source))
            artifact = Artifact(path=source.reference)
            for stage in STAGES:
                stage_started = time.perf_counter()
                artifact, report = stage(artifact, job)
                job.reports.append(report)
                job.say(f"{report['stage']}: {report['summary']} ({time.perf_counter() - stage_started:.1f} s)")
            written = finalize(artifact, job)
            signed_by = sign_checked(staging, signing_key, written, destination.name) if signing_key else None
            if signed_by:
                job.say(f"signed: model.sig, key {signed_by}")
        return Result(profile.name, destination, True, manifest=written, seconds=time.perf_counter() - started,
                      signed_by=signed_by)
    except EdgepackError as exc:
        return Result(profile.name, destination, False, error=exc, seconds=time.perf_counter() - started)


def _load_report(source: Source) -> dict[str, Any]:
    info = source.info
    external = info["external_data"]
    extra = f", external data {len(external['files'])} file(s) {external['bytes'] / 1e6:.2f} MB" if external["files"] else ""
    return {
        "stage": "load",
        "summary": f"{info['nodes']} nodes, IR {info['ir_version']}, opsets {info['opsets']}{extra}",
        "source": source.path.name,
        "sha256": info["sha256"],
        "nodes": info["nodes"],
        "subgraphs": info["subgraphs"],
        "passes": info["passes"],
    }
