"""File helpers shared by the stages: streamed copies with bundle permissions, and atomic output folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

__all__ = ["copy_file", "atomic_folder"]


def copy_file(src, dst) -> None:
    """Stream-copy one file and give it mode 0644 (onnx writes side files 0600)."""
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)


@contextmanager
def atomic_folder(destination: Path, *, force: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``destination``; rename it into place only if the block succeeds.

    On any failure the temporary folder is removed and ``destination`` is left as it was.
    """
    if destination.exists() and not force:
        raise UsageError(f"{destination} already exists", hint="pass --force to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    os.chmod(staging, 0o755)
    try:
        yield staging
        if destination.exists():
            old = staging.with_suffix(".old")
            destination.rename(old)
            staging.rename(destination)
            shutil.rmtree(old)
        else:
            staging.rename(destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
