"""Stage 4, quantize: apply the recipe the user asked for, or the profile's default, behind an accuracy gate.

Rules:
1. The recipe is ``--quantize`` if given, else ``quantization.default`` of the profile. A static
   default with no calibration data becomes ``quantization.without_calibration`` (or refuses when that
   is ``refuse``); the fallback is printed and recorded. An explicit ``--quantize static`` without
   ``--calibration`` refuses. Random calibration happens only with ``--calibration random``.
2. A model that is already quantized is kept as it is (reported, not quantized again), whatever the profile's
   recipe (``none`` included); one whose only low precision is float16 weights is then held to the
   quantization tolerance, as onnxruntime's fusions round float16 differently from the unfused model.
3. The gate: the quantized model runs beside the FP32 reference on validation inputs (``--validation``,
   else the last fifth of the calibration samples, else generated inputs); cosine, top-1 agreement and
   (if the profile sets it) max abs error must meet ``quantization.tolerance``. A miss is an error saying
   by how much and what to try. With ``--auto-exclude`` (static and int4) the recipe's most sensitive
   nodes are taken out of it (``Recipe.rank_sensitive``: static leaves the nodes with the most
   quantization noise in float, int4 quantizes the MatMuls that cost the most in dynamic INT8), 1, 2,
   4... of them up to ``quantization.max_auto_exclude``, then halving back between the last miss and
   the first pass: the fewest that pass ship.
4. Every figure, the recipe's options and where the data came from go into the report (the manifest).
5. With ``--tune`` the recipe is chosen by a search over recipes instead (edgepack/recipes/search.py): it builds,
   gates and times candidates as they would ship, converted, and the winner's conversion is what ships.
   Where it cannot time (another CPU architecture, a model already quantized) rule 1 applies, and the
   report says why.
6. When the recipe is the profile's default (no ``--quantize``) and it misses the gate or fails, the
   profile's ``quantization.default_fallbacks`` are tried in order (``auto_exclude``, another recipe,
   ``none`` for FP32); the first that passes ships, with a notice naming the default, why it missed and
   what shipped. The user never asked for quantization, so a miss is no reason to ship nothing. An
   explicit ``--quantize`` stays strict.
7. A recipe that quantizes nothing ships the FP32 model, said so, not a pre-processed copy labelled INT8 or
   FP16 and held to the looser quantization tolerance: an integer recipe that left no quantized op (dynamic
   INT8 of a model with no MatMul, Gemm or Conv of constant weights), an FP16 one that left no more float16
   ops than the model had (a tree ensemble, kept in FP32 by the converter; a float64 model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..accuracy import check, compare, top1_phrase
from ..calibration import RANDOM, Samples, calibration_samples, validation_samples
from ..checked import job_inputs, native_crash, quiet_session, work_paths_out
from ..errors import AccuracyError, ConversionError, EdgepackError, UsageError, first_line
from ..inputs import plan_for
from ..onnxio.modelinfo import describe_io
from ..pipeline.job import Artifact, Job
from ..pipeline.stage import Stage, StageResult, optional
from ..recipes import RECIPES
from ..recipes.fp16 import fp16_ops
from ..recipes.quantize import already_quantized, quantize_model, quantized_ops
from ..recipes.search import host_arch, search

__all__ = ["Quantize", "QuantizeResult", "resolve_recipe"]


@dataclass(frozen=True, kw_only=True)
class QuantizeResult(StageResult):
    stage = "quantize"
    recipe: str
    requested: str | None
    """``--quantize``, ``tune`` for a search, None for the profile's default."""
    profile_default: str
    fallback: dict[str, str] | None = optional()
    unused_options: str | None = optional()
    already_quantized: dict[str, int] | None = optional()
    options: dict[str, Any] | None = optional()
    calibration: dict[str, Any] | None = optional()
    validation: dict[str, Any] | None = optional()
    sensitivity: list[dict[str, Any]] | None = optional()
    tune: dict[str, Any] | None = optional()
    """With ``--tune``: the candidates, their figures and timings, and why the winner won (or why nothing was timed)."""
    result: dict[str, Any] | None = optional()
    tolerance: dict[str, Any] | None = optional()
    figures: dict[str, Any] | None = optional()
    passed: bool | None = optional()
    attempts: list[dict[str, Any]] | None = optional()
    summary: str
    default_fallback: dict[str, Any] | None = optional()
    """Rule 5: the profile's default missed and this one of its default_fallbacks shipped."""
    notice: str | None = optional()


