"""The stages a target's bundle goes through, in order: read this list top to bottom.

    load (once, for every target: edgepack/stages/load.py), then per target:
    check -> fix_shapes -> optimize -> quantize -> coverage -> convert -> bundle -> manifest -> self_test -> budget

A stage that does not apply to a profile (``applies``) still records why in the manifest.
"""

from __future__ import annotations

from ..profiles import Profile
from ..stages.budget import Budget
from ..stages.bundle import Bundle
from ..stages.check import Check
from ..stages.convert import Convert
from ..stages.coverage import Coverage
from ..stages.fix_shapes import FixShapes
from ..stages.manifest import Manifest
from ..stages.optimize import Optimize
from ..stages.quantize import Quantize
from ..stages.selftest import SelfTest
from .job import Options
from .stage import Stage

__all__ = ["plan"]


def plan(profile: Profile, options: Options) -> list[Stage]:
    return [
        Check(),
        FixShapes(),  # fixed shapes before the graph is optimized
        Optimize(),
        Quantize(tune=options.tune),  # --tune: a search over recipes, which converts its candidates
        Coverage(),  # of the model as it will be converted
        Convert(),
        Bundle(),
        Manifest(),
        SelfTest(),
        Budget(),
    ]
