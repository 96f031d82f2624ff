"""Stage 4, quantize: apply the recipe the user asked for, or the profile's default.

Only ``none`` exists so far: the model goes on in FP32.
"""

from __future__ import annotations

from ..errors import UsageError
from ..job import Artifact, Job

__all__ = ["quantize"]


def quantize(artifact: Artifact, job: Job) -> tuple[Artifact, dict]:
    recipe = job.options.quantize or job.profile.quantization.default
    if recipe != "none":
        raise UsageError(f"quantization recipe {recipe!r} is not available yet", hint="use --quantize none")
    return artifact, {"stage": "quantize", "summary": "none: FP32 kept", "recipe": "none"}
