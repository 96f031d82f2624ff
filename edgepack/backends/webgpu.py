"""onnxruntime-web in the browser: the WebGPU provider, with wasm (the CPU) behind it."""

from __future__ import annotations

from .base import ListedBackend

__all__ = ["Webgpu"]


class Webgpu(ListedBackend):
    name = "webgpu"
    providers = ("webgpu", "wasm")
    checker = "webgpu"
