"""Stage 8, self-test: load the bundle as the device would and compare it with the FP32 reference.

Rules:
1. The bundle is loaded through its own runtime shim (checksums verified, the manifest's session
   options, the CPU provider), so a converted model that does not load never ships.
2. It runs on the user's ``--sample-inputs`` (one input set exactly as the model takes it, or several
   stacked on a new first axis) or on inputs fitted to the model (edgepack.inputs, shapes recorded);
   the reference model runs on the same.
   The reference runs first and is released before the bundle is loaded, so a large model is never
   held twice in memory at once.
3. Max abs error and cosine similarity go into the manifest, with a histogram of each output's errors;
   missing the profile's tolerance is an error.
4. A quantized (INT8 or FP16) bundle is held to ``quantization.tolerance`` instead of ``accuracy`` (meant
   for FP32), runs on the inputs the quantization gate used, and its size after ORT conversion is
   compared with the quantized .onnx: weights re-inflated by the conversion are reported.
5. An FP32 bundle whose outputs differ from the reference by at most ``FLOAT_ROUNDING`` passes whatever
   the cosine: PP-OCRv4's detector on made-up inputs gave max abs error 1.5e-07 with cosine 0.9977, its
   score map being all but zero.
6. A bundle with int8 ops for another CPU (arm64, wasm) that misses on this host is measured again where
   this host's int8 kernels differ from exact ones (x86 without VNNI adds u8 x s8 pairs in 16 bits, which
   saturate, and ``backends.EXACT_INT8`` cannot load every model): the model's .onnx on exact kernels
   (that entry, else graph optimizations basic, which keep QDQ in float) must meet the quantization
   tolerance, against the FP32 reference (a recipe's model) or against the model's own exact numbers (a
   model that came quantized). It then passes with a notice saying the bundle's own numbers could not
   be measured here. An x86-64 bundle of a recipe's model has no such excuse (its device may have the same
   kernels); one of a model that came quantized must give what plain onnxruntime gives on this CPU (its
   .ort cannot take the exact kernels), and passes with a notice saying so.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import onnx

from ..accuracy import check, compare, error_histograms, top1_phrase
from ..calibration import load_samples, validation_samples
from ..errors import AccuracyError, ConversionError, first_line
from ..inputs import plan_for
from ..onnxio.modelinfo import describe_io
from ..pipeline.job import Artifact, Job
from ..pipeline.stage import Stage, StageResult, flattened, optional
from ..recipes.quantize import quantized_ops
from .convert import ConvertResult

__all__ = ["SelfTest", "SelfTestResult"]

SAMPLE_SETS = 3
FLOAT_ROUNDING = 1e-6
"""Max abs error within float32 rounding of values near 1 (8 ulp): the outputs are the same numbers."""
GROWTH_WARNING = 1.25
"""A converted quantized model this much larger than its .onnx, giving back over half of what quantization
saved, has had weights re-inflated (FP32 constant folding)."""
GROWTH_FLOOR = 64 * 1024
"""Below this, growth is the ORT format's own overhead on a small model."""


@dataclass(frozen=True, kw_only=True)
class SelfTestResult(StageResult):
    stage = "self_test"
    summary: str
    notice: str | None = optional()
    """What the shim warned of when it loaded the bundle (an entry of its session it had to leave out)."""
    passed: bool
    tolerance: str | None = optional()
    """Which of the profile's tolerances applied, when not ``accuracy``."""
    inputs: str
    sample_sets: int
    providers: list[str]
    onnxruntime: str
    input_shapes: dict[str, list[int]] | None = optional()
    """The shapes of the inputs edgepack made up (edgepack.inputs), and the candidates tried before them."""
    tries: list[dict[str, Any]] | None = optional()
    input_values: dict[str, Any] | None = optional()
    """Of the inputs edgepack made up, those not drawn freely: ids below a table's size, a fill, a Reshape target
    (the bundle's web page makes its sample input with these and ``input_shapes``)."""
    figures: dict[str, Any] = flattened()
    size_after_conversion: dict[str, Any] | None = optional()
    size_warning: str | None = optional()
    host_int8_kernels: dict[str, Any] | None = optional()
    """Rule 6: how this host's int8 kernels differ from exact ones, and the model's figures on exact ones."""


