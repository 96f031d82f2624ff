"""The bundle manifest: what is in a bundle, how to load it, and the checksum of every file.

``manifest.json`` sits at the bundle root. Its ``files`` map lists every other file of the bundle
(POSIX paths relative to the root) with ``size``, ``sha256`` and ``integrity`` (a Subresource
Integrity ``sha384-`` string for browsers), and for files of 8 MiB and more ``blocks``: the SHA-384 of
each 4 MiB block, so that the web loader verifies a download block by block while it streams in instead
of hashing it whole after its last byte (``BLOCK``). It is written with sorted keys and no timestamp, so
packaging the same input twice gives the same bytes (``SOURCE_DATE_EPOCH`` adds a ``created`` date).
``manifest_sha256`` is the manifest's own checksum: the SHA-256 of manifest.json with that value written
as 64 zeros, so a changed byte anywhere in the manifest is caught too.

What the manifest says besides its files is ``Content``, a tree of frozen dataclasses whose fields are the
keys of runtime_shim/manifest.schema.json (the tests hold the two together); ``to_dict()`` is what is written.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import VerificationError
from ..progress import step

if TYPE_CHECKING:
    from ..profiles import Profile

__all__ = [
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "SCHEMA",
    "hash_file",
    "list_files",
    "write_manifest",
    "read_manifest",
    "verify_bundle",
    "SEAL_KEY",
    "seal_matches",
    "Content",
    "ModelEntry",
    "Tensor",
    "SourceModel",
    "RuntimeEntry",
    "ProviderEntry",
    "SessionEntry",
]

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "model.sig"
"""The bundle's signature (edgepack/bundle/signing.py), written after the manifest: like the manifest, never listed in it."""
SCHEMA = "edgepack.manifest/1"
_CHUNK = 1 << 20
_BIG = 16 << 20
"""Files this large are hashed once per manifest write (``_hash_once``) and with progress shown."""
SEAL_KEY = "manifest_sha256"
BLOCK = 4 << 20
"""Files of at least two blocks list the SHA-384 of each (base64): ``{"size": BLOCK, "sha384": [...]}``."""
_SEAL_FIELD = re.compile(rb'"manifest_sha256": "([0-9a-f]{64})"')
_BLANK_SEAL = b'"manifest_sha256": "' + b"0" * 64 + b'"'


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: list[int | str | None] | None
    """An int when fixed, the symbolic name when named, None when unnamed; None alone: not even the rank is known."""


@dataclass(frozen=True)
class SourceModel:
    """The user's model, as given."""

    name: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ModelEntry:
    file: str
    format: Literal["onnx", "ort"]
    ort_style: str | None
    external_data: list[str]
    precision: str
    ir_version: int
    opsets: dict[str, int]
    inputs: list[Tensor]
    outputs: list[Tensor]
    source: SourceModel


@dataclass(frozen=True)
class ProviderEntry:
    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class SessionEntry:
    intra_op_num_threads: int
    graph_optimization_level: Literal["disable", "basic", "extended", "all"]
    config_entries: dict[str, str]


@dataclass(frozen=True)
class RuntimeEntry:
    package: str
    version: str
    execution_providers: list[ProviderEntry]
    strict_providers: bool
    session_options: SessionEntry


