"""Stage 3, optimize: target-independent graph clean-up with onnx-ir passes.

Rules:
1. Passes run on every graph, If/Loop bodies included: drop Identity nodes, share identical
   initializers, remove nodes and initializers nothing uses.
2. Hardware-specific fusions are left to onnxruntime's optimizer, which the convert stage runs
   with the target's platform, so they match the device.
3. External data stays memory-mapped and is written back as a side file.
4. Each pass is a checked step (edgepack.checked): a pass that raises (onnx-ir cannot read every model;
   IdentityEliminationPass raises on If branches returning Constant weights through a differently ranked
   Identity) or writes a model that does not load or agree with the one before it is skipped, with a notice.
5. The stage is target-independent, so it runs once per distinct input of a model's targets
   (edgepack.pipeline.shared): every dynamic-shape target of a model gets the same optimized model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx_ir.passes.common import (
    DeduplicateHashedInitializersPass,
    IdentityEliminationPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from ..checked import job_inputs, notice_of, run_ir_passes
from ..onnxio.modelinfo import iter_nodes
from ..pipeline.job import Artifact, Job
from ..pipeline.shared import shared_step
from ..pipeline.stage import Stage, StageResult, optional

__all__ = ["Optimize", "OptimizeResult"]


@dataclass(frozen=True, kw_only=True)
class OptimizeResult(StageResult):
    stage = "optimize"
    summary: str
    nodes_before: int
    nodes_after: int
    steps: list[dict[str, Any]]
    """One record per pass: applied, repaired or skipped, and what was checked (rule 4)."""
    notice: str | None = optional()


class Optimize(Stage):
    name = "optimize"

    def run(self, artifact: Artifact, job: Job) -> OptimizeResult:
        def optimize(folder: Path) -> tuple[Path, list[dict[str, Any]]]:
            passes = [
                IdentityEliminationPass(),
                DeduplicateHashedInitializersPass(),
                RemoveUnusedNodesPass(),
                RemoveUnusedFunctionsPass(),
                RemoveUnusedOpsetsPass(),
            ]
            return run_ir_passes(passes, artifact.path, folder, feeds=job_inputs(job))

        current, records = shared_step(job, self.name, artifact.path, optimize)  # rule 5
        before, after = _count_nodes(artifact.path), _count_nodes(current)
        notice = notice_of(records)
        if notice:
            job.say(f"NOTE: {notice}")
        return OptimizeResult(
            summary=f"{before} -> {after} nodes",
            nodes_before=before,
            nodes_after=after,
            steps=records,
            notice=notice,
            artifact=Artifact(path=current, precision=artifact.precision),
        )


def _count_nodes(path: Path) -> int:
    return sum(1 for _ in iter_nodes(onnx.load_model(path, load_external_data=False)))