class SelfTest(Stage):
    name = "self_test"

    def run(self, artifact: Artifact, job: Job) -> SelfTestResult:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort

        from ..runtime_shim import edgepack_shim

        quantized = artifact.precision != "fp32"
        inputs, outputs = describe_io(onnx.load_model(artifact.onnx_path, load_external_data=False))
        if job.options.sample_inputs:
            given = load_samples(job.options.sample_inputs, inputs, what="sample input", one_set=True)
            samples, origin = given.feeds, given.origin
        elif quantized:
            validation = validation_samples(job.options, inputs, fit=lambda: plan_for(job, inputs))
            samples, origin = validation.feeds, validation.origin
        else:
            samples, origin = plan_for(job, inputs).generate(seed=0, count=SAMPLE_SETS), "generated"
        fitted = plan_for(job, inputs).report() if origin == "generated" else {}  # the shapes made up, for the manifest
        output_names = [o["name"] for o in outputs]
        try:
            expected = _run_reference(job, output_names, samples)
        except Exception as exc:
            detail = first_line(exc)
            hint = (
                "edgepack's generated inputs do not fit the model: give --sample-inputs with a real input set"
                if origin == "generated"
                else "the model does not run on these inputs: check them against what it takes"
            )
            raise ConversionError(
                f"running the FP32 reference model on {origin} inputs failed: {detail}",
                where=job.profile.name,
                hint=hint,
            ) from None
        try:
            # the packaging host's onnxruntime stands in for the device's, whatever the bundle's version range
            bundled = edgepack_shim.load(
                job.staging, providers=["CPUExecutionProvider"], check_runtime=False, model=job.model_key
            )
        except Exception as exc:  # onnxruntime raises bare Exception subclasses from C++
            detail = first_line(exc)
            if quantized:
                raise ConversionError(
                    f"the {artifact.precision} quantized model does not load in onnxruntime after ORT-format conversion "
                    f"({artifact.ort_style or 'no'} style): {detail}",
                    where=job.profile.name,
                    hint="try another recipe (--quantize fp16, dynamic or none), or ort_format.style "
                    f"{'Runtime' if artifact.ort_style == 'Fixed' else 'Fixed'} in the profile",
                ) from None
            raise ConversionError(
                f"the packaged model does not load in onnxruntime: {detail}",
                where=job.profile.name,
                hint="try another ort_format style in the profile (Fixed/Runtime/none)",
            ) from None
        try:
            got = [bundled.run(feeds) for feeds in samples]
        except Exception as exc:
            detail = first_line(exc)
            raise ConversionError(f"running the packaged model failed: {detail}", where=job.profile.name) from None
        figures = compare(expected, got, generated=origin == "generated")
        for name, histogram in error_histograms(expected, got).items():
            figures["outputs"][name]["abs_error_histogram"] = histogram
        if bundled.warnings:
            fitted["notice"] = "; ".join(bundled.warnings)
        if quantized:
            return _with_fitted(
                _quantized_report(
                    artifact, job, figures, origin, len(samples), bundled.providers, ort.__version__, expected, samples
                ),
                fitted,
            )
        tolerance = job.profile.accuracy
        # outputs near zero (a detector's score map on made-up inputs) have a cosine of float noise: agreement
        # within float32 rounding passes without it (rule 5)
        exact = figures["max_abs_error"] <= FLOAT_ROUNDING
        passed = figures["max_abs_error"] <= tolerance.max_abs_error and (
            exact or figures["cosine"] >= tolerance.min_cosine
        )
        excused = None if passed else _host_kernels(artifact, job, samples, figures, got=got, origin=origin)
        if not passed and not excused:
            notes = "".join(f"; output {n!r}: {o['note']}" for n, o in figures["outputs"].items() if "note" in o)
            raise AccuracyError(
                f"the packaged model's outputs miss the tolerance: max abs error {figures['max_abs_error']:.4g} "
                f"(allowed {tolerance.max_abs_error:g}), cosine {figures['cosine']:.6f} (required {tolerance.min_cosine:g})"
                f"{notes}",
                where=job.profile.name,
                hint="check the model with --sample-inputs of real data, or loosen accuracy in the profile if that is acceptable",
            )
        summary = (
            f"passed: max abs error {figures['max_abs_error']:.3g} (<= {tolerance.max_abs_error:g}), cosine "
            f"{figures['cosine']:.6f} (>= {tolerance.min_cosine:g}) on {len(samples)} {origin} input set(s)"
        )
        result = SelfTestResult(
            passed=True,
            inputs=origin,
            sample_sets=len(samples),
            providers=bundled.providers,
            onnxruntime=ort.__version__,
            figures=figures,
            **(excused or {"summary": summary}),
        )
        return _with_fitted(result, fitted)


