"""The packaging run: one model, loaded once, packaged for each target by the stages of ``plan``.

A target's bundle is built in a temporary folder and renamed into place only when every stage passed,
so a failure leaves nothing behind. The results of the stages end up in the bundle's manifest and REPORT.md.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle.signing import load_private_key, sign_checked
from ..destination import check_destination
from ..errors import EdgepackError, UsageError
from ..fileops import atomic_folder
from ..profiles import Profile
from ..recipes.kernels import refuse_unsupported
from ..stages.load import load, load_result
from ..stages.manifest import finalize
from .job import Artifact, Job, Options, Source
from ..progress import about
from .plan import plan

__all__ = ["Result", "package_model", "bundle_path", "refuse_existing_output"]


@dataclass
class Result:
    target: str
    bundle: Path
    ok: bool
    manifest: dict[str, Any] | None = None
    error: EdgepackError | None = None
    seconds: float = 0.0
    frozen: dict[str, Any] | None = None
    """With --freeze: where the frozen executable is and how big (edgepack/bundle/freeze.py)."""
    signed_by: str | None = None
    """With a signing key: its fingerprint, as recorded in the bundle's model.sig."""

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
        if self.error:
            data["error"] = {"type": type(self.error).__name__, "message": str(self.error),
                             "exit_code": self.error.exit_code, "stage": self.error.stage}
        return data


def bundle_path(output: Path, model_name: str, profile: Profile) -> Path:
    return output / f"{model_name}-{profile.name}"


def refuse_existing_output(name: str, profiles: list[Profile], options: Options,
                           inputs: tuple[Path, ...] = ()) -> dict[str, Path]:
    """Each target's bundle folder; a UsageError before any work when one (or its frozen executable)
    exists and ``options.force`` is not set, or may not be written or replaced (edgepack/destination.py)."""
    destinations = {p.name: bundle_path(options.output, name, p) for p in profiles}
    existing = [str(d) for d in destinations.values() if os.path.lexists(d)]
    if options.freeze:
        from ..bundle.freeze import frozen_path

        existing += [str(frozen_path(destinations[p.name])) for p in profiles
                     if p.bundle.kind == "python" and os.path.lexists(frozen_path(destinations[p.name]))]
    if existing and not options.force:
        raise UsageError(f"output already exists: {', '.join(existing)}", hint="pass --force to replace it")
    for profile in profiles:
        check_destination(destinations[profile.name], force=options.force, inputs=inputs)
        if options.freeze and profile.bundle.kind == "python":
            from ..bundle.freeze import frozen_path, not_frozen

            check_destination(frozen_path(destinations[profile.name]), force=options.force, recognise=not_frozen)
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
    refuse_unsupported(profiles, options)
    destinations = refuse_existing_output(name, profiles, options, inputs=(model,))
    signing_key = load_private_key(options.sign_key, options.sign_passphrase_env) if options.sign_key else None
    with tempfile.TemporaryDirectory(prefix="edgepack-") as scratch:
        progress(f"load {model}")
        source_dir = Path(scratch) / "source"
        source_dir.mkdir()
        source = load(model, source_dir, name)
        if origin:
            source = dataclasses.replace(source, origin=list(origin))
        results = []
        for profile in profiles:
            workdir = Path(scratch) / profile.name
            workdir.mkdir()
            with about(profile.name):
                results.append(_package_one(source, profile, options, workdir, destinations[profile.name], progress,
                                            signing_key))
        if options.freeze:
            from ..bundle.freeze import freeze_result

            results = [freeze_result(r, p, onefile=options.onefile, force=options.force, progress=progress)
                       for r, p in zip(results, profiles)]
        return results


def _package_one(source: Source, profile: Profile, options: Options, workdir: Path, destination: Path,
                 progress: Callable[[str], None], signing_key=None) -> Result:
    started = time.perf_counter()
    try:
        with atomic_folder(destination, force=options.force, inputs=source_files(source)) as staging:
            job = Job(profile=profile, options=options, source=source, workdir=workdir, staging=staging,
                      destination=destination, progress=progress)
            job.results.append(load_result(source))
            artifact = Artifact(path=source.reference)
            for stage in plan(profile, options):
                stage_started = time.perf_counter()
                try:
                    result = stage.run(artifact, job) if stage.applies(job) else stage.skip(artifact, job)
                except EdgepackError as exc:
                    exc.stage = stage.name
                    raise
                job.results.append(result)
                artifact = result.artifact or artifact
                job.say(f"{stage.name}: {result.summary} ({time.perf_counter() - stage_started:.1f} s)")
            written = finalize(artifact, job)
            signed_by = sign_checked(staging, signing_key, written, destination.name) if signing_key else None
            if signed_by:
                job.say(f"signed: model.sig, key {signed_by}")
        return Result(profile.name, destination, True, manifest=written, seconds=time.perf_counter() - started,
                      signed_by=signed_by)
    except EdgepackError as exc:
        return Result(profile.name, destination, False, error=exc, seconds=time.perf_counter() - started)


def source_files(source: Source) -> list[Path]:
    """The user's model and its side files: never inside a folder packaging replaces."""
    return [source.path] + [source.path.parent / rel for rel in source.info["external_data"]["files"]]
