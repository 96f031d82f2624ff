"""Whether a target's runtime has the kernels a recipe writes, asked before any work.

Rules:
1. A recipe declares the ``com.microsoft`` operators its model holds (``Recipe.kernels``); the backend of
   the target's accelerator (the one its ``coverage.checker`` measures, else the CPU) says for each whether
   its runtime has it (``Backend.kernel_gap``: the CPU from onnxruntime's kernel registry and the first
   release that has it, an accelerator from its operator table).
2. A missing required kernel refuses the recipe for that target before anything is read or written,
   naming the op and the runtime version that has it; the run's other targets are packaged
   (``unsupported_targets``; a multi-model bundle, whose every target holds every model, and a build file's
   model are refused whole: ``refuse_unsupported``). The recipe that would run is ``--quantize``, else the
   profile's default (its ``without_calibration`` fallback when no calibration data is given), which
   ``--tune`` runs too where it cannot time; where it can, it leaves such candidates out itself and says
   why. A missing optional kernel is the recipe's to handle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..backends import accelerator_of
from ..errors import CompatibilityError
from . import RECIPES

if TYPE_CHECKING:
    from ..pipeline.job import Options
    from ..profiles import Profile

__all__ = ["kernel_gaps", "required_gaps", "refuse_unsupported", "unsupported_targets"]


def kernel_gaps(profile: Profile, recipe: str, settings: Any = None) -> dict[str, str]:
    """{op: why the profile's runtime cannot run it} for the kernels ``recipe`` writes with ``settings``
    (the profile's when None); empty: all there."""
    settings = settings if settings is not None else profile.quantization.settings(recipe)
    backend = accelerator_of(profile)
    gaps = {}
    for kernel in RECIPES[recipe].kernels(settings):
        reason = backend.kernel_gap(profile, kernel.op, kernel.activation)
        if reason:
            gaps[kernel.op] = reason
    return gaps


def required_gaps(profile: Profile, recipe: str) -> dict[str, str]:
    """The gaps of ``kernel_gaps`` that refuse the recipe (rule 2)."""
    required = {k.op for k in RECIPES[recipe].kernels(profile.quantization.settings(recipe)) if k.required}
    return {op: why for op, why in kernel_gaps(profile, recipe).items() if op in required}


def refuse_unsupported(profiles: list[Profile], options: Options) -> None:
    """CompatibilityError when a target's runtime lacks a required kernel of the recipe it would run."""
    refused = _refused(profiles, options)
    if refused:
        listed = "; ".join(f"{name} ({recipe}): {why}" for name, (recipe, why) in refused.items())
        blocked = [p for p in profiles if p.name in refused]
        others = [
            n
            for n in RECIPES
            if n not in {r for r, _ in refused.values()} and not any(required_gaps(p, n) for p in blocked)
        ]
        raise CompatibilityError(
            f"the recipe writes operators these targets' runtimes have no kernel for: {listed}",
            hint=f"package these targets with another recipe (--quantize {', '.join(others)}), "
            "or leave them out of --target",
        )


def unsupported_targets(profiles: list[Profile], options: Options) -> dict[str, CompatibilityError]:
    """Rule 2 per target: the refusal of each target whose runtime lacks a required kernel of the recipe it
    would run (the others are packaged: one target's missing kernel does not stop them)."""
    by_name = {p.name: p for p in profiles}
    return {
        name: CompatibilityError(
            f"the {recipe} recipe writes operators this target's runtime has no kernel for: {why}",
            hint="package this target with another recipe (--quantize "
            + ", ".join(n for n in RECIPES if n != recipe and not required_gaps(by_name[name], n))
            + "), or leave it out of --target",
        )
        for name, (recipe, why) in _refused(profiles, options).items()
    }


def _refused(profiles: list[Profile], options: Options) -> dict[str, tuple[str, str]]:
    """{target: (the recipe it would run, why its runtime cannot)} for the targets rule 2 refuses."""
    refused = {}
    for profile in profiles:
        recipe = _would_run(profile, options)
        gaps = required_gaps(profile, recipe) if recipe else {}
        if recipe and gaps:
            refused[profile.name] = (recipe, "; ".join(gaps.values()))
    return refused


def _would_run(profile: Profile, options: Options) -> str | None:
    if options.tune:
        from .search import host_arch  # imports onnx: only when tuning

        if profile.device.arch == host_arch():
            return None  # the search chooses among the candidates whose kernels are there
    settings = profile.quantization
    recipe = options.quantize or settings.default
    if not options.quantize and RECIPES[recipe].needs_calibration and not options.calibration:
        return None if settings.without_calibration == "refuse" else settings.without_calibration
    return recipe
