"""Stage 3, optimize: target-independent graph clean-up with onnx-ir passes.

Rules:
1. Passes run on every graph, If/Loop bodies included: drop Identity nodes, share identical
   initializers, remove nodes and initializers nothing uses.
2. Hardware-specific fusions are left to onnxruntime's optimizer, which the convert stage runs
   with the target's platform, so they match the device.
3. External data stays memory-mapped and is written back as a side file.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import PassManager
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    DeduplicateHashedInitializersPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from ..pipeline.job import Artifact, Job
from ..onnxio.save import save_model

__all__ = ["optimize"]


def optimize(artifact: Artifact, job: Job) -> tuple[Artifact, dict]:
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
    report = {"stage": "optimize", "summary": f"{before} -> {after} nodes", "nodes_before": before, "nodes_after": after}
    return Artifact(path=out, precision=artifact.precision), report


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
