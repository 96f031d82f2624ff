"""Mobile bundles (Android NNAPI, iOS CoreML): the .ort model and its reduced-operator config for an app."""

from __future__ import annotations

from ..job import Artifact, Job


class MobileBundler:
    def write(self, model: Artifact, job: Job) -> dict:
        (job.staging / "README.md").write_text(
            f"# {job.source.name} for {job.profile.name}\n\n{job.profile.description}.\n\n"
            f"Add `model/` to the app's assets and load it with {job.profile.runtime.package} {job.profile.runtime.version}.\n",
            encoding="utf-8",
        )
        return {}
