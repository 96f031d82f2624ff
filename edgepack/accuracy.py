"""How far a packaged model's outputs are from the FP32 reference's.

``compare`` gives max and mean abs error and cosine similarity, and for classifier-shaped outputs
(``[batch, classes]``, float, not named as an embedding or hidden state: ``EMBEDDING``) the share of rows
whose arg-max agrees with the reference's (top-1 agreement). ``check`` holds figures against tolerances and
says by how much they miss.

On inputs edgepack generated (``generated=True``), a row whose reference scores at the two arg-maxes are within
``NEAR_TIE`` of the output's range is a near-tie and counts as agreeing: made-up inputs put classifiers on the
fence far more often than real ones, and a flip there says nothing about the model. The figures say how many
rows were near-ties (``top1_near_ties``). On the user's own inputs every flip counts.

Non-tensor outputs (an ai.onnx.ml ZipMap's sequence of maps, a sequence of tensors) are compared as the
numbers they hold, in order (map values by sorted key).

``error_histograms`` counts each output's absolute errors per decade, for the build report.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np

__all__ = [
    "compare",
    "top1_agreement",
    "check",
    "as_numbers",
    "error_histograms",
    "ERROR_EDGES",
    "NEAR_TIE",
    "top1_phrase",
]

EMBEDDING = re.compile(r"embed|pooler|hidden|feature|vector|encod|latent", re.IGNORECASE)
"""Output names of embeddings and hidden states ([batch, dims] like a classifier's scores, but whose arg-max
means nothing): they get no top-1 figure, cosine and errors judge them."""

NEAR_TIE = 0.01
"""On generated inputs, a top-1 flip between scores closer than this share of the output's range agrees."""


def as_numbers(value: Any) -> np.ndarray:
    """An output as one flat float64 array: tensors as they are, sequences and maps element by element."""
    if isinstance(value, dict):
        return np.concatenate([as_numbers(value[k]) for k in sorted(value)] or [np.zeros(0)])
    if isinstance(value, (list, tuple)):
        return np.concatenate([as_numbers(v) for v in value] or [np.zeros(0)])
    array = np.asarray(value)
    if array.dtype.kind in "USO":  # string labels: equal or not
        return np.array([zlib.crc32(str(v).encode()) for v in array.ravel()], dtype=np.float64)
    return array.astype(np.float64).ravel()


ERROR_EDGES = [0.0, *(10.0**k for k in range(-8, 1))]
"""Bin i holds errors in [ERROR_EDGES[i], ERROR_EDGES[i + 1]); the last bin, errors of 1 and more."""


def compare(
    reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]], *, generated: bool = False
) -> dict[str, Any]:
    """Max and mean absolute error and cosine similarity per output, over all sample sets, plus the worst
    (top-1 agreement with near-ties counted as agreeing when the inputs were ``generated``)."""
    per_output: dict[str, Any] = {}
    for name in reference[0]:
        ref = np.concatenate([as_numbers(r[name]) for r in reference])
        got = np.concatenate([as_numbers(c[name]) for c in candidate])
        mismatch = _shape_mismatch([r[name] for r in reference], [c[name] for c in candidate])
        if mismatch is None and ref.shape != got.shape:
            mismatch = f"{got.size} values differ from the reference's {ref.size}"
        if mismatch is not None:
            per_output[name] = {
                "max_abs_error": float("inf"),
                "mean_abs_error": float("inf"),
                "cosine": 0.0,
                "note": mismatch,
            }
            continue
        diff = np.abs(ref - got)
        per_output[name] = {
            "max_abs_error": float(diff.max()) if diff.size else 0.0,
            "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
            "cosine": _cosine(ref, got),
        }
        top1 = (
            None
            if EMBEDDING.search(name)
            else top1_agreement(
                [r[name] for r in reference], [c[name] for c in candidate], near_tie=NEAR_TIE if generated else 0.0
            )
        )
        if top1 is not None:
            per_output[name]["top1_agreement"], near_ties = top1
            if near_ties:
                per_output[name]["top1_near_ties"] = near_ties
    figures = {
        "max_abs_error": max(o["max_abs_error"] for o in per_output.values()),
        "mean_abs_error": max(o["mean_abs_error"] for o in per_output.values()),
        "cosine": min(o["cosine"] for o in per_output.values()),
        "outputs": per_output,
    }
    agreements = [o["top1_agreement"] for o in per_output.values() if "top1_agreement" in o]
    if agreements:
        figures["top1_agreement"] = min(agreements)
    near_ties = sum(o.get("top1_near_ties", 0) for o in per_output.values())
    if near_ties:
        figures["top1_near_ties"] = near_ties
    return figures


