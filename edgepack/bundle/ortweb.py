"""onnxruntime-web for web bundles: the npm package at the profile's pinned version, verified and cached.

Rules:
1. The tarball comes from the npm registry (``$npm_config_registry`` or registry.npmjs.org): the
   version's metadata gives ``dist.tarball`` and ``dist.integrity`` (sha512); the downloaded bytes must
   match that integrity, else nothing is kept.
2. A verified tarball is cached in ``$EDGEPACK_CACHE_DIR`` or the user cache folder
   (``$XDG_CACHE_HOME/edgepack/npm``, by default ``~/.cache/edgepack/npm``) beside a file holding its
   integrity; a cached tarball is re-hashed before each use and fetched again if it changed.
3. A local tarball (``--ort-web PATH``) works offline; its package.json must name the package and a
   version the profile allows.
4. Only the files the profile lists (``web.ort_web_files``, from the package's ``dist/`` folder) are
   extracted; the rest of the 139 MB package never reaches a bundle.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..errors import DownloadError, ProfileError, UsageError, VerificationError
from ..profiles import Profile
from ..progress import step

__all__ = ["OrtWeb", "pinned_version", "cache_dir", "fetch_tarball", "open_tarball", "extract_files"]

PACKAGE = "onnxruntime-web"
DEFAULT_REGISTRY = "https://registry.npmjs.org"
TIMEOUT_S = 60
_CHUNK = 1 << 20


@dataclass(frozen=True)
class OrtWeb:
    """A verified onnxruntime-web tarball."""

    path: Path
    version: str
    integrity: str
    """sha512 SRI string of the tarball, as npm writes it."""
    origin: str
    """Where it came from: the registry URL, or 'local tarball PATH'."""

    def to_dict(self) -> dict:
        return {"package": PACKAGE, "version": self.version, "integrity": self.integrity, "origin": self.origin}


def pinned_version(profile: Profile) -> str:
    """The one version a web bundle ships: the profile's ``runtime.version`` must be ``==X.Y.Z``."""
    spec = profile.runtime.version.strip()
    version = spec[2:].strip() if spec.startswith("==") and "," not in spec and "*" not in spec else ""
    if not version:
        raise ProfileError(
            f"key 'runtime.version': a web bundle ships one exact {PACKAGE} version, "
            f"so it must be pinned like '==1.30.0', found {spec!r}",
            where=profile.source or profile.name,
        )
    return version


def cache_dir() -> Path:
    if os.environ.get("EDGEPACK_CACHE_DIR"):
        return Path(os.environ["EDGEPACK_CACHE_DIR"]) / "npm"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgepack" / "npm"


def registry_url() -> str:
    return (os.environ.get("npm_config_registry") or os.environ.get("NPM_CONFIG_REGISTRY") or DEFAULT_REGISTRY).rstrip(
        "/"
    )


def fetch_tarball(version: str, cache: Path | None = None) -> OrtWeb:
    """The verified tarball of ``onnxruntime-web@version``, from the cache or the npm registry (rule 1, 2)."""
    cache = cache or cache_dir()
    tarball = cache / f"{PACKAGE}-{version}.tgz"
    recorded = tarball.with_name(tarball.name + ".integrity")
    if tarball.is_file() and recorded.is_file():
        integrity = recorded.read_text(encoding="ascii").strip()
        if _sri_sha512(tarball) == integrity:
            return OrtWeb(tarball, version, integrity, f"cache {tarball}")
    registry = registry_url()
    meta_url = f"{registry}/{PACKAGE}/{version}"
    try:
        meta = json.loads(_get(meta_url).read())
        url, integrity = meta["dist"]["tarball"], meta["dist"]["integrity"]
    except (ValueError, KeyError, TypeError):
        raise DownloadError(
            f"the npm registry's metadata for {PACKAGE}@{version} has no dist.tarball/dist.integrity", where=meta_url
        ) from None
    if not integrity.startswith("sha512-"):
        raise DownloadError(
            f"the npm registry gives no sha512 integrity for {PACKAGE}@{version} ({integrity!r})", where=meta_url
        )
    cache.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{tarball.name}.", suffix=".partial", dir=cache)
    try:
        digest = hashlib.sha512()
        with (
            os.fdopen(fd, "wb") as out,
            _get(url) as response,
            step(f"downloading {PACKAGE}@{version}", total=response.length, unit="bytes") as download,
        ):
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                download.advance(len(chunk))
        got = "sha512-" + base64.b64encode(digest.digest()).decode("ascii")
        if got != integrity:
            raise VerificationError(
                f"the downloaded {PACKAGE}@{version} tarball does not match the registry's integrity "
                f"(expected {integrity}, got {got}); it was not kept",
                where=url,
                hint="retry; if it persists, the registry or a proxy in between serves altered files",
            )
        os.chmod(partial, 0o644)
        os.replace(partial, tarball)
        recorded.write_text(integrity + "\n", encoding="ascii")
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(
            f"downloading {PACKAGE}@{version} failed: {exc}",
            where=url,
            hint="check the network, or pass a local tarball with --ort-web PATH",
        ) from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return OrtWeb(tarball, version, integrity, url)


