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

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import onnx

from ..errors import ConversionError
from ..job import Artifact, Job
from ..modelinfo import external_locations
from ..ort_tools import load_ort_tools
from .ort_canonical import canonicalize_ort_file

__all__ = ["convert", "CONFIG_NAME", "ORT_FORMAT_MAX_BYTES", "model_bytes"]

CONFIG_NAME = "required_operators_and_types.config"

ORT_FORMAT_MAX_BYTES = (1 << 31) - 1
"""The largest flatbuffer, hence the largest .ort file."""


def convert(artifact: Artifact, job: Job) -> tuple[Artifact, dict]:
    style = job.profile.ort_format.style
    if style == "none":
        return artifact, {"stage": "convert", "summary": "kept as ONNX (profile style none)", "format": "onnx"}
    size = model_bytes(artifact.path)
    if size >= ORT_FORMAT_MAX_BYTES:
        return artifact, _keep_large_model(size, job)
    out_dir = job.workdir / "ort"
    out_dir.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "edgepack.stages.convert", str(artifact.path), str(out_dir), style,
               job.profile.ort_format.platform]
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        detail = _last_error_line(log) or f"the converter exited with code {done.returncode}"
        raise ConversionError(f"ORT-format conversion ({style} style) failed: {detail}",
                              where=str(job.source.path), hint="run with --debug for onnxruntime's log")
    suffix = ".with_runtime_opt" if style == "Runtime" else ""
    ort_path = out_dir / f"{artifact.path.stem}{suffix}.ort"
    config = out_dir / f"{artifact.path.stem}.required_operators_and_types{suffix}.config"
    if not ort_path.is_file() or ort_path.stat().st_size == 0 or not config.is_file():
        raise ConversionError(f"ORT-format conversion produced no usable file:\n{log[-2000:]}",
                              where=str(job.source.path))
    try:
        canonicalize_ort_file(ort_path)
    except ValueError as exc:
        raise ConversionError(f"the converted .ort cannot be made reproducible: {exc}", where=str(job.source.path),
                              hint="use the onnxruntime version pinned in pyproject.toml") from None
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


def model_bytes(path: Path) -> int:
    """What an .ort of this ONNX model holds at least: the proto plus every external tensor's bytes."""
    proto = onnx.load_model(path, load_external_data=False)
    total = path.stat().st_size
    for _, location, offset, length in external_locations(proto):
        total += length if length is not None else max(0, (path.parent / location).stat().st_size - offset)
    return total


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


def _last_error_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "Fail" in line]
    return (errors or lines or [""])[-1][:500]


def _convert_in_this_process(model: Path, out_dir: Path, style: str, platform: str) -> None:
    """Child-process entry: onnxruntime's converter, always with an explicit style (the default converts nothing)."""
    import onnxruntime as ort

    load_ort_tools()
    from onnxruntime.tools import convert_onnx_models_to_ort as converter

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    ort.set_default_logger_severity(3)
    with contextlib.redirect_stdout(io.StringIO()):
        converter.convert_onnx_models_to_ort(
            model, output_dir=out_dir, optimization_styles=[converter.OptimizationStyle[style]],
            target_platform=platform, enable_type_reduction=True,
        )


if __name__ == "__main__":
    _convert_in_this_process(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4])
