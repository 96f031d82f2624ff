"""The facts of each bundle in a build folder, read from its manifest and files, for the build report.

Rules:
1. A bundle is a sub-folder with a ``manifest.json``; hidden folders (a bundle being written) are skipped.
   A bundle whose manifest cannot be read is listed with the reason, never dropped silently.
2. Sizes are the manifest's (every file but the manifest itself, as ``package`` prints them). Web bundles
   also get their gzip size: each file compressed alone at level 6, as a web server would send it.
3. Checksums are recomputed (``verify_bundle``), except for the bundles the calling run has just written or
   restored from the cache (``fresh``): those were verified then, and hashing them again made most of the
   time of an unchanged fleet's rebuild. A gzip size is remembered by the file's SHA-256 in the user cache
   (``gzip-sizes.json``), as a file's content fixes it. A bundle's ``model.sig`` is checked against the key the
   bundle pins (``edgepack_signing.pub``, what its shim will demand); without a pinned key the report
   names the signing key from model.sig and says it was not checked: only the user has the key to
   trust (``edgepack verify --public-key``).
4. Nothing that differs between two runs of the same build goes in (absolute paths, dates, timings of
   packaging), so the report is byte-identical when the bundles are.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, read_manifest, verify_bundle
from ..errors import EdgepackError
from ..progress import track

__all__ = ["Bundle", "collect"]

GZIP_LEVEL = 6
_CHUNK = 1 << 20


@dataclass
class Bundle:
    folder: str
    """The bundle's folder name inside the build folder (``<model>-<target>``)."""
    error: str | None = None
    """Why the manifest could not be read; then nothing else is known."""
    manifest: dict[str, Any] = field(default_factory=dict)
    gzip_bytes: int | None = None
    integrity: dict[str, Any] = field(default_factory=dict)
    signature: str = "unsigned"
    """"unsigned", "signed", "verified" (against the pinned key) or "invalid"."""
    signature_detail: str = ""
    label: str = ""
    """How the report names it: the target, or the folder when the build folder holds several models."""

    @property
    def target(self) -> str:
        return self.manifest.get("target", self.folder)

    @property
    def model_name(self) -> str:
        return self.manifest.get("model", {}).get("source", {}).get("name", "?")

    @property
    def kind(self) -> str:
        return self.manifest.get("bundle_kind", "?")

    def stage(self, name: str) -> dict[str, Any]:
        """The last report of stage ``name`` (an empty dict when the stage did not report)."""
        found = [r for r in self.manifest.get("stages", []) if r.get("stage") == name]
        return found[-1] if found else {}

    @property
    def sizes(self) -> dict[str, int]:
        """Bytes of the model (with its side files), the runtime shipped with it (web: ort/) and the rest."""
        files = self.manifest.get("files", {})
        model = self.manifest["model"]
        model_files = {model["file"], *model.get("external_data", [])}
        runtime = set(self.stage("bundle").get("ort_web", {}).get("files", []))
        parts = {"model": 0, "runtime": 0, "other": 0}
        for rel, entry in files.items():
            parts["model" if rel in model_files else "runtime" if rel in runtime else "other"] += entry["size"]
        return parts

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def self_test(self) -> dict[str, Any]:
        return self.stage("self_test")

    @property
    def tolerance(self) -> dict[str, Any]:
        """The tolerance the self-test held the bundle to."""
        profile = self.manifest.get("profile", {})
        if self.self_test.get("tolerance") == "quantization.tolerance":
            return profile.get("quantization", {}).get("tolerance", {})
        return profile.get("accuracy", {})

    @property
    def recipe(self) -> str:
        quantize = self.stage("quantize")
        recipe = quantize.get("recipe") or "none"
        if quantize.get("tune", {}).get("timed"):
            return f"{quantize['tune']['winner']} (--tune)"
        return recipe

    @property
    def notices(self) -> list[tuple[str, str]]:
        """(stage, text) of every notice, fallback, unused option and size warning the stages recorded."""
        found = []
        for r in self.manifest.get("stages", []):
            fallback = r.get("fallback")
            # the quantize stage records a fallback as {reason, message}; the PyTorch export as the exporter's name
            fallback_text = fallback.get("message") if isinstance(fallback, dict) else fallback
            texts = [r.get("notice"), fallback_text, r.get("unused_options"), r.get("size_warning")]
            seen: set[str] = set()
            for text in texts:
                # a fallback's message is often repeated inside the notice: show it once
                if text and text not in seen and not any(text in other for other in seen):
                    seen.add(text)
                    found.append((r["stage"], text))
        return found


