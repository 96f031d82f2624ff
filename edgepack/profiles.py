"""Target profiles: YAML files that say everything edgepack needs to know about a device.

A profile is data, validated once when it is loaded. Unknown keys, missing keys and values of the
wrong type are errors that name the file, the key, what was expected and what was found. The rest
of edgepack reads the frozen dataclasses below and never branches on a target's name.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from .backends import BACKENDS, backend_of, checkers
from .errors import ProfileError, UsageError
from .recipes import RECIPES, variants
from .safety import check_profile, load_yaml, shown

__all__ = [
    "Profile",
    "builtin_profile_names",
    "load_profile",
    "resolve_targets",
]

SCHEMA = "edgepack.profile/1"


@dataclass(frozen=True)
class Device:
    arch: Literal["arm64", "x86_64", "wasm"]
    """CPU architecture the bundle's runtime runs on (wasm: any browser)."""


@dataclass(frozen=True)
class Runtime:
    package: str
    """What the device installs: a PyPI, npm, Maven or CocoaPods package name."""
    version: str
    """PEP 440 version specifier of that package, e.g. '>=1.20'."""
    max_opset: int
    """Highest ai.onnx opset the oldest runtime in `version` implements."""
    max_ir_version: int


@dataclass(frozen=True)
class ExecutionProvider:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Session:
    intra_op_num_threads: int = 0
    """0 lets onnxruntime pick (one per physical core)."""
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    config_entries: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class OrtFormat:
    style: Literal["Fixed", "Runtime", "none"]
    """Fixed: optimizations baked in. Runtime: replayed on device (NNAPI, CoreML, WebGPU). none: ship .onnx."""
    platform: Literal["arm", "amd64"] = "arm"
    allow_onnx_fallback: bool = True
    """A model too large for the ORT format (2 GiB) ships as ONNX + external data, with a notice; false: fail."""


@dataclass(frozen=True)
class QuantizedAccuracy:
    """How close a quantized (or FP16) model must stay to the FP32 source, on validation inputs."""

    min_cosine: float = 0.99
    min_top1_agreement: float = 0.99
    """Share of samples whose arg-max agrees, for classifier-shaped outputs ([batch, classes])."""
    max_abs_error: float | None = None
    """None: not gated (INT8 abs errors scale with the output's range); reported anyway."""


def _recipe_settings() -> dict[str, Any]:
    return {name: r.settings() for name, r in RECIPES.items() if r.settings}


@dataclass(frozen=True)
class Quantization:
    default: str = "none"
    """A recipe's name (edgepack/recipes)."""
    without_calibration: str = "refuse"
    """What a default that needs calibration (``static``) becomes when no calibration data is given (reported
    in the manifest); ``refuse`` stops with an error. An explicit ``--quantize static`` always needs calibration data."""
    recipes: dict[str, Any] = field(default_factory=_recipe_settings, metadata={"keys_of": "recipes"})
    """Each recipe's settings, read from a key of its own name (``static:``, ``dynamic:``, ``fp16:``)."""
    tolerance: QuantizedAccuracy = field(default_factory=QuantizedAccuracy)
    max_auto_exclude: int = 8
    """--auto-exclude leaves at most this many nodes in float before giving up (static; int4 has its own
    ``int4.max_int8_share``)."""
    default_fallbacks: list[Literal["auto_exclude", "dynamic", "fp16", "none"]] = field(
        default_factory=lambda: ["auto_exclude", "none"]
    )
    """When ``default`` (not an explicit --quantize) misses the accuracy gate or fails, what to try next, in
    order: ``auto_exclude`` (static only) leaves the most sensitive nodes in float, ``none`` ships FP32.
    What shipped, and why, goes into the notices and the manifest."""
    tune_candidates: list[str] = field(
        default_factory=lambda: ["fp32", "dynamic_u8", "dynamic_s8", "static_u8s8", "static_s8s8", "int4"]
    )
    """Recipe variants ``--tune`` builds and times on a host with the device's CPU (static ones need calibration data)."""
    default_evidence: str = ""
    """The measurement behind ``default``: what ``--tune`` reports when it cannot time on the device's CPU."""

    def settings(self, recipe: str) -> Any:
        """The profile's settings of ``recipe`` (None for one without settings, e.g. none)."""
        return self.recipes.get(recipe)


