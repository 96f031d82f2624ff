"""What flows through the pipeline: the artifact each stage returns, and the job it works for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ..errors import UsageError
from ..execution import Execution
from ..profiles import Profile
from ..recipes import RECIPES

if TYPE_CHECKING:
    from .stage import StageResult

    R = TypeVar("R", bound=StageResult)

__all__ = ["Artifact", "Options", "Source", "Job"]


@dataclass(frozen=True)
class Artifact:
    """The model as it stands after a stage."""

    path: Path
    """The model file (.onnx, or .ort once converted) in the job's work folder."""
    format: Literal["onnx", "ort"] = "onnx"
    ort_style: str | None = None
    ops_config: Path | None = None
    """The reduced-operator build config made from the .ort, once converted."""
    precision: str = "fp32"
    onnx: Path | None = None
    """The ONNX model this artifact was made from (itself while still ONNX): the source of I/O facts."""

    @property
    def onnx_path(self) -> Path:
        return self.onnx or self.path


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TUNE_BUDGET = 300.0


@dataclass(frozen=True)
class Options:
    """What the user asked for on top of the profile (CLI flags, API arguments). It checks itself when made,
    so the CLI and the Python API refuse the same values with the same message (named after the flag)."""

    output: Path = Path("build")
    force: bool = False
    sample_inputs: Path | None = None
    quantize: str | None = None
    """None: the profile's default recipe."""
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """--input-shape NAME=1,3,224,224: fixed shapes for the inputs of fixed-shape profiles."""
    fixed_dims: dict[str, int] = field(default_factory=dict)
    """--fix-dim NAME=VALUE: a value for a symbolic dim (dim_param) everywhere in the graph."""
    self_test_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """--self-test-shape NAME=1,3,640,640: the shapes of the inputs edgepack makes up (edgepack/inputs.py)."""
    min_accelerated_fraction: float | None = None
    """None: the profile's coverage.min_accelerated_fraction."""
    max_partitions: int | None = None
    """None: the profile's coverage.max_partitions."""
    freeze: bool = False
    """Also build a PyInstaller executable of the shim beside each python bundle (edgepack/bundle/freeze.py)."""
    onefile: bool = False
    """With ``freeze``: one self-extracting file instead of a folder."""
    ort_web: Path | None = None
    """A local onnxruntime-web npm tarball for web bundles (offline); None: fetch it from the npm registry."""
    calibration: str | None = None
    """Calibration data for static quantization: a path (.npy, .npz, or a folder of them) or 'random'."""
    calibration_method: str | None = None
    """None: the profile's static.calibration_method."""
    validation: Path | None = None
    """Inputs for the quantization accuracy gate (same formats as calibration)."""
    auto_exclude: bool = False
    """Leave the nodes most hurt by quantization in float until the accuracy gate passes."""
    tune: bool = False
    """Choose the recipe by building, gating and timing candidates on this host (edgepack/recipes/search.py)."""
    tune_budget: float | None = None
    """Seconds ``tune`` may take in all (None: ``TUNE_BUDGET``); measuring stops when they are spent."""
    sign_key: Path | None = None
    """A P-256 private key (PEM): every bundle gets ``model.sig`` (edgepack/bundle/signing.py)."""
    sign_passphrase_env: str | None = None
    """The environment variable holding ``sign_key``'s passphrase."""
    pin_key: Path | None = None
    """A P-256 public key pinned beside the shim of python bundles: the shim then refuses unsigned bundles."""
    execution: Execution = field(default_factory=Execution)
    """Worker processes, Ray, the bundle cache (edgepack/execution.py): how the bundles are made, not what they hold."""

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in RECIPES:
            raise UsageError(f"--quantize {self.quantize!r}: expected one of {', '.join(RECIPES)}")
        if self.auto_exclude and self.quantize and not RECIPES[self.quantize].auto_exclude:
            capable = " or ".join(n for n, r in RECIPES.items() if r.auto_exclude)
            raise UsageError(
                f"--auto-exclude works with {capable} quantization, not {self.quantize}",
                hint="use --quantize static --calibration DATA --auto-exclude, or --quantize int4 --auto-exclude",
            )
        if self.calibration_method is not None and self.calibration_method not in CALIBRATION_METHODS:
            raise UsageError(
                f"--calibration-method {self.calibration_method!r}: expected one of {', '.join(CALIBRATION_METHODS)}"
            )
        if self.tune and self.quantize:
            raise UsageError("--tune chooses the recipe itself: leave out --quantize")
        if self.tune_budget is not None and (not self.tune or not self.tune_budget > 0):
            raise UsageError(f"--tune-budget {self.tune_budget:g}: expected a number of seconds above 0, with --tune")
        if self.sign_passphrase_env and not self.sign_key:
            raise UsageError("--sign-passphrase-env only applies with --sign-key")
        if self.onefile and not self.freeze:
            raise UsageError("--onefile only applies with --freeze")
        if self.min_accelerated_fraction is not None and not 0.0 <= self.min_accelerated_fraction <= 1.0:
            raise UsageError(
                f"--min-accelerated-fraction {self.min_accelerated_fraction}: expected a share between 0 and 1"
            )
        if self.max_partitions is not None and self.max_partitions < 0:
            raise UsageError(f"--max-partitions {self.max_partitions}: expected 0 or more")

    @property
    def tune_seconds(self) -> float:
        return TUNE_BUDGET if self.tune_budget is None else self.tune_budget


@dataclass(frozen=True)
class Source:
    """The user's model, read once for all targets. ``reference`` is the FP32 model every bundle is compared with."""

    name: str
    path: Path
    reference: Path
    """The loaded model as written by the load stage (ONNX, maybe with external data) in a work folder."""
    info: dict[str, Any]
    """The load stage's report: size, checksum, IR, opsets, external data."""
    origin: list[dict[str, Any]] = field(default_factory=list)
    """Reports of the steps that made the model before it was loaded (an export from PyTorch); they head
    every bundle's list of stage reports."""

    @property
    def bytes(self) -> int:
        """The model file plus its external data."""
        return self.info["size_bytes"] + self.info["external_data"]["bytes"]


@dataclass
class Job:
    """One model packaged for one target."""

    profile: Profile
    options: Options
    source: Source
    workdir: Path
    """Scratch space for this target, deleted at the end."""
    staging: Path
    """The bundle being written: a temporary folder beside the destination, renamed into place at the end."""
    destination: Path
    progress: Callable[[str], None] = lambda message: None
    results: list[StageResult] = field(default_factory=list)
    """What each stage returned so far, in order."""
    model_key: str | None = None
    """The model's name in a multi-model bundle (edgepack/pipeline/multi.py): the self-test opens it by name."""

    def say(self, message: str) -> None:
        self.progress(f"[{self.profile.name}] {message}")

    def result(self, kind: type[R]) -> R | None:
        """The result of the stage that returns ``kind``, if it ran."""
        return next((r for r in reversed(self.results) if isinstance(r, kind)), None)

    def records(self) -> list[dict[str, Any]]:
        """The manifest's list of stages: what made the model before it was loaded, then every result."""
        return [*self.source.origin, *(r.record() for r in self.results)]