class Quantize(Stage):
    name = "quantize"

    def __init__(self, *, tune: bool = False):
        self.tune = tune

    def run(self, artifact: Artifact, job: Job) -> QuantizeResult:
        if not self.tune:
            return quantize(artifact, job)
        host, device = host_arch(), job.profile.device.arch
        if device != host:
            return _untimed_default(artifact, job, host, device)
        if already_quantized(artifact.path):
            kept = quantize(artifact, job)  # keeps the model as it is, and says so
            return dataclasses.replace(
                kept, tune={"timed": False, "reason": "the model is already quantized: no recipe to choose"}
            )
        outcome = search(artifact, job)
        return QuantizeResult(
            recipe=outcome.winner.method,
            requested="tune",
            profile_default=job.profile.quantization.default,
            tune=outcome.report,
            result=outcome.winner.quantize_report,
            figures=outcome.winner.figures or None,
            passed=True,
            summary=outcome.summary,
            notice=outcome.notice,
            artifact=outcome.winner.artifact,
        )


def _untimed_default(artifact: Artifact, job: Job, host: str, device: str) -> QuantizeResult:
    """Rule 5: x86 timings of an ARM bundle are never presented as device speed."""
    settings = job.profile.quantization
    evidence = settings.default_evidence or "the profile records no measurement for it"
    reason = (
        f"--tune cannot time {job.profile.name}: its CPU is {device} and this machine is {host}, so timings "
        f"here say nothing about the device; the profile's default recipe ({settings.default}) is used "
        f"instead. Its basis: {evidence}"
    )
    job.say(f"NOTE: {reason}")
    chosen = quantize(artifact, job)
    return dataclasses.replace(
        chosen,
        tune={
            "timed": False,
            "host_arch": host,
            "device_arch": device,
            "reason": reason,
            "default": settings.default,
            "default_evidence": evidence,
        },
        notice=reason if not chosen.notice else f"{chosen.notice}; {reason}",
        summary=f"{chosen.summary} [--tune: not timed on a {host} host for a {device} device; profile default]",
    )


def quantize(artifact: Artifact, job: Job) -> QuantizeResult:
    recipe, fallback = resolve_recipe(job)
    try:
        return _quantize(artifact, job, recipe, fallback, job.options.auto_exclude)
    except (AccuracyError, ConversionError) as exc:
        if job.options.quantize:
            raise
        return _default_fallback(artifact, job, recipe, fallback, exc)


def _default_fallback(
    artifact: Artifact, job: Job, recipe: str, fallback: dict[str, str] | None, missed: EdgepackError
) -> QuantizeResult:
    """Rule 5: the next of the profile's default_fallbacks that passes, or the miss itself when none does."""
    why = work_paths_out(missed.message)
    tried = [{"recipe": recipe, "error": why}]
    for name in job.profile.quantization.default_fallbacks:
        if name == recipe or (
            name == "auto_exclude" and (not RECIPES[recipe].auto_exclude or job.options.auto_exclude)
        ):
            continue  # the recipe cannot take nodes out (Recipe.auto_exclude), or it already did
        job.say(f"NOTE: the profile's default {recipe} missed ({why}); trying {name}")
        try:
            if name == "auto_exclude":
                shipped = _quantize(artifact, job, recipe, fallback, True)
            else:
                shipped = _quantize(artifact, job, name, None, False)
        except (AccuracyError, ConversionError) as exc:
            tried.append({"recipe": name, "error": work_paths_out(exc.message)})
            continue
        label = {
            "auto_exclude": f"{recipe} with its most sensitive nodes {RECIPES[recipe].kept_as}",
            "none": "FP32",
        }.get(name, name)
        notice = (
            f"the profile's default recipe {recipe} missed ({why}); shipped {label} instead "
            "(quantization.default_fallbacks; --quantize makes a recipe strict)"
        )
        job.say(f"NOTE: {notice}")
        return dataclasses.replace(
            shipped,
            notice="; ".join(filter(None, [shipped.notice, notice])),
            default_fallback={"from": recipe, "to": name, "tried": tried},
            summary=f"{shipped.summary} [default {recipe} missed: shipped {label}]",
        )
    raise missed


