"""Static INT8 in QDQ format, calibrated on data (onnxruntime.quantization.quantize_static)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .. import progress
from .base import Recipe, Variant

__all__ = ["Static", "StaticSettings"]


@dataclass(frozen=True)
class StaticSettings:
    """Static INT8 in QDQ format, calibrated on data (onnxruntime.quantization.quantize_static)."""

    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["uint8", "int8"] = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    """Weights in 7 bits: x86-64 CPUs without VNNI add U8S8 products in 16 bits, which 8-bit weights can
    saturate whatever the session asks (a Fixed-style .ort has its kernels chosen); 7 bits cannot (onnxruntime's
    documented remedy). For profiles whose devices may be such CPUs."""
    symmetric_activations: bool = False
    """TensorRT needs symmetric QDQ (zero point 0) for activations and weights."""
    symmetric_weights: bool = True
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    """distribution is left out: onnxruntime meant it for FP8, it gives poor INT8 ranges (measured: cosine 0.71)."""
    op_types: list[str] = field(default_factory=list)
    """Op types to quantize; empty: every type onnxruntime can quantize."""
    exclude_op_types: list[str] = field(default_factory=list)


class Static(Recipe):
    name = "static"
    description = "static INT8 (QDQ)"
    precision = "int8"
    settings = StaticSettings
    needs_calibration = True
    flags = ("--calibration", "--calibration-method", "--auto-exclude", "--validation")
    auto_exclude = True
    variants = {
        "static_u8s8": Variant(
            "static QDQ U8S8 per-channel", {"activation_type": "uint8", "weight_type": "int8", "per_channel": True}
        ),
        "static_s8s8": Variant(
            "static QDQ S8S8 per-channel", {"activation_type": "int8", "weight_type": "int8", "per_channel": True}
        ),
    }

    def apply(
        self, prepared, out, settings: StaticSettings, *, calibration, excluded, external, calibration_method, target
    ) -> None:
        from ..errors import ConversionError
        from ..ort_tools import load_ort_tools
        from .quantize import UNTYPED_AS_FLOAT, Reader, op_types, quant_type

        if not calibration:
            raise ConversionError("static quantization needs calibration samples")
        load_ort_tools()  # onnxruntime.quantization imports onnxruntime.tools, which imports torch
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        method = calibration_method or settings.calibration_method
        with progress.step(f"calibrating ({method}) on {len(calibration)} sample(s)", total=len(calibration)) as step:
            quantize_static(
                prepared,
                out,
                Reader(calibration, step),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types(
                    settings.op_types, settings.exclude_op_types, [*QDQRegistry, *QLinearOpsRegistry]
                ),
                per_channel=settings.per_channel,
                activation_type=quant_type(settings.activation_type),
                weight_type=quant_type(settings.weight_type),
                reduce_range=settings.reduce_range,
                nodes_to_exclude=excluded,
                use_external_data_format=external,
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile,
                }[method],
                extra_options={
                    "ActivationSymmetric": settings.symmetric_activations,
                    "WeightSymmetric": settings.symmetric_weights,
                    **UNTYPED_AS_FLOAT,
                },
            )

    def what_to_try(self, options, settings) -> list[str]:
        return [
            "--auto-exclude" if not options.auto_exclude else "raise quantization.max_auto_exclude in the profile",
            "--calibration-method entropy or percentile",
            "more (and representative) --calibration data",
            "--quantize fp16 or --quantize dynamic",
        ]
