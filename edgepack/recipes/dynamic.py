"""Dynamic INT8: weights quantized ahead of time, activations at run time (quantize_dynamic); no calibration.

Rules:
1. onnxruntime's ``quantize_dynamic`` does the work, with the recipe's settings.
2. A model over ``LARGE_MODEL`` bytes (its weights in external data) is quantized in bounded memory, still by
   ``quantize_dynamic``: it skips pre-processing (symbolic shape inference and an onnxruntime session hold
   the model twice), is loaded once and named in memory, and onnxruntime's shape re-inference, which
   deep-copies the model, saves and reloads it (``save_and_reload_model_with_shape_infer``, twice), runs on a
   copy without the weights' bytes, its value_info written into the model itself.
3. Under rule 2 the large weights stay in their side files until the quantizer reads each one
   (edgepack/recipes/ondisk.py): FP32 and INT8 weights are never held at once.
   On a 2.4 GB model the quantizer alone peaked at 7.4 GB (3.1x) before rule 2, 4.0 GB (1.67x) before rule 3.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import ondisk
from .base import Recipe, Variant
from .ondisk import LARGE_MODEL

__all__ = ["Dynamic", "DynamicSettings", "LARGE_MODEL"]


@dataclass(frozen=True)
class DynamicSettings:
    """Weights INT8 ahead of time, activations quantized at run time (quantize_dynamic); no calibration."""

    weight_type: Literal["uint8", "int8"] = "int8"
    """int8: MatMulInteger S8 was faster than U8 on the encoder (benchmarks/quantization.py)."""
    per_channel: bool = False
    reduce_range: bool = False
    """Weights in 7 bits: x86-64 CPUs without VNNI add U8S8 products in 16 bits, which 8-bit weights can
    saturate whatever the session asks (a Fixed-style .ort has its kernels chosen); 7 bits cannot (onnxruntime's
    documented remedy). For profiles whose devices may be such CPUs."""
    op_types: list[str] = field(default_factory=lambda: ["MatMul", "Attention", "LSTM", "Gather"])
    """Conv is left out by default: dynamic ConvInteger is slower than FP32 on CPUs, 5-8x with int8 weights
    (benchmarks/quantization.py)."""
    exclude_op_types: list[str] = field(default_factory=list)


class Dynamic(Recipe):
    name = "dynamic"
    description = "dynamic INT8"
    precision = "int8"
    settings = DynamicSettings
    flags = ("--validation",)
    variants = {
        "dynamic_u8": Variant("dynamic INT8, U8 weights", {"weight_type": "uint8"}),
        "dynamic_s8": Variant("dynamic INT8, S8 weights", {"weight_type": "int8"}),
    }

    def skips_preprocess(self, source: Path) -> str | None:
        from .quantize import model_bytes

        if model_bytes(source) > LARGE_MODEL:
            return "none (a model over 2 GiB, quantized in bounded memory: nodes named in memory)"
        return None

    def apply(
        self, prepared, out, settings: DynamicSettings, *, calibration, excluded, external, calibration_method, target
    ) -> None:
        from ..ort_tools import load_ort_tools
        from .quantize import UNTYPED_AS_FLOAT, model_bytes, name_nodes, op_types, quant_type

        load_ort_tools()  # onnxruntime.quantization imports onnxruntime.tools, which imports torch
        from onnxruntime.quantization import quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        large = model_bytes(Path(prepared)) > LARGE_MODEL
        if large:  # rules 2 and 3
            model = ondisk.load_small_tensors(Path(prepared))
            name_nodes(model)
        with _bounded_memory(Path(prepared).parent) if large else contextlib.nullcontext():
            quantize_dynamic(
                model if large else prepared,
                out,
                op_types_to_quantize=op_types(settings.op_types, settings.exclude_op_types, IntegerOpsRegistry),
                per_channel=settings.per_channel,
                weight_type=quant_type(settings.weight_type),
                reduce_range=settings.reduce_range,
                nodes_to_exclude=excluded,
                use_external_data_format=external or large,
                extra_options=UNTYPED_AS_FLOAT,
            )

    def what_to_try(self, options, settings) -> list[str]:
        return [
            "--quantize static with --calibration data",
            "exclude op types in quantization.dynamic.exclude_op_types",
            "--quantize fp16",
        ]


@contextlib.contextmanager
def _bounded_memory(folder: Path):
    """Rules 2 and 3 while active: shapes inferred in place, weights read from the side files in ``folder``."""
    with _shapes_inferred_in_place(), ondisk.weights_read_from(folder):
        yield


@contextlib.contextmanager
def _shapes_inferred_in_place():
    """Rule 2: while it is active, onnxruntime's quantizer re-infers shapes on the model it holds, not on copies."""
    import importlib

    # by module name: onnxruntime.quantization's attribute 'quantize' is a function of that module
    names = ("quantize", "onnx_quantizer", "base_quantizer")
    modules = [importlib.import_module(f"onnxruntime.quantization.{name}") for name in names]
    modules = [m for m in modules if hasattr(m, _RELOAD)]
    saved = [getattr(m, _RELOAD) for m in modules]
    for module in modules:
        setattr(module, _RELOAD, _infer_in_place)
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            setattr(module, _RELOAD, original)


_RELOAD = "save_and_reload_model_with_shape_infer"


def _infer_in_place(model):
    """What ``save_and_reload_model_with_shape_infer`` returns (the model, its value_info from onnx's shape
    inference, onnxruntime's inference mark), without copying the weights: inference runs on a model of the
    same nodes whose large initializers are declared as inputs (their type and shape, no bytes)."""
    import onnx
    from onnx import helper
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    graph = model.graph
    declared = {i.name for i in graph.input}
    # shapes, axes: values inference reads
    small = [t for t in graph.initializer if ondisk.nbytes(t) <= ondisk.KEPT_IN_INFERENCE]
    weights = [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in graph.initializer
        if ondisk.nbytes(t) > ondisk.KEPT_IN_INFERENCE and t.name not in declared
    ]
    skeleton = helper.make_model(
        helper.make_graph(list(graph.node), graph.name, [*graph.input, *weights], list(graph.output), small),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
        functions=list(model.functions),
    )
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    graph.ClearField("value_info")
    graph.value_info.extend(inferred.value_info)
    for output, found in zip(graph.output, inferred.output):
        output.CopyFrom(found)
    add_infer_metadata(model)
    return model
