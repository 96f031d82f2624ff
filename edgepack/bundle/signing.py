"""Signed bundles in the OpenSSF model-signing format (PyPI ``model-signing`` 1.x, "key" method).

``model.sig`` at the bundle root is a Sigstore bundle (``application/vnd.dev.sigstore.bundle.v0.3+json``)
holding a DSSE envelope around an in-toto Statement v1 with predicate type
``https://model_signing/signature/v1.0``. Its ``predicate.resources`` list every file of the bundle
(manifest.json and REPORT.md included, model.sig itself excluded) with its SHA-256; the one subject is
the bundle folder's name with the SHA-256 of those digests concatenated in order. The signature is
ECDSA P-256 with SHA-256 over the DSSE pre-authentication encoding, DER-encoded.
``verificationMaterial.publicKey.hint`` is the key fingerprint: SHA-256 (hex) of the public key as PEM
SubjectPublicKeyInfo, the value ``model_signing verify key`` compares with the key it is given.

Rules:
- The format is written with ``cryptography`` alone, not with ``model-signing``: installing
  model-signing 1.1.1 pulled 32 packages (sigstore, tuf, pydantic, requests, rich, blake3...; it also
  imports pyOpenSSL without declaring it), and its API hashes the whole folder again. Here the digests
  come from the manifest just written, so signing hashes only manifest.json: 2 ms whatever the size,
  against 94 ms for model-signing's signer on a 67 MB bundle (benchmarks/signing.py).
  Interoperability is tested both ways against the upstream CLI (tests/test_signing.py).
- Signatures are deterministic (RFC 6979): the same bundle signed with the same key gives the same
  model.sig, so a signed build is reproducible byte for byte.
- The manifest and REPORT.md do not name the signer: they are written (and sealed) before signing,
  and a bundle signed by two people differs only in model.sig. The fingerprint is in model.sig and is
  printed by every command that signs or verifies; a key pinned beside the shim (``--pin-key``) is
  part of the bundle, so its fingerprint is in the manifest and REPORT.md.
- ``serialization.ignore_paths`` records what the upstream CLI records (its signature file and git
  files), so ``model_signing verify key`` finds the same set of files; edgepack's verifiers ignore
  only model.sig and refuse any other unlisted file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError, VerificationError
from ..runtime_shim import edgepack_shim as shim
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, read_manifest, verify_bundle

__all__ = [
    "SIGNATURE_NAME",
    "PINNED_KEY_NAME",
    "generate_key",
    "load_private_key",
    "load_public_key",
    "fingerprint",
    "public_pem",
    "sign_bundle",
    "sign_checked",
    "verify_signature",
    "SignResult",
]

PINNED_KEY_NAME = "edgepack_signing.pub"
"""A public key the packager pins beside the shim (``--pin-key``): the shim then refuses unsigned bundles."""
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
IGNORE_PATHS = sorted([".git", ".gitattributes", ".github", ".gitignore", SIGNATURE_NAME])


def generate_key(private_path: Path, public_path: Path, passphrase: str | None) -> str:
    """Write a new P-256 key pair as PEM (the private key 0600, encrypted when a passphrase is given);
    return the public key's fingerprint. Existing files are never overwritten."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for path in (private_path, public_path):
        if path.exists():
            raise UsageError(f"{path} already exists", hint="choose another name; keys are never overwritten")
    key = ec.generate_private_key(ec.SECP256R1())
    encryption = (
        serialization.BestAvailableEncryption(passphrase.encode("utf-8"))
        if passphrase
        else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_bytes = public_pem(key.public_key())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_bytes, 0o644)
    return fingerprint(key.public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never replace a key; the mode is set at creation, so a private key is never readable by others
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_private_key(path: Path, passphrase_env: str | None = None):
    """The P-256 private key in PEM file ``path``; the passphrase, if any, is read from the environment
    variable ``passphrase_env`` (never from the command line, where other users can read it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    passphrase = None
    if passphrase_env:
        if passphrase_env not in os.environ:
            raise UsageError(
                f"the environment variable {passphrase_env} is not set",
                where=str(path),
                hint=f"export {passphrase_env}=... with the key's passphrase",
            )
        passphrase = os.environ[passphrase_env].encode("utf-8")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), passphrase)
    except FileNotFoundError:
        raise UsageError(
            "no such private key file", where=str(path), hint="create one with `edgepack keygen`"
        ) from None
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        hint = (
            "give its passphrase in an environment variable: --passphrase-env VAR (package: --sign-passphrase-env VAR)"
            if passphrase is None
            else "this key is not encrypted: drop the passphrase option"
        )
        raise UsageError(f"cannot read the private key: {exc}", where=str(path), hint=hint) from None
    except ValueError as exc:
        raise UsageError(
            f"cannot read the private key: {exc}",
            where=str(path),
            hint="a PEM EC private key (P-256), with its right passphrase",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise UsageError(
            "the signing key must be an elliptic-curve P-256 (secp256r1) private key",
            where=str(path),
            hint="create one with `edgepack keygen`",
        )
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise UsageError("no such public key file", where=str(path)) from None
    except ValueError as exc:
        raise UsageError(
            f"cannot read the public key: {exc}",
            where=str(path),
            hint="a PEM public key (-----BEGIN PUBLIC KEY-----), e.g. from `edgepack keygen`",
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise UsageError("the public key must be an elliptic-curve P-256 (secp256r1) key", where=str(path))
    return key


def public_pem(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(public_key) -> str:
    """model-signing's key hint: SHA-256 (hex) of the PEM SubjectPublicKeyInfo."""
    return hashlib.sha256(public_pem(public_key)).hexdigest()


def statement(bundle_name: str, digests: dict[str, str]) -> dict[str, Any]:
    """The in-toto Statement model-signing signs, for files ``digests`` (POSIX path -> SHA-256 hex)."""
    names = sorted(digests, key=lambda rel: rel.split("/"))  # model-signing's order: by path components
    root = hashlib.sha256(b"".join(bytes.fromhex(digests[rel]) for rel in names)).hexdigest()
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": bundle_name, "digest": {"sha256": root}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": IGNORE_PATHS,
            },
            "resources": [{"name": rel, "algorithm": "sha256", "digest": digests[rel]} for rel in names],
        },
    }


def pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers."""
    return b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)


@dataclass(frozen=True)
class SignResult:
    signature: Path
    fingerprint: str
    files: int


def bundle_digests(bundle: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Every file's SHA-256 for the statement: the manifest's own digests plus manifest.json's, hashed now."""
    digests = {rel: entry["sha256"] for rel, entry in manifest["files"].items()}
    digests[MANIFEST_NAME] = shim.sha256_of(Path(bundle), MANIFEST_NAME)[1]
    return digests


def sign_bundle(bundle: Path, key, *, manifest: dict[str, Any] | None = None, name: str | None = None) -> SignResult:
    """Write ``model.sig`` over every file of ``bundle``, atomically.

    ``manifest``: the manifest just written by the pipeline, whose digests are current; without it the
    bundle is verified first (signing must never vouch for files that no longer match their manifest).
    ``name``: the subject name (default: the folder's name; the pipeline passes the final one).
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if manifest is None:
        result = verify_bundle(bundle)
        if not result.ok:
            problems = ", ".join(
                f"{kind} {rel}" for kind in ("missing", "extra", "changed") for rel in getattr(result, kind)
            )
            raise VerificationError(
                f"the bundle does not match its manifest, so it is not signed: {problems}",
                where=str(bundle),
                hint="repackage it, or restore the files",
            )
        manifest = read_manifest(bundle)
    payload = _payload_bytes(statement(name or bundle.resolve().name, bundle_digests(bundle, manifest)))
    signature = key.sign(pae(payload), ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    document = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": fingerprint(key.public_key())}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode("ascii"), "keyid": ""}],
        },
    }
    target = bundle / SIGNATURE_NAME
    temp = bundle / f".{SIGNATURE_NAME}.partial"
    temp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.chmod(temp, 0o644)
    os.replace(temp, target)
    return SignResult(target, fingerprint(key.public_key()), len(manifest["files"]) + 1)


def sign_checked(bundle: Path, key, manifest: dict[str, Any], name: str) -> str:
    """Sign a bundle the pipeline just wrote, then check the signature as the device will (the shim's own
    verifier); return the key's fingerprint."""
    from ..runtime_shim import edgepack_shim

    signed = sign_bundle(bundle, key, manifest=manifest, name=name)
    device_key = edgepack_shim.public_key_from_pem(public_pem(key.public_key()).decode("ascii"), "the signing key")
    try:
        edgepack_shim.verify_signature(bundle, manifest, device_key)
    except edgepack_shim.ShimError as exc:
        raise VerificationError(f"the shim refuses the signature just written: {exc}", where=str(bundle)) from None
    return signed.fingerprint


