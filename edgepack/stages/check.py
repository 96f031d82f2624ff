"""Stage 2, check: can the target's runtime load this model at all?

Rules:
1. The model's IR version must be at most the profile's ``runtime.max_ir_version``.
2. Its ai.onnx opset must be at most ``runtime.max_opset``.
3. Every node, in every subgraph, needs a kernel in onnxruntime (the CPU provider is every target's
   fallback) or an ONNX function body that onnxruntime expands, or a model-local function. The load
   stage applies this rule once for all targets, with ``ops_without_kernel`` below.
Each failure is one error naming what the model needs and what the runtime offers.
"""

from __future__ import annotations

import functools

import onnx
import onnx.defs

from ..errors import CompatibilityError
from ..job import Artifact, Job
from ..modelinfo import iter_nodes, opsets

__all__ = ["check", "ops_without_kernel"]


def check(artifact: Artifact, job: Job) -> tuple[Artifact, dict]:
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
            hint=f"re-export the model at opset {runtime.max_opset} or lower (e.g. torch.onnx.export(..., opset_version={runtime.max_opset})), "
            "or target a device runtime new enough for this opset",
        )
    report = {
        "stage": "check",
        "summary": f"IR {proto.ir_version} <= {runtime.max_ir_version}, opset {opset} <= {runtime.max_opset}, every op has a kernel (checked at load)",
        "ir_version": proto.ir_version,
        "opsets": model_opsets,
    }
    return artifact, report


def ops_without_kernel(proto: onnx.ModelProto, model_opsets: dict[str, int]) -> dict[str, int]:
    """{op: count} of the nodes onnxruntime has no kernel or function for (rule 3)."""
    local = {(f.domain, f.name) for f in proto.functions}
    missing: dict[str, int] = {}
    for node in iter_nodes(proto):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if (node.domain, node.op_type) in local or (domain == "" and node.op_type == "Constant"):
            continue  # onnxruntime turns Constant nodes into initializers when it loads a graph: no kernel needed
        version = model_opsets.get(domain or "ai.onnx")
        if version is None or not _runnable(domain, node.op_type, version):
            key = f"{domain}::{node.op_type}" if domain else node.op_type
            missing[key] = missing.get(key, 0) + 1
    return missing


@functools.lru_cache(maxsize=None)
def _runnable(domain: str, op_type: str, opset: int) -> bool:
    since = opset
    schema = None
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
        since = schema.since_version
    except onnx.defs.SchemaError:
        if domain in ("", "ai.onnx.ml"):
            return False  # not an op of this opset at all
    for start, end in _kernels().get((domain, op_type), ()):
        if start <= since <= end:
            return True
    return bool(schema and (schema.has_function or schema.has_context_dependent_function))


@functools.lru_cache(maxsize=1)
def _kernels() -> dict[tuple[str, str], list[tuple[int, int]]]:
    from onnxruntime.capi import _pybind_state

    table: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for kernel in _pybind_state.get_all_opkernel_def():
        table.setdefault((kernel.domain, kernel.op_name), []).append(tuple(kernel.version_range))
    return table
