"""Tune: the quantize stage's search over recipes (``--tune``): build, gate and time candidates, ship the fastest.

Rules:
1. Timing means something only on the device's CPU. When the profile's ``device.arch`` is not this
   host's architecture, nothing is timed: the tuner says why and the quantize stage runs the profile's
   default, whose measurement (``quantization.default_evidence``) goes into the report. x86 timings of
   an ARM bundle are never presented as device speed. An already quantized model is kept as it is.
2. Candidates are the profile's ``quantization.tune_candidates``: FP32, dynamic INT8 with U8 or S8
   weights, static QDQ U8S8 or S8S8 per-channel (only with ``--calibration``, ``random`` included),
   FP16, INT4 weight-only (only where the target's runtime has MatMulNBits, edgepack/recipes/kernels.py).
   Each is quantized by ``edgepack.recipes`` from the profile's recipe settings and converted
   as the convert stage would, so it is the file that would ship (the winner's conversion is shipped,
   not made again), and opened with the session options the
   shim would use on the device (threads, optimization level, config entries).
3. The gate: every candidate runs on the validation inputs beside the FP32 reference, as converted.
   FP32 is held to ``accuracy``, the others to ``quantization.tolerance``. A candidate that misses is
   recorded with its figures and never timed, never shipped.
4. Timing: every candidate warms up, then runs once per round, round-robin (the starting candidate
   rotates), so load from elsewhere on the machine hits all alike. Rounds stop at ``MAX_ROUNDS`` or when
   ``--tune-budget`` (counted from the start of tuning, building included) is spent, after at least
   ``MIN_ROUNDS``. After ``PRUNE_AFTER`` rounds a candidate whose fastest run is slower than
   ``PRUNE_FACTOR`` times the leader's median stops being timed: it cannot win.
5. The winner has the lowest median. Candidates within ``TIE`` of it count as equally fast; of those
   the smallest ships. The report records every candidate's median, p90, size, accuracy, gate result,
   and why the winner won.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .. import progress
from ..accuracy import check, compare
from ..calibration import Samples, calibration_samples, validation_samples
from ..errors import AccuracyError, ConversionError, EdgepackError, first_line
from ..inputs import plan_for
from ..onnxio.modelinfo import describe_io
from ..onnxio.ort_convert import ORT_FORMAT_MAX_BYTES, to_ort
from ..onnxio.ort_convert import model_bytes as onnx_model_bytes
from ..ort_tools import load_ort_tools
from ..pipeline.job import Artifact, Job
from . import variants
from .base import TIE
from .kernels import required_gaps
from .quantize import model_bytes, quantize_model

__all__ = ["search", "Outcome", "host_arch", "Candidate", "select", "time_round_robin", "choose"]

MIN_ROUNDS = 5
MAX_ROUNDS = 60
WARMUP_RUNS = 3
PRUNE_AFTER = 5
PRUNE_FACTOR = 1.5

_ARCH_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


def host_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH_NAMES.get(machine, machine)


@dataclass
class Candidate:
    """One recipe as it would ship."""

    name: str
    model: Path
    """The file that runs (the converted .ort, or the .onnx for style none)."""
    artifact: Artifact | None = None
    """What ships if this candidate wins: ``model`` as the convert stage takes it."""
    precision: str = "fp32"
    bytes: int = 0
    method: str = "none"
    figures: dict[str, Any] | None = None
    misses: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    """Seconds per run, in the order measured."""
    note: str = ""
    quantize_report: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.figures is not None and not self.misses

    @property
    def median(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p90(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(np.ceil(0.9 * len(ordered))) - 1)]

    def to_dict(self) -> dict[str, Any]:
        variant = variants().get(self.name)
        data: dict[str, Any] = {
            "name": self.name,
            "recipe": variant[1].description if variant else self.name,
            "precision": self.precision,
            "bytes": self.bytes,
            "gate": "passed" if self.passed else ("failed" if self.figures else "not run"),
        }
        if self.misses:
            data["gate_misses"] = self.misses
        if self.figures:
            data["accuracy"] = {
                k: self.figures[k]
                for k in ("cosine", "max_abs_error", "mean_abs_error", "top1_agreement")
                if k in self.figures
            }
        if self.latencies:
            data.update(
                median_ms=round(1e3 * self.median, 4), p90_ms=round(1e3 * self.p90, 4), runs=len(self.latencies)
            )
        if self.note:
            data["note"] = self.note
        return data


# --- the search ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the search ships (``winner.artifact``, converted) and what the quantize stage reports of it."""

    winner: Candidate
    report: dict[str, Any]
    summary: str
    notice: str | None


