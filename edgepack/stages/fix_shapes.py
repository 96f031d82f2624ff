"""Stage, fix shapes: give every input a fixed shape when the profile's accelerator needs one (NNAPI, CoreML).

Rules:
1. Shapes come from ``--input-shape NAME=1,3,224,224`` and ``--fix-dim NAME=VALUE``, then from the
   profile's ``shapes.defaults`` (input name -> shape). The flags are checked against the model for
   every profile: an unknown input or dim name, a wrong rank, a value below 1 or a clash with a dim
   the model already fixes is an error, never a silent no-op.
2. A dynamic dim nothing names is fixed to 1 when it is an input's first dim (the batch dim by
   convention) and its name does not say it is something else (``seq``, ``time``, ``height``,
   ``samples``: a sequence-first LSTM or Scan input), or wherever its name says batch, and reported as
   assumed. Any other dynamic dim is an error that names the input, the
   dim and the flag to pass: guessing a sequence length or an image size would ship a wrong model.
3. onnxruntime's own functions do the work (``make_dim_param_fixed``, ``make_input_shape_fixed``, then
   ``fix_output_shapes``). External data stays in side files (``make_dynamic_shape_fixed`` would inline it).
   Both are checked steps (edgepack.checked). Fixing the output shapes runs onnx.checker, which refuses
   IR-3 models onnxruntime runs: then the outputs keep their declared shapes. A model onnxruntime refuses
   at the fixed sizes stays as it was, with a notice. Sequence and map inputs have no shape to fix.
4. Profiles with ``shapes.fixed: false`` keep the model's shapes.
5. A dim whose name is no symbol (``?``, as Paddle2ONNX names every unknown dim) is its input's own: it is
   fixed in that input alone. onnxruntime's helper fixes a named dim everywhere it appears, so it would take
   every ``?`` for one dim and refuse two sizes for it. Dims named by an identifier are shared as declared.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..checked import Feeds, job_inputs, notice_of, run_checked
from ..errors import UsageError
from ..fileops import working_directory
from ..inputs import dim_role, is_batch_dim
from ..onnxio.modelinfo import describe_io, external_locations, is_tensor
from ..ort_tools import load_ort_tools
from ..pipeline.job import Artifact, Job
from ..pipeline.stage import Stage, StageResult, optional

__all__ = ["FixShapes", "FixShapesResult", "plan_shapes", "apply_shapes"]


@dataclass(frozen=True, kw_only=True)
class FixShapesResult(StageResult):
    stage = "fix_shapes"
    summary: str
    applied: bool
    input_shapes: dict[str, list[int]] | None = optional()
    assumed_batch_dims: list[str] | None = optional()
    outputs: list[dict[str, Any]] | None = optional()
    """The outputs' shapes once inferred from the fixed inputs."""
    steps: list[dict[str, Any]] | None = optional()
    """The checked steps (rule 3): fixing the inputs, then the outputs."""
    notice: str | None = optional()


class FixShapes(Stage):
    name = "fix_shapes"

    def applies(self, job: Job) -> bool:
        return job.profile.shapes.fixed

    def skip(self, artifact: Artifact, job: Job) -> FixShapesResult:
        """The flags are still checked against the model (rule 1)."""
        proto = onnx.load_model(artifact.path, load_external_data=False)
        _check_flags(proto, job.options.input_shapes, job.options.fixed_dims, str(job.source.path))
        return FixShapesResult(summary="not required: the profile takes dynamic shapes", applied=False)

    def run(self, artifact: Artifact, job: Job) -> FixShapesResult:
        proto = onnx.load_model(artifact.path, load_external_data=False)
        where = str(job.source.path)
        shapes, assumed = plan_shapes(
            proto, job.options.input_shapes, job.options.fixed_dims, job.profile.shapes.defaults, where=where
        )
        records: list[dict[str, Any]] = []
        out = apply_shapes(proto, artifact.path, job.workdir / "fixed", shapes, feeds=job_inputs(job), records=records)
        fixed = ", ".join(f"{name}={'x'.join(map(str, dims))}" for name, dims in shapes.items())
        applied = out != artifact.path
        notice = notice_of(records)
        if notice:
            job.say(f"NOTE: {notice}")
        return FixShapesResult(
            summary=(f"fixed {fixed}" if applied else f"not applied: fixing {fixed} breaks the model (see notice)")
            + (f" ({', '.join(assumed)} set to 1, taken as the batch dim)" if assumed else ""),
            applied=applied,
            steps=records,
            notice=notice,
            input_shapes={name: list(dims) for name, dims in shapes.items()},
            assumed_batch_dims=assumed,
            outputs=describe_io(onnx.load_model(out, load_external_data=False))[1],
            artifact=Artifact(path=out, precision=artifact.precision),
        )


