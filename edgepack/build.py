"""``edgepack build edgepack.yaml``: every model of a fleet for every target it lists.

Rules:
1. A build file is data validated once, as profiles are (the same typed reader): an unknown or missing
   key, or a value of the wrong type, is an error naming the file, the key, what was expected and what
   was found. Paths in it are relative to the build file.
2. The (model, target) pairs are listed in file order; ``--model`` and ``--target`` filter them and
   ``--shard I/N`` keeps every N-th pair starting at the I-th, so N CI jobs with the same file build
   disjoint parts of the fleet whose union is all of it.
3. Every pair is reported, failed or not: one model that cannot be loaded fails its own pairs only.
   ONNX models share one pool of workers; PyTorch models are exported one after the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import EdgepackError, ProfileError, UsageError
from .execution import DEFAULT_CACHE_MAX_MB, Execution, available_cores, default_cache_dir
from .profiles import _NAME, _build, _kind

__all__ = [
    "BuildFile",
    "ModelEntry",
    "MemberEntry",
    "load_build_file",
    "select_pairs",
    "parse_shard",
    "run_build",
    "add_execution_flags",
    "execution_from_args",
]

SCHEMA = "edgepack.build/1"


@dataclass(frozen=True)
class MemberEntry:
    """One model of a multi-model bundle (edgepack/pipeline/multi.py)."""

    model: str
    """An .onnx file (side files next to it)."""
    name: str = ""
    """Its name in the bundle (``model/<name>.ort``, ``--model <name>``); default: the file's stem."""
    quantize: str | None = None
    """Its recipe; default: the entry's ``quantize``, else the profile's."""


@dataclass(frozen=True)
class ModelEntry:
    model: str = ""
    """An .onnx file (side files next to it), a .pt2 program, or a PyTorch ``pkg.module:factory``."""
    models: list[MemberEntry] = field(default_factory=list)
    """Instead of ``model``: the models of one multi-model bundle per target (then ``name`` is required)."""
    name: str = ""
    """Names the bundles (``<name>-<target>``); default: the file's stem or the factory's name."""
    targets: list[str] = field(default_factory=list)
    """Overrides the file's ``targets`` for this model."""
    quantize: str | None = None
    """A recipe of edgepack/recipes (none, dynamic, static, fp16, int4, q4f16); default: the profile's."""
    calibration: str | None = None
    """A path (.npy, .npz, or a folder of .npz samples) or 'random'."""
    calibration_method: Literal["minmax", "entropy", "percentile"] | None = None
    validation: str | None = None
    sample_inputs: str | None = None
    auto_exclude: bool = False
    tune: bool = False
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    fixed_dims: dict[str, int] = field(default_factory=dict)
    min_accelerated_fraction: float | None = None
    max_partitions: int | None = None
    example_inputs: list[str] = field(default_factory=list)
    """PyTorch models: the example shape of each forward() argument, e.g. 2x3x224x224 or 2x128:int64."""
    dynamic: list[str] = field(default_factory=list)
    """PyTorch models: dynamic axes, e.g. input:0=batch."""


@dataclass(frozen=True)
class BuildFile:
    models: list[ModelEntry]
    targets: list[str] = field(default_factory=list)
    """Targets of every model that lists none: built-in names, 'all', or profile .yaml paths."""
    output: str = "build"
    source: str = ""
    """Where the file was read from (not a YAML key)."""


@dataclass(frozen=True)
class Pair:
    entry: ModelEntry
    profile: Any


def load_build_file(path: Path) -> BuildFile:
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError("no such build file", where=where) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read the build file: {exc}", where=where) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ProfileError(f"not valid YAML{place}: {getattr(exc, 'problem', exc)}", where=where) from None
    if not isinstance(data, dict):
        raise ProfileError(f"expected a mapping of build keys, found {_kind(data)}", where=where)
    schema = data.pop("schema", SCHEMA)
    if schema != SCHEMA:
        raise ProfileError(f"key 'schema': expected {SCHEMA!r}, found {schema!r}", where=where)
    build = dataclasses.replace(_build(BuildFile, data, where, ""), source=where)
    _check_semantics(build, path)
    return build


