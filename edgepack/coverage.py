"""Execution-provider coverage: how much of a model runs on the target's accelerator, and in how many pieces.

Rules:
1. Every checker looks at the model as onnxruntime's mobile usability checker does: optimized at the
   BASIC level (constant folding, semantics-preserving fusions), then shape-inferred.
2. Each backend (edgepack/backends) owns its checker and picks one of the two kinds here. ``nnapi`` and
   ``coreml`` use onnxruntime's own checker (``usability_report``, from ``onnxruntime.tools.mobile_helpers``):
   its supported-operator tables, its dynamic-shape rule (a node with a dynamic input stays on the CPU) and
   its partition count. CoreML is checked for the profile's ``coverage.coreml_format``.
3. ``tensorrt``, ``webgpu`` and ``xnnpack`` check each node's operator against a list kept in ``edgepack/data``
   (``list_report``; the list is named by the profile's ``coverage.op_list``, with its source and version in
   its header). Their partition count is an estimate: the connected components of supported nodes.
4. The report gives the share of nodes on the accelerator, the partitions, the unsupported operator
   types with counts and, for the shape-aware checkers, the nodes held back only by dynamic shapes.
5. ``gate`` fails when the share is under ``min_accelerated_fraction`` or the partitions are more than
   ``max_partitions`` (the profile's values unless the caller overrides them).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from .backends import checker_backend
from .errors import ConversionError, EdgepackError, ProfileError, first_line
from .fileops import working_directory
from .onnxio.modelinfo import drop_initializer_value_infos, iter_graphs, iter_nodes
from .ort_tools import load_ort_tools
from .safety import op_list_names, shown

if TYPE_CHECKING:
    from .profiles import Coverage

__all__ = [
    "CoverageError",
    "CoverageReport",
    "measure",
    "gate",
    "format_report",
    "usability_checker",
    "usability_report",
    "list_report",
    "load_op_list",
]


class CoverageError(EdgepackError):
    """The model misses the profile's accelerator-coverage gate."""

    exit_code = 6


@dataclass
class CoverageReport:
    checker: str
    """nnapi, coreml-mlprogram, coreml-neuralnetwork, tensorrt, webgpu or xnnpack."""
    nodes: int
    supported_nodes: int
    partitions: int
    partitions_estimated: bool
    """True for list-based checkers: connected components of supported nodes, not onnxruntime's partitioner."""
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    """'domain:Op' -> number of nodes whose operator the accelerator does not take."""
    dynamic_shape_nodes: int | None = None
    """Nodes the accelerator would take if their input shapes were fixed (shape-aware checkers only)."""
    dynamic_inputs: bool = True
    """Whether a graph input has a dim that is not fixed; when none has, the nodes held back sit after ops whose
    output shapes onnx's inference cannot give, and no --input-shape frees them."""
    source: str = ""

    @property
    def fraction(self) -> float:
        return self.supported_nodes / self.nodes if self.nodes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accelerated_fraction": round(self.fraction, 4)}

    def summary(self) -> str:
        parts = f"{self.partitions} partition{'s' if self.partitions != 1 else ''}" + (
            " (estimated)" if self.partitions_estimated else ""
        )
        text = f"{self.supported_nodes}/{self.nodes} nodes ({self.fraction:.0%}) on {self.checker}, {parts}"
        if self.dynamic_shape_nodes:
            text += f", {self.dynamic_shape_nodes} held back by dynamic or unknown shapes"
        if self.unsupported_ops:
            text += "; unsupported: " + ", ".join(
                f"{op.removeprefix('ai.onnx:')} x{n}" for op, n in self.unsupported_ops.items()
            )
        return text


def measure(model_path: Path, coverage: Coverage) -> CoverageReport:
    """Coverage of the ONNX model at ``model_path`` (external data beside it), measured by the backend whose
    checker the profile names."""
    backend = checker_backend(coverage.checker)
    if backend is None:
        raise ValueError(f"no coverage checker {coverage.checker!r}")
    with tempfile.TemporaryDirectory(prefix="edgepack-coverage-") as tmp:
        try:
            return backend.measure(prepare(model_path, Path(tmp)), coverage)
        except (ValueError, onnx.shape_inference.InferenceError, RuntimeError) as exc:
            # onnxruntime raises bare Exception subclasses from C++; its checker needs inferred shapes
            detail = first_line(exc)
            raise ConversionError(
                f"the {coverage.checker} coverage check could not run: {detail}",
                where=str(model_path),
                hint="the model's shapes could not be inferred; run it through onnx.shape_inference to see why",
            ) from None


