"""Stage 3, optimize: target-independent graph clean-up with onnx-ir passes.

Rules:
1. Passes run on every graph, If/Loop bodies included: drop Identity nodes, share identical
   initializers, remove nodes and initializers nothing uses.
2. Hardware-specific fusions are left to onnxruntime's optimizer, which the convert stage runs
   with the target's platform, so they match the device.
3. External data stays memory-mapped and is written back as a side file.
4. Each pass is a checked step (edgepack.checked): a pass that raises (onnx-ir cannot read every model)
   or writes a model that does not load or agree with the one before it is skipped, with a notice.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    DeduplicateHashedInitializersPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from ..checked import job_inputs, notice_of, run_ir_passes
from ..job import Artifact, Job
from ..modelinfo import iter_nodes

__all__ = ["optimize"]


def optimize(artifact: Artifact, job: Job) -> tuple[Artifact, dict]:
    passes = [
        IdentityEliminationPass(),
        DeduplicateHashedInitializersPass(),
        RemoveUnusedNodesPass(),
        RemoveUnusedFunctionsPass(),
        RemoveUnusedOpsetsPass(),
    ]
    current, records = run_ir_passes(passes, artifact.path, job.workdir / "optimize", feeds=job_inputs(job))
    before, after = _count_nodes(artifact.path), _count_nodes(current)
    report = {"stage": "optimize", "summary": f"{before} -> {after} nodes", "nodes_before": before, "nodes_after": after,
              "steps": records}
    notice = notice_of(records)
    if notice:
        report["notice"] = notice
        job.say(f"NOTE: {notice}")
    return Artifact(path=current, precision=artifact.precision), report


def _count_nodes(path: Path) -> int:
    return sum(1 for _ in iter_nodes(onnx.load_model(path, load_external_data=False)))