def _quantize(
    artifact: Artifact, job: Job, recipe: str, fallback: dict[str, str] | None, auto_exclude: bool
) -> QuantizeResult:
    chosen = RECIPES[recipe]
    report: dict[str, Any] = {
        "recipe": recipe,
        "requested": job.options.quantize,
        "profile_default": job.profile.quantization.default,
    }
    if fallback:
        report["fallback"] = fallback
        job.say(f"NOTE: {fallback['message']}")
    unused = [
        flag
        for flag, given in (
            ("--calibration", job.options.calibration),
            ("--calibration-method", job.options.calibration_method),
            ("--auto-exclude", job.options.auto_exclude),
            ("--validation", job.options.validation),
        )
        if given and flag not in chosen.flags
    ]
    if unused:
        report["unused_options"] = f"{', '.join(unused)}: not used by the {recipe} recipe"
        job.say(f"NOTE: {report['unused_options']}")
    settings = job.profile.quantization.settings(recipe)
    found = already_quantized(artifact.path)
    # a model whose only low precision is float16 weights is held to the quantization tolerance by the self-test:
    # onnxruntime's fusions round float16 differently from the unfused model (rule 2)
    as_given = Artifact(path=artifact.path, precision="fp16") if list(found) == ["float16 initializers"] else None
    if settings is None:
        note = f" [fallback from {fallback['from']}: {fallback['reason']}]" if fallback else ""
        kept = f"already quantized ({', '.join(found)}): kept as it is" if found else f"{chosen.description} kept"
        return QuantizeResult(
            **report, summary=f"{recipe}: {kept}{note}", already_quantized=found or None, artifact=as_given
        )
    if found:
        listed = ", ".join(f"{k} x{v}" for k, v in found.items())
        job.say(f"NOTE: the model is already quantized ({listed}): not quantized again")
        return QuantizeResult(
            **{**report, "recipe": "none"},
            already_quantized=found,
            summary=f"already quantized ({listed}): kept as it is, {recipe} not applied",
            artifact=as_given,
        )
    report["options"] = dataclasses.asdict(settings)
    inputs, _ = describe_io(onnx.load_model(artifact.path, load_external_data=False))
    calibration = None
    if chosen.needs_calibration:
        calibration = calibration_samples(job.options, inputs, fit=lambda: plan_for(job, inputs))
        assert calibration is not None  # resolve_recipe refuses static without --calibration
        report["options"]["calibration_method"] = job.options.calibration_method or settings.calibration_method
        report["calibration"] = {
            "origin": calibration.origin,
            "samples": len(calibration.feeds),
            "random": calibration.origin == RANDOM,
        }
        if calibration.origin == RANDOM:
            job.say("NOTE: calibrated on random inputs (--calibration random): accuracy on real data is unknown")
    validation = validation_samples(job.options, inputs, fit=lambda: plan_for(job, inputs))
    report["validation"] = {"origin": validation.origin, "samples": len(validation.feeds)}

    tolerance = job.profile.quantization.tolerance

    def attempt(excluded: list[str], *, again: bool = False):
        result = quantize_model(
            artifact.path,
            job.workdir / "quantized" / "quantized.onnx",
            recipe,
            settings,
            calibration=calibration.feeds if calibration else None,
            exclude_nodes=excluded,
            calibration_method=job.options.calibration_method,
            target=job.profile,
            check_inputs=job_inputs(job),
        )
        figures = _measure(job, result.path, validation, recipe)
        misses = check(
            figures,
            min_cosine=tolerance.min_cosine,
            min_top1_agreement=tolerance.min_top1_agreement,
            max_abs_error=tolerance.max_abs_error,
        )
        if not again:
            attempts.append({"excluded_nodes": list(excluded), "passed": not misses, **_headline(figures)})
        return result, figures, misses

    attempts: list[dict[str, Any]] = []
    result, figures, misses = attempt([])
    if _converted_nothing(chosen.precision, result.path, artifact.path):  # rule 7
        job.say(f"NOTE: {recipe} quantization found nothing to quantize in this model: FP32 kept")
        return QuantizeResult(
            **{**report, "recipe": "none"},
            notice=f"{recipe} quantization found nothing to quantize (no op it quantizes, or none with constant "
            "weights): the FP32 model is kept",
            summary=f"{recipe}: nothing to quantize, FP32 kept",
        )
    excluded: list[str] = []
    if misses and auto_exclude and chosen.auto_exclude:
        pre = result.path.with_name(result.path.stem + ".pre.onnx")
        ranking = chosen.rank_sensitive(
            pre if pre.exists() else artifact.path,
            result.path,
            validation.feeds[:8],
            job.workdir,
            settings,
            job.profile,
        )
        report["sensitivity"] = [{"node": n, chosen.sensitivity_figure: round(s, 4)} for n, s in ranking[:20]]
        excluded, (result, figures, misses) = _fewest_out(
            [n for n, _ in ranking],
            attempt,
            lambda count, misses: job.say(
                f"auto-exclude: {'; '.join(misses)}; retrying with {count} node(s) {chosen.kept_as}"
            ),
            (result, figures, misses),
        )

    if result.preprocess_notice:
        report["notice"] = f"quantization pre-processing: {result.preprocess_notice}"
        job.say(f"NOTE: {report['notice']}")
    report.update(
        {
            "result": result.report(),
            "tolerance": dataclasses.asdict(tolerance),
            "figures": figures,
            "passed": not misses,
            "attempts": attempts,
        }
    )
    if misses:
        raise AccuracyError(
            f"{recipe} quantization misses the profile's tolerance on {len(validation.feeds)} validation sample(s) "
            f"({validation.origin}): {'; '.join(misses)}"
            + (f" (with {len(excluded)} node(s) {chosen.kept_as})" if excluded else ""),
            where=job.profile.name,
            hint="try " + ", or ".join(chosen.what_to_try(job.options, settings)) + "; --quantize none keeps FP32",
        )
    ratio = result.bytes_after / result.bytes_before if result.bytes_before else 1.0
    top1 = top1_phrase(figures)
    excluded_note = f", {len(excluded)} node(s) {chosen.kept_as}" if excluded else ""
    fallback_note = f" [fallback from {fallback['from']}: {fallback['reason']}]" if fallback else ""
    data_note = f", calibrated on {calibration.origin}" if calibration else ""
    summary = (
        f"{recipe}: {result.bytes_before / 1e6:.2f} MB -> {result.bytes_after / 1e6:.2f} MB ({ratio:.2f}x), "
        f"cosine {figures['cosine']:.5f}{top1} on {len(validation.feeds)} validation sample(s)"
        f"{data_note}{excluded_note}{fallback_note}"
    )
    return QuantizeResult(**report, summary=summary, artifact=Artifact(path=result.path, precision=result.precision))


