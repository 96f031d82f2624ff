"""4-bit weight-only recipes: ``int4`` (float32 activations) and ``q4f16`` (FP16 activations, for WebGPU).

Rules:
1. Weights of MatMul nodes are quantized in blocks of ``block_size`` along the reduction axis by
   onnxruntime's own ``MatMulNBitsQuantizer`` (round to nearest, QOperator format): each such MatMul becomes
   a ``com.microsoft`` MatMulNBits. Embedding tables (a Gather whose data is a 2-D float initializer)
   become GatherBlockQuantized where the target's runtime has that kernel. No calibration data is needed.
2. ``q4f16`` converts the model to FP16 first (float32 inputs and outputs kept, as the fp16 recipe does,
   with its exclusions), then quantizes the FP16 weights: MatMulNBits with FP16 activations.
3. Before any work, every target says whether its runtime has the kernels (edgepack/recipes/kernels.py):
   MatMulNBits missing refuses the recipe, naming the op and the runtime version that has it; only
   GatherBlockQuantized missing keeps embeddings in float and the report says so.
4. The quantizer writes a quantized Gather's table as int4/uint4 tensors, which need IR 10 and ai.onnx
   opset 21: an older model is upgraded with onnx's version converter first (the quantizer itself would
   only relabel the opset); when the upgrade fails, or the target's runtime reads an older opset,
   embeddings stay in float. The ORT format has no 4-bit tensor type ("Unsupported tensor data type
   '<unknown>'" at load, onnxruntime 1.31), so the tables are then repacked as uint8 with ``bits=4``, the
   kernel's other form: two values per byte along the last axis, low nibble first (measured identical
   outputs). Tables with an odd last dim stay in float.
5. ``accuracy_level`` is MatMulNBits' own attribute: 4 computes in int8 (MLAS's fastest CPU path on
   x86 and ARM64), 0 leaves it to the kernel. The accuracy gate of the quantize stage applies as for
   every recipe.
6. ``int4`` skips onnxruntime's quantization pre-processing: weight-only quantization needs no shape
   information, and pre-processing writes a full copy of the model first (``q4f16`` keeps it: the FP16
   converter relies on its shape inference). Its nodes are named in memory instead.
7. ``int4`` of a model over 2 GiB leaves its large weights in their side files until the quantizer reads
   each one (edgepack/recipes/ondisk.py): FP32 and 4-bit weights are never held at once. The upgrade of
   rule 4 and the quantizer run in the side files' folder: onnx's checker and onnx-ir, which the quantizer
   reads weights with, look for side files in the working folder.
8. ``--auto-exclude`` (``int4``): when the model misses the accuracy gate, the MatMuls that cost it the most
   accuracy per weight are quantized as the target's ``dynamic`` recipe does instead (INT8 weights,
   MatMulInteger), as few as the gate needs: 8 bits per weight instead of 32 in float. Each MatMul is
   ranked by the cosine its restoring to float alone gains on the validation inputs, per million
   weights it holds (one session per MatMul, so not for models over 2 GiB), up to ``max_int8_share``
   of the MatMul weights. On the 4-layer encoder of
   benchmarks/int4.py (random weights), the query and key projections gained nothing and the value,
   output and FFN ones about 0.001 each.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from . import ondisk
from .base import QUANTIZED_OPS, Kernel, Recipe, Variant

__all__ = ["Int4", "Q4f16", "Int4Settings", "Q4f16Settings"]

MATMUL_OP = "MatMulNBits"
GATHER_OP = "GatherBlockQuantized"
GATHER_OPSET = 21
"""int4/uint4 tensors exist from IR 10 / ai.onnx opset 21."""


@dataclass(frozen=True)
class Int4Settings:
    """4-bit weight-only block quantization (onnxruntime MatMulNBitsQuantizer), no calibration."""

    block_size: int = 32
    """Weights per scale along the reduction axis: a power of two, at least 16. benchmarks/int4.py (random
    weights): 32 gave cosine 0.994 on the transformer example and 0.986 on a 4-layer encoder at 0.164x FP32
    size; 128 gave 0.992 and 0.976 at 0.138x."""
    symmetric: bool = False
    """False: a 4-bit zero point per block as well (4 bits more per block, more accurate on skewed blocks)."""
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    """MatMulNBits' compute type: 0 the kernel's choice, 1 fp32, 2 fp16, 3 bf16, 4 int8 (fastest on CPUs)."""
    op_types: list[Literal["MatMul", "Gather"]] = field(default_factory=lambda: ["MatMul", "Gather"])
    """Gather: embedding tables as GatherBlockQuantized, where the target's runtime has it."""
    max_int8_share: float = 0.5
    """--auto-exclude: at most this share of the MatMul weights goes to dynamic INT8 (rule 8). At half, the
    model holds about 6.6 bits per weight, dynamic INT8's 8."""


