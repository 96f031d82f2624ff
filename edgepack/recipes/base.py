"""The recipe interface: what a quantization recipe declares and the one thing it does.

A recipe is a small object: its ``name`` (what ``--quantize`` and a profile's ``quantization.default``
say), the ``precision`` of the model it writes, its ``settings`` (the dataclass of its section in a
profile's ``quantization``, None when it has none), the options it reads, its ``--tune`` variants, and
``apply`` (write the quantized model from the pre-processed one), and the ``com.microsoft`` kernels that
model needs (``kernels``: each target's backend says before any work whether its runtime has them,
edgepack/recipes/kernels.py). Everything around it (pre-processing,
the accuracy gate, auto-exclude, reporting) is the same for every recipe (edgepack/recipes/quantize.py,
edgepack/stages/quantize.py).

Recipe modules import nothing heavy at module level: the CLI reads the registry to list its choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np

    from ..pipeline.job import Options
    from ..profiles import Profile

__all__ = ["Recipe", "Variant", "Kernel", "QUANTIZED_OPS", "TIE"]

TIE = 0.03
"""--tune: candidates this much slower than the fastest count as equally fast (the smallest ships). Here, not in
recipes/search.py, so the build report reads it without importing onnx."""

QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLinear",
        "MatMulNBits",
        "GatherBlockQuantized",
        "DynamicQuantizeMatMul",
        "QAttention",
        "QGemm",
        "DynamicQuantizeLSTM",
        "QEmbedLayerNormalization",
    }
)
"""Op types that carry quantized data: what ``already_quantized`` looks for and the report counts."""


@dataclass(frozen=True)
class Variant:
    """A ``--tune`` candidate: the recipe with some of its profile settings replaced."""

    description: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Kernel:
    """A ``com.microsoft`` operator a recipe writes, on inputs of the ``activation`` type."""

    op: str
    activation: str
    required: bool = True
    """False: where the target's runtime lacks it, the recipe writes its model without it (and says so)."""


class Recipe:
    name: ClassVar[str]
    description: ClassVar[str]
    precision: ClassVar[str]
    """Of the model it writes: 'fp32', 'int8', 'fp16'."""
    settings: ClassVar[type | None] = None
    needs_calibration: ClassVar[bool] = False
    flags: ClassVar[tuple[str, ...]] = ()
    """The command-line options it reads (the others are reported as unused)."""
    auto_exclude: ClassVar[bool] = False
    """Whether ``--auto-exclude`` can take its most sensitive nodes out of it (``rank_sensitive``)."""
    kept_as: ClassVar[str] = "in float"
    """Where ``--auto-exclude`` keeps the nodes it takes out, for messages."""
    sensitivity_figure: ClassVar[str] = "sqnr_db"
    """What ``rank_sensitive`` ranks by, for the report."""
    variants: ClassVar[dict[str, Variant]] = {}
    marked_ops: ClassVar[frozenset[str]] = QUANTIZED_OPS
    """Op types of the written model the report counts."""
    preprocess: ClassVar[bool] = True
    """Whether it starts from onnxruntime's quantization pre-processing (edgepack/recipes/quantize.py, rule 1)."""

    def skips_preprocess(self, source: Path) -> str | None:
        """Why it does not pre-process ``source`` (for the report; its ``apply`` names the nodes in memory then),
        or None when it does."""
        return None if self.preprocess else "none (weight-only: nodes named in memory)"

    def apply(
        self,
        prepared: Path,
        out: Path,
        settings: Any,
        *,
        calibration: list[dict[str, np.ndarray]] | None,
        excluded: list[str],
        external: bool,
        calibration_method: str | None,
        target: Profile | None,
    ) -> dict[str, Any] | None:
        """Write the quantized model to ``out`` (external data beside it when ``external``); return notes for
        the report (what was left in float, and why), if any. ``target``: the profile it is written for."""
        raise NotImplementedError(f"recipe {self.name} writes no model")

    def kernels(self, settings: Any) -> tuple[Kernel, ...]:
        """The ``com.microsoft`` operators its model holds with these settings, beyond onnxruntime's usual ones."""
        return ()

    def check(self, settings: Any) -> tuple[str, str] | None:
        """The settings key that is wrong beyond its type, and what is wrong with it; None: nothing."""
        return None

    def what_to_try(self, options: Options, settings: Any) -> list[str]:
        """What to try when its model misses the accuracy gate."""
        return []

    def rank_sensitive(
        self,
        prepared: Path,
        quantized: Path,
        feeds: list[dict[str, np.ndarray]],
        workdir: Path,
        settings: Any,
        profile: Profile,
    ) -> list[tuple[str, float]]:
        """The nodes of the float model ``prepared`` that ``--auto-exclude`` may take out of the recipe, most
        harmful first, with the figure they are ranked by; ``quantized``: its model with every node in. At
        most the profile's ``quantization.max_auto_exclude``."""
        from .quantize import rank_sensitive_nodes

        ranking = rank_sensitive_nodes(prepared, quantized, feeds, workdir)
        return ranking[: profile.quantization.max_auto_exclude]
