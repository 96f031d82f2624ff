"""How packaging runs, as opposed to what it makes: worker processes or a Ray cluster, and the bundle cache.

None of these settings changes a bundle's bytes, so none of them is part of a bundle's cache key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["Execution", "default_cache_dir", "available_cores", "DEFAULT_CACHE_MAX_MB"]

DEFAULT_CACHE_MAX_MB = 10_000.0


@dataclass(frozen=True)
class Execution:
    jobs: int = 1
    """(model, target) pairs packaged at once: 1 runs them in this process, more in worker processes."""
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    """With the ray executor: the cluster to join; None starts a Ray instance on this machine for the run."""
    cache: Path | None = None
    """The bundle cache folder (edgepack/cache.py); None: no cache."""
    cache_max_mb: float = DEFAULT_CACHE_MAX_MB
    """Least recently used bundles are evicted once the cache holds more."""


def default_cache_dir() -> Path | None:
    """``$EDGEPACK_BUNDLE_CACHE`` (``off``: no cache, for CI jobs that must build everything), else ``bundles``
    beside the onnxruntime-web cache (``~/.cache/edgepack/bundles``)."""
    if os.environ.get("EDGEPACK_BUNDLE_CACHE"):
        value = os.environ["EDGEPACK_BUNDLE_CACHE"]
        return None if value == "off" else Path(value)
    from .bundle.ortweb import cache_dir

    return cache_dir().parent / "bundles"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