def _fewest_out(nodes: list[str], attempt, say, first):
    """Rule 3's search: the fewest of ``nodes`` (most sensitive first) to take out for ``attempt`` to pass,
    doubling 1, 2, 4... then halving back between the last miss and the first pass. Returns the nodes out
    and the outcome of that attempt (the last miss when none passes; ``first``, the attempt with every node
    in, when there are no nodes). The model on disk is always the returned outcome's."""
    missed, passed = 0, None  # the most nodes out that missed, the fewest that passed
    outcome = best = first
    count = min(1, len(nodes))
    while count > missed and (passed is None or count < passed):
        say(count, outcome[2])
        outcome = attempt(nodes[:count])
        if outcome[2]:
            missed = count
        else:
            passed, best = count, outcome
        count = min(len(nodes), 2 * count) if passed is None else (missed + passed) // 2
    if passed is None:
        return nodes[:missed], outcome
    if outcome is not best:  # the last try missed: write the fewest that passed again
        best = attempt(nodes[:passed], again=True)
    return nodes[:passed], best


def resolve_recipe(job: Job) -> tuple[str, dict[str, str] | None]:
    """The recipe to run and, when the profile's default could not be used as is, why (rule 1)."""
    settings = job.profile.quantization
    requested = job.options.quantize
    if requested:
        if RECIPES[requested].needs_calibration and not job.options.calibration:
            others = " / ".join(n for n, r in RECIPES.items() if r.settings and not r.needs_calibration)
            raise UsageError(
                f"{requested} quantization needs calibration data (--calibration)",
                where=job.profile.name,
                hint=_CALIBRATION_HINT + f"; or --quantize {others}, which need none",
            )
        return requested, None
    default = settings.default
    if not RECIPES[default].needs_calibration or job.options.calibration:
        return default, None
    if settings.without_calibration == "refuse":
        others = "|".join(n for n, r in RECIPES.items() if not r.needs_calibration)
        raise UsageError(
            f"the profile's default recipe is {default} quantization, which needs calibration data (--calibration)",
            where=job.profile.name,
            hint=_CALIBRATION_HINT + f"; or choose a recipe with --quantize {others}",
        )
    return settings.without_calibration, {
        "from": default,
        "to": settings.without_calibration,
        "reason": "no calibration data given (--calibration)",
        "message": f"the profile's default is {default} quantization but no calibration data was given (--calibration): "
        f"using the profile's fallback {settings.without_calibration!r} instead",
    }