@dataclass(frozen=True)
class Q4f16Settings(Int4Settings):
    """4-bit weights on an FP16 model (fp16.exclude_op_types apply too); WebGPU runs it with shader-f16."""

    accuracy_level: Literal[0, 1, 2, 3, 4] = 0
    """With FP16 activations, level 4 gave cosine 0.840 on onnxruntime 1.31's CPU provider (transformer
    example, Runtime-style .ort) against 0.994 at level 0."""


class Int4(Recipe):
    name = "int4"
    description = "INT4 weight-only (MatMulNBits)"
    precision = "int4"
    settings = Int4Settings
    flags: ClassVar[tuple[str, ...]] = ("--validation", "--auto-exclude")
    auto_exclude = True
    kept_as = "in dynamic INT8"
    sensitivity_figure = "cosine_gain_per_million_weights"
    variants = {"int4": Variant("INT4 weight-only (MatMulNBits)")}
    preprocess = False
    activation = "float"

    def kernels(self, settings: Int4Settings) -> tuple[Kernel, ...]:
        gather = (Kernel(GATHER_OP, self.activation, required=False),) if "Gather" in settings.op_types else ()
        return (Kernel(MATMUL_OP, self.activation), *gather)

    def check(self, settings: Int4Settings) -> tuple[str, str] | None:
        size = settings.block_size
        if size < 16 or size & (size - 1):
            return "block_size", f"expected a power of two, at least 16 (MatMulNBits), found {size}"
        if not 0 <= settings.max_int8_share <= 1:
            return "max_int8_share", f"expected a share between 0 and 1, found {settings.max_int8_share}"
        return None

    def apply(
        self, prepared, out, settings: Int4Settings, *, calibration, excluded, external, calibration_method, target
    ) -> dict[str, Any]:
        import onnx

        from .quantize import model_bytes, name_nodes

        source = Path(prepared).resolve()
        side_files = source.parent if model_bytes(source) > ondisk.LARGE_MODEL else None  # rule 7
        model = ondisk.load_small_tensors(source) if side_files else onnx.load_model(source)
        name_nodes(model)
        return quantize_4bit(model, out, self.name, settings, excluded, external, target, side_files=side_files)

    def rank_sensitive(self, prepared, quantized, feeds, workdir, settings, profile) -> list[tuple[str, float]]:
        return rank_matmuls(Path(prepared), Path(quantized), feeds, settings.max_int8_share)

    def what_to_try(self, options, settings: Int4Settings) -> list[str]:
        return [
            "--auto-exclude (the MatMuls that cost the most in dynamic INT8)"
            if not options.auto_exclude
            else f"a larger quantization.int4.max_int8_share (now {settings.max_int8_share})",
            f"a smaller quantization.int4.block_size (now {settings.block_size})",
            "quantization.int4.op_types [MatMul] (embeddings in float)",
            "--quantize dynamic",
        ]


class Q4f16(Int4):
    name = "q4f16"
    description = "4-bit weights on FP16 activations (WebGPU with shader-f16)"
    precision = "q4f16"
    settings = Q4f16Settings
    flags = ("--validation",)
    auto_exclude = False
    variants = {"q4f16": Variant("4-bit weights, FP16 activations (float32 I/O)")}
    marked_ops = QUANTIZED_OPS | {"Cast"}
    preprocess = True
    activation = "float16"

    def apply(
        self, prepared, out, settings: Int4Settings, *, calibration, excluded, external, calibration_method, target
    ) -> dict[str, Any]:
        import onnx

        from .fp16 import fp16_model

        if target is None:
            raise ValueError(f"the {self.name} recipe needs the target profile")
        model = fp16_model(onnx.load_model(prepared), target.quantization.settings("fp16"), excluded)
        return quantize_4bit(model, out, self.name, settings, excluded, external, target)

    def what_to_try(self, options, settings: Int4Settings) -> list[str]:
        return [f"a smaller quantization.q4f16.block_size (now {settings.block_size})", "--quantize fp16"]