def prepare(model_path: Path, scratch: Path) -> onnx.ModelProto:
    """The model as onnxruntime's usability checker sees it (see FACTS: prepare as its CLI does): optimized,
    then shapes inferred from the file (any size) as its ``ModelProtoWithShapeInfo`` does, strictly; where onnx
    cannot type an op (ai.onnx.ml's Scaler), the shapes it can, so the values it cannot type count as
    dynamic instead of the check refusing the model."""
    load_ort_tools()
    from onnxruntime.tools.onnx_model_utils import optimize_model

    optimized = scratch / model_path.name
    optimize_model(model_path, optimized, use_external_initializers=True)
    inferred = scratch / f"{model_path.stem}.shapes.onnx"
    try:
        onnx.shape_inference.infer_shapes_path(str(optimized), str(inferred), strict_mode=True)
    except onnx.shape_inference.InferenceError:
        onnx.shape_inference.infer_shapes_path(str(optimized), str(inferred), strict_mode=False)
    model = onnx.load_model(inferred)
    if any(n.domain == "com.microsoft" for n in iter_nodes(model)):
        with working_directory(scratch):  # it writes sym_shape_infer_temp.onnx and side files where it runs
            model = _symbolic_shapes(model)
    graph = model.graph
    # an omitted optional input ("", as in Resize(x, "", "", sizes) or Clip(x, "", max)) has no value_info, which
    # the checker takes for a dynamic shape: it is given a fixed (scalar) one; an initializer's own record goes,
    # as the checker takes initializers as fixed but reads a record first
    drop_initializer_value_infos(model)
    if any(name == "" for node in iter_nodes(model) for name in node.input):
        graph.value_info.add(name="").type.tensor_type.shape.SetInParent()
    if not graph.value_info and len(graph.node) > 1 and graph.node[0].output:
        # nothing could be typed (the first op is one onnx cannot type): the checker refuses an empty value_info
        # as "shape inference not run"; an untyped entry is what it takes a missing one for, a dynamic value
        graph.value_info.add(name=graph.node[0].output[0])
    return model


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's inference gives no shape after a com.microsoft op (onnxruntime's transformer optimizer writes
    Attention, SkipLayerNormalization, BiasGelu), so every node after one would count as held back by unknown
    shapes: onnxruntime's symbolic shape inference, which knows those ops, types them where it can (the model
    as it was where it cannot)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        with _quiet():
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception:  # onnxruntime's inference raises plain Exceptions on what it cannot follow
        return model
    return inferred or model


def usability_checker():
    """onnxruntime's ``usability_checker`` module (``onnxruntime.tools.mobile_helpers``), importable."""
    load_ort_tools()
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    return uc


def usability_report(
    model: onnx.ModelProto, name: str, table: str, partitions: Callable[[onnx.ModelProto, bool], Any]
) -> CoverageReport:
    """The report of onnxruntime's own checker: ``partitions(model, require_fixed_shapes)`` is its
    ``check_*_partitions`` for the backend, reading its supported-operator ``table``."""
    from onnxruntime.tools.onnx_model_utils import is_fixed_size_tensor

    weights = {t.name for t in model.graph.initializer}
    with _quiet():
        fixed = partitions(model, True)
        if_fixed = partitions(model, False)
    # the checker keeps a set of unsupported types; count the nodes with its own table
    unsupported = collections.Counter(
        _domain_op(node) for node in iter_nodes(model) if not fixed.supported_ops_checker.is_op_supported(node)
    )
    return CoverageReport(
        checker=name,
        nodes=fixed.num_nodes,
        supported_nodes=fixed.num_supported_nodes,
        partitions=fixed.num_partitions,
        partitions_estimated=False,
        unsupported_ops=dict(unsupported.most_common()),
        dynamic_shape_nodes=if_fixed.num_supported_nodes - fixed.num_supported_nodes,
        dynamic_inputs=not all(is_fixed_size_tensor(i) for i in model.graph.input if i.name not in weights),
        source=f"onnxruntime.tools.mobile_helpers {table} (onnxruntime {_ort_version()})",
    )


def list_report(model: onnx.ModelProto, coverage: Coverage) -> CoverageReport:
    """The report of a list-based checker: each node's operator against ``coverage.op_list``, partitions
    estimated as connected components of supported nodes."""
    table, header = load_op_list(coverage.op_list)
    opset = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    total = supported_count = partitions = 0
    unsupported: collections.Counter[str] = collections.Counter()
    for graph in iter_graphs(model.graph):
        ok = [_is_listed(node, table, opset) for node in graph.node]
        total += len(ok)
        supported_count += sum(ok)
        for node, good in zip(graph.node, ok):
            if not good:
                unsupported[_domain_op(node)] += 1
        partitions += _components(graph, ok)
    return CoverageReport(
        checker=coverage.checker,
        nodes=total,
        supported_nodes=supported_count,
        partitions=partitions,
        partitions_estimated=True,
        unsupported_ops=dict(unsupported.most_common()),
        source=f"edgepack/data/{coverage.op_list} ({header})",
    )