def open_tarball(path: Path, profile: Profile) -> OrtWeb:
    """A local tarball given by the user (rule 3): it must be onnxruntime-web at a version the profile allows."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            "no such file", where=str(path), hint=f"pass the {PACKAGE}-X.Y.Z.tgz that `npm pack {PACKAGE}@X.Y.Z` writes"
        )
    try:
        with tarfile.open(path, "r:gz") as tar:
            member = tar.extractfile("package/package.json")  # None when it is not a regular file
            package = json.load(member) if member is not None else None
    except (tarfile.TarError, KeyError, OSError, ValueError, EOFError):
        package = None
    if not isinstance(package, dict):
        raise UsageError("not an npm package tarball (no readable package/package.json)", where=str(path)) from None
    name, version = package.get("name"), str(package.get("version"))
    if name != PACKAGE:
        raise UsageError(f"the tarball holds the npm package {name!r}, not {PACKAGE!r}", where=str(path))
    if Version(version) not in SpecifierSet(profile.runtime.version):
        raise UsageError(
            f"the tarball is {PACKAGE} {version} but the profile {profile.name} pins {profile.runtime.version}",
            where=str(path),
            hint=f"use {PACKAGE}-{pinned_version(profile)}.tgz",
        )
    return OrtWeb(path, version, _sri_sha512(path), f"local tarball {path}")


def extract_files(ort_web: OrtWeb, names: list[str], destination: Path) -> list[Path]:
    """Copy ``package/dist/<name>`` for each name into ``destination`` (rule 4); nothing else is read out.

    One streaming pass over the archive: random access into a .tgz would decompress it again per file.
    """
    for name in names:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ProfileError(
                f"key 'web.ort_web_files': {name!r} is not a plain file name of the package's dist/ folder"
            )
    wanted = {f"package/dist/{name}": name for name in names}
    destination.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    try:
        with tarfile.open(ort_web.path, "r|gz") as tar:
            for member in tar:
                dist_name = wanted.get(member.name)
                if dist_name is None or dist_name in written:
                    continue
                src = tar.extractfile(member) if member.isfile() else None
                if src is None:
                    raise UsageError(f"dist/{dist_name} in the tarball is not a regular file", where=ort_web.origin)
                target = destination / dist_name
                with src, open(target, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                os.chmod(target, 0o644)
                written[dist_name] = target
                if len(written) == len(wanted):
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise UsageError(f"cannot read the {PACKAGE} tarball: {exc}", where=str(ort_web.path)) from None
    missing = [name for name in names if name not in written]
    if missing:
        raise UsageError(
            f"{PACKAGE} {ort_web.version} has no dist/{missing[0]}",
            where=ort_web.origin,
            hint="check web.ort_web_files in the profile against the package's files",
        )
    return [written[name] for name in names]


def _get(url: str):
    request = urllib.request.Request(
        url, headers={"Accept": "application/json, application/octet-stream", "User-Agent": "edgepack"}
    )
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise DownloadError(
            f"the npm registry answered HTTP {exc.code} {exc.reason}",
            where=url,
            hint="check the version exists, or pass a local tarball with --ort-web PATH",
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"cannot reach the npm registry: {reason}",
            where=url,
            hint="check the network (or $npm_config_registry), or pass a local tarball with --ort-web PATH",
        ) from None


def _sri_sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")