def collect(build_dir: Path, fresh: frozenset[str] = frozenset()) -> list[Bundle]:
    """Every bundle below ``build_dir`` (rule 1), sorted by folder name; ``fresh``: the folder names of bundles
    verified by the calling run (rule 3)."""
    bundles = []
    sizes = _GzipSizes.load()
    for folder in sorted(p for p in build_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / MANIFEST_NAME).is_file():
            continue
        try:
            manifest = read_manifest(folder)
        except EdgepackError as exc:
            bundles.append(Bundle(folder.name, error=exc.message))
            continue
        if not isinstance(manifest.get("model"), dict) or not isinstance(manifest.get("stages"), list):
            bundles.append(Bundle(folder.name, error="manifest.json has no model or stage reports"))
            continue
        bundle = Bundle(folder.name, manifest=manifest)
        if bundle.kind == "web":
            bundle.gzip_bytes = _gzip_bytes(folder, manifest, sizes)
        if folder.name in fresh:
            files = len(manifest["files"])
            bundle.integrity = {"ok": True, "checked": files, "missing": [], "extra": [], "changed": []}
        else:
            verified = verify_bundle(folder)
            bundle.integrity = {
                "ok": verified.ok,
                "checked": verified.checked,
                "missing": verified.missing,
                "extra": verified.extra,
                "changed": verified.changed,
            }
        bundle.signature, bundle.signature_detail = _signature(folder)
        bundles.append(bundle)
    sizes.save()
    several_models = len({b.model_name for b in bundles if not b.error}) > 1
    for b in bundles:
        b.label = b.folder if several_models or b.error else b.target
    return bundles


def _gzip_bytes(folder: Path, manifest: dict[str, Any], sizes: _GzipSizes) -> int:
    total = 0
    for rel in track(sorted(manifest["files"]), f"gzip sizes of {folder.name}"):
        path = folder / rel
        if path.is_file() and not path.is_symlink():
            total += sizes.of(path, manifest["files"][rel].get("sha256"))
    return total


class _GzipSizes:
    """Gzip sizes by SHA-256 (rule 3), kept in ``gzip-sizes.json`` of the user cache; a damaged or missing
    file is an empty memory. A size is trusted only for a file whose size and checksum the caller knows."""

    def __init__(self, path: Path | None, known: dict[str, int]):
        self.path, self.known, self.added = path, known, False

    @classmethod
    def load(cls) -> _GzipSizes:
        path, known = load_memory("gzip-sizes.json", lambda v: isinstance(v, int))
        return cls(path, known)

    def of(self, path: Path, sha256: str | None) -> int:
        key = f"{sha256}:{GZIP_LEVEL}" if sha256 else None
        if key and key in self.known:
            return self.known[key]
        size = _gzipped_size(path)
        if key:
            self.known[key], self.added = size, True
        return size

    def save(self) -> None:
        if self.added and self.path:
            save_memory(self.path, self.known)  # lost: the next report computes the sizes again


def load_memory(name: str, valid: Callable[[Any], bool]) -> tuple[Path, dict[str, Any]]:
    """A JSON object of the user cache (``name`` beside onnxruntime-web's folder) and its path; a damaged or
    missing file, or one with a value that is not ``valid``, is an empty memory."""
    from ..bundle.ortweb import cache_dir

    path = cache_dir().parent / name
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    return path, known if isinstance(known, dict) and all(valid(v) for v in known.values()) else {}


def save_memory(path: Path, known: dict[str, Any]) -> None:
    """Write a memory whole (a temporary file renamed into place); one that cannot be written is lost."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(known), encoding="utf-8")  # in order: the newest last
        os.replace(partial, path)
    except OSError:
        pass


def _gzipped_size(path: Path) -> int:
    """Bytes of ``path`` gzipped (zlib's gzip container), streamed: a model file is never read whole."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            size += len(compressor.compress(chunk))
    return size + len(compressor.flush())


def _signature(folder: Path) -> tuple[str, str]:
    """(status, what to say) of the bundle's model.sig (rule 3)."""
    from ..bundle.signing import PINNED_KEY_NAME, load_public_key, verify_signature

    path = folder / SIGNATURE_NAME
    if not path.is_file():
        return "unsigned", f"unsigned (no {SIGNATURE_NAME})"
    pinned = folder / PINNED_KEY_NAME
    if pinned.is_file():
        try:
            key = verify_signature(folder, load_public_key(pinned))
        except EdgepackError as exc:
            return "invalid", f"{SIGNATURE_NAME} does not verify with the pinned key: {exc.message}"
        return "verified", f"signed with the pinned key {key[:16]}…, verified"
    try:
        hint = json.loads(path.read_text(encoding="utf-8"))["verificationMaterial"]["publicKey"]["hint"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return "invalid", f"{SIGNATURE_NAME} is malformed"
    return "signed", f"signed by key {str(hint)[:16]}…, not checked here (edgepack verify --public-key KEY)"
