"""Bundlers add the files a bundle kind needs around the model (a Python shim, web assets, mobile loaders).

A bundler is an object with ``write(model: Artifact, job: Job) -> dict``: it writes into ``job.staging``
and returns facts for the bundle stage's report. Pick one with ``bundler_for(kind)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the pipeline imports the bundle kinds
    from ..pipeline.job import Artifact, Job

__all__ = ["Bundler", "bundler_for"]


class Bundler(Protocol):
    def write(self, model: Artifact, job: Job) -> dict: ...


def bundler_for(kind: str) -> Bundler:
    from . import mobile, python, web

    bundlers: dict[str, Bundler] = {
        "python": python.PythonBundler(),
        "web": web.WebBundler(),
        "mobile": mobile.MobileBundler(),
    }
    return bundlers[kind]