@dataclass(frozen=True)
class Shapes:
    fixed: bool = False
    """The device's accelerator needs every input dim fixed (NNAPI, CoreML)."""
    defaults: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Coverage:
    checker: str = "none"
    """The checker of the profile's accelerator (edgepack/backends), or none (the CPU: nothing to measure)."""
    min_accelerated_fraction: float = 0.0
    max_partitions: int | None = None
    op_list: str = ""
    """For list-based checkers (tensorrt, webgpu, xnnpack): the operator list in edgepack/data, named with its version."""
    coreml_format: Literal["MLProgram", "NeuralNetwork"] = "MLProgram"
    """Which CoreML model format's operator table the coreml checker uses."""


@dataclass(frozen=True)
class Mobile:
    """What an app needs to ship a mobile bundle: the exact onnxruntime package and how to build a reduced one."""

    loader: Literal["kotlin", "swift"]
    onnxruntime_version: str
    """The exact onnxruntime release the app links; it must satisfy runtime.version."""
    gradle: str = ""
    """Maven group:artifact of the Android package (runtime.package), completed with onnxruntime_version."""
    cocoapods: str = ""
    """CocoaPods pod name of the iOS package."""
    swiftpm_url: str = ""
    swiftpm_product: str = ""
    build_args: list[str] = field(default_factory=list)
    """build.py arguments for a reduced onnxruntime for this device (the config and type reduction are added)."""


@dataclass(frozen=True)
class Bundle:
    kind: Literal["python", "web", "mobile"]


@dataclass(frozen=True)
class Accuracy:
    max_abs_error: float
    min_cosine: float


@dataclass(frozen=True)
class Budget:
    max_bundle_mb: float


@dataclass(frozen=True)
class Web:
    """What a web bundle ships of onnxruntime-web (bundle kind ``web``)."""

    ort_web_files: list[str] = field(default_factory=list)
    """File names in the npm package's ``dist/`` folder, copied to the bundle's ``ort/``."""
    entry: str = ""
    """The one of ``ort_web_files`` the loader imports (an ES module with the wasm glue built in)."""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: Device
    runtime: Runtime
    execution_providers: list[ExecutionProvider]
    ort_format: OrtFormat
    bundle: Bundle
    accuracy: Accuracy
    budget: Budget
    strict_providers: bool = False
    session: Session = field(default_factory=Session)
    quantization: Quantization = field(default_factory=Quantization)
    shapes: Shapes = field(default_factory=Shapes)
    coverage: Coverage = field(default_factory=Coverage)
    mobile: Mobile | None = None
    web: Web = field(default_factory=Web)
    source: str = ""
    """Where the profile was read from (not a YAML key)."""

    def to_dict(self) -> dict[str, Any]:
        """As written in the manifest: the YAML's keys (each recipe's settings under its own name)."""
        data = dataclasses.asdict(self)
        data.pop("source")
        data["quantization"] = {
            key: value
            for name, item in data["quantization"].items()
            for key, value in (item.items() if name == "recipes" else [(name, item)])
        }
        return data


