"""FP16: weights and compute in FP16, float32 inputs and outputs kept (onnxconverter-common)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .base import QUANTIZED_OPS, Recipe, Variant

__all__ = ["Fp16", "Fp16Settings", "fp16_model", "save"]


@dataclass(frozen=True)
class Fp16Settings:
    """Weights and compute in FP16, float32 inputs and outputs kept (onnxconverter-common)."""

    exclude_op_types: list[str] = field(default_factory=list)
    """Op types kept in FP32 (a Cast is put around them)."""


class Fp16(Recipe):
    name = "fp16"
    description = "FP16"
    precision = "fp16"
    settings = Fp16Settings
    flags = ("--validation",)
    variants = {"fp16": Variant("FP16 (float32 I/O)")}
    marked_ops = QUANTIZED_OPS | {"Cast"}

    def apply(
        self, prepared, out, settings: Fp16Settings, *, calibration, excluded, external, calibration_method, target
    ) -> None:
        import onnx

        save(fp16_model(onnx.load_model(prepared), settings, excluded), out, external=external)

    def what_to_try(self, options, settings) -> list[str]:
        return ["exclude op types in quantization.fp16.exclude_op_types (kept in FP32)"]


def fp16_model(model, settings: Fp16Settings, excluded: list[str]):
    """The FP16 model with float32 inputs and outputs (also the first step of q4f16)."""
    from onnxconverter_common import float16

    # quant_pre_process already ran shape inference on the file: the converter's own in-memory
    # inference would serialize the whole model, which fails over 2 GiB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per clipped constant, e.g. -10000.0 in attention masks
        model = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            disable_shape_infer=True,
            op_block_list=sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(settings.exclude_op_types)),
            node_block_list=excluded or None,
        )
    _align_casts(model)
    return model


def save(model, out: Path, *, external: bool) -> None:
    """``out``, with its weights in ``out.data`` (readable by all, as every bundle file) when ``external``."""
    import onnx

    if external:
        onnx.save_model(
            model,
            out,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=out.name + ".data",
            size_threshold=1024,
        )
        os.chmod(out.with_name(out.name + ".data"), 0o644)
    else:
        onnx.save_model(model, out)


def _align_casts(model) -> None:
    """onnxconverter-common turns a Cast-to-float's output into float16 in value_info but leaves the node's
    ``to`` at float, which onnxruntime refuses to load: make each Cast produce the type its output declares."""
    import onnx

    from ..onnxio.modelinfo import iter_nodes

    declared = {vi.name: vi.type.tensor_type.elem_type for vi in [*model.graph.value_info, *model.graph.output]}
    for node in iter_nodes(model):
        if node.op_type != "Cast" or node.output[0] not in declared:
            continue
        for attr in node.attribute:
            if (
                attr.name == "to"
                and attr.i == onnx.TensorProto.FLOAT
                and declared[node.output[0]] == onnx.TensorProto.FLOAT16
            ):
                attr.i = onnx.TensorProto.FLOAT16
