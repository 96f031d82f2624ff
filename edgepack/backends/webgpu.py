"""onnxruntime-web in the browser: the WebGPU provider, with wasm (the CPU) behind it."""

from __future__ import annotations

from .base import Backend, listed_ops

__all__ = ["Webgpu"]


class Webgpu(Backend):
    name = "webgpu"
    providers = ("webgpu", "wasm")
    checker = "webgpu"

    def measure(self, model, coverage):
        """Each node's operator against the profile's ``coverage.op_list`` (onnxruntime-web's WebGPU kernels)."""
        from ..coverage import list_report

        return list_report(model, coverage)

    def operator_table(self, profile):
        return listed_ops(profile)