def search(artifact: Artifact, job: Job) -> Outcome:
    """Build, gate, time and choose (rules 2-5) on a host with the device's CPU."""
    started = time.perf_counter()
    load_ort_tools()  # before onnxruntime.quantization: keeps torch out of this process
    deadline = started + job.options.tune_seconds
    inputs, _ = describe_io(onnx.load_model(artifact.path, load_external_data=False))
    validation = validation_samples(job.options, inputs, fit=lambda: plan_for(job, inputs))
    calibration = calibration_samples(job.options, inputs, fit=lambda: plan_for(job, inputs))
    notes: list[str] = []
    candidates: list[Candidate] = []
    for name in job.profile.quantization.tune_candidates:
        if time.perf_counter() > deadline:
            notes.append(f"{name} not built: the tuning budget of {job.options.tune_seconds:g} s was spent")
            continue
        if variants()[name][0].needs_calibration and calibration is None:
            notes.append(f"{name} not built: static quantization needs --calibration DATA (or --calibration random)")
            continue
        gaps = required_gaps(job.profile, variants()[name][0].name)
        if gaps:
            notes.append(f"{name} not built: {'; '.join(gaps.values())}")
            continue
        job.say(f"tune: building {name}")
        try:
            candidates.append(_build(name, artifact, job, calibration))
        except EdgepackError as exc:
            notes.append(f"{name} not built: {exc.message}")
    if not candidates:
        raise ConversionError(
            "--tune built no candidate: " + "; ".join(notes),
            where=job.profile.name,
            hint="raise --tune-budget, or package without --tune",
        )
    winner, timing = select(
        candidates,
        job.source.reference,
        validation.feeds,
        _session_factory(job),
        lambda c: _tolerance(job, c),
        generated=validation.origin == "generated",
        deadline=deadline,
        budget=job.options.tune_seconds,
        say=job.say,
    )
    notes += timing
    for note in timing:
        job.say(f"NOTE: {note}")
    if winner is None:
        raise AccuracyError(
            f"--tune: no candidate passed the accuracy gate on {len(validation.feeds)} validation sample(s) "
            f"({validation.origin}): " + "; ".join(f"{c.name}: {'; '.join(c.misses)}" for c in candidates if c.misses),
            where=job.profile.name,
            hint="give representative --calibration/--validation data, or loosen quantization.tolerance in the profile",
        )
    why = _why(winner, candidates)
    job.say(f"tune: {why}")
    return Outcome(
        winner=winner,
        report=_report(winner, candidates, notes, job, validation, why, time.perf_counter() - started),
        summary=f"tuned on this {host_arch()} host, {len(candidates)} candidate(s): {why}",
        notice="; ".join(notes) or None,
    )


def _build(name: str, artifact: Artifact, job: Job, calibration: Samples | None) -> Candidate:
    recipe, variant = variants()[name]
    folder = job.workdir / "tune" / name
    folder.mkdir(parents=True, exist_ok=True)
    quantize_report = None
    source = artifact
    settings = job.profile.quantization.settings(recipe.name)
    if settings is not None:
        result = quantize_model(
            artifact.path,
            folder / "quantized" / "quantized.onnx",
            recipe.name,
            dataclasses.replace(settings, **variant.overrides),
            calibration=calibration.feeds if recipe.needs_calibration and calibration else None,
            calibration_method=job.options.calibration_method,
            target=job.profile,
        )
        quantize_report = result.report()
        source = Artifact(path=result.path, precision=result.precision)
    shipped = _as_shipped(source, job, folder / "ort")
    size = shipped.path.stat().st_size if shipped.format == "ort" else model_bytes(shipped.path)
    return Candidate(
        name=name,
        model=shipped.path,
        artifact=shipped,
        precision=source.precision,
        bytes=size,
        method=recipe.name,
        quantize_report=quantize_report,
    )