@functools.cache
def load_op_list(name: str) -> tuple[dict[str, tuple[int, int | None]], str]:
    """``{op: (first opset, last opset or None)}`` and the list's version line, from edgepack/data/<name>."""
    if name not in op_list_names():  # never a path: only the lists shipped with edgepack
        raise ProfileError(
            f"coverage.op_list {shown(name)} is not a list in edgepack/data",
            hint="name one of: " + ", ".join(op_list_names()),
        )
    path = resources.files("edgepack") / "data" / name
    table: dict[str, tuple[int, int | None]] = {}
    version = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            if "_version:" in line:
                version = line.lstrip("# ").strip()
            continue
        if not line.strip():
            continue
        op, _, span = line.strip().partition(" ")
        if not span:
            table[op] = (1, None)
        elif span.endswith("+"):
            table[op] = (int(span[:-1]), None)
        else:
            first, last = span.split("-")
            table[op] = (int(first), int(last))
    return table, version


def _is_listed(node: onnx.NodeProto, table: dict[str, tuple[int, int | None]], opset: dict[str, int]) -> bool:
    if node.domain == "com.microsoft":  # listed as com.microsoft:Op, each with a single version
        return f"com.microsoft:{node.op_type}" in table
    if (node.domain or "ai.onnx") != "ai.onnx" or node.op_type not in table:
        return False
    first, last = table[node.op_type]
    try:
        since = onnx.defs.get_schema(node.op_type, opset.get("ai.onnx", 1), "").since_version
    except onnx.defs.SchemaError:
        return False
    return since >= first and (last is None or since <= last)


def _components(graph: onnx.GraphProto, ok: list[bool]) -> int:
    """Connected components of supported nodes, joined where one feeds another."""
    parent = list(range(len(ok)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    for i, node in enumerate(graph.node):
        if not ok[i]:
            continue
        for name in node.input:
            j = producer.get(name)
            if j is not None and ok[j]:
                parent[find(i)] = find(j)
    return len({find(i) for i, good in enumerate(ok) if good})


def gate(report: CoverageReport, min_fraction: float, max_partitions: int | None, *, where: str) -> dict[str, Any]:
    """Raise CoverageError when the report misses the gate; return the gate as applied."""
    applied = {"min_accelerated_fraction": min_fraction, "max_partitions": max_partitions}
    if report.fraction < min_fraction:
        ops = ", ".join(f"{op.removeprefix('ai.onnx:')} x{n}" for op, n in report.unsupported_ops.items()) or "none"
        raise CoverageError(
            f"only {report.supported_nodes}/{report.nodes} nodes ({report.fraction:.1%}) run on {report.checker}, "
            f"the profile requires at least {min_fraction:.1%}; unsupported operators: {ops}"
            + (
                f"; {report.dynamic_shape_nodes} node(s) are held back by dynamic or unknown shapes"
                + ("" if report.dynamic_inputs else " (every input is fixed: they follow ops onnx cannot type)")
                if report.dynamic_shape_nodes
                else ""
            ),
            where=where,
            hint="replace the unsupported operators, "
            + (
                "fix the input shapes (--input-shape NAME=1,3,224,224), "
                if report.dynamic_shape_nodes and report.dynamic_inputs
                else ""
            )
            + "or lower the gate with --min-accelerated-fraction (the rest runs on the CPU provider)",
        )
    if max_partitions is not None and report.partitions > max_partitions:
        raise CoverageError(
            f"the model splits into {report.partitions} {report.checker} partitions"
            f"{' (estimated)' if report.partitions_estimated else ''}, the profile allows at most {max_partitions}",
            where=where,
            hint="each partition boundary copies tensors between the accelerator and the CPU; replace the operators "
            "between them, or raise the limit with --max-partitions",
        )
    return applied


def format_report(before: CoverageReport | None, after: CoverageReport, *, fixed_shapes: bool) -> list[str]:
    """Human-readable lines (inspect, REPORT.md)."""
    lines = []
    if before is not None and fixed_shapes:
        lines.append(f"before fixing shapes: {before.summary()}")
        lines.append(f"after fixing shapes:  {after.summary()}")
    else:
        lines.append(after.summary())
    if after.partitions_estimated:
        lines.append("partitions estimated as connected components of supported nodes")
    lines.append(f"operator list: {after.source}")
    return lines


def _domain_op(node: onnx.NodeProto) -> str:
    return f"{node.domain or 'ai.onnx'}:{node.op_type}"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


@contextlib.contextmanager
def _quiet():
    logging.getLogger("usability_checker").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):
        yield
