"""The packaging run: one model, loaded once, packaged for each target by the stages of ``plan``.

A target's bundle is built in a temporary folder and renamed into place only when every stage passed,
so a failure leaves nothing behind. The results of the stages end up in the bundle's manifest and REPORT.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..bundle.signing import sign_checked
from ..checked import work_paths_out
from ..errors import EdgepackError
from ..fileops import atomic_folder
from ..profiles import Profile
from ..recipes.kernels import unsupported_targets
from ..stages.load import load_result
from ..stages.manifest import finalize
from .job import Artifact, Job, Options, Source
from .plan import plan
from .result import Result, bundle_path, refuse_existing_output
from .stage import Stage

__all__ = ["Result", "package_model", "bundle_path", "refuse_existing_output", "run_stage"]


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
    refused = unsupported_targets(profiles, options)
    runnable = [p for p in profiles if p.name not in refused]
    destinations = refuse_existing_output(name, runnable, options, inputs=(model,))
    # loaded once here; the targets run here, in worker processes or on Ray, each bundle maybe from the cache
    from ..executors import ModelWork, package_models

    built = (
        package_models([ModelWork(model, name, runnable, options, destinations, origin)], progress)[0]
        if runnable
        else []
    )
    return with_refused(profiles, built, refused, name, options)


def with_refused(
    profiles: list[Profile], built: list[Result], refused: Mapping[str, EdgepackError], name: str, options: Options
) -> list[Result]:
    """The results of ``built`` and a failed one per ``refused`` target, in the order of ``profiles``."""
    by_target = {r.target: r for r in built}
    return [
        by_target[p.name]
        if p.name in by_target
        else Result(p.name, bundle_path(options.output, name, p), False, error=refused[p.name])
        for p in profiles
    ]


def _package_one(
    source: Source,
    profile: Profile,
    options: Options,
    workdir: Path,
    destination: Path,
    progress: Callable[[str], None],
    signing_key=None,
) -> Result:
    started = time.perf_counter()
    try:
        with atomic_folder(destination, force=options.force, inputs=source_files(source)) as staging:
            job = Job(
                profile=profile,
                options=options,
                source=source,
                workdir=workdir,
                staging=staging,
                destination=destination,
                progress=progress,
            )
            job.results.append(load_result(source))
            artifact = Artifact(path=source.reference)
            for stage in plan(profile, options):
                artifact = run_stage(stage, artifact, job)
            written = finalize(artifact, job)
            signed_by = sign_checked(staging, signing_key, written, destination.name) if signing_key else None
            if signed_by:
                job.say(f"signed: model.sig, key {signed_by}")
        return Result(
            profile.name,
            destination,
            True,
            manifest=written,
            seconds=time.perf_counter() - started,
            signed_by=signed_by,
        )
    except EdgepackError as exc:
        return Result(profile.name, destination, False, error=exc, seconds=time.perf_counter() - started)


def run_stage(stage: Stage, artifact: Artifact, job: Job) -> Artifact:
    """Run ``stage`` (or record why it does not apply), add its result to the job; the artifact it leaves."""
    started = time.perf_counter()
    try:
        result = stage.run(artifact, job) if stage.applies(job) else stage.skip(artifact, job)
    except EdgepackError as exc:
        exc.stage = stage.name
        _name_the_users_model(exc, job)
        raise
    job.results.append(result)
    job.say(f"{stage.name}: {result.summary} ({time.perf_counter() - started:.1f} s)")
    return result.artifact or artifact


def _name_the_users_model(exc: EdgepackError, job: Job) -> None:
    """A stage's error speaks of the user's model, not of edgepack's working copies of it (``/tmp/edgepack-*/...``),
    which are gone when the user reads it."""
    user = str(job.source.path)
    exc.where = work_paths_out(exc.where, user) if exc.where else exc.where
    exc.message = work_paths_out(exc.message, user)
    exc.hint = work_paths_out(exc.hint, user) if exc.hint else exc.hint


def source_files(source: Source) -> list[Path]:
    """The user's model and its side files: never inside a folder packaging replaces."""
    return [source.path] + [source.path.parent / rel for rel in source.info["external_data"]["files"]]
