"""How far a packaged model's outputs are from the FP32 reference's."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["compare"]


def compare(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Max and mean absolute error and cosine similarity per output, over all sample sets, plus the worst."""
    per_output: dict[str, Any] = {}
    for name in reference[0]:
        ref = np.concatenate([np.asarray(r[name], dtype=np.float64).ravel() for r in reference])
        got = np.concatenate([np.asarray(c[name], dtype=np.float64).ravel() for c in candidate])
        if ref.shape != got.shape:
            per_output[name] = {"max_abs_error": float("inf"), "mean_abs_error": float("inf"), "cosine": 0.0,
                                "note": f"shape {got.shape} differs from the reference's {ref.shape}"}
            continue
        diff = np.abs(ref - got)
        per_output[name] = {
            "max_abs_error": float(diff.max()) if diff.size else 0.0,
            "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
            "cosine": _cosine(ref, got),
        }
    return {
        "max_abs_error": max(o["max_abs_error"] for o in per_output.values()),
        "mean_abs_error": max(o["mean_abs_error"] for o in per_output.values()),
        "cosine": min(o["cosine"] for o in per_output.values()),
        "outputs": per_output,
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return 0.0
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))
