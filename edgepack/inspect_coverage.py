"""``edgepack inspect MODEL --target T``: the target accelerator's coverage of a model, without packaging it.

The same measurement and shape rules as the pipeline's fix_shapes and coverage stages; the gate is
shown, not enforced.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

from .coverage import format_report, measure
from .profiles import load_profile
from .stages.fix_shapes import apply_shapes, plan_shapes

__all__ = ["coverage_for_target"]


def coverage_for_target(
    model: Path, target: str, input_shapes: dict[str, tuple[int, ...]], fixed_dims: dict[str, int]
) -> dict[str, Any]:
    profile = load_profile(target)
    settings = profile.coverage
    result: dict[str, Any] = {"target": profile.name, "checker": settings.checker}
    if settings.checker == "none":
        result["lines"] = ["no accelerator to check (coverage.checker: none): the target runs on the CPU"]
        return result
    before = measure(model, settings)
    after, shapes, assumed = before, None, list[str]()
    if profile.shapes.fixed:
        proto = onnx.load_model(model, load_external_data=False)
        shapes, assumed = plan_shapes(proto, input_shapes, fixed_dims, profile.shapes.defaults, where=str(model))
        with tempfile.TemporaryDirectory(prefix="edgepack-inspect-") as tmp:
            after = measure(apply_shapes(proto, model, Path(tmp), shapes), settings)
    lines = format_report(before, after, fixed_shapes=profile.shapes.fixed)
    if shapes:
        lines.append(
            "fixed shapes: "
            + ", ".join(f"{n}={'x'.join(map(str, d))}" for n, d in shapes.items())
            + (f" ({', '.join(assumed)} set to 1, taken as the batch dim)" if assumed else "")
        )
    gate = f"gate: at least {settings.min_accelerated_fraction:.0%} of nodes" + (
        f", at most {settings.max_partitions} partition(s)" if settings.max_partitions is not None else ""
    )
    passed = after.fraction >= settings.min_accelerated_fraction and (
        settings.max_partitions is None or after.partitions <= settings.max_partitions
    )
    lines.append(f"{gate}: {'passes' if passed else 'MISSED'}")
    result.update(
        {
            "before": before.to_dict(),
            "after": after.to_dict(),
            "input_shapes": {n: list(d) for n, d in shapes.items()} if shapes else None,
            "assumed_batch_dims": assumed,
            "gate_passed": passed,
            "lines": lines,
        }
    )
    return result
