"""File helpers shared by the stages: streamed copies with bundle permissions, and atomic output folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .destination import check_destination, nearest_existing
from .errors import UsageError

__all__ = ["copy_file", "copy_model", "atomic_folder", "remove_staging", "working_directory"]


def copy_file(src, dst) -> None:
    """Stream-copy one file and give it mode 0644 (onnx writes side files 0600)."""
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)


def copy_model(src: Path, dst: Path, locations: Iterable[str] | None = None) -> Path:
    """An ONNX model byte for byte at ``dst``, its side files beside it at the same relative places.
    ``locations``: its side files when already known (read from the model otherwise)."""
    if locations is None:
        import onnx

        from .onnxio.modelinfo import external_locations

        proto = onnx.load_model(src, load_external_data=False)
        locations = sorted({loc for _, loc, _, _ in external_locations(proto)})
    dst.parent.mkdir(parents=True, exist_ok=True)
    for location in locations:
        (dst.parent / location).parent.mkdir(parents=True, exist_ok=True)
        copy_file(src.parent / location, dst.parent / location)
    copy_file(src, dst)
    return dst


def _staging_prefix(destination: Path) -> str:
    return f".{destination.name[:60]}."


def remove_staging(destination: Path) -> None:
    """The staging folders ``atomic_folder`` made for ``destination`` and a process that died left behind."""
    for partial in nearest_existing(destination.parent).glob(f"{_staging_prefix(destination)}*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def atomic_folder(
    destination: Path,
    *,
    force: bool,
    inputs: Iterable[Path] = (),
    recognise: Callable[[Path], str | None] | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary folder; rename it to ``destination`` only if the block succeeds.

    The temporary folder sits in the closest existing folder on the way to ``destination`` (so the rename
    stays on one filesystem) and the folders up to ``destination`` are made only at the rename: on any
    failure nothing is left, not even an empty output folder. What may be replaced, and what never
    (the ``inputs``), is ``destination.check_destination``'s rule, checked again at the rename.
    """
    check_destination(destination, force=force, inputs=inputs, recognise=recognise)
    parent = nearest_existing(destination.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(destination), suffix=".partial", dir=parent))
    except OSError as exc:
        raise UsageError(
            f"cannot write in {parent}: {exc.strerror or exc}",
            where=str(destination),
            hint="choose an -o in a folder you can write",
        ) from None
    os.chmod(staging, 0o755)
    try:
        yield staging
        check_destination(destination, force=force, inputs=inputs, recognise=recognise)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(destination):
            old = staging.with_suffix(".old")
            destination.rename(old)
            staging.rename(destination)
            shutil.rmtree(old)
        else:
            staging.rename(destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def working_directory(folder: Path) -> Iterator[Path]:
    """Run a block with ``folder`` as the current folder: for library helpers that write files relative
    to it (onnxruntime's quantization pre-processing, onnx's checker looking for side files)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)
