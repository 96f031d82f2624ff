"""Dynamic INT8: weights quantized ahead of time, activations at run time (quantize_dynamic); no calibration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import Recipe, Variant

__all__ = ["Dynamic", "DynamicSettings"]


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

    def apply(
        self, prepared, out, settings: DynamicSettings, *, calibration, excluded, external, calibration_method, target
    ) -> None:
        from ..ort_tools import load_ort_tools
        from .quantize import op_types, quant_type

        load_ort_tools()  # onnxruntime.quantization imports onnxruntime.tools, which imports torch
        from onnxruntime.quantization import quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        quantize_dynamic(
            prepared,
            out,
            op_types_to_quantize=op_types(settings.op_types, settings.exclude_op_types, IntegerOpsRegistry),
            per_channel=settings.per_channel,
            weight_type=quant_type(settings.weight_type),
            reduce_range=settings.reduce_range,
            nodes_to_exclude=excluded,
            use_external_data_format=external,
        )

    def what_to_try(self, options, settings) -> list[str]:
        return [
            "--quantize static with --calibration data",
            "exclude op types in quantization.dynamic.exclude_op_types",
            "--quantize fp16",
        ]