def _as_shipped(source: Artifact, job: Job, out_dir: Path) -> Artifact:
    """The candidate converted as the convert stage would (which then ships it as it is); kept as ONNX where
    that stage keeps it (style none, over the ORT format's limit)."""
    ort_format = job.profile.ort_format
    if ort_format.style == "none" or onnx_model_bytes(source.path) >= ORT_FORMAT_MAX_BYTES:
        return source
    return to_ort(source, ort_format.style, ort_format.platform, out_dir, where=str(job.source.path))


def _tolerance(job: Job, candidate: Candidate) -> dict[str, Any]:
    if candidate.precision == "fp32":
        return {"min_cosine": job.profile.accuracy.min_cosine, "max_abs_error": job.profile.accuracy.max_abs_error}
    t = job.profile.quantization.tolerance
    return {"min_cosine": t.min_cosine, "min_top1_agreement": t.min_top1_agreement, "max_abs_error": t.max_abs_error}


def _session_factory(job: Job) -> Callable[[Path], Any]:
    """Sessions opened the way the shim opens the bundle on the device (runtime_shim.session_options)."""
    import onnxruntime as ort

    from ..backends import session_entries
    from ..runtime_shim import edgepack_shim

    profile = job.profile
    providers = [ep.name for ep in profile.execution_providers if ep.name in ort.get_available_providers()]

    def open_session(path: Path):
        model_format = "ort" if path.suffix == ".ort" else "onnx"
        ort_style = profile.ort_format.style if model_format == "ort" else None
        manifest = {
            "runtime": {
                "session_options": {
                    "intra_op_num_threads": profile.session.intra_op_num_threads,
                    "graph_optimization_level": profile.session.graph_optimization_level,
                    "config_entries": session_entries(profile, model_format, ort_style),
                }
            },
            "model": {"format": model_format, "ort_style": ort_style},
        }
        return ort.InferenceSession(
            str(path), edgepack_shim.session_options(ort, manifest), providers=providers or ["CPUExecutionProvider"]
        )

    return open_session


# --- gate, timing, choice (usable on any set of model files) ----------------------------------