def _shape_mismatch(reference: list[Any], candidate: list[Any]) -> str | None:
    """How a tensor output's shape differs from the reference's in the first sample set where it does
    (the same numbers in another shape, a rank-0 output come back as [1], are still wrong), or None."""
    for index, (ref, got) in enumerate(zip(reference, candidate)):
        if isinstance(ref, np.ndarray) and isinstance(got, np.ndarray) and ref.shape != got.shape:
            where = f" (sample set {index})" if len(reference) > 1 else ""
            return f"shape {list(got.shape)} differs from the reference's {list(ref.shape)}{where}"
    return None


def error_histograms(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]) -> dict[str, dict]:
    """Per output, how many of its values over all sample sets are off by how much (bins of ``ERROR_EDGES``);
    outputs whose shape differs from the reference's have none."""
    found = {}
    for name in reference[0]:
        ref = np.concatenate([as_numbers(r[name]) for r in reference])
        got = np.concatenate([as_numbers(c[name]) for c in candidate])
        if ref.shape != got.shape or _shape_mismatch([r[name] for r in reference], [c[name] for c in candidate]):
            continue
        diff = np.abs(ref - got)
        diff[~np.isfinite(diff)] = np.inf
        counts = np.bincount(np.searchsorted(ERROR_EDGES, diff, side="right") - 1, minlength=len(ERROR_EDGES))
        found[name] = {"edges": ERROR_EDGES, "counts": [int(c) for c in counts]}
    return found


def top1_agreement(
    reference: list[np.ndarray], candidate: list[np.ndarray], *, near_tie: float = 0.0
) -> tuple[float, int] | None:
    """Share of rows with the same arg-max, and how many of those agree only as near-ties (the reference's
    scores at both arg-maxes within ``near_tie`` of the reference's range), or None when the output is not
    classifier-shaped (rank 2, float, at least two classes)."""
    if not reference or any(not isinstance(r, np.ndarray) or r.ndim != 2 for r in reference + candidate):
        return None
    if len({r.shape[1] for r in reference + candidate}) > 1:  # classes that vary with the input: no classifier
        return None
    ref = np.concatenate([np.asarray(r) for r in reference])
    got = np.concatenate([np.asarray(c) for c in candidate])
    if ref.shape != got.shape or ref.shape[1] < 2 or not ref.shape[0] or not np.issubdtype(ref.dtype, np.floating):
        return None
    rows = np.arange(ref.shape[0])
    best, picked = ref.argmax(axis=1), got.argmax(axis=1)
    same = best == picked
    if near_tie > 0:
        span = float(np.nanmax(ref) - np.nanmin(ref)) if np.isfinite(ref).any() else 0.0
        ties = ~same & (ref[rows, best] - ref[rows, picked] <= near_tie * span)
        return float(np.mean(same | ties)), int(ties.sum())
    return float(np.mean(same)), 0


def top1_phrase(figures: dict[str, Any]) -> str:
    """``", top-1 98.4%"`` for a summary line, with the near-ties it counted; empty without a top-1 figure."""
    if "top1_agreement" not in figures:
        return ""
    ties = figures.get("top1_near_ties", 0)
    counted = f" ({ties} near-tie{'s' if ties > 1 else ''} of generated inputs counted as agreeing)" if ties else ""
    return f", top-1 {figures['top1_agreement']:.1%}{counted}"


def check(
    figures: dict[str, Any],
    *,
    min_cosine: float,
    min_top1_agreement: float | None = None,
    max_abs_error: float | None = None,
) -> list[str]:
    """Each missed tolerance as a phrase saying by how much; empty when every one is met."""
    misses = []
    if figures["cosine"] < min_cosine:
        misses.append(
            f"cosine {figures['cosine']:.6f} is {min_cosine - figures['cosine']:.2g} below the required {min_cosine:g}"
        )
    agreement = figures.get("top1_agreement")
    if agreement is not None and min_top1_agreement is not None and agreement < min_top1_agreement:
        misses.append(
            f"top-1 agreement {agreement:.1%} is {100 * (min_top1_agreement - agreement):.1f} points below "
            f"the required {min_top1_agreement:.1%}"
        )
    if max_abs_error is not None and figures["max_abs_error"] > max_abs_error:
        misses.append(
            f"max abs error {figures['max_abs_error']:.4g} is {figures['max_abs_error'] / max_abs_error:.1f}x "
            f"the allowed {max_abs_error:g}"
        )
    misses += [f"output {name!r}: {o['note']}" for name, o in figures.get("outputs", {}).items() if "note" in o]
    return misses


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return 0.0
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))