def _with_fitted(result: SelfTestResult, fitted: dict[str, Any]) -> SelfTestResult:
    """``result`` with the made-up input shapes and the shim's warnings, joined to a notice it has."""
    notice = "; ".join(n for n in (result.notice, fitted.get("notice")) if n) or None
    return dataclasses.replace(result, **{**fitted, "notice": notice})


def _run_reference(job: Job, output_names: list[str], samples: list[dict]) -> list[dict]:
    """The reference's outputs, on the kernels the bundle asks for (exact int8 where the model loads with them,
    as the shim does: a model that came quantized is compared kernel for kernel); its session (the whole model
    in memory) is gone when this returns."""
    from ..checked import quiet_session

    reference = quiet_session(job.source.reference)
    return [dict(zip(output_names, reference.run(output_names, feeds))) for feeds in samples]


def _quantized_report(
    artifact: Artifact,
    job: Job,
    figures: dict,
    origin: str,
    count: int,
    providers,
    version: str,
    expected: list[dict],
    samples: list[dict],
) -> SelfTestResult:
    tolerance = job.profile.quantization.tolerance
    misses = check(
        figures,
        min_cosine=tolerance.min_cosine,
        min_top1_agreement=tolerance.min_top1_agreement,
        max_abs_error=tolerance.max_abs_error,
    )
    top1 = top1_phrase(figures)
    size, warning = None, None
    converted = job.result(ConvertResult)
    if converted and converted.ort_bytes is not None and converted.onnx_bytes is not None:
        onnx_bytes, ort_bytes = converted.onnx_bytes, converted.ort_bytes
        source_bytes = job.source.bytes
        saved = source_bytes - onnx_bytes
        size = {
            "source_bytes": source_bytes,
            "onnx_bytes": onnx_bytes,
            "ort_bytes": ort_bytes,
            "ratio": round(ort_bytes / onnx_bytes, 3),
        }
        grown = ort_bytes - onnx_bytes
        if ort_bytes > GROWTH_WARNING * onnx_bytes and grown > GROWTH_FLOOR and saved > 0 and grown > saved / 2:
            other = "Runtime" if artifact.ort_style == "Fixed" else "Fixed"
            warning = (
                f"the .ort is {ort_bytes / onnx_bytes:.2f}x the size of the quantized .onnx ({ort_bytes / 1e6:.2f} MB vs "
                f"{onnx_bytes / 1e6:.2f} MB; FP32 source {source_bytes / 1e6:.2f} MB): the conversion re-inflated weights; "
                f"try ort_format.style {other} in the profile, or another recipe"
            )
            job.say(f"WARNING: {warning}")
    excused = _host_kernels(artifact, job, samples, figures, expected=expected, origin=origin) if misses else None
    if misses and not excused:
        raise AccuracyError(
            f"the packaged {artifact.precision} model misses the quantization tolerance after conversion: {'; '.join(misses)}",
            where=job.profile.name,
            hint="the quantized .onnx passed the gate, so the ORT conversion changed the numbers: try ort_format.style "
            "Fixed/Runtime, or another recipe (--quantize)",
        )
    summary = (
        f"passed ({artifact.precision}, quantization tolerance): cosine {figures['cosine']:.6f} "
        f"(>= {tolerance.min_cosine:g}){top1}, max abs error {figures['max_abs_error']:.3g} on {count} {origin} input set(s)"
    )
    return SelfTestResult(
        passed=True,
        **(excused or {"summary": summary, "tolerance": "quantization.tolerance"}),
        inputs=origin,
        sample_sets=count,
        providers=providers,
        onnxruntime=version,
        figures=figures,
        size_after_conversion=size,
        size_warning=warning,
    )


