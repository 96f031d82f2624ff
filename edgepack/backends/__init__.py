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

__all__ = ["BACKENDS", "Backend", "accelerator_of", "backend_of", "checker_backend", "checkers", "session_entries"]

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


def session_entries(profile: Profile, model_format: str, ort_style: str | None) -> dict[str, str]:
    """The profile's session config entries plus those each of its backends needs for this model."""
    entries = dict(profile.session.config_entries)
    for backend in dict.fromkeys(backend_of(ep.name) for ep in profile.execution_providers):
        if backend is not None:
            entries.update(backend.session_entries(model_format, ort_style))
    return entries
