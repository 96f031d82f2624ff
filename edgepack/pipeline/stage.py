"""The stage interface: a stage says when it applies and returns a typed result.

A stage is a small object with a ``name``, ``applies(job)`` and ``run(artifact, job) -> StageResult``.
When it does not apply, ``skip(artifact, job)`` gives the result recorded instead (the manifest lists
every stage, and a skipped one says why). Each stage's result is a dataclass of its own with
``summary`` (for people), ``notice`` (what the user must know, e.g. a fallback taken) and the facts later
stages or the manifest need; ``record()`` turns it into the manifest's entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .job import Artifact, Job

__all__ = ["Stage", "StageResult", "optional", "flattened"]


def optional() -> Any:
    """A field left out of the record while it is None."""
    return field(default=None, metadata={"optional": True})


def flattened() -> Any:
    """A mapping whose keys are written into the record itself (figures of a comparison, a bundler's facts)."""
    return field(default_factory=dict, metadata={"flatten": True})


@dataclass(frozen=True, kw_only=True)
class StageResult:
    """Base of every stage's result. Subclasses declare ``summary``, ``notice`` and their facts, in the
    order the record lists them."""

    stage: ClassVar[str]
    if TYPE_CHECKING:  # declared by each subclass where its record shows it, with ``notice`` if it has one
        summary: str
    artifact: Artifact | None = field(default=None, repr=False, compare=False, metadata={"record": False})
    """The model as the stage left it; None: unchanged."""

    def record(self) -> dict[str, Any]:
        data: dict[str, Any] = {"stage": self.stage}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("record", True) is False or (f.metadata.get("optional") and value is None):
                continue
            if f.metadata.get("flatten"):
                data.update(value)
            else:
                data[f.name] = value
        return data


class Stage:
    """Base of every stage: applies to every job unless it says otherwise."""

    name: ClassVar[str]

    def applies(self, job: Job) -> bool:
        return True

    def run(self, artifact: Artifact, job: Job) -> StageResult:
        raise NotImplementedError

    def skip(self, artifact: Artifact, job: Job) -> StageResult:
        """The result recorded when the stage does not apply."""
        raise NotImplementedError(f"stage {self.name} applies to every job")