def _payload_bytes(value: dict[str, Any]) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True).encode("utf-8")


def verify_signature(bundle: Path, public_key) -> str:
    """Check ``model.sig`` against ``public_key`` and the manifest's digests; return the fingerprint.

    The files themselves are checked against the manifest by ``manifest.verify_bundle``: together they
    cover every byte. Raises VerificationError naming what is wrong.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    where = str(bundle)
    expected_key = fingerprint(public_key)
    try:  # only a regular file inside the bundle, through no link (a FIFO would hang the read)
        with shim.open_in_bundle(Path(bundle), SIGNATURE_NAME) as f:
            text = f.read(shim.MAX_MANIFEST_BYTES + 1).decode("utf-8")
    except FileNotFoundError:
        raise VerificationError(
            f"the bundle is not signed (no {SIGNATURE_NAME}) and a public key was given",
            where=where,
            hint="sign it with `edgepack sign BUNDLE --key KEY`",
        ) from None
    except OSError as exc:
        raise VerificationError(
            f"{SIGNATURE_NAME} is not a regular file of the bundle ({exc.strerror or exc})", where=where
        ) from None
    except UnicodeDecodeError as exc:
        raise VerificationError(f"{SIGNATURE_NAME} is malformed ({type(exc).__name__})", where=where) from None
    try:
        document = json.loads(text)
        hint = document["verificationMaterial"].get("publicKey", {}).get("hint")
        envelope = document["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = envelope["signatures"]
        raw_signature = base64.b64decode(signatures[0]["sig"], validate=True)
        media_type, payload_type = document["mediaType"], envelope["payloadType"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise VerificationError(f"{SIGNATURE_NAME} is malformed ({type(exc).__name__}: {exc})", where=where) from None
    if media_type != BUNDLE_MEDIA_TYPE or payload_type != PAYLOAD_TYPE or len(signatures) != 1:
        raise VerificationError(
            f"{SIGNATURE_NAME} is not a model-signing key signature "
            f"(media type {media_type!r}, payload type {payload_type!r}, {len(signatures)} signature(s))",
            where=where,
        )
    if hint and hint != expected_key:
        raise VerificationError(
            f"signed with another key: {SIGNATURE_NAME} names key {hint}, the given public key is {expected_key}",
            where=where,
            hint="verify with the signer's public key",
        )
    try:
        public_key.verify(raw_signature, pae(payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise VerificationError(
            f"{SIGNATURE_NAME}: the signature does not verify with key {expected_key} "
            "(tampered, or signed with another key)",
            where=where,
        ) from None
    problem = _statement_problem(payload, bundle_digests(bundle, read_manifest(bundle)))
    if problem:
        raise VerificationError(f"{SIGNATURE_NAME}: {problem}", where=where)
    return expected_key


def _statement_problem(payload: bytes, digests: dict[str, str]) -> str | None:
    """What differs between the signed statement and the bundle's digests (None: nothing)."""
    try:
        signed = json.loads(payload)
        serialization = signed["predicate"]["serialization"]
        resources = signed["predicate"]["resources"]
        listed = {r["name"]: r["digest"] for r in resources if r["algorithm"] == "sha256"}
        subject = signed["subject"][0]["digest"]["sha256"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "the signed statement is malformed"
    if signed.get("_type") != STATEMENT_TYPE or signed.get("predicateType") != PREDICATE_TYPE:
        return f"the signed statement is not a model-signing v1.0 statement ({signed.get('predicateType')!r})"
    if (
        serialization.get("method") != "files"
        or serialization.get("hash_type") != "sha256"
        or len(listed) != len(resources)
    ):
        return f"the signature uses {serialization.get('method')}/{serialization.get('hash_type')} serialization; only files/sha256 is read"
    root = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources)).hexdigest()
    if root != subject:
        return "the signed statement is inconsistent (its subject digest does not match its resources)"
    found = {
        "not signed": sorted(set(digests) - set(listed)),
        "signed but not in the bundle": sorted(set(listed) - set(digests)),
        "changed since signing": sorted(rel for rel in set(digests) & set(listed) if digests[rel] != listed[rel]),
    }
    return "; ".join(f"{kind}: {', '.join(names)}" for kind, names in found.items() if names) or None
