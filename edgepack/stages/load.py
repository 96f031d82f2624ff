"""Stage 1, load: read the user's model once, refuse what is broken or unsafe, write a clean FP32 copy.

Rules:
1. The model must be a non-empty file that parses as ONNX and passes ``onnx.checker``.
2. Every external-data ``location`` must be a relative path inside the model's folder (no ``..``, no
   absolute path, no symlink leading out), and its file must hold ``offset + length`` bytes.
3. The model is re-written (never modified in place) through onnx-ir, which memory-maps external data:
   initializers listed as graph inputs (IR 3) are removed from the inputs, weights held in Constant
   nodes become initializers. The copy keeps external data when the source had it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveInitializersFromInputsPass

from ..errors import ModelError
from ..job import Source
from ..modelinfo import external_locations, summarize
from .save import save_model

__all__ = ["load", "parse_model"]


def load(path: Path, workdir: Path, name: str | None = None) -> Source:
    proto = parse_model(path)
    reference = workdir / "reference.onnx"
    model = ir.load(path)
    changes = {}
    for pass_ in (RemoveInitializersFromInputsPass(), LiftConstantsToInitializersPass()):
        changes[type(pass_).__name__] = pass_(model).modified
    save_model(model, reference)
    info = summarize(proto, path)
    info.update({"sha256": _sha256(path), "passes": changes})
    return Source(name=name or path.stem, path=path, reference=reference, info=info)


def parse_model(path: Path) -> onnx.ModelProto:
    """The model's protobuf (external data not read), checked: rules 1 and 2."""
    if not path.exists():
        raise ModelError("no such file", where=str(path))
    if path.is_dir():
        raise ModelError("is a folder, not an ONNX model file", where=str(path), hint="pass the .onnx file inside it")
    if path.stat().st_size == 0:
        raise ModelError("the file is empty (0 bytes)", where=str(path))
    try:
        proto = onnx.load_model(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelError(
            f"not a valid ONNX model: the protobuf cannot be parsed ({type(exc).__name__})",
            where=str(path),
            hint="the file may be truncated or not an ONNX model; re-export or re-download it",
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelError("not an ONNX model: it has no graph", where=str(path))
    try:
        # with external data, check the file: the checker resolves side files against the model's folder
        onnx.checker.check_model(str(path) if external_locations(proto) else proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"the ONNX checker rejects the model: {first}", where=str(path)) from None
    _check_external_data(proto, path)
    return proto


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    folder = path.parent.resolve()
    sizes: dict[str, int] = {}
    for tensor, location, offset, length in external_locations(proto):
        where = f"{path} (tensor {tensor!r})"
        if not location:
            raise ModelError("external data with no location", where=where)
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ".." in Path(location).parts:
            raise ModelError(
                f"external data location {location!r} points outside the model's folder", where=where,
                hint="side files must sit in the model's folder or below it",
            )
        side = (path.parent / location)
        if not side.resolve().is_relative_to(folder):
            raise ModelError(f"external data file {location!r} is a link leading outside the model's folder", where=where)
        if not side.is_file():
            raise ModelError(f"external data file {location!r} is missing", where=where,
                             hint="copy the side files next to the .onnx file")
        size = sizes.setdefault(location, side.stat().st_size)
        end = offset + (length or 0)
        if end > size or (length is None and offset > size):
            raise ModelError(
                f"external data file {location!r} is {size} bytes, shorter than the tensor's offset+length ({end})",
                where=where, hint="the side file is truncated; copy it again",
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
