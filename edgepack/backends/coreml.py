"""Apple CoreML on iOS; the Swift loader passes these options to onnxruntime as strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Backend, mobile_helpers_table

__all__ = ["Coreml", "CoremlOptions"]

TABLES = {"MLProgram": "coreml_supported_mlprogram_ops.md", "NeuralNetwork": "coreml_supported_neuralnetwork_ops.md"}
"""onnxruntime's supported-operator table for each CoreML model format."""


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

    def measure(self, model, coverage):
        """onnxruntime's own CoreML checker, with the table of the profile's ``coverage.coreml_format``."""
        from ..coverage import usability_checker, usability_report

        table = TABLES[coverage.coreml_format]
        check = usability_checker().check_coreml_partitions
        return usability_report(
            model,
            f"coreml-{coverage.coreml_format.lower()}",
            table,
            lambda m, require_fixed: check(m, require_fixed, table),
        )

    def operator_table(self, profile):
        return mobile_helpers_table(TABLES[profile.coverage.coreml_format])