def select(
    candidates: list[Candidate],
    reference: Path,
    feeds: list[dict[str, np.ndarray]],
    open_session: Callable[[Path], Any],
    tolerance: Callable[[Candidate], dict[str, Any]],
    *,
    generated: bool = False,
    deadline: float,
    budget: float,
    say: Callable[[str], None] = lambda m: None,
    max_rounds: int = MAX_ROUNDS,
) -> tuple[Candidate | None, list[str]]:
    """Gate every candidate against ``reference`` on ``feeds`` (rule 3), time those that pass (rule 4)
    and return the winner (rule 5, None if none passed) and notes on what was cut short."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    ref = ort.InferenceSession(str(reference), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in ref.get_outputs()]
    expected = [dict(zip(names, ref.run(names, f))) for f in feeds]
    sessions = {}
    for candidate in candidates:
        try:
            session = open_session(candidate.model)
            got = [dict(zip(names, session.run(names, f))) for f in feeds]
        except Exception as exc:  # onnxruntime raises bare Exception subclasses from C++
            detail = first_line(exc)
            candidate.figures, candidate.misses = {}, [f"does not run as converted: {detail[:200]}"]
            continue
        candidate.figures = compare(expected, got, generated=generated)
        candidate.misses = check(candidate.figures, **tolerance(candidate))
        if candidate.passed:
            sessions[candidate.name] = session
        else:
            say(f"tune: {candidate.name} fails the gate: {'; '.join(candidate.misses)}")
    passing = [c for c in candidates if c.name in sessions]
    if not passing:
        return None, []
    notes = time_round_robin(passing, sessions, feeds[0], deadline=deadline, budget=budget, max_rounds=max_rounds)
    return choose(passing), notes


def time_round_robin(
    candidates: list[Candidate],
    sessions: dict[str, Any],
    feed: dict[str, np.ndarray],
    *,
    deadline: float,
    budget: float,
    max_rounds: int = MAX_ROUNDS,
) -> list[str]:
    """Rule 4: warm-up, then one run of each candidate per round, starting candidate rotating."""
    for candidate in candidates:
        for _ in range(WARMUP_RUNS):
            sessions[candidate.name].run(None, feed)
    active = list(candidates)
    notes = []
    rounds = 0
    with progress.step(f"tune: timing {len(candidates)} candidate(s), rounds", total=max_rounds) as step:
        while rounds < max_rounds:
            if rounds >= MIN_ROUNDS and time.perf_counter() > deadline:
                notes.append(
                    f"timing stopped after {rounds} round(s): the tuning budget of {budget:g} s was spent "
                    f"(--tune-budget)"
                )
                break
            shift = rounds % len(active)
            for candidate in active[shift:] + active[:shift]:
                start = time.perf_counter()
                sessions[candidate.name].run(None, feed)
                candidate.latencies.append(time.perf_counter() - start)
            rounds += 1
            step.advance()
            if rounds == PRUNE_AFTER and len(active) > 1:
                leader = min(c.median for c in active)
                for candidate in [c for c in active if min(c.latencies) > PRUNE_FACTOR * leader]:
                    candidate.note = (
                        f"timed {rounds} rounds only: its fastest run was {min(candidate.latencies) / leader:.1f}x "
                        f"the leader's median"
                    )
                    active.remove(candidate)
    return notes


def choose(candidates: list[Candidate]) -> Candidate | None:
    """Rule 5: the fastest gate-passing candidate; within TIE of it, the smallest."""
    timed = [c for c in candidates if c.passed and c.latencies]
    if not timed:
        return None
    fastest = min(timed, key=lambda c: c.median)
    tied = [c for c in timed if c.median <= fastest.median * (1 + TIE)]
    return min(tied, key=lambda c: (c.bytes, c.median))


def _why(winner: Candidate, candidates: list[Candidate]) -> str:
    timed = sorted([c for c in candidates if c.passed and c.latencies], key=lambda c: c.median)
    failed = [c.name for c in candidates if not c.passed]
    text = f"{winner.name}: median {1e3 * winner.median:.2f} ms (p90 {1e3 * winner.p90:.2f} ms), {winner.bytes / 1e6:.2f} MB"
    others = [c for c in timed if c is not winner]
    if others:
        runner = others[0]
        if runner.median < winner.median:
            text += (
                f"; {runner.name} was {(1 - runner.median / winner.median):.1%} faster, within the {TIE:.0%} "
                f"tie margin, and {winner.name} is smaller ({runner.bytes / 1e6:.2f} MB)"
            )
        else:
            text += f"; next {runner.name} at {1e3 * runner.median:.2f} ms ({runner.median / winner.median:.2f}x)"
        slowest = timed[-1]
        if slowest is not runner:
            text += f", slowest {slowest.name} at {slowest.median / winner.median:.2f}x"
    else:
        text += "; the only candidate that passed the gate"
    if failed:
        text += f"; failed the gate or did not run: {', '.join(failed)}"
    return text


def _report(
    winner: Candidate,
    candidates: list[Candidate],
    notes: list[str],
    job: Job,
    validation: Samples,
    why: str,
    seconds: float,
) -> dict[str, Any]:
    threads = job.profile.session.intra_op_num_threads
    return {
        "timed": True,
        "host_arch": host_arch(),
        "device_arch": job.profile.device.arch,
        "host_cpu": platform.processor() or platform.machine(),
        "threads": threads or "onnxruntime default",
        "winner": winner.name,
        "why": why,
        "candidates": [c.to_dict() for c in candidates],
        "notes": notes,
        "seconds": round(seconds, 1),
        "budget_seconds": job.options.tune_seconds,
        "validation": {"origin": validation.origin, "samples": len(validation.feeds)},
        "timing": f"{WARMUP_RUNS} warm-up runs each, then round-robin rounds of one run per candidate on one "
        "validation input, medians and p90",
    }
