"""Execution-provider backends, registered once: profiles are checked against them when they load.
A new accelerator family is a module here (a ``Backend``, edgepack/backends/base.py), its line below,
and a profile in targets/."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Backend
from .coreml import Coreml
from .cpu import Cpu
from .nnapi import Nnapi
from .tensorrt import Tensorrt
from .webgpu import Webgpu
from .xnnpack import Xnnpack

if TYPE_CHECKING:
    from ..profiles import Profile

__all__ = [
    "BACKENDS",
    "EXACT_INT8",
    "Backend",
    "accelerator_of",
    "backend_of",
    "checker_backend",
    "checkers",
    "session_entries",
]

BACKENDS: dict[str, Backend] = {b.name: b for b in (Cpu(), Tensorrt(), Nnapi(), Coreml(), Webgpu(), Xnnpack())}


def backend_of(provider: str) -> Backend | None:
    return next((b for b in BACKENDS.values() if provider in b.providers), None)


def accelerator_of(profile) -> Backend:
    """The backend that runs what a profile's accelerator takes: the one its ``coverage.checker`` measures,
    the CPU when it measures none (a wasm bundle runs onnxruntime's CPU kernels)."""
    return checker_backend(profile.coverage.checker) or BACKENDS["cpu"]


def checkers() -> list[str]:
    """Every coverage checker a profile may name."""
    return [b.checker for b in BACKENDS.values() if b.checker]


def checker_backend(checker: str) -> Backend | None:
    """The backend whose coverage checker is ``checker`` (None for ``none``)."""
    return next((b for b in BACKENDS.values() if b.checker == checker), None)


EXACT_INT8 = {"session.x64quantprecision": "1"}
"""On x86-64 CPUs without VNNI (AVX2, AVX-512 before VNNI) onnxruntime's U8S8 kernels add pairs of products in
16 bits, which saturate: on an AMD EPYC with AVX2 only, the static INT8 transformer example measured cosine
0.9951 against FP32 where a VNNI host measured 0.9999. This entry makes onnxruntime take its exact U8U8 kernels
there; elsewhere (ARM, VNNI, WebAssembly) it changes nothing. Every bundle carries it (a profile may set it to
"0"), and edgepack's own sessions on this host use it, so the accuracy gate measures the model, not the host.

Where the entry applies, onnxruntime converts int8 weights to uint8 at load, and onnxruntime 1.31's converter
fails on QDQ models whose int8 zero points are shared by several DequantizeLinear nodes ("Attempt to replace
the existing tensor": quantize_static's default S8S8 QDQ transformer example), a model plain onnxruntime runs.
Such a model then loads without it: edgepack's sessions (checked.quiet_session) and the shim's (which warns)."""


def session_entries(profile: Profile, model_format: str, ort_style: str | None) -> dict[str, str]:
    """The profile's session config entries plus those each of its backends needs for this model."""
    entries = {**EXACT_INT8, **profile.session.config_entries}
    for backend in dict.fromkeys(backend_of(ep.name) for ep in profile.execution_providers):
        if backend is not None:
            entries.update(backend.session_entries(model_format, ort_style))
    return entries