def plan_shapes(
    proto: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]],
    fixed_dims: dict[str, int],
    defaults: dict[str, list[int]],
    *,
    where: str,
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The fixed shape of every input (rules 1 and 2), and the dims assumed to be batch dims."""
    inputs = _check_flags(proto, input_shapes, fixed_dims, where)
    non_tensors = {io["name"] for io in describe_io(proto)[0] if not is_tensor(io)}
    shapes: dict[str, tuple[int, ...]] = {}
    assumed: list[str] = []
    missing: list[tuple[str, str, str, Any]] = []
    for name, dims in inputs.items():
        if name in non_tensors:
            continue  # a sequence or map has no shape to fix
        if name in input_shapes:
            shapes[name] = tuple(input_shapes[name])
            continue
        given = defaults.get(name)
        if given is not None:
            _check_shape(name, dims, tuple(given), where, source="profile shapes.defaults")
            shapes[name] = tuple(given)
            continue
        concrete = []
        spec = {"name": name, "shape": dims, "dtype": "float32"}
        for i, dim in enumerate(dims):
            if isinstance(dim, int) and dim > 0:
                concrete.append(dim)
            elif isinstance(dim, str) and dim in fixed_dims:
                concrete.append(fixed_dims[dim])
            elif is_batch_dim(dim) or (i == 0 and dim_role(spec, 0, dim) == "batch"):
                # the batch by name or by convention; a sequence-first input ([seq, batch, features]) is asked for
                concrete.append(1)
                assumed.append(f"{name} dim {i}" + (f" ({dim})" if isinstance(dim, str) else ""))
            else:
                label = f"dim {i} ({dim!r})" if isinstance(dim, str) else f"dim {i} (unnamed)"
                example = ",".join(
                    str(
                        d
                        if isinstance(d, int) and d > 0
                        else (1 if is_batch_dim(d) or (j == 0 and dim_role(spec, j, d) == "batch") else "N")
                    )
                    for j, d in enumerate(dims)
                )
                missing.append((name, label, example, dim))
                break
        else:
            shapes[name] = tuple(concrete)
    if missing:
        raise _needs_shapes(missing, where)
    return shapes, assumed


def _needs_shapes(missing: list[tuple[str, str, str, Any]], where: str) -> UsageError:
    """Every input left dynamic, in one refusal whose hint fixes them all (not one per run)."""
    what = ", ".join(f"input {name!r} has a dynamic {label}" for name, label, _, _ in missing)
    flags = " ".join(f"--input-shape {name}={example}" for name, _, example, _ in missing)
    hint = f"pass {flags} with N the size the app will use"
    named = sorted({dim for *_, dim in missing if isinstance(dim, str) and _is_symbol(dim)})
    if named:  # --fix-dim ?=N cannot work (rule 5)
        hint += ", or " + " ".join(f"--fix-dim {dim}=N" for dim in named)
    return UsageError(f"the target needs fixed input shapes, but {what}", where=where, hint=hint)


def apply_shapes(
    proto: onnx.ModelProto,
    source: Path,
    folder: Path,
    shapes: dict[str, tuple[int, ...]],
    *,
    feeds: Feeds = lambda model: None,
    records: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``proto`` with ``shapes`` fixed (and output shapes inferred, a checked step whose record goes to
    ``records``) to ``folder``, side files copied beside it (onnx.checker refuses hard-linked side files)."""
    load_ort_tools()
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    for name, dims in shapes.items():
        _unname_placeholder_dims(proto.graph, name)
        try:
            make_input_shape_fixed(proto.graph, name, list(dims))
        except ValueError as exc:  # e.g. two inputs given different sizes for one shared dim
            raise UsageError(
                f"cannot fix input {name!r} to {'x'.join(map(str, dims))}: {exc}",
                where=str(source),
                hint="inputs that share a named dim must get the same size for it",
            ) from None
    folder.mkdir(parents=True, exist_ok=True)
    for location in sorted({loc for _, loc, _, _ in external_locations(proto)}):
        target = folder / location
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.parent / location, target)
    inputs_fixed = folder / f"{source.stem}.inputs-fixed.onnx"

    def inputs() -> Path:
        onnx.save_model(proto, inputs_fixed)
        return inputs_fixed

    used, record = run_checked("make_input_shape_fixed", source, inputs, feeds=feeds)
    if records is not None:
        records.append(record)
    if used == source:  # at these sizes onnxruntime refuses the model: it stays as it was, with a notice
        return source
    out = folder / source.name

    def outputs() -> Path:
        # fix_output_shapes runs onnx.checker on the proto, which looks for side files from the current folder
        with working_directory(folder):
            fix_output_shapes(proto)
        onnx.save_model(proto, out)
        return out

    used, record = run_checked("fix_output_shapes", inputs_fixed, outputs, feeds=feeds)
    if records is not None:
        records.append(record)
    return used


