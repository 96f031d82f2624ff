"""Inputs edgepack makes up for a model (self-test, validation, random calibration), fitted to what the model tells.

Rules:
1. Each dynamic dim gets a size from its role, read from its name and its place: batch 1; height and
   width (named so, or dims 2-3 of an image-like rank-4 input) multiples of 32 (text and object
   detectors downsample 5 times: 8x8 fails their residual Add); audio sample counts 512 and up (a
   spectrogram front end reflect-pads more than 8 samples; 512 is one silero frame at 16 kHz);
   sequence length 16; channels 3. A dim named in two inputs gets one size. An unnamed dim after a
   fixed first dim is taken as a batch dim (a recurrent state [2, batch, 128]).
2. Integer inputs read by a Gather (an embedding table) stay below the table's size on that axis; a
   scalar integer named like a rate (``sr``, ``sample_rate``) is 16000, then 8000; the shape of an
   Expand, the repeats of a Tile and the shape of a ConstantOfShape are ones, TopK's k is 1, a Reshape's
   target shape is zeros then -1 (copy the leading dims, fold the rest: always valid where random integers
   are not); masks are ones, booleans True, token type ids 0 or 1, other integers in [0, 16).
3. Candidates go from small to large (``LADDER``); the first one the FP32 reference runs on is used, and
   every try is recorded. Where random integers are drawn, a candidate must run on every set the
   self-test and the checked steps draw (``CHECKED_DRAWS``), not just the first. When none runs, the
   error says so, with the last try's shapes and the node that refused it: edgepack's inputs are at
   fault there, never the user's model.
4. Sizes the user gives win: ``--self-test-shape NAME=D0,D1,...`` (any target), then ``--input-shape``
   and ``--fix-dim`` (the app's sizes). Real inputs (``--sample-inputs``) bypass all of this.
5. Non-tensor inputs: a sequence of tensors gets two tensors of its element type; a map (an ai.onnx.ml
   DictVectorizer's input) gets the keys of the vocabulary that reads it, else 0..3.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .checked import quiet_session, work_paths_out
from .errors import ConversionError, UsageError, first_line
from .onnxio.modelinfo import format_shape, iter_graphs
from .samples import check_budget

__all__ = ["InputPlan", "fit_inputs", "plan_for", "is_batch_dim", "dim_role", "LADDER", "node_of_error"]

LADDER = [
    {"spatial": 64, "samples": 512, "sequence": 16, "other": 8, "rate": 16000},
    {"spatial": 224, "samples": 16000, "sequence": 64, "other": 1, "rate": 16000},
    {"spatial": 640, "samples": 16000, "sequence": 128, "other": 32, "rate": 8000},
    # audio under another name: silero VAD declares [batch, ?] or [batch, sequence] and needs over 128 samples
    {"spatial": 640, "samples": 16000, "sequence": 512, "other": 512, "rate": 16000},
]
"""Sizes per dim role, one candidate per row, tried in order (rule 3)."""
CHECKED_DRAWS = ((0, 3), (5, 1))
"""(seed, count) of the sets the self-test and the checked steps generate (rule 3)."""

_RATE = re.compile(r"(^|_)(sr|rate|sample_?rate|sampling_?rate)$")
_SPATIAL = re.compile(r"(^|_)(h|w|height|width|img_?h|img_?w|image_?height|image_?width)$")
_SAMPLES = re.compile(r"sample|audio|wav|pcm|signal|speech|waveform|num_samples")
_SEQUENCE = re.compile(r"seq|sequence|token|length|len|time|step|frames|words|chars|text")
_BATCH = re.compile(r"batch|^n$|^b$|^bs$")
_FIXED_ROLES = {"batch": 1, "channels": 3}


@dataclass(frozen=True)
class InputPlan:
    """How to make input sets for one model: a shape per input, value rules, and how it was found."""

    specs: list[dict[str, Any]]
    shapes: dict[str, tuple[int, ...]]
    rules: dict[str, tuple[str, Any]]
    """Per input: ("normal", None), ("ints", (low, high)), ("fill", value), ("reshape", None), ("sequence",
    (elem dtype, shape)), ("map", (keys, value dtype))."""
    tries: list[dict[str, Any]] = field(default_factory=list)
    """Every candidate tried, in order: shapes, and the error of those that failed."""

    def generate(self, *, seed: int, count: int) -> list[dict[str, Any]]:
        check_budget(
            {
                s["name"]: (self.shapes[s["name"]], s["dtype"])
                for s in self.specs
                if self.rules[s["name"]][0] not in ("sequence", "map")
            },
            count,
        )
        rng = np.random.default_rng(seed)
        return [{spec["name"]: self._value(spec, rng) for spec in self.specs} for _ in range(count)]

    def _value(self, spec: dict[str, Any], rng: np.random.Generator) -> Any:
        kind, arg = self.rules[spec["name"]]
        shape = self.shapes[spec["name"]]
        if kind == "sequence":
            dtype, elem_shape = arg
            return [_tensor(np.dtype(dtype), elem_shape, "normal", None, rng) for _ in range(2)]
        if kind == "map":
            keys, dtype = arg
            return {key: _tensor(np.dtype(dtype), (), "normal", None, rng).item() for key in keys}
        return _tensor(np.dtype(spec["dtype"]), shape, kind, arg, rng)

    def report(self) -> dict[str, Any]:
        """For the manifest: the shapes used, the values of inputs that are not drawn freely (ids below an
        embedding's size, a fill, a Reshape target), and the candidates tried before. The bundle's web page
        makes its sample input from the first two."""
        values: dict[str, Any] = {}
        for name, (kind, arg) in self.rules.items():
            if kind == "ints":
                values[name] = {"ints": [int(arg[0]), int(arg[1])]}
            elif kind == "fill":
                values[name] = {"fill": arg.item() if hasattr(arg, "item") else arg}
            elif kind == "reshape":
                values[name] = {"reshape": True}
        found = {"input_shapes": {name: list(dims) for name, dims in self.shapes.items()}, "tries": self.tries}
        return {**found, "input_values": values} if values else found


def _draws_integers(specs: list[dict[str, Any]], rules: dict[str, tuple[str, Any]]) -> bool:
    """Whether some input gets integers in [0, 16) for no known use, whose values (not only their shapes) may
    decide whether the model runs; bounded ones (an embedding's ids) are valid by construction."""
    return any(rules[spec["name"]][0] == "normal" and _is_integer(spec["dtype"]) for spec in specs)


def _is_integer(dtype: Any) -> bool:
    try:
        return np.dtype(dtype).kind in "iu"
    except TypeError:
        return False


def _tensor(dtype: np.dtype, shape: tuple[int, ...], kind: str, arg: Any, rng: np.random.Generator) -> np.ndarray:
    if kind == "fill":
        return np.full(shape, arg, dtype=dtype)
    if kind == "reshape":  # [0, ..., 0, -1]: the leading dims copied, the rest folded into the last
        values = np.zeros(shape, dtype=dtype)
        if values.size:
            values.reshape(-1)[-1] = -1
        return values
    if dtype == np.bool_:
        return np.ones(shape, dtype=dtype)
    if np.issubdtype(dtype, np.integer):
        low, high = arg if kind == "ints" else (0, 16)
        return rng.integers(low, high, size=shape).astype(dtype)
    if dtype.kind in "US":
        return np.array(rng.choice(["a", "b", "c"], size=shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


_CACHE: dict[str, InputPlan] = {}


def fit_inputs(
    model: Path,
    specs: list[dict[str, Any]],
    *,
    given: dict[str, tuple[int, ...]] | None = None,
    named: dict[str, int] | None = None,
    shown: str | None = None,
) -> InputPlan:
    """The first candidate (rules 1-4) on which ``model`` runs in onnxruntime; cached per model, specs and sizes.

    ``given``: whole shapes per input name; ``named``: sizes of named dims; ``shown``: the model's name in
    errors (the user's file, not edgepack's working copy of it)."""
    key = repr((str(model), specs, sorted((given or {}).items()), sorted((named or {}).items())))
    if key in _CACHE:
        return _CACHE[key]
    proto = onnx.load_model(model, load_external_data=False)
    rules = _value_rules(proto, specs)
    shown = shown or model.name
    run = _session_runner(model, shown)
    tries: list[dict[str, Any]] = []
    seen = set()
    for level in LADDER:
        shapes = _shapes(specs, level, given or {}, named or {})
        level_rules = {
            name: (("fill", level["rate"]) if rule == ("rate", None) else rule) for name, rule in rules.items()
        }
        if repr((shapes, level_rules)) in seen:
            continue
        seen.add(repr((shapes, level_rules)))
        plan = InputPlan(specs, shapes, level_rules)
        draws = CHECKED_DRAWS if _draws_integers(specs, level_rules) else ((0, 1),)
        # over the memory budget: that error, not a failed try
        sets = [feeds for seed, count in draws for feeds in plan.generate(seed=seed, count=count)]
        try:
            for feeds in sets:
                run(feeds)
        except Exception as exc:  # onnxruntime raises many kinds from native code
            tries.append({"input_shapes": _shown(shapes), "error": work_paths_out(first_line(exc)[:300])})
            continue
        tries.append({"input_shapes": _shown(shapes), "error": None})
        plan = InputPlan(specs, shapes, level_rules, tries)
        _CACHE[key] = plan
        return plan
    last = tries[-1]
    raise UsageError(
        f"edgepack could not build inputs this model accepts; the last try, shapes {_text(last['input_shapes'])}, "
        f"failed at {node_of_error(last['error'])}: give --sample-inputs",
        where=shown,
        hint=f"onnxruntime said: {last['error']}; --sample-inputs takes one real input set (.npz of named arrays), "
        "--self-test-shape NAME=D0,D1,... just the sizes",
    )


def plan_for(job, specs: list[dict[str, Any]]) -> InputPlan:
    """The plan for a packaging job: its FP32 reference, the inputs as the artifact declares them (fixed for
    fixed-shape targets), the user's sizes (rule 4)."""
    options = job.options
    by_name = {spec["name"]: spec for spec in specs}
    for name, dims in options.self_test_shapes.items():
        shape = by_name[name]["shape"] if name in by_name else None
        if name not in by_name:
            raise UsageError(
                f"--self-test-shape names input {name!r}, which the model does not have",
                hint=f"the model's inputs are: {', '.join(by_name) or 'none'}",
            )
        if shape is not None and (
            len(dims) != len(shape) or any(isinstance(d, int) and d > 0 and d != size for d, size in zip(shape, dims))
        ):
            raise UsageError(
                f"--self-test-shape {name}={','.join(map(str, dims)) or 'scalar'} does not fit input "
                f"{name!r} of shape {format_shape(shape)}",
                hint="keep the model's fixed dims and its rank",
            )
    return fit_inputs(
        job.source.reference,
        specs,
        given={**options.input_shapes, **options.self_test_shapes},
        named=options.fixed_dims,
        shown=job.source.path.name,
    )


def node_of_error(message: str) -> str:
    """'node Pad (name)' from onnxruntime's 'running Pad node. Name:'...'' text, else 'a node onnxruntime names above'."""
    found = re.findall(r"running (\w+) node\. Name:'([^']*)'", message)
    if not found:
        return "loading"
    op, name = found[-1]
    return f"node {op}" + (f" {name!r}" if name else "")


def _session_runner(model: Path, shown: str) -> Callable[[dict[str, Any]], None]:
    import onnxruntime as ort

    try:
        session = quiet_session(model)
    except Exception as exc:  # no inputs involved: the model itself does not load
        raise ConversionError(
            f"the FP32 model does not run in onnxruntime {ort.__version__}: {first_line(exc)[:400]}",
            where=shown,
            hint="the model itself does not load in onnxruntime with graph "
            "optimizations on: re-export it from its source (e.g. not from a file onnxruntime's "
            "optimizer wrote)",
        ) from None
    return lambda feeds: session.run(None, feeds)


def _shown(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    return {name: list(dims) for name, dims in shapes.items()}


def _text(shapes: dict[str, list[int]]) -> str:
    return "{" + ", ".join(f"{name}: {'x'.join(map(str, dims)) or 'scalar'}" for name, dims in shapes.items()) + "}"


def _shapes(
    specs: list[dict[str, Any]], level: dict[str, int], given: dict[str, tuple[int, ...]], named: dict[str, int]
) -> dict[str, tuple[int, ...]]:
    sizes = dict(named)  # a named dim gets one size across inputs
    for spec in specs:  # user-given shapes fix the names they cover first
        if spec["name"] in given and spec["shape"]:
            for dim, size in zip(spec["shape"], given[spec["name"]]):
                if isinstance(dim, str):
                    sizes.setdefault(dim, size)
    shapes = {}
    for spec in specs:
        name, shape = spec["name"], spec["shape"]
        if name in given:
            shapes[name] = tuple(given[name])
            continue
        if shape is None:
            shapes[name] = ()
            continue
        dims = []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif isinstance(dim, str) and dim in sizes:
                dims.append(sizes[dim])
            else:
                role = dim_role(spec, axis, dim)
                size = _FIXED_ROLES[role] if role in _FIXED_ROLES else level[role]
                if isinstance(dim, str):
                    sizes[dim] = size
                dims.append(size)
        shapes[name] = tuple(dims)
    return shapes


def is_batch_dim(dim: Any) -> bool:
    """A dim the model names as a batch (``batch``, ``batch_size``, ``N``)."""
    return isinstance(dim, str) and bool(_BATCH.search(dim.lower()))


def dim_role(spec: dict[str, Any], axis: int, dim: Any) -> str:
    """batch, spatial, samples, sequence, channels or other (rule 1)."""
    shape = spec["shape"]
    label = dim.lower() if isinstance(dim, str) else ""
    if is_batch_dim(dim):
        return "batch"
    if label and _SPATIAL.search(label):
        return "spatial"
    image_like = len(shape) == 4 and np.dtype(spec["dtype"]).kind == "f"
    if image_like and axis == 1 and not label:
        return "channels"
    if image_like and axis in (2, 3):
        return "spatial"
    if label and _SAMPLES.search(label):
        return "samples"
    if label and _SEQUENCE.search(label):
        return "sequence"
    earlier_dynamic = any(not (isinstance(d, int) and d > 0) for d in shape[:axis])
    if not earlier_dynamic:
        return "batch"  # the first dynamic dim: dim 0, or a state's batch dim after fixed ones
    if not label and len(shape) == 2 and _SAMPLES.search(spec["name"].lower()):
        return "samples"
    if not label and len(shape) == 2 and np.dtype(spec["dtype"]).kind in "iu":
        return "sequence"
    return "other"


def _value_rules(proto: onnx.ModelProto, specs: list[dict[str, Any]]) -> dict[str, tuple[str, Any]]:
    bounds = _gather_bounds(proto)
    repeats = _shape_operands(proto, _ONES_ARE_VALID)
    reshapes = _shape_operands(proto, {"Reshape": 1})
    inputs = {vi.name: vi for vi in proto.graph.input}
    rules: dict[str, tuple[str, Any]] = {}
    for spec in specs:
        name = spec["name"]
        lowered = name.lower()
        vi = inputs.get(name)
        if vi is not None and vi.type.WhichOneof("value") == "sequence_type":
            elem = vi.type.sequence_type.elem_type.tensor_type
            elem_shape = tuple(d.dim_value if d.dim_value > 0 else 2 for d in elem.shape.dim)
            rules[name] = ("sequence", (onnx.helper.tensor_dtype_to_np_dtype(elem.elem_type).name, elem_shape))
            continue
        if vi is not None and vi.type.WhichOneof("value") == "map_type":
            rules[name] = ("map", _map_keys(proto, vi))
            continue
        if spec["shape"] is None and vi is not None and vi.type.WhichOneof("value") != "tensor_type":
            raise UsageError(
                f"edgepack cannot make up a value for input {name!r} of type {vi.type.WhichOneof('value')}",
                where=name,
                hint="give --sample-inputs with a real input set",
            )
        try:
            dtype = np.dtype(spec["dtype"])
        except TypeError:
            raise UsageError(
                f"edgepack cannot make up values of type {spec['dtype']} for input {name!r}",
                hint="give --sample-inputs with a real input set",
            ) from None
        if "mask" in lowered:
            rules[name] = ("fill", 1)
        elif dtype.kind in "iu" and len(spec["shape"] or []) <= 1 and _RATE.search(lowered):
            rules[name] = ("rate", None)
        elif dtype.kind in "iu" and name in repeats:
            rules[name] = ("fill", 1)
        elif dtype.kind in "iu" and name in reshapes:
            rules[name] = ("reshape", None)
        elif dtype.kind in "iu" and name in bounds:
            rules[name] = ("ints", (0, max(1, min(16, bounds[name]))))
        elif dtype.kind in "iu" and "type" in lowered:
            rules[name] = ("ints", (0, 2))
        else:
            rules[name] = ("normal", None)
    return rules


def _map_keys(proto: onnx.ModelProto, vi: onnx.ValueInfoProto) -> tuple[list[Any], str]:
    """Keys for a map input: the vocabulary of the DictVectorizer that reads it, else 0..3 (rule 5)."""
    map_type = vi.type.map_type
    string_keys = map_type.key_type == onnx.TensorProto.STRING
    values = onnx.helper.tensor_dtype_to_np_dtype(map_type.value_type.tensor_type.elem_type).name
    for node in proto.graph.node:
        if node.op_type == "DictVectorizer" and vi.name in node.input:
            for attr in node.attribute:
                if attr.name == "string_vocabulary" and string_keys:
                    return [k.decode() for k in attr.strings], values
                if attr.name == "int64_vocabulary" and not string_keys:
                    return list(attr.ints), values
    return ([str(k) for k in range(4)] if string_keys else list(range(4))), values


_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity"}


def _gather_bounds(proto: onnx.ModelProto) -> dict[str, int]:
    """Graph input -> the smallest table size along the axis a Gather indexes with it (directly or through a
    shape-only op), for tables that are initializers or Constant nodes, or whose size on that axis onnx's
    shape inference finds (a table computed from a fixed-size input)."""
    tables = _inferred_shapes(proto)
    tables.update({t.name: list(t.dims) for g in iter_graphs(proto.graph) for t in g.initializer})
    for graph in iter_graphs(proto.graph):
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
                tables[node.output[0]] = list(node.attribute[0].t.dims)
    origin = {vi.name: vi.name for vi in proto.graph.input}
    bounds: dict[str, int] = {}
    for graph in iter_graphs(proto.graph):
        for node in graph.node:
            if node.op_type in _PASS_THROUGH and node.input and node.input[0] in origin:
                origin[node.output[0]] = origin[node.input[0]]
            if (
                node.op_type == "Gather"
                and len(node.input) == 2
                and node.input[1] in origin
                and node.input[0] in tables
            ):
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                dims = tables[node.input[0]]
                if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
                    source = origin[node.input[1]]
                    bounds[source] = min(bounds.get(source, dims[axis]), dims[axis])
    return bounds


INFER_LIMIT = 256 * 1024 * 1024


def _inferred_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Value -> dims (0 where unknown) that onnx's shape inference finds; none when it fails (custom ops), or
    for a model with over ``INFER_LIMIT`` bytes of inline weights (inference copies the whole protobuf)."""
    if proto.ByteSize() > INFER_LIMIT:
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # onnx raises several kinds on models it cannot infer; bounds are then initializers only
        return {}
    shapes = {}
    for info in inferred.graph.value_info:
        tensor = info.type.tensor_type
        if info.type.WhichOneof("value") == "tensor_type" and tensor.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
    return shapes


_ONES_ARE_VALID = {"Expand": 1, "Tile": 1, "ConstantOfShape": 0, "TopK": 1}
"""Op -> the input position of a shape, repeat count or k that a tensor of ones always satisfies (Expand
broadcasts, Tile copies once, ConstantOfShape makes one element, TopK keeps the largest); random integers
fail them ("invalid expand shape", "k argument should not be greater than")."""


def _shape_operands(proto: onnx.ModelProto, positions: dict[str, int]) -> set[str]:
    """Graph inputs that are (through a Cast) the operand at ``positions[op]`` of an op: the shape of an
    Expand, the repeats of a Tile, the target shape of a Reshape (rule 2)."""
    origin = {vi.name: vi.name for vi in proto.graph.input}
    found: set[str] = set()
    for graph in iter_graphs(proto.graph):
        for node in graph.node:
            if node.op_type == "Cast" and node.input and node.input[0] in origin:
                origin[node.output[0]] = origin[node.input[0]]
            position = positions.get(node.op_type)
            if position is not None and len(node.input) > position and node.input[position] in origin:
                found.add(origin[node.input[position]])
    return found
