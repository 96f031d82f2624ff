"""NVIDIA TensorRT (with CUDA behind it) on Jetson and discrete GPUs.

The shim turns these options into onnxruntime's TensorRT provider options on the device
(``edgepack_shim.tensorrt_options``): ``trt_*`` pass through, ``tensorrt_version`` and ``dynamic_dims``
describe the device, and the cache paths are the shim's to choose (per GPU and TensorRT version).

Rules checked when the profile loads, the shim's own on the device:
1. Engine and timing cache paths and the optimization-profile shapes are the shim's: a profile sets
   ``trt_*_cache_enable`` and ``dynamic_dims`` instead.
2. ``dynamic_dims`` are [min, opt, max] ranges with 1 <= min <= opt <= max.
3. INT8 follows the model: left out, the shim switches ``trt_int8_enable`` on for an int8 (QDQ) model and
   leaves it off otherwise, so an explicit value that contradicts the profile's default recipe is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..recipes import RECIPES
from .base import ListedBackend

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


class Tensorrt(ListedBackend):
    name = "tensorrt"
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    checker = "tensorrt"
    options = {"TensorrtExecutionProvider": TensorrtOptions, "CUDAExecutionProvider": CudaOptions}
    chosen_on_device = {
        **dict.fromkeys(
            ("trt_engine_cache_path", "trt_timing_cache_path"),
            "the shim keeps caches outside the read-only bundle, in a folder per GPU and TensorRT version "
            "(an engine only loads on those); set trt_engine_cache_enable or trt_timing_cache_enable",
        ),
        **dict.fromkeys(
            ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"),
            "the shim builds the optimization profile from the model's inputs; set dynamic_dims",
        ),
    }

    def check(self, provider: str, options, profile) -> str | None:
        if not isinstance(options, TensorrtOptions):
            return None
        precision = RECIPES[profile.quantization.default].precision
        if options.trt_int8_enable is not None and options.trt_int8_enable != (precision == "int8"):
            return (
                f"trt_int8_enable: {str(options.trt_int8_enable).lower()} contradicts the default recipe "
                f"{profile.quantization.default!r} ({precision}); leave it out: the shim switches INT8 on for an "
                "int8 model and leaves it off otherwise"
            )
        for name, value in options.dynamic_dims.items():
            if len(value) != 3 or not 1 <= value[0] <= value[1] <= value[2]:
                return f"dynamic_dims.{name}: expected [min, opt, max] with 1 <= min <= opt <= max, found {value}"
        if options.trt_builder_optimization_level is not None and not 0 <= options.trt_builder_optimization_level <= 5:
            return f"trt_builder_optimization_level: expected 0 to 5, found {options.trt_builder_optimization_level}"
        return None