def builtin_profile_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str) -> Profile:
    """Load a built-in profile by name, or a user's profile from a .yaml path."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UsageError(f"profile file {name_or_path} does not exist")
        return _load_file(path)
    if name_or_path not in builtin_profile_names():
        known = ", ".join(builtin_profile_names())
        raise UsageError(
            f"unknown target {shown(name_or_path)}",
            hint=f"built-in targets: {known}, or all; or pass a path to your own profile .yaml",
        )
    return _load_file(Path(str(_builtin_dir() / f"{name_or_path}.yaml")))


def resolve_targets(names: list[str]) -> list[Profile]:
    """Expand 'all' and comma lists; load each profile once, in the order given."""
    wanted: list[str] = []
    for name in names:
        for part in name.split(","):
            part = part.strip()
            expanded = builtin_profile_names() if part == "all" else [part]
            wanted += [n for n in expanded if n and n not in wanted]
    if not wanted:
        raise UsageError("no target given", hint="use --target NAME (see `edgepack targets`) or --target all")
    return [load_profile(n) for n in wanted]


def _builtin_dir():
    return resources.files("edgepack.builtin_targets")


def _load_file(path: Path) -> Profile:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile: {exc}", where=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ProfileError(f"not valid YAML{place}: {getattr(exc, 'problem', exc)}", where=str(path)) from None
    except RecursionError:
        raise ProfileError("not valid YAML: nested too deeply", where=str(path)) from None
    if not isinstance(data, dict):
        raise ProfileError(f"expected a mapping of profile keys, found {_kind(data)}", where=str(path))
    schema = data.pop("schema", SCHEMA)
    if schema != SCHEMA:
        raise ProfileError(f"key 'schema': expected {SCHEMA!r}, found {shown(schema)}", where=str(path))
    profile = _build(Profile, data, str(path), "")
    profile = dataclasses.replace(profile, source=str(path))
    _check_semantics(profile, str(path))
    return profile


def _check_semantics(profile: Profile, where: str) -> None:
    if not _NAME.fullmatch(profile.name):
        raise ProfileError(
            f"key 'name': expected letters, digits, '.', '_' or '-' (it names the bundle folder), found {shown(profile.name)}",
            where=where,
        )
    if profile.session.intra_op_num_threads < 0:
        raise ProfileError(
            f"key 'session.intra_op_num_threads': expected 0 (automatic) or more, "
            f"found {profile.session.intra_op_num_threads}",
            where=where,
        )
    try:
        SpecifierSet(profile.runtime.version)
    except InvalidSpecifier:
        raise ProfileError(
            f"key 'runtime.version': expected a version specifier like '>=1.20', found {shown(profile.runtime.version)}",
            where=where,
        ) from None
    _check_recipes(profile.quantization, where)
    _check_providers(profile, where)
    if not profile.execution_providers:
        raise ProfileError("key 'execution_providers': expected at least one provider, found none", where=where)
    if not 0.0 < profile.accuracy.min_cosine <= 1.0:
        raise ProfileError(
            f"key 'accuracy.min_cosine': expected a number in (0, 1], found {profile.accuracy.min_cosine}", where=where
        )
    tolerance = profile.quantization.tolerance
    for key, value in (
        ("quantization.tolerance.min_cosine", tolerance.min_cosine),
        ("quantization.tolerance.min_top1_agreement", tolerance.min_top1_agreement),
    ):
        if not 0.0 <= value <= 1.0:
            raise ProfileError(f"key {key!r}: expected a number in [0, 1], found {value}", where=where)
    for key, value in (
        ("accuracy.max_abs_error", profile.accuracy.max_abs_error),
        ("budget.max_bundle_mb", profile.budget.max_bundle_mb),
        ("runtime.max_opset", profile.runtime.max_opset),
        ("runtime.max_ir_version", profile.runtime.max_ir_version),
    ):
        if value <= 0:
            raise ProfileError(f"key {key!r}: expected a positive number, found {value}", where=where)
    check_profile(profile, where)


def _check_providers(profile: Profile, where: str) -> None:
    """Every provider belongs to a backend (edgepack/backends) and its options are the backend's, checked by
    its rules; the coverage checker is the one of a backend the profile uses."""
    used = set()
    for i, ep in enumerate(profile.execution_providers):
        backend = backend_of(ep.name)
        key = f"execution_providers[{i}]"
        if backend is None:
            raise ProfileError(
                f"key '{key}.name': no backend runs {ep.name!r}",
                where=where,
                hint="known providers: " + ", ".join(p for b in BACKENDS.values() for p in b.providers),
            )
        used.add(backend.checker)
        chosen = next((option for option in ep.options if option in backend.chosen_on_device), None)
        if chosen is not None:
            raise ProfileError(f"key '{key}.options.{chosen}': {backend.chosen_on_device[chosen]}", where=where)
        kind = backend.options.get(ep.name)
        if kind is None:
            if ep.options:
                raise ProfileError(
                    f"key '{key}.options': {ep.name} takes no options, found {sorted(ep.options)}", where=where
                )
            continue
        problem = backend.check(ep.name, _build(kind, ep.options, where, f"{key}.options."), profile)
        if problem:
            raise ProfileError(f"key '{key}.options': {problem}", where=where)
    checker = profile.coverage.checker
    choices = ["none", *checkers()]
    if checker not in choices:
        raise ProfileError(
            f"key 'coverage.checker': expected one of {', '.join(map(repr, choices))}, found {checker!r}", where=where
        )
    if checker != "none" and checker not in used:
        raise ProfileError(
            f"key 'coverage.checker': {checker!r} measures a provider this profile does not list", where=where
        )


def _check_recipes(quantization: Quantization, where: str) -> None:
    """Recipe names are the registry's (edgepack/recipes), and each recipe's settings pass its own check."""
    for name, recipe in RECIPES.items():
        problem = recipe.check(quantization.settings(name)) if recipe.settings else None
        if problem:
            raise ProfileError(f"key 'quantization.{name}.{problem[0]}': {problem[1]}", where=where)
    without = ["refuse", *(name for name, r in RECIPES.items() if not r.needs_calibration)]
    checks = [
        ("quantization.default", quantization.default, list(RECIPES)),
        ("quantization.without_calibration", quantization.without_calibration, without),
        *(
            (f"quantization.tune_candidates[{i}]", name, list(variants()))
            for i, name in enumerate(quantization.tune_candidates)
        ),
    ]
    for key, value, choices in checks:
        if value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise ProfileError(f"key {key!r}: expected one of {shown}, found {value!r}", where=where)


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


# --- a small typed reader: dataclass fields are the schema ------------------------------------


def _build(cls, data: Any, where: str, prefix: str):
    if not isinstance(data, dict):
        raise ProfileError(
            f"key {prefix.rstrip('.') or '(top)'!r}: expected a mapping, found {_kind(data)}", where=where
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    spread = {f.name: _SPREAD[f.metadata["keys_of"]]() for f in fields.values() if "keys_of" in f.metadata}
    known = {*(set(fields) - set(spread)), *(key for kinds in spread.values() for key in kinds)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ProfileError(
            f"unknown key {prefix}{shown(unknown[0])}", where=where, hint=f"known keys here: {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {}
    for name, kinds in spread.items():
        values[name] = {
            key: _build(kind, data[key], where, f"{prefix}{key}.") if key in data else kind()
            for key, kind in kinds.items()
        }
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in spread:
            continue
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProfileError(f"missing key {key!r}", where=where)
            continue
        values[name] = _convert(hints[name], data[name], where, key)
    return cls(**values)


_SPREAD = {"recipes": lambda: {name: r.settings for name, r in RECIPES.items() if r.settings}}
"""Fields whose entries are keys of the section itself, one per registered plug-in."""


def _convert(tp, value: Any, where: str, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where, key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ProfileError(f"key {key!r}: expected one of {choices}, found {shown(value)}", where=where)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ProfileError(f"key {key!r}: expected a list, found {_kind(value)}", where=where)
        return [_convert(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProfileError(f"key {key!r}: expected a mapping, found {_kind(value)}", where=where)
        return {
            _convert(args[0], k, where, key): _convert(args[1], v, where, f"{key}.{shown(k)}") for k, v in value.items()
        }
    if tp is Any:
        _check_plain(value, where, key)
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ProfileError(f"key {key!r}: expected a finite number, found {value}", where=where)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ProfileError(
            f"key {key!r}: expected {_TYPE_NAMES.get(tp, tp.__name__)}, found {_kind(value)}", where=where
        )
    return value


def _check_plain(value: Any, where: str, key: str) -> None:
    """Free-form values (provider options) end up in the manifest: plain JSON data only, and not huge."""
    pending, seen = [value], 0
    while pending:
        item = pending.pop()
        seen += 1
        if seen > 10_000:
            raise ProfileError(f"key {key!r}: the value is too large", where=where)
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                raise ProfileError(f"key {key!r}: mapping keys must be strings", where=where)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ProfileError(f"key {key!r}: expected a finite number, found {item}", where=where)
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            raise ProfileError(
                f"key {key!r}: expected plain data (text, numbers, lists, mappings), found {_kind(item)}", where=where
            )


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: f"the string {shown(value)}", bool: f"{value}".lower()}.get(
        type(value), f"{type(value).__name__} {shown(value)}"
    )
