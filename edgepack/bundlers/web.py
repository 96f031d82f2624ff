"""Web bundles (onnxruntime-web): the model laid out for a static site."""

from __future__ import annotations

from ..job import Artifact, Job


class WebBundler:
    def write(self, model: Artifact, job: Job) -> dict:
        (job.staging / "README.md").write_text(
            f"# {job.source.name} for {job.profile.name}\n\n{job.profile.description}.\n\n"
            f"The model is in `model/`; load it with {job.profile.runtime.package} {job.profile.runtime.version}.\n",
            encoding="utf-8",
        )
        return {}
