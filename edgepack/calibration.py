"""Calibration and validation data for quantization: read from the user's files, checked against the model.

Accepted forms (``inputs`` are the model's input specs, as ``modelinfo.describe_io`` gives them):
1. ``x.npy``: one array for a single-input model, samples stacked on the first axis.
2. ``x.npz``: one array per input name, samples stacked on the first axis (all with the same count).
3. A folder of ``<input name>.npy`` files: as 2, one file per input.
4. A folder of ``.npz`` files: one sample per file (named arrays), read in file-name order.
5. ``random``: generated inputs, only when asked for by name; the origin says so in the manifest.

An array whose rank is the input's rank + 1 holds samples on its first axis; one of the input's
rank is split along the batch axis into samples of the model's batch size (1 when dynamic). Names,
dtypes and fixed dims must match the model's inputs; an error names the input, what was expected and
what was found.

``--sample-inputs`` is read with ``one_set=True``: an array of the input's rank (a scalar included) is
one value exactly as the model takes it, split only along a first axis the model declares as a batch
(named like ``batch``), since a dynamic first axis need not be a batch (a sequence, a sample count), and
not even then when another input has no such axis (the rows are then the one set's batch).
Several sets otherwise only when every input stacks them on a new first axis, or from a folder of .npz files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UsageError
from .inputs import InputPlan, is_batch_dim
from .samples import generate_inputs

if TYPE_CHECKING:
    from .pipeline.job import Options

__all__ = [
    "Samples",
    "load_samples",
    "random_samples",
    "generated_validation",
    "split_for_validation",
    "calibration_samples",
    "validation_samples",
    "RANDOM",
    "RANDOM_COUNT",
    "VALIDATION_COUNT",
]

RANDOM = "random"
RANDOM_COUNT = 32
VALIDATION_COUNT = 32
RANDOM_SEED = 1
VALIDATION_SEED = 2
"""Different seeds: generated validation inputs are never the random calibration inputs."""


@dataclass(frozen=True)
class Samples:
    feeds: list[dict[str, np.ndarray]]
    origin: str
    """Where the samples came from, for the report: a path, 'random', 'generated', ..."""


def load_samples(
    spec: str | Path,
    inputs: list[dict[str, Any]],
    *,
    what: str = "calibration",
    plan: InputPlan | None = None,
    one_set: bool = False,
) -> Samples:
    """Read and check samples from a path (forms 1-4), or generate them for ``random`` (form 5) from ``plan``."""
    if str(spec) == RANDOM:
        return random_samples(inputs, plan=plan)
    path = Path(spec)
    if not path.exists():
        raise UsageError(
            f"{what} data not found",
            where=str(path),
            hint="give an .npy, an .npz, a folder of them, or 'random' (calibration only)",
        )
    if path.is_dir():
        npz = sorted(path.glob("*.npz"))
        npy = sorted(path.glob("*.npy"))
        if npz and npy:
            raise UsageError(
                f"the {what} folder mixes .npz and .npy files",
                where=str(path),
                hint="use either one .npz per sample or one .npy per input",
            )
        if npz:
            feeds = []
            for file in npz:
                arrays = _read(file, what)
                if not isinstance(arrays, dict):
                    raise UsageError("expected named arrays", where=str(file))
                feeds += _split(arrays, inputs, str(file), what, one_set)
        elif npy:
            arrays = {f.stem: _read(f, what) for f in npy}
            feeds = _split(arrays, inputs, str(path), what, one_set)
        else:
            raise UsageError(f"the {what} folder holds no .npz or .npy files", where=str(path))
    else:
        data = _read(path, what)
        if isinstance(data, np.ndarray):
            if len(inputs) != 1:
                names = ", ".join(spec["name"] for spec in inputs)
                raise UsageError(
                    f"an .npy holds one array but the model has {len(inputs)} inputs ({names})",
                    where=str(path),
                    hint="use an .npz with one array per input name, or a folder of <input>.npy",
                )
            data = {inputs[0]["name"]: data}
        feeds = _split(data, inputs, str(path), what, one_set)
    if not feeds:
        raise UsageError(f"the {what} data holds no samples", where=str(path))
    return Samples(feeds, str(path))


def random_samples(
    inputs: list[dict[str, Any]], count: int = RANDOM_COUNT, *, plan: InputPlan | None = None
) -> Samples:
    """``plan``: inputs fitted to the model (edgepack.inputs); without it, generic ones."""
    feeds = (
        plan.generate(seed=RANDOM_SEED, count=count) if plan else generate_inputs(inputs, seed=RANDOM_SEED, count=count)
    )
    return Samples(feeds, RANDOM)


def generated_validation(
    inputs: list[dict[str, Any]], count: int = VALIDATION_COUNT, *, plan: InputPlan | None = None
) -> Samples:
    feeds = (
        plan.generate(seed=VALIDATION_SEED, count=count)
        if plan
        else generate_inputs(inputs, seed=VALIDATION_SEED, count=count)
    )
    return Samples(feeds, "generated")


def split_for_validation(samples: Samples) -> tuple[Samples, Samples]:
    """Hold out the last fifth of the user's samples for validation; with fewer than 5, validate
    on the calibration samples themselves (said so in the origin: a weaker check)."""
    n = len(samples.feeds)
    if n < 5:
        return samples, Samples(
            samples.feeds, f"{samples.origin} (the calibration samples themselves: too few to hold out)"
        )
    held = max(1, n // 5)
    return (
        Samples(samples.feeds[:-held], samples.origin),
        Samples(samples.feeds[-held:], f"{samples.origin} (last {held} of {n} samples held out)"),
    )


def calibration_samples(
    options: Options, inputs: list[dict[str, Any]], *, fit: Callable[[], InputPlan] | None = None
) -> Samples | None:
    """What static quantization calibrates on: ``--calibration`` less the last fifth, held out for validation
    when no ``--validation`` is given (random calibration keeps all: validation is generated apart).
    ``fit``: inputs fitted to the model (edgepack.inputs), for ``random``."""
    if not options.calibration:
        return None
    samples = load_samples(options.calibration, inputs, plan=fit() if fit and options.calibration == RANDOM else None)
    if samples.origin != RANDOM and not options.validation:
        samples = split_for_validation(samples)[0]
    return samples


def validation_samples(
    options: Options, inputs: list[dict[str, Any]], *, fit: Callable[[], InputPlan] | None = None
) -> Samples:
    """The inputs the quantization gate uses, for the self-test to run the bundle on the same ones:
    ``--validation``, else the fifth of ``--calibration`` held out, else ``--sample-inputs`` (real inputs win
    over made-up ones), else generated inputs (fitted to the model by ``fit``)."""
    if options.validation:
        return load_samples(options.validation, inputs, what="validation")
    if options.calibration and options.calibration != RANDOM:
        return split_for_validation(load_samples(options.calibration, inputs))[1]
    if options.sample_inputs:
        return load_samples(options.sample_inputs, inputs, what="sample input", one_set=True)
    return generated_validation(inputs, plan=fit() if fit else None)


def _read(path: Path, what: str):
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(
            f"cannot read {what} data: {exc}", where=str(path), hint="save arrays with numpy.save / numpy.savez"
        ) from None
    if isinstance(data, np.ndarray):
        return data
    with data:
        return {name: data[name] for name in data.files}


def _split(
    arrays: dict[str, np.ndarray], inputs: list[dict[str, Any]], where: str, what: str, one_set: bool = False
) -> list[dict[str, np.ndarray]]:
    names = [spec["name"] for spec in inputs]
    unknown = sorted(set(arrays) - set(names))
    missing = sorted(set(names) - set(arrays))
    if unknown or missing:
        parts = ([f"missing input(s) {', '.join(missing)}"] if missing else []) + (
            [f"unknown name(s) {', '.join(unknown)}"] if unknown else []
        )
        raise UsageError(
            f"{what} data does not match the model: {'; '.join(parts)}",
            where=where,
            hint=f"the model's inputs are: {', '.join(names)}",
        )
    per_input = {spec["name"]: _samples_of(arrays[spec["name"]], spec, where, what, one_set) for spec in inputs}
    counts = {name: len(s) for name, s in per_input.items()}
    if len(set(counts.values())) > 1 and one_set:
        # a batch of several rows next to an input without a batch axis (a scalar rate, a state): the batch is
        # the one set's, as the model takes it, not rows to split
        whole = {
            spec["name"]: _samples_of(arrays[spec["name"]], spec, where, what, one_set, batches=False)
            for spec in inputs
        }
        if len({len(s) for s in whole.values()}) == 1:
            per_input, counts = whole, {name: len(s) for name, s in whole.items()}
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{name}: {n}" for name, n in counts.items())
        hint = (
            "give one input set with each array shaped as the model takes it, or stack every input's sets "
            "on a new first axis"
            if one_set
            else "give every input the same number of samples"
        )
        raise UsageError(f"{what} inputs hold different numbers of samples ({found})", where=where, hint=hint)
    return [{name: per_input[name][i] for name in names} for i in range(next(iter(counts.values())))]


def _samples_of(
    array: np.ndarray, spec: dict[str, Any], where: str, what: str, one_set: bool = False, *, batches: bool = True
) -> list[np.ndarray]:
    name, shape = spec["name"], spec["shape"]
    expected_dtype = np.dtype(spec["dtype"])
    if array.dtype != expected_dtype:
        raise UsageError(
            f"{what} input {name!r}: expected dtype {expected_dtype}, found {array.dtype}",
            where=where,
            hint=f"convert it, e.g. array.astype(numpy.{expected_dtype})",
        )
    shown = _show(shape)
    if shape is None:
        return [array]
    rank = len(shape)
    if array.ndim == rank + 1:
        samples = list(array)
    elif array.ndim == rank and one_set and not (batches and rank and is_batch_dim(shape[0])):
        samples = [array]
    elif array.ndim == rank and rank > 0:
        batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1
        if array.shape[0] % batch:
            raise UsageError(
                f"{what} input {name!r}: {array.shape[0]} rows do not split into batches of {batch}",
                where=where,
                hint=f"the model's input shape is {shown}",
            )
        samples = [array[i : i + batch] for i in range(0, array.shape[0], batch)]
    else:
        raise UsageError(
            f"{what} input {name!r}: expected shape {shown} (or N samples of it), found {list(array.shape)}",
            where=where,
            hint="stack samples on a new first axis, or along the batch axis",
        )
    for sample in samples:
        for axis, (want, got) in enumerate(zip(shape, sample.shape)):
            if isinstance(want, int) and want > 0 and want != got:
                raise UsageError(
                    f"{what} input {name!r}: expected shape {shown}, found {list(sample.shape)} per sample "
                    f"(axis {axis} is {got}, the model needs {want})",
                    where=where,
                )
    return samples


def _show(shape: list | None) -> str:
    if shape is None:
        return "(unknown)"
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"
