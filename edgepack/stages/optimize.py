"""Stage 3, optimize: target-independent graph clean-up with onnx-ir passes.

Rules:
1. Passes run on every graph, If/Loop bodies included: drop Identity nodes, share identical
   initializers, remove nodes and initializers nothing uses.
2. Hardware-specific fusions are left to onnxruntime's optimizer, which the convert stage runs
   with the target's platform, so they match the device.
3. External data stays memory-mapped and is written back as a side file.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import PassManager
from onnx_ir.passes.common import (
    DeduplicateHashedInitializersPass,
    IdentityEliminationPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from ..onnxio.save import save_model
from ..pipeline.job import Artifact, Job
from ..pipeline.stage import Stage, StageResult

__all__ = ["Optimize", "OptimizeResult"]


@dataclass(frozen=True, kw_only=True)
class OptimizeResult(StageResult):
    stage = "optimize"
    summary: str
    nodes_before: int
    nodes_after: int


class Optimize(Stage):
    name = "optimize"

    def run(self, artifact: Artifact, job: Job) -> OptimizeResult:
        model = ir.load(artifact.path)
        before = _count_nodes(model)
        passes = PassManager(
            [
                IdentityEliminationPass(),
                DeduplicateHashedInitializersPass(),
                RemoveUnusedNodesPass(),
                RemoveUnusedFunctionsPass(),
                RemoveUnusedOpsetsPass(),
            ]
        )
        passes(model)
        after = _count_nodes(model)
        out = save_model(model, job.workdir / "optimized.onnx")
        return OptimizeResult(summary=f"{before} -> {after} nodes", nodes_before=before, nodes_after=after,
                              artifact=Artifact(path=out, precision=artifact.precision))


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
