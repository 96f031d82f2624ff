"""Quantization recipes, registered once: profiles, the CLI's ``--quantize`` choices, ``--tune`` candidates
and the manifest read this registry. A new recipe is a module here (a ``Recipe``, edgepack/recipes/base.py)
and its line below, plus profile data."""

from __future__ import annotations

from .base import Recipe, Variant
from .dynamic import Dynamic
from .fp16 import Fp16
from .fp32 import Fp32
from .int4 import Int4, Q4f16
from .static import Static

__all__ = ["RECIPES", "recipe", "variants", "Recipe", "Variant"]

RECIPES: dict[str, Recipe] = {r.name: r for r in (Fp32(), Static(), Dynamic(), Fp16(), Int4(), Q4f16())}
"""In this order in the CLI's help; recipes with settings in this order in a profile's ``quantization``."""


def recipe(name: str) -> Recipe:
    return RECIPES[name]


def variants() -> dict[str, tuple[Recipe, Variant]]:
    """Every ``--tune`` candidate by name, with its recipe."""
    return {name: (r, v) for r in RECIPES.values() for name, v in r.variants.items()}