_CALIBRATION_HINT = (
    "give --calibration DATA (an .npy per input, an .npz of named arrays, or a folder of .npz "
    "samples), or --calibration random for a smoke test (marked as random in the manifest)"
)


def _converted_nothing(precision: str, quantized: Path, before: Path) -> bool:
    """Rule 7: an integer recipe that left no quantized op, or an FP16 one that left no more float16 ops
    than the model had (every float op kept in FP32, as tree ensembles are, or no float32 at all)."""
    if precision in ("int8", "int4"):
        return not quantized_ops(quantized)
    if precision == "fp16":
        after = fp16_ops(onnx.load_model(quantized, load_external_data=False))
        return after <= fp16_ops(onnx.load_model(before, load_external_data=False))
    return False


def _measure(job: Job, quantized, validation: Samples, recipe: str) -> dict[str, Any]:
    """The gate's figures: the FP32 reference and the quantized model on the validation inputs. Either
    failing in onnxruntime is a ConversionError naming which model and the first line of what it said."""
    blame = (
        "the model does not run on these inputs: check them against what the model takes"
        if validation.origin != "generated"
        else "edgepack's generated inputs do not fit the model: give --validation (or --sample-inputs) with real inputs"
    )
    expected = _run(job.source.reference, validation, job, "the FP32 model", hint=blame)
    got = _run(
        quantized,
        validation,
        job,
        f"the {recipe}-quantized model",
        names=list(expected[0]),
        probe=True,
        hint=f"try another recipe than {recipe} (--quantize), exclude the op types it fails on in "
        f"quantization.{recipe}.exclude_op_types, or keep FP32 with --quantize none",
    )
    return compare(expected, got, generated=validation.origin == "generated")


def _run(
    model,
    validation: Samples,
    job: Job,
    what: str,
    *,
    hint: str,
    names: list[str] | None = None,
    probe: bool = False,
) -> list[dict[str, Any]]:
    """The model's outputs on the validation inputs; ``probe``: a helper tool wrote it, so it is first tried
    in a child process (checked rule 5)."""
    import onnxruntime as ort

    if probe and (crash := native_crash(model, validation.feeds[0])):
        raise ConversionError(
            f"{what}: onnxruntime {ort.__version__} {crash} loading or running it (in a separate process, so "
            "nothing else was lost)",
            where=job.profile.name,
            hint=hint,
        )
    try:
        session = quiet_session(model)
        names = names or [o.name for o in session.get_outputs()]
        return [dict(zip(names, session.run(names, feeds))) for feeds in validation.feeds]
    except Exception as exc:  # onnxruntime raises Fail, InvalidGraph, RuntimeException, ... from native code
        detail = first_line(exc)
        raise ConversionError(
            f"{what} does not run in onnxruntime {ort.__version__}: {detail[:400]}", where=job.profile.name, hint=hint
        ) from None


def _headline(figures: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_abs_error", "mean_abs_error", "cosine", "top1_agreement")
    return {k: figures[k] for k in keys if k in figures}