def _check_semantics(build: BuildFile, path: Path) -> None:
    where = str(path)
    if not build.models:
        raise ProfileError("key 'models': expected at least one model, found none", where=where)
    from .recipes import RECIPES

    seen: dict[str, int] = {}
    for i, entry in enumerate(build.models):
        if bool(entry.model) == bool(entry.models):
            raise ProfileError(
                f"key 'models[{i}]': expected either 'model' (one model) or 'models' (a multi-model bundle), "
                f"found {'both' if entry.model else 'neither'}",
                where=where,
            )
        if entry.models and (len(entry.models) < 2 or not entry.name):
            raise ProfileError(
                f"key 'models[{i}].models': a multi-model bundle needs two models or more and a 'name', "
                f"found {len(entry.models)} model(s){'' if entry.name else ' and no name'}",
                where=where,
            )
        for key, recipe in [("quantize", entry.quantize)] + [
            (f"models[{j}].quantize", m.quantize) for j, m in enumerate(entry.models)
        ]:
            if recipe is not None and recipe not in RECIPES:
                raise ProfileError(
                    f"key 'models[{i}].{key}': expected one of {', '.join(RECIPES)}, found {recipe!r}", where=where
                )
        name = model_name(entry)
        if not _NAME.fullmatch(name):
            raise ProfileError(
                f"key 'models[{i}].name': expected letters, digits, '.', '_' or '-' (it names the "
                f"bundle folders), found {name!r}",
                where=where,
            )
        if name in seen:
            raise ProfileError(
                f"key 'models[{i}].name': expected a name no other model has, found {name!r} "
                f"(also models[{seen[name]}])",
                where=where,
                hint="give one of them a 'name'",
            )
        seen[name] = i
        if not (entry.targets or build.targets):
            raise ProfileError(
                f"key 'models[{i}].targets': expected at least one target (here or in the file's "
                "'targets'), found none",
                where=where,
            )
        for shape_name, dims in entry.input_shapes.items():
            if not dims or any(d < 1 for d in dims):
                raise ProfileError(
                    f"key 'models[{i}].input_shapes.{shape_name}': expected a list of sizes of 1 or more, found {dims}",
                    where=where,
                )
        if entry.min_accelerated_fraction is not None and not 0.0 <= entry.min_accelerated_fraction <= 1.0:
            raise ProfileError(
                f"key 'models[{i}].min_accelerated_fraction': expected a share between 0 and 1, "
                f"found {entry.min_accelerated_fraction}",
                where=where,
            )


_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:(?P<attr>[A-Za-z_][\w.]*)$")


def model_name(entry: ModelEntry) -> str:
    if entry.name:
        return entry.name
    factory = _FACTORY.match(entry.model)
    return factory["attr"].split(".")[-1] if factory and not entry.model.endswith(".pt2") else Path(entry.model).stem


def select_pairs(
    build: BuildFile,
    *,
    models: list[str] | None = None,
    targets: list[str] | None = None,
    shard: tuple[int, int] | None = None,
) -> list[Pair]:
    """The (model, target) pairs to build, in file order (rule 2)."""
    from .profiles import resolve_targets

    base = Path(build.source).parent
    known = [model_name(e) for e in build.models]
    for wanted in models or []:
        if wanted not in known:
            raise UsageError(f"--model {wanted}: no such model in {build.source}", hint=f"models: {', '.join(known)}")
    only = {p.name for p in resolve_targets(targets)} if targets else None
    profiles: dict[str, Any] = {}
    resolved: dict[tuple[str, ...], list[Any]] = {}  # a fleet's models mostly share one target list
    pairs = []
    for entry in build.models:
        if models and model_name(entry) not in models:
            continue
        names = [_relative(n, base) if n.endswith((".yaml", ".yml")) else n for n in (entry.targets or build.targets)]
        if tuple(names) not in resolved:
            resolved[tuple(names)] = resolve_targets(names)
        for profile in resolved[tuple(names)]:
            profile = profiles.setdefault(profile.source, profile)
            if only is None or profile.name in only:
                pairs.append(Pair(entry, profile))
    if shard:
        index, count = shard
        pairs = pairs[index - 1 :: count]
    return pairs


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UsageError(f"--shard {text}: expected I/N with 1 <= I <= N, e.g. 2/4")
    return int(match[1]), int(match[2])


