"""Android NNAPI (deprecated upstream, still shipped in onnxruntime-android); the Kotlin loader adds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import Backend, mobile_helpers_table

__all__ = ["Nnapi", "NnapiOptions"]


@dataclass(frozen=True)
class NnapiOptions:
    flags: list[
        Literal["NNAPI_FLAG_USE_FP16", "NNAPI_FLAG_USE_NCHW", "NNAPI_FLAG_CPU_DISABLED", "NNAPI_FLAG_CPU_ONLY"]
    ] = field(default_factory=list)
    """ai.onnxruntime.providers.NNAPIFlags, as the loader maps them (prefix NNAPI_FLAG_ removed)."""


class Nnapi(Backend):
    name = "nnapi"
    providers = ("NnapiExecutionProvider",)
    checker = "nnapi"
    options = {"NnapiExecutionProvider": NnapiOptions}

    def measure(self, model, coverage):
        """onnxruntime's own NNAPI checker: its operator table, dynamic-shape rule and partition count."""
        from ..coverage import usability_checker, usability_report

        return usability_report(model, "nnapi", "nnapi_supported_ops.md", usability_checker().check_nnapi_partitions)

    def operator_table(self, profile):
        return mobile_helpers_table("nnapi_supported_ops.md")
