"""onnxruntime-web in the browser: the WebGPU provider, with wasm (the CPU) behind it."""

from __future__ import annotations

from .base import Backend, listed_ops

__all__ = ["Webgpu"]


class Webgpu(Backend):
    name = "webgpu"
    providers = ("webgpu", "wasm")
    checker = "webgpu"

    def operator_table(self, profile):
        return listed_ops(profile)