def run_build(
    build: BuildFile, pairs: list[Pair], base_options, *, progress: Callable[[str], None]
) -> list[tuple[str, Any]]:
    """Package every pair; (model name, Result) for each, in pair order (rule 3)."""
    from .api import is_torch_input, package_source
    from .executors import ModelWork, package_models
    from .pipeline.result import Result, refuse_existing_output
    from .recipes.kernels import refuse_unsupported

    base = Path(build.source).parent
    grouped: dict[str, tuple[ModelEntry, list]] = {}
    for pair in pairs:
        grouped.setdefault(model_name(pair.entry), (pair.entry, []))[1].append(pair.profile)
    options_of = {name: _options(entry, base, base_options) for name, (entry, _) in grouped.items()}
    models = {}
    destinations_of: dict[str, dict[str, Path]] = {}
    for name, (entry, profiles) in grouped.items():  # every refusal of the output before any work
        if entry.models:
            members = tuple(Path(_relative(m.model, base)) for m in entry.models)
            destinations_of[name] = refuse_existing_output(name, profiles, options_of[name], inputs=members)
            continue
        local = _relative(entry.model, base)
        models[name] = local if Path(local).exists() or entry.model.endswith((".onnx", ".pt2")) else entry.model
        destinations_of[name] = refuse_existing_output(
            name, profiles, options_of[name], inputs=(Path(models[name]),) if models[name] == local else ()
        )
    results: dict[tuple[str, str], Any] = {}
    works = []
    for name, (entry, profiles) in grouped.items():
        model = models.get(name, "")
        try:
            refuse_unsupported(profiles, options_of[name])  # a recipe a target cannot run fails this model only
        except EdgepackError as exc:
            results.update(
                {(name, p.name): Result(p.name, destinations_of[name][p.name], False, error=exc) for p in profiles}
            )
            continue
        if is_torch_input(model):
            try:
                done = package_source(
                    model,
                    profiles,
                    options_of[name],
                    name=name,
                    example_inputs=entry.example_inputs or None,
                    dynamic=entry.dynamic or None,
                    progress=progress,
                )
            except EdgepackError as exc:
                done = [Result(p.name, destinations_of[name][p.name], False, error=exc) for p in profiles]
            results.update({(name, r.target): r for r in done})
        elif entry.models:
            results.update(
                {(name, r.target): r for r in _package_bundle(entry, base, profiles, options_of[name], progress)}
            )
        else:
            works.append(ModelWork(Path(model), name, profiles, options_of[name], destinations_of[name]))
    for work, done in zip(works, package_models(works, progress, keep_going=True), strict=True):
        results.update({(work.name, r.target): r for r in done})
    return [(model_name(p.entry), results[model_name(p.entry), p.profile.name]) for p in pairs]


def _package_bundle(entry: ModelEntry, base: Path, profiles: list, options, progress: Callable[[str], None]) -> list:
    """A multi-model entry: one bundle per target (edgepack/pipeline/multi.py); a refusal fails its pairs only."""
    from .api import package_several
    from .pipeline.multi import Member
    from .pipeline.result import Result, bundle_path

    members = [
        Member(m.name or Path(m.model).stem, Path(_relative(m.model, base)), m.quantize or entry.quantize)
        for m in entry.models
    ]
    try:
        return package_several(
            members, profiles, dataclasses.replace(options, quantize=None), name=entry.name, progress=progress
        )
    except EdgepackError as exc:
        return [Result(p.name, bundle_path(options.output, entry.name, p), False, error=exc) for p in profiles]


def _options(entry: ModelEntry, base: Path, options):
    def path(value: str | None) -> Path | None:
        return Path(_relative(value, base)) if value else None

    calibration = entry.calibration if entry.calibration in (None, "random") else _relative(entry.calibration, base)
    return dataclasses.replace(
        options,
        quantize=entry.quantize,
        calibration=calibration,
        calibration_method=entry.calibration_method,
        validation=path(entry.validation),
        sample_inputs=path(entry.sample_inputs),
        auto_exclude=entry.auto_exclude,
        tune=entry.tune,
        input_shapes={k: tuple(v) for k, v in entry.input_shapes.items()},
        fixed_dims=dict(entry.fixed_dims),
        min_accelerated_fraction=entry.min_accelerated_fraction,
        max_partitions=entry.max_partitions,
    )


def _relative(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


# --- the flags `package` and `build` share ---------------------------------------------------------


def add_execution_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        metavar="N",
        help=f"(model, target) pairs at once, in worker processes (default: the cores, {available_cores()} here)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="build every bundle, neither reading nor filling the cache"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="bundle cache folder, may be shared by several machines "
        "(default: $EDGEPACK_BUNDLE_CACHE, 'off' for none, or ~/.cache/edgepack/bundles)",
    )
    parser.add_argument(
        "--cache-max-mb",
        type=float,
        metavar="MB",
        help=f"evict least recently used bundles past this size (default: {DEFAULT_CACHE_MAX_MB:g})",
    )
    parser.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: worker processes on this machine; ray: one Ray task per pair (pip install 'edgepack[ray]')",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="with --executor ray: the cluster to join (default: $RAY_ADDRESS, else a Ray instance "
        "started on this machine for the run)",
    )


def execution_from_args(args) -> Execution:
    if args.ray_address and args.executor != "ray":
        raise UsageError("--ray-address only applies with --executor ray")
    if args.no_cache and (args.cache_dir or args.cache_max_mb is not None):
        raise UsageError("--cache-dir and --cache-max-mb do not apply with --no-cache")
    jobs = available_cores() if args.jobs is None else args.jobs
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: expected 1 or more")
    max_mb = DEFAULT_CACHE_MAX_MB if args.cache_max_mb is None else args.cache_max_mb
    if not max_mb > 0:
        raise UsageError(f"--cache-max-mb {max_mb:g}: expected a size in MB above 0")
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    return Execution(jobs=jobs, executor=args.executor, ray_address=args.ray_address, cache=cache, cache_max_mb=max_mb)
