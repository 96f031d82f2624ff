"""Which nodes of a model onnxruntime has no kernel for: the CPU provider is every target's fallback, so a
node needs a kernel there, an ONNX function body onnxruntime expands, or a model-local function."""

from __future__ import annotations

import functools

import onnx
import onnx.defs

from .modelinfo import iter_nodes

__all__ = ["ops_without_kernel", "kernel_defs"]


def ops_without_kernel(proto: onnx.ModelProto, model_opsets: dict[str, int]) -> dict[str, int]:
    """{op: count} of the nodes onnxruntime has no kernel or function for."""
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


@functools.cache
def _runnable(domain: str, op_type: str, opset: int) -> bool:
    since = opset
    schema = None
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
        since = schema.since_version
    except onnx.defs.SchemaError:
        # not an onnx op of this opset; onnxruntime registers a few in the onnx domain itself, with a kernel from
        # opset 1 (LayerNormalization before 17, SimplifiedLayerNormalization: its transformer optimizer writes them)
        pass
    for start, end in _kernels().get((domain, op_type), ()):
        if start <= since <= end:
            return True
    # onnx's defs.pyi leaves out these two OpSchema properties, which the C++ extension has
    return bool(schema and (schema.has_function or schema.has_context_dependent_function))  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=1)
def kernel_defs() -> tuple:
    """onnxruntime's kernel registry (op, domain, version range, provider, type constraints): the one place
    edgepack reads that private API."""
    from onnxruntime.capi import _pybind_state

    return tuple(_pybind_state.get_all_opkernel_def())


@functools.lru_cache(maxsize=1)
def _kernels() -> dict[tuple[str, str], list[tuple[int, int]]]:
    table: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for kernel in kernel_defs():
        table.setdefault((kernel.domain, kernel.op_name), []).append(tuple(kernel.version_range))
    return table