def _host_kernels(
    artifact: Artifact,
    job: Job,
    samples: list[dict],
    figures: dict,
    *,
    expected: list[dict] | None = None,
    got: list[dict] | None = None,
    origin: str = "generated",
) -> dict[str, Any] | None:
    """Rule 6: the summary, notice and record of a bundle whose miss is this host's int8 kernels, or None.
    ``expected``: the FP32 reference's outputs (a recipe's model); else ``got``, the bundle's outputs (a model
    that came quantized), are held to the model's own numbers on exact kernels."""
    import platform

    from ..backends import EXACT_INT8
    from ..checked import cpu_session, outputs_of

    arch = job.profile.device.arch
    same_cpu = arch in (platform.machine(), "x86_64", "amd64")
    if same_cpu and expected is not None:
        return None  # a recipe's int8 model on an x86 device: the device saturates as this host does
    model = artifact.onnx_path
    if not quantized_ops(model):
        return None
    try:
        host = outputs_of(cpu_session(model), samples)
        try:
            exact, how = outputs_of(cpu_session(model, EXACT_INT8), samples), "session.x64quantprecision=1"
        except Exception:  # onnxruntime 1.31 cannot load some QDQ models with it (backends.EXACT_INT8)
            exact, how = (
                outputs_of(cpu_session(model, basic=True), samples),
                "graph optimizations basic (QDQ kept in float)",
            )
    except Exception:  # the .onnx does not run here at all: the miss stands as measured
        return None
    drift = compare(exact, host)
    if drift["cosine"] >= 0.9999 and drift["max_abs_error"] <= 1e-3:
        return None  # this host's kernels are exact on this model: the miss is the bundle's
    if expected is None:  # a model that came quantized: the bundle computes what onnxruntime does here, or
        like_host = _like_plain_onnxruntime(job, drift, compare(host, got or []), arch, same_cpu)
        if like_host or same_cpu:
            return like_host
    tolerance = job.profile.quantization.tolerance
    reference, candidate = (expected, exact) if expected is not None else (exact, got or [])
    measured = compare(reference, candidate, generated=origin == "generated")
    misses = check(
        measured,
        min_cosine=tolerance.min_cosine,
        min_top1_agreement=tolerance.min_top1_agreement,
        max_abs_error=tolerance.max_abs_error,
    )
    if misses:
        return None
    against = "the FP32 reference" if expected is not None else "the model's own numbers on exact kernels"
    notice = (
        f"this host's int8 kernels are not exact on this model (x86 without VNNI saturates: host vs exact kernels "
        f"cosine {drift['cosine']:.6f}, max abs error {drift['max_abs_error']:.3g}), so the {arch} bundle's own "
        f"numbers cannot be measured here: on this host it gave cosine {figures['cosine']:.6f}. On exact int8 "
        f"kernels ({how}) the model meets the quantization tolerance against {against}: cosine "
        f"{measured['cosine']:.6f}, max abs error {measured['max_abs_error']:.3g}. Check it on the device."
    )
    job.say(f"NOTE: {notice}")
    return {
        "summary": f"passed on exact int8 kernels (cosine {measured['cosine']:.6f}); this host's int8 kernels "
        "saturate, so the bundle's own numbers were not measured (see notice)",
        "notice": notice,
        "tolerance": "quantization.tolerance",
        "host_int8_kernels": {
            "exact_by": how,
            "host_vs_exact": {"cosine": drift["cosine"], "max_abs_error": drift["max_abs_error"]},
            "on_exact_kernels": {"cosine": measured["cosine"], "max_abs_error": measured["max_abs_error"]},
            "against": "fp32 reference" if expected is not None else "exact kernels",
        },
    }


def _like_plain_onnxruntime(job: Job, drift: dict, measured: dict, arch: str, same_cpu: bool) -> dict[str, Any] | None:
    """Rule 6 for a bundle of a model that came quantized: a .ort cannot take the exact kernels (onnxruntime
    applies session.x64quantprecision when it transforms the graph, which a Fixed-style .ort has done already),
    so on this host it must give what plain onnxruntime gives here."""
    tolerance = job.profile.accuracy
    if measured["max_abs_error"] > tolerance.max_abs_error or measured["cosine"] < tolerance.min_cosine:
        return None
    device = "CPUs with VNNI compute it exactly" if same_cpu else f"an {arch} device's kernels do not saturate"
    notice = (
        "onnxruntime's int8 kernels on x86 CPUs without VNNI (this host) saturate on this model and the .ort "
        f"cannot take the exact ones: the bundle gives what plain onnxruntime gives here (max abs error "
        f"{measured['max_abs_error']:.3g}), which is off the model's exact numbers by cosine {drift['cosine']:.6f}, "
        f"max abs error {drift['max_abs_error']:.3g}; {device}"
    )
    job.say(f"NOTE: {notice}")
    return {
        "summary": f"passed against plain onnxruntime on this CPU (max abs error {measured['max_abs_error']:.3g}); "
        "its int8 kernels saturate here (see notice)",
        "notice": notice,
        "host_int8_kernels": {
            "host_vs_exact": {"cosine": drift["cosine"], "max_abs_error": drift["max_abs_error"]},
            "bundle_vs_host": {"cosine": measured["cosine"], "max_abs_error": measured["max_abs_error"]},
            "against": "host kernels",
        },
    }
