"""FP32: the model as it is (``--quantize none``); a ``--tune`` candidate like any other."""

from __future__ import annotations

from .base import Recipe, Variant

__all__ = ["Fp32"]


class Fp32(Recipe):
    name = "none"
    description = "FP32"
    precision = "fp32"
    variants = {"fp32": Variant("FP32")}
