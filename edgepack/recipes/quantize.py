"""What every quantization recipe shares: pre-processing, dispatch to the recipe, what the result holds.

Rules:
1. Every recipe starts from ``quant_pre_process`` (shape inference and basic optimization): without
   it, onnxruntime's quantizer trips over stale shape information in exported models. A recipe that
   needs no shapes says so (``Recipe.preprocess``, int4), and dynamic INT8 of a model over 2 GiB
   (``Recipe.skips_preprocess``): it is spared the full copies pre-processing makes, and its nodes are named
   in memory. Each pre-processing try is a
   checked step (edgepack.checked): when symbolic shape inference fails, or its optimizer writes a model
   onnxruntime cannot load, the next try leaves that part out; when every try fails, the model is
   quantized as it is, and ``preprocess_notice`` says so.
2. Every node gets a name first, so nodes can be left in float by name (``--auto-exclude``).
   Initializers that onnxruntime's optimizer invented during pre-processing are renamed under
   ``pre_process/``: its MatMul+Add fusion names new initializers with a generator that only avoids
   node names, so loading the written model with optimizations on would fuse again, reuse a name such
   as ``gemm_input_shape`` and fail ("Attempt to replace the existing tensor").
3. A model that already holds quantized ops (QDQ pairs, QLinear*, *Integer, MatMulNBits) or FP16
   weights is not quantized again: ``already_quantized`` says what was found.
4. A model with external data (or over 1 GiB of weights) is written with external data, and never
   serialized as one protobuf: protobuf cannot hold more than 2 GiB.
5. ``rank_sensitive_nodes`` orders nodes by the quantization noise onnxruntime's ``qdq_loss_debug``
   measures on the tensors they read and write and on their weights, worst first, earliest first on ties.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from .. import progress
from ..checked import Feeds, notice_of, run_checked
from ..errors import ConversionError, first_line
from ..fileops import copy_model, working_directory
from ..onnxio.modelinfo import external_locations, iter_graphs, iter_nodes
from ..onnxio.save import EXTERNAL_DATA_THRESHOLD
from ..ort_tools import load_ort_tools
from . import RECIPES
from .base import QUANTIZED_OPS

if TYPE_CHECKING:
    from ..profiles import Profile

__all__ = [
    "Quantized",
    "already_quantized",
    "quantized_ops",
    "quantize_model",
    "rank_sensitive_nodes",
    "model_bytes",
    "op_types",
    "quant_type",
    "Reader",
    "name_nodes",
]
LOW_PRECISION = {
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT4,
    onnx.TensorProto.UINT4,
}


@dataclass(frozen=True)
class Quantized:
    path: Path
    precision: str
    """The recipe's: 'int8', 'fp16', 'int4' or 'q4f16'."""
    bytes_before: int
    bytes_after: int
    external_data: bool
    quantized_ops: dict[str, int]
    """Op types of the written model that carry quantized or FP16 data, with counts."""
    low_precision_weights: int
    """Initializers stored in 8-bit or 16-bit types."""
    excluded_nodes: list[str]
    preprocess: str
    preprocess_notice: str | None = None
    """Set when a pre-processing try was skipped (rule 1)."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What the recipe left in float, and why (reported only when there is something)."""

    def report(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.notes:
            del data["notes"]
        data["path"] = self.path.name
        data["size_ratio"] = round(self.bytes_after / self.bytes_before, 4) if self.bytes_before else None
        return data


UNTYPED_AS_FLOAT = {"DefaultTensorType": 1}
"""onnxruntime's quantizers refuse a tensor whose type shape inference could not give ("Unable to find data
type ... DefaultTensorType"), as after the com.microsoft ops of onnxruntime's own transformer optimizer:
such a tensor is taken as float, as that message suggests (the gate then judges the result)."""


def quantized_ops(path: Path, proto: onnx.ModelProto | None = None) -> dict[str, int]:
    """Quantized op types (int8, int4) the model holds, with counts; empty if none."""
    proto = proto or onnx.load_model(path, load_external_data=False)
    found: dict[str, int] = {}
    for node in iter_nodes(proto):
        if node.op_type in QUANTIZED_OPS:
            found[node.op_type] = found.get(node.op_type, 0) + 1
    return found


def already_quantized(path: Path) -> dict[str, int]:
    """Quantized op types (and FP16 weights) the model already holds, with counts; empty if none."""
    proto = onnx.load_model(path, load_external_data=False)
    found = quantized_ops(path, proto)
    fp16 = sum(
        1 for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    )
    if fp16:
        found["float16 initializers"] = fp16
    return found


def model_bytes(path: Path) -> int:
    """The .onnx file plus its external data files."""
    proto = onnx.load_model(path, load_external_data=False)
    side = {loc for _, loc, _, _ in external_locations(proto)}
    return path.stat().st_size + sum(
        (path.parent / loc).stat().st_size for loc in side if (path.parent / loc).is_file()
    )


def quantize_model(
    source: Path,
    out: Path,
    method: str,
    settings: Any,
    *,
    calibration: list[dict[str, np.ndarray]] | None = None,
    exclude_nodes: Iterable[str] = (),
    calibration_method: str | None = None,
    check_inputs: Feeds = lambda model: None,
    target: Profile | None = None,
) -> Quantized:
    """Quantize ``source`` into ``out`` (a fresh .onnx, external data beside it when needed) with the recipe
    named ``method`` and its ``settings`` (edgepack/recipes), for the ``target`` profile (the 4-bit recipes
    read which kernels its runtime has and the opset it reads)."""
    if method not in RECIPES or RECIPES[method].settings is None:
        raise ValueError(f"unknown recipe {method!r}")
    recipe = RECIPES[method]
    out.parent.mkdir(parents=True, exist_ok=True)
    external = _needs_external_data(source)
    prepared = out.with_name(out.stem + ".pre.onnx")
    for stale in (out, prepared):  # onnx appends to an existing side file: start from nothing on a retry
        stale.unlink(missing_ok=True)
        stale.with_name(stale.name + ".data").unlink(missing_ok=True)
    # onnxruntime's helpers write temporary files (sym_shape_infer_temp.onnx, <uuid>.data) into the current
    # folder: it is the job's scratch folder while they run
    preprocess_notice = None
    skipped = recipe.skips_preprocess(source)
    if skipped is None:
        with working_directory(out.parent):
            preprocess, preprocess_notice = prepare(source, prepared, external=external, check_inputs=check_inputs)
    else:
        prepared, preprocess = source, skipped
    excluded = sorted(exclude_nodes)
    try:
        with progress.step(f"{method} quantization"), _quiet(), working_directory(out.parent):
            notes = recipe.apply(
                prepared,
                out,
                settings,
                calibration=calibration,
                excluded=excluded,
                external=external,
                calibration_method=calibration_method,
                target=target,
            )
    except ConversionError:
        raise
    except Exception as exc:  # onnxruntime and onnx raise many kinds from deep inside
        detail = first_line(exc)
        raise ConversionError(
            f"{method} quantization failed: {type(exc).__name__}: {detail[:300]}",
            hint="exclude the op types it fails on in the profile (quantization.<recipe>.exclude_op_types), "
            "or try another recipe (--quantize)",
        ) from None
    proto = onnx.load_model(out, load_external_data=False)
    ops: dict[str, int] = {}
    for node in iter_nodes(proto):
        if node.op_type in recipe.marked_ops:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return Quantized(
        path=out,
        precision=recipe.precision,
        bytes_before=model_bytes(source),
        bytes_after=model_bytes(out),
        external_data=external,
        quantized_ops=dict(sorted(ops.items())),
        low_precision_weights=sum(1 for t in proto.graph.initializer if t.data_type in LOW_PRECISION),
        excluded_nodes=excluded,
        preprocess=preprocess,
        preprocess_notice=preprocess_notice,
        notes=notes or {},
    )


PREPROCESS_TRIES = [
    ("quant_pre_process", {}),
    ("quant_pre_process without symbolic shape inference", {"skip_symbolic_shape": True}),
    (
        "quant_pre_process without symbolic shape inference and its optimizer",
        {"skip_symbolic_shape": True, "skip_optimization": True},
    ),
]


def prepare(
    source: Path, out: Path, *, external: bool, check_inputs: Feeds = lambda model: None
) -> tuple[str, str | None]:
    """quant_pre_process, then a name for every node (rule 1): what was run, and a notice when a try was skipped."""
    load_ort_tools()  # onnxruntime.quantization imports onnxruntime.tools, which imports torch
    from onnxruntime.quantization.shape_inference import quant_pre_process

    kwargs = dict(
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        external_data_location=out.name + ".data" if external else None,
    )
    # symbolic shape inference runs onnx's in-memory inference, which serializes the whole model: not over 1 GiB
    tries = PREPROCESS_TRIES[1:] if model_bytes(source) > EXTERNAL_DATA_THRESHOLD else PREPROCESS_TRIES
    records = []
    for label, options in tries:

        def run(options=options) -> Path:
            for stale in (out, out.with_name(out.name + ".data")):
                stale.unlink(missing_ok=True)
            quant_pre_process(str(source), str(out), **kwargs, **options)
            _name_nodes(out, source)  # part of the step: its invented initializer names fail a second optimization
            return out

        used, record = run_checked(label, source, run, feeds=check_inputs)
        records.append(record)
        if used == out:
            break
    else:
        copy_model(source, out)
        _name_nodes(out, source)
    failed = "; ".join(f"{r['step']} failed ({r['reason']})" for r in records if r["status"] == "skipped")
    if records[-1]["status"] == "skipped":
        return "no pre-processing", f"{failed}: quantized without pre-processing"
    done = records[-1]["step"]
    if done == PREPROCESS_TRIES[1][0] and records[-1]["status"] == "applied":
        # symbolic shape inference does not know every op; onnx's shape inference stands in, as it always did
        return f"{done} ({(failed or 'the model is over 1 GiB')[:100]})", None
    return done, "; ".join(filter(None, [f"{failed}: used {done}" if failed else None, notice_of(records)]))


def _name_nodes(path: Path, source: Path) -> None:
    proto = onnx.load_model(path, load_external_data=False)
    _rename_invented_initializers(proto, onnx.load_model(source, load_external_data=False))
    name_nodes(proto)
    onnx.save_model(proto, path)  # external data references stay as they are: the side file is untouched


def name_nodes(proto: onnx.ModelProto) -> None:
    """A name for every node that has none (rule 2)."""
    used = {n.name for n in iter_nodes(proto) if n.name}
    count = 0
    for node in iter_nodes(proto):
        if not node.name:
            name = f"{node.op_type}_{count}"
            while name in used:
                count += 1
                name = f"{node.op_type}_{count}"
            node.name = name
            used.add(name)
            count += 1


_INVENTED_PREFIX = "pre_process/"


def _rename_invented_initializers(proto: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Rule 2: initializers whose names appear nowhere in the source model get the ``pre_process/`` prefix,
    which no name onnxruntime generates from its fixed base names (``gemm_input_shape``, ...) can equal."""
    known = {
        name
        for graph in iter_graphs(source.graph)
        for name in [
            *(t.name for t in graph.initializer),
            *(i.name for i in graph.input),
            *(o for n in graph.node for o in n.output),
        ]
    }
    renames = {t.name: _INVENTED_PREFIX + t.name for t in proto.graph.initializer if t.name not in known}
    if not renames:
        return
    for graph in iter_graphs(proto.graph):
        for tensor in graph.initializer:
            tensor.name = renames.get(tensor.name, tensor.name)
        for info in [*graph.input, *graph.value_info, *graph.output]:
            info.name = renames.get(info.name, info.name)
        for node in graph.node:
            for names in (node.input, node.output):
                for i, name in enumerate(names):
                    if name in renames:
                        names[i] = renames[name]


def _needs_external_data(path: Path) -> bool:
    proto = onnx.load_model(path, load_external_data=False)
    return bool(external_locations(proto)) or model_bytes(path) > EXTERNAL_DATA_THRESHOLD


def op_types(wanted: list[str], excluded: list[str], registry: Iterable[str]) -> list[str]:
    types = list(wanted) if wanted else sorted(set(registry))
    return [t for t in types if t not in set(excluded)]


def quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


class Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds; ``step`` counts the samples read."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], step: progress.Step | None = None):
        self.feeds = feeds
        self.step = step
        self.iterator: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self.iterator, None)
        if feed is not None and self.step:
            self.step.advance()
        return feed

    def rewind(self) -> None:
        self.iterator = iter(self.feeds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:  # qdq_loss_debug iterates instead of calling get_next
        return iter(self.feeds)


def rank_sensitive_nodes(
    prepared: Path, quantized: Path, feeds: list[dict[str, np.ndarray]], workdir: Path
) -> list[tuple[str, float]]:
    """Nodes of the float model ordered by the quantization noise on their outputs and weights
    (signal-to-quantization-noise ratio in dB, lowest first), from onnxruntime's qdq_loss_debug."""
    load_ort_tools()  # onnxruntime.quantization imports onnxruntime.tools, which imports torch
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        compute_weight_error,
        create_activation_matching,
        create_weight_matching,
        modify_model_output_intermediate_tensors,
    )

    external = _needs_external_data(prepared)
    float_aug = workdir / "debug_float.onnx"
    qdq_aug = workdir / "debug_qdq.onnx"
    try:
        with _quiet():
            modify_model_output_intermediate_tensors(str(prepared), str(float_aug), save_as_external_data=external)
            modify_model_output_intermediate_tensors(str(quantized), str(qdq_aug), save_as_external_data=external)
            float_acts = collect_activations(str(float_aug), Reader(feeds))
            qdq_acts = collect_activations(str(qdq_aug), Reader(feeds))
            activation_error = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
            weight_error = compute_weight_error(create_weight_matching(str(prepared), str(quantized)))
    except Exception as exc:  # onnxruntime sessions on the debug models, numpy on their outputs
        detail = first_line(exc)
        raise ConversionError(
            f"measuring each node's quantization noise (--auto-exclude) failed: {type(exc).__name__}: {detail[:300]}",
            hint="leave --auto-exclude off and exclude op types in quantization.static.exclude_op_types, "
            "or try another recipe (--quantize)",
        ) from None
    proto = onnx.load_model(prepared, load_external_data=False)
    scores: dict[str, float] = {}
    order = {node.name: i for i, node in enumerate(proto.graph.node)}
    for node in proto.graph.node:
        # a QDQ pair on a tensor goes when neither its producer nor its consumers are quantized: charge both
        errors = [activation_error[t]["qdq_err"] for t in [*node.input, *node.output] if t in activation_error]
        errors += [weight_error[t] for t in node.input if t in weight_error]
        errors = [float(e) for e in errors if np.isfinite(e)]
        if errors:
            scores[node.name] = min(errors)
    # on ties (a signal lost early reads 0 dB everywhere after it) the earliest node comes first
    return sorted(scores.items(), key=lambda kv: (round(kv[1], 2), order[kv[0]]))


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization prints and logs at INFO for every step; keep warnings and errors only
    (they go to the debug log, never to the user's stdout). Python warnings its numpy code raises (a
    RuntimeWarning per all-zero block in MatMulNBits' quantizer) are not edgepack's to show either."""
    import warnings

    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
