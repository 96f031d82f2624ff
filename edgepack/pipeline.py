"""The packaging pipeline: one model, loaded once, packaged for each target by the stages below.

    load (once) -> check -> optimize -> quantize -> convert -> bundle -> manifest -> self-test -> budget
    (with fix_shapes before optimize and coverage before convert)

Each stage is ``stage(artifact, job) -> (artifact, report)``; the reports end up in the bundle's
manifest and REPORT.md. A target's bundle is built in a temporary folder and renamed into place only
when every stage passed, so a failure leaves nothing behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import BudgetError, EdgepackError, UsageError
from .fileops import atomic_folder
from .job import Artifact, Job, Options, Source
from .profiles import Profile
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


@dataclass
class Result:
    target: str
    bundle: Path
    ok: bool
    manifest: dict[str, Any] | None = None
    error: EdgepackError | None = None
    seconds: float = 0.0
    frozen: dict[str, Any] | None = None
    """With --freeze: where the frozen executable is and how big (edgepack/freeze.py)."""
    signed_by: str | None = None
    """With a signing key: its fingerprint, as recorded in the bundle's model.sig."""
    cache: str | None = None
    """With the bundle cache (edgepack/cache.py): "hit" when restored from it, "stored" when built and added."""

    @property
    def notices(self) -> list[str]:
        """What the user must know about this bundle (fallbacks taken), from the stage reports."""
        return [f"{r['stage']}: {r['notice']}" for r in (self.manifest or {}).get("stages", []) if r.get("notice")]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"target": self.target, "bundle": str(self.bundle), "ok": self.ok,
                                "seconds": round(self.seconds, 2)}
        if self.manifest:
            data["bytes"] = sum(f["size"] for f in self.manifest["files"].values())
            data["model"] = self.manifest["model"]["file"]
            data["self_test"] = next(r for r in self.manifest["stages"] if r["stage"] == "self_test")["summary"]
            data["notices"] = self.notices
        if self.frozen:
            data["frozen"] = self.frozen
        if self.signed_by:
            data["signed_by"] = self.signed_by
        if self.cache:
            data["cache"] = self.cache
        if self.error:
            data["error"] = {"type": type(self.error).__name__, "message": str(self.error),
                             "exit_code": self.error.exit_code}
        return data


def bundle_path(output: Path, model_name: str, profile: Profile) -> Path:
    return output / f"{model_name}-{profile.name}"


def refuse_existing_output(name: str, profiles: list[Profile], options: Options) -> dict[str, Path]:
    """Each target's bundle folder; a UsageError before any work when one (or its frozen executable)
    exists and ``options.force`` is not set."""
    destinations = {p.name: bundle_path(options.output, name, p) for p in profiles}
    existing = [str(d) for d in destinations.values() if d.exists()]
    if options.freeze:
        from .freeze import frozen_path

        existing += [str(frozen_path(destinations[p.name])) for p in profiles
                     if p.bundle.kind == "python" and frozen_path(destinations[p.name]).exists()]
    if existing and not options.force:
        raise UsageError(f"output already exists: {', '.join(existing)}", hint="pass --force to replace it")
    return destinations


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
