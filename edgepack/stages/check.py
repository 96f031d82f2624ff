"""Stage 2, check: can the target's runtime load this model at all?

Rules:
1. The model's IR version must be at most the profile's ``runtime.max_ir_version``.
2. Its ai.onnx opset must be at most ``runtime.max_opset``.
3. Every node, in every subgraph, needs a kernel in onnxruntime (the CPU provider is every target's
   fallback) or an ONNX function body that onnxruntime expands, or a model-local function. The load
   stage applies this rule once for all targets (edgepack.onnxio.kernels).
Each failure is one error naming what the model needs and what the runtime offers.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..errors import CompatibilityError
from ..onnxio.modelinfo import opsets
from ..pipeline.job import Artifact, Job
from ..pipeline.stage import Stage, StageResult

__all__ = ["Check", "CheckResult"]


@dataclass(frozen=True, kw_only=True)
class CheckResult(StageResult):
    stage = "check"
    summary: str
    ir_version: int
    opsets: dict[str, int]


class Check(Stage):
    name = "check"

    def run(self, artifact: Artifact, job: Job) -> CheckResult:
        runtime = job.profile.runtime
        proto = onnx.load_model(artifact.path, load_external_data=False)
        where = f"{job.source.path} for target {job.profile.name}"
        needs = f"{runtime.package} {runtime.version}"
        if proto.ir_version > runtime.max_ir_version:
            raise CompatibilityError(
                f"the model has IR version {proto.ir_version}, but the target's runtime ({needs}) reads up to IR {runtime.max_ir_version}",
                where=where,
                hint="re-export the model with an older exporter (or set ir_version), or use a profile with a newer runtime",
            )
        model_opsets = opsets(proto)
        opset = model_opsets.get("ai.onnx", 0)
        if opset > runtime.max_opset:
            raise CompatibilityError(
                f"the model uses ai.onnx opset {opset}, but the target's runtime ({needs}) implements up to opset {runtime.max_opset}",
                where=where,
                hint=f"re-export the model at opset {runtime.max_opset} or lower ({_reexport(proto, runtime.max_opset)}), "
                "or target a device runtime new enough for this opset",
            )
        return CheckResult(
            summary=f"IR {proto.ir_version} <= {runtime.max_ir_version}, opset {opset} <= {runtime.max_opset}, "
            "every op has a kernel (checked at load)",
            ir_version=proto.ir_version,
            opsets=model_opsets,
        )


_EXPORTERS = {
    "skl2onnx": "skl2onnx: convert_sklearn(..., target_opset={{'': {opset}, 'ai.onnx.ml': 3}})",
    "onnxmltools": "onnxmltools: convert_lightgbm(...) or convert_xgboost(..., target_opset={opset})",
    "tf2onnx": "python -m tf2onnx.convert ... --opset {opset}",
}
"""How exporters other than torch take an opset, by the producer_name they write."""


def _reexport(proto: onnx.ModelProto, opset: int) -> str:
    """How the model's own exporter takes ``opset`` (torch's way when the producer is another)."""
    producer = proto.producer_name.lower()
    for name, how in _EXPORTERS.items():
        if producer.startswith(name):
            return how.format(opset=opset)
    return f"e.g. torch.onnx.export(..., opset_version={opset})"