@dataclass(frozen=True)
class Content:
    """The manifest apart from ``schema``, ``files``, ``created`` and ``manifest_sha256`` (``write_manifest``)."""

    target: str
    profile: Profile
    bundle_kind: Literal["python", "web", "mobile"]
    model: ModelEntry
    runtime: RuntimeEntry
    reduced_ops_config: str | None
    tools: dict[str, str]
    stages: list[dict[str, Any]]
    """Each stage's record (``StageResult.record``), the steps before loading first."""
    models: dict[str, dict[str, Any]] | None = None
    """Multi-model bundles only (edgepack/pipeline/multi.py): every model's entry by name, with its session
    config entries and stage reports; not written when None."""

    def to_dict(self) -> dict[str, Any]:
        """The manifest's keys as plain data, the profile as its YAML keys (``Profile.to_dict``)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.models is None:
            del data["models"]
        return {**data, "profile": self.profile.to_dict(), "model": asdict(self.model), "runtime": asdict(self.runtime)}


def hash_file(path: Path) -> dict[str, Any]:
    """Size, SHA-256 and SRI sha384 of one file, read once in chunks (never whole into memory)."""
    sha256, sha384, block, size = hashlib.sha256(), hashlib.sha384(), hashlib.sha384(), 0
    blocks = []
    total = path.stat().st_size
    shown = step(f"checksums of {path.name}", total=total, unit="bytes") if total >= _BIG else nullcontext()
    with open(path, "rb") as f, shown as hashing:
        while chunk := f.read(_CHUNK):  # BLOCK is a multiple of _CHUNK
            sha256.update(chunk)
            sha384.update(chunk)
            block.update(chunk)
            size += len(chunk)
            if size % BLOCK == 0:
                blocks.append(block.digest())
                block = hashlib.sha384()
            if hashing:
                hashing.advance(len(chunk))
    if size % BLOCK:
        blocks.append(block.digest())
    integrity = "sha384-" + base64.b64encode(sha384.digest()).decode("ascii")
    entry: dict[str, Any] = {"size": size, "sha256": sha256.hexdigest(), "integrity": integrity}
    if size >= 2 * BLOCK:
        entry["blocks"] = {"size": BLOCK, "sha384": [base64.b64encode(d).decode("ascii") for d in blocks]}
    return entry


_big_hashes: dict[tuple[int, int, int, int, int], dict[str, Any]] = {}


def _hash_once(path: Path) -> dict[str, Any]:
    """``hash_file``, remembered for big files while they stay the same file unchanged (same inode, size,
    mtime and ctime): the manifest is written twice per bundle and a model's weights need hashing once."""
    st = path.stat()
    if st.st_size < _BIG:
        return hash_file(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _big_hashes:
        _big_hashes[key] = hash_file(path)
    return dict(_big_hashes[key])


def list_files(bundle: Path) -> list[str]:
    """Every path below ``bundle`` except the manifest and the signature, as sorted POSIX relative paths
    (links included)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(bundle):
        base = Path(dirpath)
        # a linked folder is listed as an entry (and so refused), never followed
        names = filenames + [d for d in dirnames if (base / d).is_symlink()]
        for name in names:
            rel = (base / name).relative_to(bundle).as_posix()
            if rel not in (MANIFEST_NAME, SIGNATURE_NAME):
                found.append(rel)
    return sorted(found)


def write_manifest(bundle: Path, content: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` with ``content`` plus the checksums of every file now in ``bundle``."""
    manifest = {"schema": SCHEMA, **content}
    manifest["files"] = {rel: _hash_once(bundle / rel) for rel in list_files(bundle)}
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        created = datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc)
        manifest["created"] = created.isoformat()
    manifest[SEAL_KEY] = "0" * 64
    data = (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    manifest[SEAL_KEY] = hashlib.sha256(data).hexdigest()
    data = _SEAL_FIELD.sub(b'"manifest_sha256": "' + manifest[SEAL_KEY].encode() + b'"', data)
    (bundle / MANIFEST_NAME).write_bytes(data)
    return manifest


def seal_matches(raw: bytes) -> bool:
    """True when manifest.json (its bytes) still has the checksum it was written with."""
    found = _SEAL_FIELD.findall(raw)
    return len(found) == 1 and hashlib.sha256(_SEAL_FIELD.sub(_BLANK_SEAL, raw)).hexdigest() == found[0].decode()


def read_manifest(bundle: Path) -> dict[str, Any]:
    """The parsed manifest, checked by the shim's own rules (``manifest_problem``): every reader of a
    bundle, the device and ``edgepack verify``, refuses the same manifests. The seal is not checked here."""
    shim = _shim()
    if not Path(bundle).is_dir():
        raise VerificationError("not a bundle folder", where=str(bundle))
    try:
        return shim.read_manifest(Path(bundle), check_seal=False)
    except shim.VerificationError as exc:
        text = str(exc)
        prefix = f"{bundle}: "
        raise VerificationError(text[len(prefix) :] if text.startswith(prefix) else text, where=str(bundle)) from None


def _shim():
    from ..runtime_shim import edgepack_shim

    return edgepack_shim


@dataclass
class VerifyResult:
    bundle: Path
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "ok": self.ok,
            "checked": self.checked,
            "missing": self.missing,
            "extra": self.extra,
            "changed": self.changed,
        }


def verify_bundle(bundle: Path, *, every_digest: bool = False) -> VerifyResult:
    """Recompute every checksum of ``bundle`` against its manifest, opening only regular files inside it.

    Sizes, SHA-256 and the manifest's seal always; with ``every_digest`` (``edgepack verify``) also the SHA-384
    integrity and block digests the web loader checks instead, which then must describe the same bytes. A
    manifest whose seal matches can disagree with itself only if the tool that wrote it did, so the bundle
    cache and the report, which read bundles edgepack wrote, skip that second read of every file."""
    shim = _shim()
    manifest = read_manifest(bundle)
    report = shim.check_files(Path(bundle), manifest)
    result = VerifyResult(
        bundle=bundle, missing=report.missing, extra=report.extra, changed=report.changed, checked=report.checked
    )
    if every_digest:
        for rel, entry in sorted(manifest["files"].items()):
            if rel in result.changed or rel in result.missing or not {"integrity", "blocks"} & entry.keys():
                continue
            found = hash_file(Path(bundle) / rel)
            if any(entry[key] != found.get(key) for key in ("integrity", "blocks") if key in entry):
                result.changed.append(rel)
        result.changed.sort()
    with shim.open_in_bundle(Path(bundle), MANIFEST_NAME) as f:
        raw = f.read(shim.MAX_MANIFEST_BYTES + 1)
    if not seal_matches(raw):
        result.changed.insert(0, MANIFEST_NAME)
    return result
