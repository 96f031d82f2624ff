"""Where a bundle may be written, and what ``--force`` may replace: checked before any work and again
at the moment a finished bundle is renamed into place.

Rules:
1. ``--force`` replaces only what is recognisably edgepack's own: a real folder (not a link) holding a
   ``manifest.json`` of edgepack's schema and no file its manifest does not list (a file the user
   added is the user's). A frozen executable's folder must hold the ``edgepack_shim`` executable.
2. Never the input: a destination holding the model or one of its side files is refused, with or
   without ``--force`` (seen: ``--force`` deleted the model packaged from inside the old bundle folder).
3. A destination that is a file or a symbolic link, an ``-o`` that names a file or a folder that
   cannot be written, or a path the system cannot use (too long) is a usage error before any work.
4. Nothing is created before the bundle is ready: the output folder (``-o``) is made when the bundle
   is renamed into it, so a failed target leaves no empty folder behind.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .bundle.manifest import MANIFEST_NAME, SCHEMA, list_files
from .errors import UsageError

__all__ = ["check_destination", "not_a_bundle", "nearest_existing"]


def check_destination(
    destination: Path,
    *,
    force: bool,
    inputs: Iterable[Path] = (),
    recognise: Callable[[Path], str | None] | None = None,
) -> None:
    """Raise UsageError unless a bundle may be written at ``destination`` (rules 1-3).

    ``recognise(path)`` says why an existing folder is not one ``--force`` may replace (None: it may);
    by default ``not_a_bundle`` (rule 1)."""
    recognise = recognise or not_a_bundle
    try:
        _check(destination, force, list(inputs), recognise)
    except OSError as exc:
        raise UsageError(f"cannot use this output path: {exc.strerror or exc}", where=_shown(destination)) from None


def _check(destination: Path, force: bool, inputs: list[Path], recognise) -> None:
    where = _shown(destination)
    for path in inputs:
        if _inside(path, destination):
            raise UsageError(
                f"the input {_shown(path)} is inside the output folder, which packaging would replace",
                where=where,
                hint="choose another -o, or move the model out of the old bundle first",
            )
    if os.path.islink(destination):
        raise UsageError(
            "the output is a symbolic link; edgepack does not replace links",
            where=where,
            hint="remove the link or choose another -o",
        )
    if os.path.lexists(destination):
        if not os.path.isdir(destination):
            raise UsageError(
                "the output exists and is a file, not a bundle folder",
                where=where,
                hint="remove it or choose another -o",
            )
        if not force:
            raise UsageError("the output already exists", where=where, hint="pass --force to replace it")
        problem = recognise(destination)
        if problem:
            raise UsageError(
                f"--force replaces only a folder edgepack wrote, and this one {problem}",
                where=where,
                hint="move your files out of it, delete it yourself, or choose another -o",
            )
    parent = nearest_existing(destination.parent)
    longest = os.pathconf(parent, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    below = Path(os.path.abspath(destination)).relative_to(parent).parts
    if any(len(os.fsencode(part)) > longest for part in below) or len(os.fsencode(os.path.abspath(destination))) > 4000:
        raise UsageError(
            f"the output path is too long for this system (a name over {longest} bytes, or a path over 4000)",
            where=where,
            hint="choose a shorter -o",
        )
    if not parent.is_dir():
        raise UsageError(
            f"{_shown(parent)} is a file, so no bundle folder can be made below it",
            where=where,
            hint="-o names the folder that receives one bundle folder per target",
        )
    try:  # a real write: permission bits say nothing for root, nor for a read-only or special filesystem
        os.rmdir(tempfile.mkdtemp(prefix=".edgepack-probe-", dir=parent))
    except OSError as exc:
        raise UsageError(
            f"cannot write in the folder {_shown(parent)}: {exc.strerror or exc}",
            where=where,
            hint="choose an -o in a folder you can write",
        ) from None


def not_a_bundle(folder: Path) -> str | None:
    """Why ``folder`` is not a bundle ``--force`` may replace (rule 1), or None."""
    manifest = folder / MANIFEST_NAME
    try:
        if not stat.S_ISREG(os.lstat(manifest).st_mode):
            return f"has a {MANIFEST_NAME} that is not a regular file"
        with open(manifest, "rb") as f:
            data = json.loads(f.read((16 << 20) + 1).decode("utf-8"))
    except FileNotFoundError:
        return f"has no {MANIFEST_NAME} (it is not an edgepack bundle)"
    except (OSError, ValueError, RecursionError):
        return f"has an unreadable {MANIFEST_NAME}"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("files"), dict):
        return f"has a {MANIFEST_NAME} that is not an edgepack manifest"
    listed = set(data["files"])
    unknown = [rel for rel in list_files(folder) if rel not in listed and not rel.startswith("__pycache__/")]
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        return f"holds files its manifest does not list: {', '.join(_shown(r) for r in unknown[:3])}{more}"
    return None


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (rule 4: where the bundle is staged before -o exists)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _inside(path: Path, folder: Path) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False


def _shown(path) -> str:
    text = str(path)
    return text if len(text) <= 200 else text[:120] + "..." + text[-60:]
