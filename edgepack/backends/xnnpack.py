"""XNNPACK on the arm64 CPU, in onnxruntime-android and onnxruntime's iOS packages; the Kotlin loader adds it."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ListedBackend

__all__ = ["Xnnpack", "XnnpackOptions"]


@dataclass(frozen=True)
class XnnpackOptions:
    intra_op_num_threads: int = 0
    """XNNPACK's own thread pool; 0: the session's intra-op thread count."""


class Xnnpack(ListedBackend):
    name = "xnnpack"
    providers = ("XnnpackExecutionProvider",)
    checker = "xnnpack"
    options = {"XnnpackExecutionProvider": XnnpackOptions}

    def check(self, provider: str, options, profile) -> str | None:
        if options.intra_op_num_threads < 0:
            return (
                f"intra_op_num_threads: expected 0 (the session's count) or more, found {options.intra_op_num_threads}"
            )
        return None
