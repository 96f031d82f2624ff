"""Apple CoreML on iOS; the Swift loader passes these options to onnxruntime as strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Backend, mobile_helpers_table

__all__ = ["Coreml", "CoremlOptions"]


@dataclass(frozen=True)
class CoremlOptions:
    ModelFormat: Literal["MLProgram", "NeuralNetwork"] = "MLProgram"
    MLComputeUnits: Literal["ALL", "CPUOnly", "CPUAndGPU", "CPUAndNeuralEngine"] = "ALL"
    ModelCacheDirectory: str = ""
    """$CACHES is the app's caches folder (the Swift loader resolves it)."""
    RequireStaticInputShapes: Literal["0", "1"] = "0"
    EnableOnSubgraphs: Literal["0", "1"] = "0"


class Coreml(Backend):
    name = "coreml"
    providers = ("CoreMLExecutionProvider",)
    checker = "coreml"
    options = {"CoreMLExecutionProvider": CoremlOptions}

    def operator_table(self, profile):
        from ..coverage import COREML_TABLES

        return mobile_helpers_table(COREML_TABLES[profile.coverage.coreml_format])
