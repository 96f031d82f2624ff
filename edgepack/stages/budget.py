"""Stage 9, budget: the bundle must fit the profile's size budget (``budget.max_bundle_mb``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BudgetError
from ..pipeline.job import Artifact, Job
from ..pipeline.stage import Stage, StageResult

__all__ = ["Budget", "BudgetResult"]


@dataclass(frozen=True, kw_only=True)
class BudgetResult(StageResult):
    stage = "budget"
    summary: str
    bytes: int


class Budget(Stage):
    name = "budget"

    def run(self, artifact: Artifact, job: Job) -> BudgetResult:
        total = sum(p.stat().st_size for p in job.staging.rglob("*") if p.is_file())
        limit = job.profile.budget.max_bundle_mb
        if total > limit * 1e6:
            raise BudgetError(
                f"the bundle is {total / 1e6:.1f} MB, over the profile's budget of {limit:g} MB",
                where=job.profile.name,
                hint="quantize the model (--quantize) or raise budget.max_bundle_mb",
            )
        return BudgetResult(summary=f"{total / 1e6:.2f} MB of {limit:g} MB", bytes=total)
