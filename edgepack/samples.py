"""Inputs generated from a model's input specs (the user's own files are read by ``calibration.load_samples``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import UsageError

__all__ = ["generate_inputs", "concrete_shape", "check_budget", "MEMORY_BUDGET"]

MEMORY_BUDGET = 2 << 30
"""Bytes all generated input sets of one call may take. A model declares its own input dims (seen:
[2**40, 2**40], which allocated until MemoryError): over this, edgepack refuses instead of allocating."""

DEFAULT_DIM = 8
"""Size given to a dynamic dim after the first (sequence length, image side) when nothing says otherwise."""


def concrete_shape(shape: list | None, overrides: dict[str, int] | None = None) -> list[int]:
    """A runnable shape: fixed dims kept, named dims from ``overrides``, the first dynamic dim 1, others 8."""
    dims = []
    for i, dim in enumerate(shape or []):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif isinstance(dim, str) and overrides and dim in overrides:
            dims.append(overrides[dim])
        else:
            dims.append(1 if i == 0 else DEFAULT_DIM)
    return dims


def generate_inputs(inputs: list[dict[str, Any]], *, seed: int = 0, count: int = 1) -> list[dict[str, np.ndarray]]:
    """``count`` deterministic input sets. Floats ~ N(0, 1); integers in [0, 16) (ids and indices stay
    in range of any table); inputs named like masks are all ones; booleans are True."""
    _check_budget(inputs, count)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        feeds = {}
        for spec in inputs:
            shape = concrete_shape(spec["shape"])
            dtype = np.dtype(spec["dtype"])
            if "mask" in spec["name"].lower() or dtype == np.bool_:
                feeds[spec["name"]] = np.ones(shape, dtype=dtype)
            elif np.issubdtype(dtype, np.integer):
                feeds[spec["name"]] = rng.integers(0, 16, size=shape).astype(dtype)
            else:
                feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        samples.append(feeds)
    return samples


def _check_budget(inputs: list[dict[str, Any]], count: int) -> None:
    check_budget({spec["name"]: (concrete_shape(spec["shape"]), spec["dtype"]) for spec in inputs}, count)


def check_budget(shapes: dict[str, tuple[Any, Any]], count: int) -> None:
    """A UsageError before anything is allocated when ``count`` input sets of these (shape, dtype) per input
    would take more than ``MEMORY_BUDGET``."""
    sizes = {name: math.prod(shape) * np.dtype(dtype).itemsize for name, (shape, dtype) in shapes.items()}
    total = sum(sizes.values()) * count
    if total > MEMORY_BUDGET:
        largest = max(sizes, key=sizes.__getitem__)
        shape = "x".join(map(str, shapes[largest][0]))
        raise UsageError(
            f"generated inputs would take {total / 2**30:.3g} GiB ({count} set(s); input {largest[:80]!r} is {shape[:80]}), "
            f"over the budget of {MEMORY_BUDGET >> 30} GiB",
            hint="give real inputs with --sample-inputs (and --calibration/--validation for quantization), "
            "or smaller dims with --input-shape / --fix-dim",
        )