def quantize_4bit(
    model,
    out,
    method: str,
    settings: Int4Settings,
    excluded: list[str],
    external: bool,
    target,
    *,
    side_files: Path | None = None,
) -> dict[str, Any]:
    """Write the 4-bit model of ``model`` (every node named) to ``out``; return notes for the report: what
    was quantized and what was left in float, and why. ``side_files``: the folder whose side files still
    hold ``model``'s large weights (rule 7)."""
    from ..errors import ConversionError
    from ..fileops import working_directory
    from ..onnxio.modelinfo import iter_nodes
    from ..ort_tools import load_ort_tools
    from .fp16 import save
    from .kernels import kernel_gaps

    load_ort_tools()  # onnxruntime.quantization imports onnxruntime.tools, which imports torch
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if target is None:
        raise ValueError(f"the {method} recipe needs the target profile")
    gather = GATHER_OP not in kernel_gaps(target, method, settings)
    notes: dict[str, Any] = {}
    types = [t for t in settings.op_types if t != "Gather" or gather]
    if "Gather" in settings.op_types and not gather:
        notes["gather"] = f"embeddings kept in float: the target's runtime has no {GATHER_OP}"
    # rule 7: side files are looked for in the working folder, by onnx's checker after the opset upgrade and
    # by the quantizer's round-to-nearest path, which reads weights with onnx-ir
    with working_directory(side_files) if side_files else contextlib.nullcontext():
        tables = _embedding_tables(model) if "Gather" in types else set()
        if tables:
            model, why_not = _for_int4_tensors(model, target.runtime.max_opset)
            if why_not:
                notes["gather"] = f"embeddings kept in float: {why_not}"
                types.remove("Gather")
                tables = set()
        int8 = sorted(set(excluded) & _weighted_matmuls(model)) if method == "int4" else []
        if int8:  # rule 8
            model = _dynamic_int8(model, int8, target, Path(out).with_name("int8_matmuls.onnx"))
            notes["matmuls_in_dynamic_int8"] = len(int8)
        # Gathers on anything but a 2-D float table (shape constants, int64 data) are not embeddings
        skip = set(excluded) | {n.name for n in iter_nodes(model) if n.op_type == "Gather" and n.name not in tables}
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=settings.block_size,
            is_symmetric=settings.symmetric,
            accuracy_level=settings.accuracy_level or None,
            nodes_to_exclude=sorted(skip),
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=tuple(types),
        )
        with _quiet_quantizer():
            quantizer.process()
    written = quantizer.model.model
    if not any(n.op_type == MATMUL_OP for n in iter_nodes(written)):
        raise ConversionError(
            f"{method} found no MatMul with a constant 2-D weight to quantize",
            hint="4-bit weights are for MatMul-heavy models (transformers); Conv and Gemm are not "
            "quantized by it: try --quantize static or dynamic",
        )
    if side_files:
        ondisk.load_remaining(written, side_files)
    _repack_tables_as_uint8(written)
    save(written, out, external=external or side_files is not None)
    ops = [n.op_type for n in iter_nodes(written)]
    notes["matmuls_left_in_float"] = ops.count("MatMul")
    if "Gather" in types:
        notes["embeddings_quantized"] = ops.count(GATHER_OP)
    return notes


def _weighted_matmuls(model) -> set[str]:
    """Names of the graph's MatMul nodes whose weight is a 2-D initializer."""
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    return {n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights}


