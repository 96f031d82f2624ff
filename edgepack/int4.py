"""4-bit weight-only recipes: ``int4`` (float32 activations) and ``q4f16`` (FP16 activations, for WebGPU).

Rules:
1. Weights of MatMul nodes are quantized in blocks of ``block_size`` along the reduction axis by
   onnxruntime's own ``MatMulNBitsQuantizer`` (round to nearest, QOperator format): each such MatMul becomes
   a ``com.microsoft`` MatMulNBits. Embedding tables (a Gather whose data is a 2-D float initializer)
   become GatherBlockQuantized where the target's runtime has that kernel. No calibration data is needed.
2. ``q4f16`` converts the model to FP16 first (float32 inputs and outputs kept, as the fp16 recipe does,
   with its exclusions), then quantizes the FP16 weights: MatMulNBits with FP16 activations.
3. Before any work, every target says whether its runtime has the kernels (``refuse_unsupported``): the CPU
   provider (python and wasm bundles) from onnxruntime's kernel registry and the first release that has
   them; WebGPU from the profile's operator list; NNAPI, CoreML and TensorRT from their coverage tables.
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
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import CompatibilityError, ConversionError
from .modelinfo import iter_nodes

if TYPE_CHECKING:
    from .job import Options
    from .profiles import Fp16Recipe, Profile

__all__ = ["METHODS", "Int4Recipe", "kernel_gaps", "refuse_unsupported", "quantize_4bit"]

METHODS = ("int4", "q4f16")

MATMUL_OP = "MatMulNBits"
GATHER_OP = "GatherBlockQuantized"
FIRST_CPU_RELEASE = {MATMUL_OP: (1, 17), GATHER_OP: (1, 20)}
"""The first onnxruntime release whose CPU provider has each kernel: MatMulNBits came with
microsoft/onnxruntime#17890 (Oct 2023, released in 1.17), GatherBlockQuantized with #21630 (Aug 2024, 1.20)."""
GATHER_OPSET = 21
"""int4/uint4 tensors exist from IR 10 / ai.onnx opset 21."""


@dataclass(frozen=True)
class Int4Recipe:
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


# --- which targets can run it (rule 3) ------------------------------------------------------------------


def kernel_gaps(profile: Profile, method: str, recipe: Int4Recipe | None = None) -> dict[str, str]:
    """{op: why the profile's runtime cannot run it} for the contrib ops ``method`` writes; empty: all there."""
    recipe = recipe or getattr(profile.quantization, method)
    wanted = [MATMUL_OP] + ([GATHER_OP] if "Gather" in recipe.op_types else [])
    activation = "float16" if method == "q4f16" else "float"
    checker = profile.coverage.checker
    gaps = {}
    for op in wanted:
        if checker in ("nnapi", "coreml", "tensorrt", "webgpu"):
            missing = not _accelerator_has(profile, op)
            if missing:
                gaps[op] = (f"the {checker} provider's operator table ({_table_name(profile)}) has no com.microsoft "
                            f"{op}; onnxruntime's CPU provider has it from {_release(op)}")
        else:
            reason = _cpu_gap(profile, op, activation)
            if reason:
                gaps[op] = reason
    return gaps


def refuse_unsupported(profiles: list[Profile], options: Options) -> None:
    """CompatibilityError before any work when a target's runtime lacks MatMulNBits for the 4-bit recipe it
    would run (``--quantize``, else the profile's default; ``--tune`` skips such candidates itself)."""
    refused = {}
    for profile in profiles:
        method = _recipe(profile, options)
        if method in METHODS and MATMUL_OP in kernel_gaps(profile, method):
            refused[profile.name] = (method, kernel_gaps(profile, method)[MATMUL_OP])
    if refused:
        listed = "; ".join(f"{name} ({method}): {why}" for name, (method, why) in refused.items())
        raise CompatibilityError(
            f"the 4-bit recipes write com.microsoft {MATMUL_OP} nodes, which these targets cannot run: {listed}",
            hint="package these targets with another recipe (--quantize fp16, dynamic or static), or leave them out of --target",
        )


def _recipe(profile: Profile, options: Options) -> str | None:
    if options.tune:
        return None
    settings = profile.quantization
    method = options.quantize or settings.default
    return settings.without_calibration if method == "static" and not options.calibration else method


def _accelerator_has(profile: Profile, op: str) -> bool:
    coverage = profile.coverage
    if coverage.checker in ("tensorrt", "webgpu"):
        from .coverage import load_op_list

        return f"com.microsoft:{op}" in load_op_list(coverage.op_list)[0]
    return f"com.microsoft:{op}" in _mobile_table(_table_name(profile))


def _table_name(profile: Profile) -> str:
    coverage = profile.coverage
    if coverage.checker == "nnapi":
        return "nnapi_supported_ops.md"
    if coverage.checker == "coreml":
        from .coverage import COREML_TABLES

        return COREML_TABLES[coverage.coreml_format]
    return f"edgepack/data/{coverage.op_list}"


@functools.cache
def _mobile_table(name: str) -> frozenset[str]:
    """The ``domain:Op`` rows of one of onnxruntime's mobile_helpers tables."""
    import onnxruntime

    text = (Path(onnxruntime.__file__).parent / "tools" / "mobile_helpers" / name).read_text(encoding="utf-8")
    return frozenset(re.findall(r"^\|([\w.]+:\w+)\|", text, flags=re.MULTILINE))


