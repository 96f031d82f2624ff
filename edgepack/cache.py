"""The bundle cache: a bundle already built from the same inputs is restored instead of rebuilt.

Rules:
1. The key is the SHA-256 of everything a bundle's bytes depend on: the model file and its external
   data, the bundle's name, the resolved profile, the options that shape the bundle (files they name
   are hashed by content: calibration and validation data, sample inputs, a local onnxruntime-web
   tarball, a pinned key), the signing key's fingerprint, and the tools (edgepack's version and the
   digest of its own files, so an edited checkout misses; onnx, onnxruntime, onnx-ir,
   onnxconverter-common, numpy, Python; onnxruntime-web is pinned by the web profiles themselves), and
   ``$SOURCE_DATE_EPOCH``, which the manifest records.
   How the build runs (jobs, executor, cache settings, output folder, --force) is not in the key.
2. Only a complete bundle enters the cache: the pipeline has verified it, it is copied to a temporary
   folder inside the cache and renamed into place, so a reader never sees half an entry.
3. A restored bundle is copied to a staging folder beside its destination and checked against its
   manifest (and its signature, when signing) before it is renamed into place; an entry that fails the
   check is deleted and the bundle is rebuilt.
4. The cache may be shared by several processes or CI runners on one file system: every change is a
   rename made while holding an exclusive ``flock`` on ``lock``; restoring holds a shared one, so an
   entry is never evicted while it is being copied.
5. Past the size limit, the least recently used entries are evicted (a hit refreshes its entry).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from .bundle.manifest import read_manifest, verify_bundle
from .errors import UsageError
from .fileops import atomic_folder

__all__ = ["BundleCache", "bundle_key", "options_digest", "CacheInfo"]

KEY_SCHEMA = "edgepack.cache/1"
_ENTRY = "entry.json"
_BUNDLE = "bundle"
_RUN_ONLY = {"output", "force", "freeze", "onefile", "execution", "sign_key", "sign_passphrase_env"}
"""Options that do not change a bundle's bytes (the signing key counts by its fingerprint instead)."""
_TOOLS = (
    "edgepack",
    "onnx",
    "onnxruntime",
    "onnx-ir",
    "onnxconverter-common",
    "numpy",
    "cryptography",
    "torch",
    "onnxscript",
)


def options_digest(options) -> dict[str, Any]:
    """The options' part of a bundle's key (rule 1): the files they name by content. The same for every target
    of a model, so it is computed once per model, not per bundle."""
    part = {}
    for f in dataclasses.fields(options):
        if f.name in _RUN_ONLY:
            continue
        value = getattr(options, f.name)
        if isinstance(value, Path) or (f.name == "calibration" and value not in (None, "random")):
            value = _path_digest(Path(value))
        part[f.name] = value
    return part


def bundle_key(
    model_files: dict[str, str],
    bundle_name: str,
    profile,
    options_part: dict[str, Any],
    *,
    signer: str | None = None,
    origin: list[dict[str, Any]] | None = None,
) -> str:
    """The cache key of one bundle (rule 1). ``model_files``: ``model_digests`` of the model;
    ``options_part``: ``options_digest`` of its options."""
    parts = {
        "schema": KEY_SCHEMA,
        "bundle": bundle_name,
        "model": model_files,
        "profile": profile.to_dict(),
        "options": options_part,
        "signer": signer,
        "origin": origin or [],
        "tools": tool_versions(),
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH"),  # the manifest records it
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_digests(model: Path, locations: list[str] | None = None, *, digest: str | None = None) -> dict[str, str]:
    """SHA-256 of the model file (``digest`` when already computed) and of every external-data file it names
    (read from the model unless ``locations`` is given). Raises on a model that cannot be parsed."""
    digests = {model.name: digest or _file_sha256(model)}
    for location in external_data_files(model) if locations is None else locations:
        side = model.parent / location
        digests[location] = _file_sha256(side) if side.is_file() else "missing"
    return digests


def external_data_files(model: Path) -> list[str]:
    import onnx

    from .onnxio.modelinfo import external_locations

    proto = onnx.load_model(model, load_external_data=False)
    return sorted({location for _, location, _, _ in external_locations(proto)})


def _path_digest(path: Path) -> str:
    """A file's SHA-256, or a folder's: the digest of its files' relative names and digests."""
    if path.is_file():
        return _file_sha256(path)
    if path.is_dir():
        listing = [
            f"{p.relative_to(path).as_posix()}:{_file_sha256(p)}" for p in sorted(path.rglob("*")) if p.is_file()
        ]
        return hashlib.sha256("\n".join(listing).encode("utf-8")).hexdigest()
    return f"missing:{path}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "edgepack-files": _edgepack_digest()}
    for package in _TOOLS:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _edgepack_digest() -> str:
    """edgepack's own code, profiles, shim and data: a development checkout keeps one version number."""
    digest = hashlib.sha256()
    for package in ("edgepack", "edgepack.builtin_targets", "edgepack.runtime_shim"):
        root = Path(str(resources.files(package)))
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheInfo:
    path: Path
    entries: int
    bytes: int
    max_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "entries": self.entries, "bytes": self.bytes, "max_bytes": self.max_bytes}


