"""ONNX -> ORT format with onnxruntime's own converter, in a child process, with the reduced-operator config.

The converter always gets an explicit style list (its default converts nothing) and type reduction on;
it runs in a child process so that a crash in it cannot take edgepack down. The .ort it writes is made
canonical (``ort_canonical``) so the same model always gives the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from ..checked import work_paths_out
from ..errors import ConversionError
from .modelinfo import external_locations
from .ort_canonical import canonicalize_ort_file

if TYPE_CHECKING:
    from ..pipeline.job import Artifact

__all__ = ["convert_to_ort", "to_ort", "CONFIG_NAME", "ORT_FORMAT_MAX_BYTES", "model_bytes"]

CONFIG_NAME = "required_operators_and_types.config"

ORT_FORMAT_MAX_BYTES = (1 << 31) - 1
"""The largest flatbuffer, hence the largest .ort file."""


def to_ort(artifact: Artifact, style: str, platform: str, out_dir: Path, *, where: str) -> Artifact:
    """``artifact`` (an ONNX pipeline Artifact) converted to the ORT format in ``style`` for ``platform``: the one
    conversion the convert stage and ``--tune`` both ship."""
    ort_path, config = convert_to_ort(artifact.path, out_dir, style, platform, where=where)
    return dataclasses.replace(
        artifact, path=ort_path, format="ort", ort_style=style, ops_config=config, onnx=artifact.onnx_path
    )


def convert_to_ort(model: Path, out_dir: Path, style: str, platform: str, *, where: str) -> tuple[Path, Path]:
    """The canonical .ort of ``model`` and its reduced-operator config, both in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", __name__, str(model), str(out_dir), style, platform]
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        detail = _last_error_line(log) or f"the converter exited with code {done.returncode}"
        tail = " | ".join(line.strip() for line in log.strip().splitlines()[-3:])
        raise ConversionError(
            f"ORT-format conversion ({style} style) failed: {detail}",
            where=where,
            hint=f"onnxruntime's converter failed on this model; its last lines: {work_paths_out(tail)[-600:]}",
        )
    suffix = ".with_runtime_opt" if style == "Runtime" else ""
    ort_path = out_dir / f"{model.stem}{suffix}.ort"
    config = out_dir / f"{model.stem}.required_operators_and_types{suffix}.config"
    if not ort_path.is_file() or ort_path.stat().st_size == 0 or not config.is_file():
        raise ConversionError(f"ORT-format conversion produced no usable file:\n{log[-2000:]}", where=where)
    try:
        canonicalize_ort_file(ort_path)
    except ValueError as exc:
        raise ConversionError(
            f"the converted .ort cannot be made reproducible: {exc}",
            where=where,
            hint="use the onnxruntime version pinned in pyproject.toml",
        ) from None
    return ort_path, config


def model_bytes(path: Path) -> int:
    """What an .ort of this ONNX model holds at least: the proto plus every external tensor's bytes."""
    proto = onnx.load_model(path, load_external_data=False)
    total = path.stat().st_size
    for _, location, offset, length in external_locations(proto):
        total += length if length is not None else max(0, (path.parent / location).stat().st_size - offset)
    return total


def _last_error_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "Fail" in line]
    return (errors or lines or [""])[-1][:500]


def _convert_in_this_process(model: Path, out_dir: Path, style: str, platform: str) -> None:
    """Child-process entry: onnxruntime's converter, always with an explicit style (the default converts nothing)."""
    import onnxruntime as ort

    from ..ort_tools import load_ort_tools

    load_ort_tools()
    from onnxruntime.tools import convert_onnx_models_to_ort as converter

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    ort.set_default_logger_severity(3)
    with contextlib.redirect_stdout(io.StringIO()):
        converter.convert_onnx_models_to_ort(
            model,
            output_dir=out_dir,
            optimization_styles=[converter.OptimizationStyle[style]],
            target_platform=platform,
            enable_type_reduction=True,
        )


if __name__ == "__main__":
    _convert_in_this_process(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4])
