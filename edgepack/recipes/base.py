"""The recipe interface: what a quantization recipe declares and the one thing it does.

A recipe is a small object: its ``name`` (what ``--quantize`` and a profile's ``quantization.default``
say), the ``precision`` of the model it writes, its ``settings`` (the dataclass of its section in a
profile's ``quantization``, None when it has none), the options it reads, its ``--tune`` variants, and
``apply`` (write the quantized model from the pre-processed one). Everything around it (pre-processing,
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

__all__ = ["Recipe", "Variant", "QUANTIZED_OPS"]

QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul",
    "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "MatMulNBits", "DynamicQuantizeMatMul",
    "QAttention", "QGemm", "DynamicQuantizeLSTM", "QEmbedLayerNormalization"})
"""Op types that carry quantized data: what ``already_quantized`` looks for and the report counts."""


@dataclass(frozen=True)
class Variant:
    """A ``--tune`` candidate: the recipe with some of its profile settings replaced."""

    description: str
    overrides: dict[str, Any] = field(default_factory=dict)


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
    """Whether ``--auto-exclude`` can leave its most sensitive nodes in float."""
    variants: ClassVar[dict[str, Variant]] = {}
    marked_ops: ClassVar[frozenset[str]] = QUANTIZED_OPS
    """Op types of the written model the report counts."""

    def apply(self, prepared: Path, out: Path, settings: Any, *, calibration: list[dict[str, np.ndarray]] | None,
              excluded: list[str], external: bool, calibration_method: str | None) -> None:
        """Write the quantized model to ``out`` (external data beside it when ``external``)."""
        raise NotImplementedError(f"recipe {self.name} writes no model")

    def what_to_try(self, options: Options) -> list[str]:
        """What to try when its model misses the accuracy gate."""
        return []
