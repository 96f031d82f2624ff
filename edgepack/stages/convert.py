"""Stage 5, convert: ONNX -> ORT format with the profile's style and platform, plus the reduced-operator config.

Rules:
1. onnxruntime's own converter does the work (``convert_onnx_models_to_ort``), always with an explicit
   style list (the default converts nothing) and type reduction on, in a child process: a crash in it
   cannot take edgepack down.
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
"""

from __future__ import annotations

from ..errors import ConversionError
from ..onnxio.ort_convert import ORT_FORMAT_MAX_BYTES, convert_to_ort, model_bytes
from ..pipeline.job import Artifact, Job

__all__ = ["convert"]


def convert(artifact: Artifact, job: Job) -> tuple[Artifact, dict]:
    style = job.profile.ort_format.style
    if style == "none":
        return artifact, {"stage": "convert", "summary": "kept as ONNX (profile style none)", "format": "onnx"}
    size = model_bytes(artifact.path)
    if size >= ORT_FORMAT_MAX_BYTES:
        return artifact, _keep_large_model(size, job)
    ort_path, config = convert_to_ort(artifact.path, job.workdir / "ort", style, job.profile.ort_format.platform,
                                      where=str(job.source.path))
    onnx_size = size
    ort_size = ort_path.stat().st_size
    report = {
        "stage": "convert",
        "summary": f"ORT format, {style} style, platform {job.profile.ort_format.platform}: "
        f"{onnx_size / 1e6:.2f} MB -> {ort_size / 1e6:.2f} MB",
        "format": "ort",
        "style": style,
        "platform": job.profile.ort_format.platform,
        "onnx_bytes": onnx_size,
        "ort_bytes": ort_size,
    }
    converted = Artifact(path=ort_path, format="ort", ort_style=style, ops_config=config,
                         precision=artifact.precision, onnx=artifact.onnx_path)
    return converted, report


def _keep_large_model(size: int, job: Job) -> dict:
    limit = f"{ORT_FORMAT_MAX_BYTES / (1 << 30):.0f} GiB"
    if not job.profile.ort_format.allow_onnx_fallback:
        raise ConversionError(
            f"the model is {size / 1e9:.2f} GB, over the ORT format's limit of {limit}, and the profile forbids "
            "shipping ONNX instead (ort_format.allow_onnx_fallback: false)",
            where=job.profile.name,
            hint="quantize the model (--quantize) to bring it under the limit, or use a profile that allows the ONNX fallback",
        )
    notice = (f"the model is {size / 1e9:.2f} GB, over the ORT format's limit of {limit}: shipped as ONNX with "
              "external data instead of .ort (no reduced-operator config; the device needs a full onnxruntime build)")
    job.say(f"notice: {notice}")
    return {"stage": "convert", "summary": f"kept as ONNX + external data: {size / 1e9:.2f} GB is over the ORT "
            f"format's limit of {limit} (see notice)", "format": "onnx",
            "fallback": "onnx", "notice": notice, "model_bytes": size, "ort_format_max_bytes": ORT_FORMAT_MAX_BYTES}
