"""Stage 5, convert: ONNX -> ORT format with the profile's style and platform, plus the reduced-operator config.

Rules:
1. onnxruntime's own converter does the work (edgepack.onnxio.ort_convert: explicit style, type
   reduction on, in a child process).
2. The .ort is rewritten in canonical form (``ort_canonical``): onnxruntime lays out its kernel type string
   table in hash-map order, which changes with the process's memory state, so without it the same model
   could give different bytes (bundles must be reproducible).
3. The config (``required_operators_and_types.config``) is generated from the converted .ort files,
   so it lists the kernels the runtime optimizers introduced; its header names files by their bundle names.
4. An .ort that is missing or empty after conversion is an error: it never moves on.
5. Style ``none`` keeps the ONNX file (and its external data).
6. The ORT format is one flatbuffer and cannot exceed 2 GiB (the converter fails after a long run
   and leaves a 0-byte file). A model whose proto plus tensor bytes reach that is not converted: it
   ships as ONNX + external data with a notice in the progress output and the stage report, or
   fails with a clear error when the profile says ``ort_format.allow_onnx_fallback: false``.
7. A model ``--tune`` already converted (the search converts every candidate to time it as it would
   ship) is shipped as converted, not converted again.
8. The converted .ort must load in onnxruntime's CPU provider with the bundle's session entries. One that
   does not is onnxruntime's converter breaking a model it runs (a QDQ model with int8 activations as a
   Runtime-style .ort, onnxruntime 1.31, on x86 and ARM64 alike: "SetOpSinceVersionForProducedNodes Not
   enough produced nodes in the runtime optimization record"): the model ships as ONNX with a notice, as
   in rule 6. Where the profile says ``allow_onnx_fallback: false`` (the app loads .ort files), a Runtime-style
   .ort is converted again in Fixed style, with a notice (CPU fusions baked in: an accelerator may take fewer
   nodes); when that does not load either, it is an error naming what onnxruntime said.
9. The converter failing outright on a model onnxruntime runs (a QDQ Conv with a float bias in Runtime
   style, onnxruntime 1.31: "The sum of input arg count is not equal to size of input defs in node
   (conv_bias_dq)") is handled as rule 8: Fixed style, or ONNX where the profile allows it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError
from ..onnxio.ort_convert import ORT_FORMAT_MAX_BYTES, model_bytes, to_ort
from ..pipeline.job import Artifact, Job
from ..pipeline.stage import Stage, StageResult, optional
from ..profiles import Profile

__all__ = ["Convert", "ConvertResult", "convert_artifact"]


@dataclass(frozen=True, kw_only=True)
class ConvertResult(StageResult):
    stage = "convert"
    summary: str
    format: str
    style: str | None = optional()
    platform: str | None = optional()
    onnx_bytes: int | None = optional()
    ort_bytes: int | None = optional()
    fallback: str | None = optional()
    notice: str | None = optional()
    model_bytes: int | None = optional()
    ort_format_max_bytes: int | None = optional()


class Convert(Stage):
    name = "convert"

    def applies(self, job: Job) -> bool:
        return job.profile.ort_format.style != "none"

    def skip(self, artifact: Artifact, job: Job) -> ConvertResult:
        return ConvertResult(summary="kept as ONNX (profile style none)", format="onnx")

    def run(self, artifact: Artifact, job: Job) -> ConvertResult:
        if artifact.format == "ort":
            return converted_result(artifact, job.profile)  # rule 7
        result = convert_artifact(artifact, job.profile, job.workdir / "ort", where=str(job.source.path))
        if result.notice:
            job.say(f"notice: {result.notice}")
        return result


def convert_artifact(artifact: Artifact, profile: Profile, out_dir: Path, *, where: str) -> ConvertResult:
    """Rules 1-9 for one ONNX artifact; the result carries the converted artifact (or the ONNX one, rules 6, 8, 9)."""
    size = model_bytes(artifact.path)
    if size >= ORT_FORMAT_MAX_BYTES:
        return _keep_large_model(size, profile)
    style = profile.ort_format.style
    converted: Artifact | None = None
    refusal: str | None = None
    failed: ConversionError | None = None
    try:
        converted = to_ort(artifact, style, profile.ort_format.platform, out_dir, where=where)
    except ConversionError as exc:  # rule 9: the converter fails on a model onnxruntime runs
        if style != "Runtime" and not profile.ort_format.allow_onnx_fallback:
            raise
        refusal, failed = exc.message, exc
    else:
        refusal = _load_refusal(converted, profile)
    if refusal and not profile.ort_format.allow_onnx_fallback and style == "Runtime":
        fixed = to_ort(artifact, "Fixed", profile.ort_format.platform, out_dir / "fixed", where=where)
        if _load_refusal(fixed, profile) is None:
            result = converted_result(fixed, profile, onnx_bytes=size)
            what = (
                f"onnxruntime's converter fails on the model in Runtime style ({refusal})"
                if converted is None
                else f"onnxruntime cannot load the Runtime-style .ort its converter wrote ({refusal})"
            )
            notice = (
                f"{what}: shipped in Fixed style instead (CPU fusions baked in: the accelerator may take fewer nodes)"
            )
            return dataclasses.replace(result, fallback="Fixed", notice=notice)
        if failed:
            raise failed
    if converted is None:
        return _keep_onnx(style, f"onnxruntime's converter fails on the model in {style} style ({refusal})", profile)
    if refusal:
        return _keep_unloadable(converted, refusal, profile)
    return converted_result(converted, profile, onnx_bytes=size)


def _load_refusal(converted: Artifact, profile: Profile) -> str | None:
    """Rule 8: what onnxruntime says when it cannot load ``converted`` as the bundle will, or None."""
    import onnxruntime as ort

    from ..backends import session_entries
    from ..checked import held_back
    from ..errors import first_line

    options = ort.SessionOptions()
    options.log_severity_level = 4
    for key, value in session_entries(profile, "ort", converted.ort_style).items():
        options.add_session_config_entry(key, value)
    try:
        with held_back():
            ort.InferenceSession(str(converted.path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises many kinds from native code
        return first_line(exc)[:300]
    return None


def _keep_unloadable(converted: Artifact, refusal: str, profile: Profile) -> ConvertResult:
    import onnxruntime as ort

    what = f"onnxruntime {ort.__version__} cannot load the {converted.ort_style}-style .ort its converter wrote"
    if not profile.ort_format.allow_onnx_fallback:
        raise ConversionError(
            f"{what} ({refusal}), and the profile forbids shipping ONNX instead (ort_format.allow_onnx_fallback: false)",
            where=profile.name,
            hint="try the other ort_format.style in the profile (Fixed/Runtime), or allow the ONNX fallback",
        )
    return _keep_onnx(converted.ort_style, f"{what} ({refusal})", profile)


def _keep_onnx(style: str | None, what: str, profile: Profile) -> ConvertResult:
    return ConvertResult(
        summary="kept as ONNX: the model does not convert to a loadable .ort (see notice)",
        format="onnx",
        style=style,
        platform=profile.ort_format.platform,
        fallback="onnx",
        notice=f"{what}: shipped as ONNX instead (no reduced-operator config; the device needs a full onnxruntime build)",
    )


def converted_result(converted: Artifact, profile: Profile, *, onnx_bytes: int | None = None) -> ConvertResult:
    onnx_bytes = model_bytes(converted.onnx_path) if onnx_bytes is None else onnx_bytes
    ort_bytes = converted.path.stat().st_size
    platform = profile.ort_format.platform
    return ConvertResult(
        summary=f"ORT format, {converted.ort_style} style, platform {platform}: "
        f"{onnx_bytes / 1e6:.2f} MB -> {ort_bytes / 1e6:.2f} MB",
        format="ort",
        style=converted.ort_style,
        platform=platform,
        onnx_bytes=onnx_bytes,
        ort_bytes=ort_bytes,
        artifact=converted,
    )


def _keep_large_model(size: int, profile: Profile) -> ConvertResult:
    limit = f"{ORT_FORMAT_MAX_BYTES / (1 << 30):.0f} GiB"
    if not profile.ort_format.allow_onnx_fallback:
        raise ConversionError(
            f"the model is {size / 1e9:.2f} GB, over the ORT format's limit of {limit}, and the profile forbids "
            "shipping ONNX instead (ort_format.allow_onnx_fallback: false)",
            where=profile.name,
            hint="quantize the model (--quantize) to bring it under the limit, or use a profile that allows the ONNX fallback",
        )
    notice = (
        f"the model is {size / 1e9:.2f} GB, over the ORT format's limit of {limit}: shipped as ONNX with "
        "external data instead of .ort (no reduced-operator config; the device needs a full onnxruntime build)"
    )
    return ConvertResult(
        summary=f"kept as ONNX + external data: {size / 1e9:.2f} GB is over the ORT format's limit of "
        f"{limit} (see notice)",
        format="onnx",
        fallback="onnx",
        notice=notice,
        model_bytes=size,
        ort_format_max_bytes=ORT_FORMAT_MAX_BYTES,
    )