class BundleCache:
    """Entries are ``entries/<key>/bundle/`` (the bundle as built) and ``entries/<key>/entry.json``
    (name, size; its modification time is the last use)."""

    def __init__(self, root: Path, max_mb: float):
        if not max_mb > 0:
            raise UsageError(f"--cache-max-mb {max_mb:g}: expected a size in MB above 0")
        self.root = Path(root)
        self.max_bytes = int(max_mb * 1e6)
        try:
            for folder in (self.root / "entries", self.root / "models", self.root / "tmp"):
                folder.mkdir(parents=True, exist_ok=True)
            (self.root / "lock").touch(exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot use the bundle cache: {exc}",
                where=str(self.root),
                hint="give a writable folder with --cache-dir, or pass --no-cache",
            ) from None

    def model_files(self, model: Path) -> dict[str, str] | None:
        """``model_digests`` of ``model``, None when it cannot be parsed (the load stage then says why).
        The names of its external-data files are remembered by the model's digest, so a warm build
        hashes files and never pays for importing onnx."""
        try:
            digest = _file_sha256(model)
        except OSError:
            return None
        memo = self.root / "models" / f"{digest}.json"
        try:
            locations = json.loads(memo.read_text(encoding="utf-8"))["external_data"]
        except (OSError, ValueError, KeyError, TypeError):
            try:
                locations = external_data_files(model)
            except Exception:  # any parse failure: not cached
                return None
            temp = Path(tempfile.mkstemp(prefix="model.", dir=self.root / "tmp")[1])
            temp.write_text(json.dumps({"external_data": locations}), encoding="utf-8")
            os.chmod(temp, 0o644)
            os.replace(temp, memo)
        return model_digests(model, locations, digest=digest)

    def restore(
        self, key: str, destination: Path, *, force: bool, public_key=None
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Put the cached bundle at ``destination`` (rule 3): (its manifest, None) on a hit, (None, None) on
        a miss, (None, what was wrong) when the entry was corrupt (it is deleted)."""
        entry = self.root / "entries" / key
        with self._lock(fcntl.LOCK_SH):
            if not (entry / _ENTRY).is_file():
                return None, None
            try:
                with atomic_folder(destination, force=force) as staging:
                    shutil.copytree(entry / _BUNDLE, staging, dirs_exist_ok=True, symlinks=True)
                    problem = _problem(staging, public_key)
                    if problem:
                        raise _Corrupt(problem)
                    manifest = read_manifest(staging)
            except _Corrupt as exc:
                problem = str(exc)
            except OSError as exc:
                problem = f"unreadable: {exc}"
            else:
                os.utime(entry / _ENTRY)
                return manifest, None
        with self._lock(fcntl.LOCK_EX):
            self._remove(entry)
        return None, problem

    def store(self, key: str, bundle: Path) -> None:
        """Copy a complete, verified bundle into the cache (rule 2), then evict past the limit (rule 5)."""
        temp = Path(tempfile.mkdtemp(prefix=f"{key[:16]}.", dir=self.root / "tmp"))
        try:
            os.chmod(temp, 0o755)
            shutil.copytree(bundle, temp / _BUNDLE, symlinks=True)
            size = sum(p.stat().st_size for p in (temp / _BUNDLE).rglob("*") if p.is_file())
            (temp / _ENTRY).write_text(
                json.dumps({"bundle": bundle.name, "bytes": size, "stored": time.time()}), encoding="utf-8"
            )
            with self._lock(fcntl.LOCK_EX):
                entry = self.root / "entries" / key
                if not entry.exists():  # another writer stored the same bundle first: theirs stays
                    os.rename(temp, entry)
                self._evict()
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def info(self) -> CacheInfo:
        with self._lock(fcntl.LOCK_SH):
            entries = self._entries()
        return CacheInfo(self.root, len(entries), sum(size for _, size, _ in entries), self.max_bytes)

    def clear(self) -> int:
        """Delete every entry (and leftovers of interrupted writers); return how many entries there were."""
        with self._lock(fcntl.LOCK_EX):
            entries = self._entries()
            for path, _, _ in entries:
                self._remove(path)
            for leftover in (self.root / "tmp").iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        return len(entries)

    def _entries(self) -> list[tuple[Path, int, float]]:
        """(folder, bytes, last use) of each complete entry."""
        found = []
        for entry in (self.root / "entries").iterdir():
            try:
                record = json.loads((entry / _ENTRY).read_text(encoding="utf-8"))
                found.append((entry, int(record["bytes"]), (entry / _ENTRY).stat().st_mtime))
            except (OSError, ValueError, KeyError, TypeError):
                found.append((entry, 0, 0.0))  # unreadable: first to go
        return found

    def _evict(self) -> None:
        entries = sorted(self._entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            self._remove(path)
            total -= size

    def _remove(self, entry: Path) -> None:
        """Rename out of ``entries`` first: a reader sees the entry whole or not at all."""
        if not entry.exists():
            return
        doomed = Path(tempfile.mkdtemp(prefix="evicted.", dir=self.root / "tmp"))
        os.rename(entry, doomed / "entry")
        shutil.rmtree(doomed, ignore_errors=True)

    @contextmanager
    def _lock(self, mode: int) -> Iterator[None]:
        with open(self.root / "lock", "rb") as handle:
            fcntl.flock(handle, mode)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class _Corrupt(Exception):
    pass


def _problem(bundle: Path, public_key) -> str | None:
    from .errors import VerificationError

    try:
        result = verify_bundle(bundle)
        if not result.ok:
            return f"{len(result.missing)} missing, {len(result.extra)} extra, {len(result.changed)} changed file(s)"
        if public_key is not None:
            from .bundle.signing import verify_signature

            verify_signature(bundle, public_key)
    except VerificationError as exc:
        return str(exc)
    return None
