"""NVIDIA TensorRT (with CUDA behind it) on Jetson and discrete GPUs.

The shim turns these options into onnxruntime's TensorRT provider options on the device
(``edgepack_shim.tensorrt_options``): ``trt_*`` pass through, ``tensorrt_version`` and ``dynamic_dims``
describe the device, and the cache paths are the shim's to choose (per GPU and TensorRT version).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Backend, listed_ops

__all__ = ["Tensorrt", "TensorrtOptions"]


@dataclass(frozen=True)
class TensorrtOptions:
    trt_fp16_enable: bool | None = None
    trt_int8_enable: bool | None = None
    """None: on for an INT8 (QDQ) model, off otherwise (the shim decides from the manifest's precision)."""
    trt_engine_cache_enable: bool | None = None
    trt_timing_cache_enable: bool | None = None
    trt_max_workspace_size: int | None = None
    trt_builder_optimization_level: int | None = None
    tensorrt_version: str = ""
    """The device's TensorRT, for the operator list and the cache key when the library does not say."""
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)
    """[min, opt, max] per named dynamic dim: one optimization profile for the whole range."""


@dataclass(frozen=True)
class CudaOptions:
    device_id: int | None = None


class Tensorrt(Backend):
    name = "tensorrt"
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    checker = "tensorrt"
    options = {"TensorrtExecutionProvider": TensorrtOptions, "CUDAExecutionProvider": CudaOptions}

    def check(self, provider: str, options) -> str | None:
        if not isinstance(options, TensorrtOptions):
            return None
        for name, value in options.dynamic_dims.items():
            if len(value) != 3 or not 1 <= value[0] <= value[1] <= value[2]:
                return f"dynamic_dims.{name}: expected [min, opt, max] with 1 <= min <= opt <= max, found {value}"
        if options.trt_builder_optimization_level is not None and not 0 <= options.trt_builder_optimization_level <= 5:
            return f"trt_builder_optimization_level: expected 0 to 5, found {options.trt_builder_optimization_level}"
        return None

    def operator_table(self, profile):
        return listed_ops(profile)