def _unname_placeholder_dims(graph: onnx.GraphProto, name: str) -> None:
    """Rule 5: input ``name``'s dims named by no symbol become unnamed dynamic dims."""
    for value in graph.input:
        if value.name == name and value.type.HasField("tensor_type"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_param") and not _is_symbol(dim.dim_param):
                    dim.ClearField("dim_param")


def _is_symbol(dim_param: str) -> bool:
    """Rule 5: whether a dim's name is a symbol dims share (``batch``, ``N``), not a placeholder such as ``?``."""
    return dim_param.isidentifier()


def _check_flags(
    proto: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], fixed_dims: dict[str, int], where: str
) -> dict[str, list[Any]]:
    inputs = {io["name"]: io["shape"] or [] for io in describe_io(proto)[0]}
    for name, dims in input_shapes.items():
        if name not in inputs:
            raise UsageError(
                f"--input-shape names input {name!r}, which the model does not have",
                where=where,
                hint=f"the model's inputs are: {', '.join(inputs) or 'none'}",
            )
        _check_shape(name, inputs[name], tuple(dims), where, source="--input-shape")
    known_dims = {d for dims in inputs.values() for d in dims if isinstance(d, str)}
    for dim, value in fixed_dims.items():
        if dim not in known_dims:
            raise UsageError(
                f"--fix-dim names dim {dim!r}, which no input of the model has",
                where=where,
                hint=f"the model's named dims are: {', '.join(sorted(known_dims)) or 'none'}",
            )
        if value < 1:
            raise UsageError(f"--fix-dim {dim}={value}: a dim must be at least 1", where=where)
    return inputs


def _check_shape(name: str, dims: list[Any], given: tuple[int, ...], where: str, *, source: str) -> None:
    shown = "x".join(map(str, given))
    if len(given) != len(dims):
        raise UsageError(
            f"{source} {name}={shown} has rank {len(given)}, but input {name!r} has rank {len(dims)} ({_fmt(dims)})",
            where=where,
            hint=f"give {len(dims)} comma-separated sizes",
        )
    for i, (dim, value) in enumerate(zip(dims, given)):
        if value < 1:
            raise UsageError(f"{source} {name}={shown}: dim {i} is {value}, a size must be at least 1", where=where)
        if isinstance(dim, int) and dim > 0 and dim != value:
            raise UsageError(
                f"{source} {name}={shown}: dim {i} is fixed to {dim} in the model, not {value}",
                where=where,
                hint=f"the model's shape is {_fmt(dims)}",
            )


def _fmt(dims: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
