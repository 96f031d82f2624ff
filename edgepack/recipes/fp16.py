"""FP16: weights and compute in FP16, float32 inputs and outputs kept (onnxconverter-common)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .base import QUANTIZED_OPS, Recipe, Variant

__all__ = ["Fp16", "Fp16Settings", "fp16_model", "fp16_ops", "save", "SEQUENCE_OPS"]

SEQUENCE_OPS = frozenset(
    {
        "SequenceConstruct",
        "SequenceInsert",
        "SequenceAt",
        "SequenceErase",
        "SequenceLength",
        "SequenceEmpty",
        "SequenceMap",
        "SplitToSequence",
        "ConcatFromSequence",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
    }
)
"""Ops taking or giving sequences or optionals: onnxconverter-common converts tensor types only (a sequence of
float stays declared float while its elements turn float16, which onnxruntime refuses), so these ops are kept
in FP32, with a Cast put around them."""


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
    """The FP16 model with float32 inputs and outputs (also the first step of q4f16): onnxconverter-common's
    conversion, with the model prepared for what it gets wrong (unnamed nodes, outputs that are read or that a
    kept-FP32 op writes) and the declared output types restored after it; unchanged when it would convert no op.

    A model that already holds float16 tensors (a float16 input, float16 weights beside float32 ones) is
    converted too: what is float32 turns float16, the rest stays (the converter refuses such a model unless
    told; the accuracy gate then judges the result like any other)."""
    from onnxconverter_common import float16

    from ..onnxio.modelinfo import iter_nodes

    declared = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    blocked = set(float16.DEFAULT_OP_BLOCK_LIST) | SEQUENCE_OPS | set(settings.exclude_op_types)
    if not any(_converts(node, blocked, set(excluded)) for node in iter_nodes(model)):
        return model  # every op is kept in FP32 (a tree ensemble): nothing to convert (quantize rule 7 says so)
    _name_nodes(model)
    _route_outputs(model, blocked, set(excluded))
    # quant_pre_process already ran shape inference on the file: the converter's own in-memory
    # inference would serialize the whole model, which fails over 2 GiB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per clipped constant, e.g. -10000.0 in attention masks
        model = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            disable_shape_infer=True,
            op_block_list=sorted(blocked),
            node_block_list=excluded or None,
            check_fp16_ready=False,
        )
    _align_casts(model)
    _restore_output_types(model, declared)
    return model


def fp16_ops(proto) -> int:
    """How many nodes, Casts and Identities aside, read or write a float16 tensor (as typed by the model's
    value infos, initializers, Constants and Casts to float16): 0 when an FP16 conversion converted nothing."""
    import onnx

    from ..onnxio.modelinfo import iter_graphs

    half = onnx.TensorProto.FLOAT16
    count = 0
    for graph in iter_graphs(proto.graph):
        typed = {
            vi.name for vi in [*graph.input, *graph.output, *graph.value_info] if vi.type.tensor_type.elem_type == half
        }
        typed |= {t.name for t in graph.initializer if t.data_type == half}
        for node in graph.node:
            if node.op_type == "Constant" and any(a.name == "value" and a.t.data_type == half for a in node.attribute):
                typed.update(node.output)
            if node.op_type == "Cast" and any(a.name == "to" and a.i == half for a in node.attribute):
                typed.update(node.output)
        count += sum(
            1
            for node in graph.node
            if node.op_type not in ("Cast", "Constant", "Identity") and typed & {*node.input, *node.output}
        )
    return count


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


_PASSIVE = frozenset({"Identity", "Cast", "Shape", "Size", "Constant"})


def _converts(node, blocked_ops: set[str], blocked_nodes: set[str]) -> bool:
    """Whether the converter would run ``node`` in FP16: an op it does not keep in FP32 (ai.onnx.ml ops
    take float32 only) and that computes (not a Cast, Identity or shape query)."""
    kept = node.op_type in blocked_ops or node.name in blocked_nodes or node.domain == "ai.onnx.ml"
    return not kept and node.op_type not in _PASSIVE


def _name_nodes(model) -> None:
    """A unique name for every unnamed node: the converter keys its Casts by node name (the Casts it adds are
    named after the nodes they feed), so unnamed nodes collide ("The downstream node of the second cast node
    should be graph output") or give two Casts one output."""
    from ..onnxio.modelinfo import iter_nodes

    nodes = list(iter_nodes(model))
    taken = {n.name for n in nodes}
    for index, node in enumerate(nodes):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _route_outputs(model, blocked_ops: set[str], blocked_nodes: set[str]) -> None:
    """Give a float graph output an Identity of its own when nodes also read it (here or in a subgraph) or when
    a node kept in FP32 writes it.

    With float32 outputs kept, the converter renames such an output's producer to a float16 tensor and casts
    it back to float32 under the output's name. Readers keep reading the float32 name, so their own outputs,
    declared float16, come out float32 and onnxruntime refuses the model. A producer kept in FP32 gets a Cast
    to float16 and one back, a pair the converter then fails to remove ("The downstream node of the second
    cast node should be graph output"). Here the producer writes ``<name>.fp16_inner``, the readers read
    that, and an Identity copies it to the output, which nothing else reads."""
    import onnx

    from ..onnxio.modelinfo import iter_nodes

    graph = model.graph
    floats = {o.name for o in graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    read = {name for node in iter_nodes(model) for name in node.input}
    routed = {}
    for node in graph.node:
        kept = node.op_type in blocked_ops or node.name in blocked_nodes
        for name in node.output:
            if name in floats and (name in read or kept):
                routed[name] = f"{name}.fp16_inner"
    _rename_inner(model, routed)
    for name, inner in routed.items():
        graph.node.append(onnx.helper.make_node("Identity", [inner], [name], name=f"{name}.fp16_output"))


def _rename_inner(model, renames: dict[str, str]) -> None:
    """Graph outputs' tensors renamed inside the model (their producers, their readers here and in subgraphs,
    their value infos), so that a node added after can write the output under its own name."""
    from ..onnxio.modelinfo import iter_nodes

    if not renames:
        return
    graph = model.graph
    for node in iter_nodes(model):
        node.input[:] = [renames.get(name, name) for name in node.input]
    for node in graph.node:
        node.output[:] = [renames.get(name, name) for name in node.output]
    for info in graph.value_info:
        info.name = renames.get(info.name, info.name)


def _restore_output_types(model, declared: dict[str, int]) -> None:
    """onnxconverter-common declares a float32 output float16 when the op producing it is kept in FP32 (a
    TreeEnsemble): such an output gets a Cast back to float32, as the recipe promises float32 outputs."""
    import onnx

    graph = model.graph
    for output in graph.output:
        was = declared.get(output.name)
        if was is None or output.type.tensor_type.elem_type == was:
            continue
        inner = f"{output.name}.fp16_cast"
        _rename_inner(model, {output.name: inner})
        graph.node.append(
            onnx.helper.make_node("Cast", [inner], [output.name], to=was, name=f"{output.name}.as_declared")
        )
        output.type.tensor_type.elem_type = was


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
