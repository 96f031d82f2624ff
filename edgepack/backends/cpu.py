"""The CPU: onnxruntime's default provider, every target's fallback; nothing to measure."""

from __future__ import annotations

from .base import Backend

__all__ = ["Cpu"]


class Cpu(Backend):
    name = "cpu"
    providers = ("CPUExecutionProvider",)