def _dynamic_int8(model, nodes: list[str], target, path: Path):
    """Rule 8: ``model`` with ``nodes`` quantized as the target's dynamic recipe does, written to ``path``."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    from .dynamic import DynamicSettings
    from .quantize import UNTYPED_AS_FLOAT, quant_type

    settings = target.quantization.settings("dynamic") or DynamicSettings()
    quantize_dynamic(
        model,
        path,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes,
        per_channel=settings.per_channel,
        weight_type=quant_type(settings.weight_type),
        reduce_range=settings.reduce_range,
        extra_options=UNTYPED_AS_FLOAT,
    )
    return onnx.load_model(path)


def rank_matmuls(
    source: Path, quantized: Path, feeds: list[dict[str, Any]], share: float = 1.0
) -> list[tuple[str, float]]:
    """Rule 8: the MatMuls of ``source`` whose restoring to float alone in ``quantized`` gains cosine on
    ``feeds``, with that gain per million weights, highest first, as many as hold at most ``share`` of the
    weights of the MatMuls ``quantized`` holds in 4 bits."""
    import numpy as np
    import onnx

    from .. import progress
    from ..accuracy import compare
    from ..errors import ConversionError
    from .quantize import model_bytes, name_nodes

    if model_bytes(source) > ondisk.LARGE_MODEL:
        raise ConversionError(
            "--auto-exclude with int4 measures each MatMul on its own, one session per MatMul: "
            "not done for models over 2 GiB",
            hint="leave --auto-exclude off and try a smaller quantization.int4.block_size, or --quantize dynamic",
        )
    original = onnx.load_model(source)
    name_nodes(original)  # as Int4.apply named them
    model = onnx.load_model(quantized)
    matmuls = {n.name: n for n in original.graph.node if n.name in _weighted_matmuls(original)}
    weights = {t.name: t for t in original.graph.initializer}
    present = {t.name for t in model.graph.initializer}
    reference = _outputs(original, feeds)
    baseline = compare(reference, _outputs(model, feeds))["cosine"]
    candidates = [
        (i, matmuls[n.name[: -len("_Q4")]])
        for i, n in enumerate(model.graph.node)
        if n.op_type == MATMUL_OP and n.name.endswith("_Q4") and n.name[: -len("_Q4")] in matmuls
    ]
    scores = []
    for i, matmul in progress.track(candidates, "ranking the MatMuls by the accuracy 4 bits cost"):
        packed = onnx.NodeProto()
        packed.CopyFrom(model.graph.node[i])
        model.graph.node[i].CopyFrom(matmul)
        weight = weights[matmul.input[1]]
        added = weight.name not in present
        if added:
            model.graph.initializer.append(weight)
        try:
            gain = compare(reference, _outputs(model, feeds))["cosine"] - baseline
        finally:
            model.graph.node[i].CopyFrom(packed)
            if added:
                model.graph.initializer.pop()
        if gain > 1e-6:
            scores.append((matmul.name, gain * 1e6 / int(np.prod(weight.dims)), int(np.prod(weight.dims))))
    budget = share * sum(int(np.prod(weights[m.input[1]].dims)) for _, m in candidates)
    ranking: list[tuple[str, float]] = []
    for name, score, size in sorted(scores, key=lambda kv: -kv[1]):
        budget -= size
        if budget < 0 or len(ranking) == len(candidates) - 1:  # an int4 model keeps a MatMul in 4 bits
            break
        ranking.append((name, score))
    return ranking


def _outputs(model, feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from ..checked import cpu_session, outputs_of

    return outputs_of(cpu_session(model.SerializeToString()), feeds)


def _embedding_tables(model) -> set[str]:
    """Names of Gather nodes whose data is a 2-D float or FP16 initializer (an embedding table) with an
    even last dim (rule 4)."""
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    tables = {
        t.name for t in model.graph.initializer if t.data_type in floats and len(t.dims) == 2 and t.dims[1] % 2 == 0
    }
    return {
        n.name
        for n in model.graph.node
        if n.op_type == "Gather"
        and n.input[0] in tables
        and not any(a.name == "axis" and a.i != 0 for a in n.attribute)
    }


def _for_int4_tensors(model, max_opset: int):
    """Rule 4: the model at opset 21 / IR 10, or the reason it cannot be."""
    import onnx
    import onnx.version_converter

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= GATHER_OPSET:
        return model, ""
    if max_opset < GATHER_OPSET:
        return model, f"int4 tensors need ai.onnx opset {GATHER_OPSET}, the target's runtime reads up to {max_opset}"
    # the FP16 converter leaves value_info entries for graph outputs at float16; the version converter
    # would keep those and turn a float32 output into float16
    ends = {v.name for v in [*model.graph.input, *model.graph.output]}
    stale = [v for v in model.graph.value_info if v.name in ends]
    for entry in stale:
        model.graph.value_info.remove(entry)
    try:
        upgraded = onnx.version_converter.convert_version(model, GATHER_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the converter raises bare RuntimeErrors and ValidationErrors
        return model, f"upgrading opset {opset} to {GATHER_OPSET} for int4 tensors failed ({type(exc).__name__})"
    upgraded.ir_version = max(upgraded.ir_version, 10)
    return upgraded, ""


def _repack_tables_as_uint8(model) -> None:
    """Rule 4: every GatherBlockQuantized table and its zero points from int4/uint4 to uint8 with two
    values per byte along the last axis. Signed values (-8..7, no zero points) move to 0..15 around the
    uint8 form's default zero point 8."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != GATHER_OP or inits[node.input[0]].data_type == onnx.TensorProto.UINT8:
            continue
        data = inits[node.input[0]]
        values = numpy_helper.to_array(data).astype(np.int16)
        if data.data_type == onnx.TensorProto.INT4:
            values += 8
        data.CopyFrom(numpy_helper.from_array(_pack_rows(values.astype(np.uint8)), data.name))
        if len(node.input) > 3 and node.input[3]:
            zero_points = inits[node.input[3]]
            packed = _pack_rows(numpy_helper.to_array(zero_points).astype(np.uint8))
            zero_points.CopyFrom(numpy_helper.from_array(packed, zero_points.name))
        node.attribute.append(onnx.helper.make_attribute("bits", 4))


def _pack_rows(values):
    import numpy as np

    if values.shape[-1] % 2:
        values = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, 1)])
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizer logs one INFO line per node on its own handler."""
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