def _cpu_gap(profile: Profile, op: str, activation: str) -> str:
    import onnxruntime
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if activation not in _cpu_kernel_types().get(op, ()):
        return (f"onnxruntime {onnxruntime.__version__}'s CPU provider has no {op} kernel for {activation} "
                f"activations")
    major, minor = FIRST_CPU_RELEASE[op]
    spec = SpecifierSet(profile.runtime.version)
    older = [f"{major}.{m}.0" for m in range(8, minor) if spec.contains(Version(f"{major}.{m}.0"))]
    if older:
        return (f"the profile admits {profile.runtime.package} {older[0]} ({profile.runtime.version}), whose CPU "
                f"provider has no {op}: it is in onnxruntime from {_release(op)}")
    return ""


def _release(op: str) -> str:
    major, minor = FIRST_CPU_RELEASE[op]
    return f"{major}.{minor}"


@functools.cache
def _cpu_kernel_types() -> dict[str, frozenset[str]]:
    """{op: activation types} of the CPU provider's MatMulNBits and GatherBlockQuantized kernels."""
    from onnxruntime.capi import _pybind_state

    activation_input = {MATMUL_OP: "T1", GATHER_OP: "T2"}
    found: dict[str, set[str]] = {}
    for kernel in _pybind_state.get_all_opkernel_def():
        if kernel.domain == "com.microsoft" and kernel.op_name in activation_input \
                and kernel.provider == "CPUExecutionProvider":
            types = kernel.type_constraints.get(activation_input[kernel.op_name], [])
            found.setdefault(kernel.op_name, set()).update(t.removeprefix("tensor(").rstrip(")") for t in types)
    return {op: frozenset(types) for op, types in found.items()}


# --- the recipe (rules 1, 2, 4, 5) ----------------------------------------------------------------------


def quantize_4bit(prepared: Path, out: Path, method: str, recipe: Int4Recipe, fp16: Fp16Recipe,
                  excluded: list[str], external: bool, *, gather: bool, max_opset: int) -> dict[str, Any]:
    """Write the 4-bit model of ``prepared`` (pre-processed, every node named) to ``out``; return notes
    for the report: what was quantized and what was left in float, and why."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from .quantization import fp16_model, name_nodes

    if method == "q4f16":
        model = fp16_model(onnx.load_model(prepared), fp16, excluded)
    else:
        model = onnx.load_model(prepared)
        name_nodes(model)
    notes: dict[str, Any] = {}
    types = [t for t in recipe.op_types if t != "Gather" or gather]
    if "Gather" in recipe.op_types and not gather:
        notes["gather"] = f"embeddings kept in float: the target's runtime has no {GATHER_OP}"
    tables = _embedding_tables(model) if "Gather" in types else set()
    if tables:
        model, why_not = _for_int4_tensors(model, max_opset)
        if why_not:
            notes["gather"] = f"embeddings kept in float: {why_not}"
            types.remove("Gather")
            tables = set()
    # Gathers on anything but a 2-D float table (shape constants, int64 data) are not embeddings
    skip = set(excluded) | {n.name for n in iter_nodes(model) if n.op_type == "Gather" and n.name not in tables}
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=recipe.block_size, is_symmetric=recipe.symmetric,
        accuracy_level=recipe.accuracy_level or None, nodes_to_exclude=sorted(skip),
        quant_format=QuantFormat.QOperator, op_types_to_quantize=tuple(types),
    )
    with _quiet_quantizer():
        quantizer.process()
    written = quantizer.model.model
    if not any(n.op_type == MATMUL_OP for n in iter_nodes(written)):
        raise ConversionError(f"{method} found no MatMul with a constant 2-D weight to quantize",
                              hint="4-bit weights are for MatMul-heavy models (transformers); Conv and Gemm are not "
                              "quantized by it: try --quantize static or dynamic")
    _repack_tables_as_uint8(written)
    if external:
        onnx.save_model(written, out, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data", size_threshold=1024)
        os.chmod(out.with_name(out.name + ".data"), 0o644)
    else:
        onnx.save_model(written, out)
    ops = [n.op_type for n in iter_nodes(written)]
    notes["matmuls_left_in_float"] = ops.count("MatMul")
    if "Gather" in types:
        notes["embeddings_quantized"] = ops.count(GATHER_OP)
    return notes


def _embedding_tables(model: onnx.ModelProto) -> set[str]:
    """Names of Gather nodes whose data is a 2-D float or FP16 initializer (an embedding table) with an
    even last dim (rule 4)."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    tables = {t.name for t in model.graph.initializer
              if t.data_type in floats and len(t.dims) == 2 and t.dims[1] % 2 == 0}
    return {n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables
            and not any(a.name == "axis" and a.i != 0 for a in n.attribute)}


def _for_int4_tensors(model: onnx.ModelProto, max_opset: int) -> tuple[onnx.ModelProto, str]:
    """Rule 4: the model at opset 21 / IR 10, or the reason it cannot be."""
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


def _repack_tables_as_uint8(model: onnx.ModelProto) -> None:
    """Rule 4: every GatherBlockQuantized table and its zero points from int4/uint4 to uint8 with two
    values per byte along the last axis. Signed values (-8..7, no zero points) move to 0..15 around the
    uint8 form's default zero point 8."""
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


def _pack_rows(values: np.ndarray) -> np.ndarray:
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
