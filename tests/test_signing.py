"""Signed bundles (edgepack/bundle/signing.py, the shim's verifier): real keys, real bundles, the upstream
``model_signing`` CLI both ways, and every refusal through the packager, the shim's API and its CLI."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from edgepack.bundle.manifest import MANIFEST_NAME, write_manifest
from edgepack.bundle.signing import PINNED_KEY_NAME, SIGNATURE_NAME
from edgepack.runtime_shim import edgepack_shim as shim

DATA = Path(__file__).resolve().parent / "data"
PASSPHRASE_ENV = "EDGEPACK_TEST_KEY_PASSPHRASE"
ENV = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", PASSPHRASE_ENV: "correct horse battery staple"}


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, env=ENV, **kwargs)


def edgepack(*args) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "edgepack", *args)


def shim_cli(bundle: Path, *args) -> subprocess.CompletedProcess:
    return run(sys.executable, bundle / "edgepack_shim.py", *args)


def upstream(*args) -> subprocess.CompletedProcess:
    """The OpenSSF ``model_signing`` CLI (PyPI model-signing), as its users run it."""
    return run(sys.executable, "-m", "model_signing", *args)


def assert_refused(done: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)


def fingerprint_of(public: Path) -> str:
    return hashlib.sha256(public.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs made by `edgepack keygen`: `release` encrypted with a passphrase, `other` not."""
    folder = tmp_path_factory.mktemp("keys")
    done = edgepack("keygen", folder / "release", "--passphrase-env", PASSPHRASE_ENV)
    assert done.returncode == 0, done.stderr
    assert edgepack("keygen", folder / "other").returncode == 0
    return {
        "release": folder / "release.priv",
        "release.pub": folder / "release.pub",
        "other": folder / "other.priv",
        "other.pub": folder / "other.pub",
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory, keys) -> dict[str, Path]:
    """The example CNN for linux-x64 packaged three ways: signed (--sign-key, encrypted key), unsigned,
    and unsigned with the release key pinned beside the shim."""
    tmp = tmp_path_factory.mktemp("signed")
    found = {}
    for label, extra in (
        ("signed", ["--sign-key", keys["release"], "--sign-passphrase-env", PASSPHRASE_ENV]),
        ("unsigned", []),
        ("pinned", ["--pin-key", keys["release.pub"]]),
    ):
        done = edgepack("package", "--example", "cnn", "--target", "linux-x64", "-o", tmp / label, "-q", *extra)
        assert done.returncode == 0, done.stderr
        found[label] = tmp / label / "cnn-linux-x64"
    return found


@pytest.fixture
def copy_of(built, tmp_path):
    def copy(name: str) -> Path:
        # the folder keeps its name: it is the signed statement's subject
        return Path(
            shutil.copytree(built[name], tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}" / built[name].name)
        )

    return copy


def tree(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


def cnn_input() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)


# --- the ECDSA P-256 verifier of the shim (pure Python) -------------------------------------------------


def test_shim_p256_verifier_passes_every_wycheproof_vector():
    """Project Wycheproof's ECDSA P-256/SHA-256 DER vectors (C2SP/wycheproof testvectors_v1, commit
    dac1dd47): 174 valid, 310 invalid (BER encodings, out-of-range r/s, edge-case points, wrong messages)."""
    vectors = json.loads(gzip.decompress((DATA / "wycheproof_ecdsa_secp256r1_sha256_test.json.gz").read_bytes()))
    checked = 0
    for group in vectors["testGroups"]:
        point = shim.p256_key_from_der(bytes.fromhex(group["publicKeyDer"]))
        for case in group["tests"]:
            found = shim.ecdsa_p256_verify(point, bytes.fromhex(case["sig"]), bytes.fromhex(case["msg"]))
            assert found == (case["result"] == "valid"), (case["tcId"], case["comment"])
            checked += 1
    assert checked == 484


def test_shim_p256_verifier_agrees_with_cryptography():
    rng = np.random.default_rng(7)
    for _ in range(40):
        key = ec.generate_private_key(ec.SECP256R1())
        der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        point = shim.p256_key_from_der(der)
        message = rng.bytes(int(rng.integers(0, 200)))
        signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
        assert shim.ecdsa_p256_verify(point, signature, message)
        assert not shim.ecdsa_p256_verify(point, signature, message + b"x")
        r, s = decode_dss_signature(signature)
        assert shim.ecdsa_p256_verify(point, encode_dss_signature(r, shim.P256_N - s), message)  # the other valid s
        assert not shim.ecdsa_p256_verify(point, encode_dss_signature(r, s ^ 1), message)
        assert not shim.ecdsa_p256_verify(point, encode_dss_signature(r + shim.P256_N, s), message)


def test_shim_refuses_keys_that_are_not_p256(tmp_path):
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    path = tmp_path / "p384.pub"
    path.write_bytes(p384.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(shim.UsageError, match="not a P-256 public key"):
        shim.read_public_key(path)
    der = bytearray(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    der[-1] ^= 1  # off the curve
    with pytest.raises(ValueError, match="not on the P-256 curve"):
        shim.p256_key_from_der(bytes(der))


# --- keys ----------------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_can_read_and_never_overwrites(keys):
    assert stat.S_IMODE(keys["release"].stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in keys["release"].read_bytes()
    assert b"ENCRYPTED" not in keys["other"].read_bytes()
    done = edgepack("keygen", keys["other"].with_suffix(""))
    assert_refused(done, 2, "already exists")
    assert keys["other.pub"].read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_an_encrypted_key_needs_its_passphrase(built, keys, tmp_path):
    bundle = Path(shutil.copytree(built["unsigned"], tmp_path / "b"))
    assert_refused(edgepack("sign", bundle, "--key", keys["release"]), 2, "passphrase-env")
    done = run(
        sys.executable, "-m", "edgepack", "sign", bundle, "--key", keys["release"], "--passphrase-env", "UNSET_VAR_X"
    )
    assert_refused(done, 2, "UNSET_VAR_X is not set")
    assert not (bundle / SIGNATURE_NAME).exists()


def test_the_private_key_never_enters_a_bundle(built, keys):
    key = serialization.load_pem_private_key(keys["release"].read_bytes(), ENV[PASSPHRASE_ENV].encode())
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    plain = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    secrets = [
        keys["release"].read_bytes(),
        plain,
        scalar,
        scalar.hex().encode(),
        base64.b64encode(scalar),
        base64.b64encode(plain)[:60],
        b"PRIVATE KEY",
    ]
    for label in ("signed", "pinned"):
        for rel, data in tree(built[label]).items():
            for secret in secrets:
                assert secret not in data, (label, rel)
    done = edgepack(
        "package",
        "--example",
        "cnn",
        "--target",
        "linux-x64",
        "-o",
        keys["release"].parent / "pin",
        "--pin-key",
        keys["release"],
    )
    assert_refused(done, 2, "cannot read the public key")
    assert not (keys["release"].parent / "pin").exists()


# --- signing and verifying ---------------------------------------------------------------------------


def test_a_signed_bundle_verifies_everywhere_and_runs(built, keys):
    bundle, public = built["signed"], keys["release.pub"]
    document = json.loads((bundle / SIGNATURE_NAME).read_text())
    assert document["verificationMaterial"]["publicKey"]["hint"] == fingerprint_of(public)
    statement = json.loads(base64.b64decode(document["dsseEnvelope"]["payload"]))
    signed = {r["name"] for r in statement["predicate"]["resources"]}
    assert signed == set(tree(bundle)) - {SIGNATURE_NAME}
    assert {MANIFEST_NAME, "REPORT.md", "edgepack_shim.py"} <= signed

    done = edgepack("verify", bundle, "--public-key", public)
    assert done.returncode == 0 and fingerprint_of(public) in done.stdout, done.stderr
    done = shim_cli(bundle, "verify", "--public-key", public)
    assert done.returncode == 0 and fingerprint_of(public) in done.stdout, done.stderr
    model = shim.load(bundle, public_key=public)
    assert model.run({"image": cnn_input()})["logits"].shape == (2, 10)
    done = upstream("verify", "key", bundle, "--public_key", public, "--signature", bundle / SIGNATURE_NAME)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_bundle_signed_by_the_upstream_cli_verifies_in_the_shim(copy_of, keys, tmp_path):
    bundle = copy_of("unsigned")
    done = upstream("sign", "key", bundle, "--private_key", keys["other"], "--signature", bundle / SIGNATURE_NAME)
    assert done.returncode == 0, done.stdout + done.stderr
    np.save(tmp_path / "in.npy", cnn_input())
    done = shim_cli(bundle, "run", "--public-key", keys["other.pub"], tmp_path / "in.npy", "-o", tmp_path / "out.npz")
    assert done.returncode == 0, done.stderr
    assert shim_cli(bundle, "verify", "--public-key", keys["other.pub"]).returncode == 0
    assert edgepack("verify", bundle, "--public-key", keys["other.pub"]).returncode == 0
    assert_refused(shim_cli(bundle, "verify", "--public-key", keys["release.pub"]), 7, "signed with another key")


def test_reproducible_two_signers_differ_only_in_the_signature_and_one_signer_not_at_all(built, copy_of, keys):
    signed = tree(built["signed"])
    again = copy_of("unsigned")
    assert edgepack("sign", again, "--key", keys["release"], "--passphrase-env", PASSPHRASE_ENV).returncode == 0
    assert tree(again) == signed  # package --sign-key == package, then sign; RFC 6979 signatures
    other = copy_of("unsigned")
    assert edgepack("sign", other, "--key", keys["other"]).returncode == 0
    differs = {rel for rel in set(signed) | set(tree(other)) if signed.get(rel) != tree(other).get(rel)}
    assert differs == {SIGNATURE_NAME}


# --- refusals -----------------------------------------------------------------------------------------


def _refused_by_all(bundle: Path, public: Path, *needles: str) -> None:
    assert_refused(edgepack("verify", bundle, "--public-key", public), 7, *needles)
    assert_refused(shim_cli(bundle, "verify", "--public-key", public), 7, *needles)
    assert_refused(shim_cli(bundle, "serve", "--port", "0", "--public-key", public), 7, *needles)
    with pytest.raises(shim.VerificationError, match=needles[0]):
        shim.load(bundle, public_key=public)


def test_another_key_is_refused(built, keys):
    _refused_by_all(built["signed"], keys["other.pub"], "signed with another key", fingerprint_of(keys["other.pub"]))


def test_an_unsigned_bundle_is_refused_when_a_key_is_required(built, keys):
    _refused_by_all(built["unsigned"], keys["release.pub"], "not signed")


def test_a_changed_file_with_a_recomputed_manifest_is_refused(copy_of, keys):
    bundle = copy_of("signed")
    model = bundle / "model" / "cnn.ort"
    data = bytearray(model.read_bytes())
    data[-100] ^= 1
    model.write_bytes(bytes(data))
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    content = {k: v for k, v in manifest.items() if k not in ("schema", "files", "manifest_sha256")}
    write_manifest(bundle, content)
    assert edgepack("verify", bundle).returncode == 0  # the checksums alone are fooled
    _refused_by_all(bundle, keys["release.pub"], "changed since signing: manifest.json, model/cnn.ort")


@pytest.mark.parametrize("how", ["signature", "payload", "hint"])
def test_a_tampered_signature_is_refused(copy_of, keys, how):
    bundle = copy_of("signed")
    path = bundle / SIGNATURE_NAME
    document = json.loads(path.read_text())
    envelope = document["dsseEnvelope"]
    if how == "signature":
        raw = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
        raw[10] ^= 1
        envelope["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
        needle = "does not verify"
    elif how == "payload":  # a resource digest replaced: the statement no longer matches the signature
        statement = json.loads(base64.b64decode(envelope["payload"]))
        statement["predicate"]["resources"][0]["digest"] = "0" * 64
        envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
        needle = "does not verify"
    else:  # the hint claims the verifier's key: the signature itself still refuses
        document["verificationMaterial"]["publicKey"]["hint"] = fingerprint_of(keys["other.pub"])
        needle = "does not verify"
    path.write_text(json.dumps(document))
    public = keys["other.pub"] if how == "hint" else keys["release.pub"]
    _refused_by_all(bundle, public, needle)


def test_signing_refuses_a_bundle_that_no_longer_matches_its_manifest(copy_of, keys):
    bundle = copy_of("unsigned")
    (bundle / "README.md").write_text("changed\n")
    assert_refused(edgepack("sign", bundle, "--key", keys["other"]), 7, "changed README.md")
    assert not (bundle / SIGNATURE_NAME).exists()


# --- a key pinned beside the shim -----------------------------------------------------------------------


def test_a_pinned_key_is_required_without_being_given(copy_of, keys, tmp_path):
    bundle = copy_of("pinned")
    fingerprint = fingerprint_of(keys["release.pub"])
    assert (bundle / PINNED_KEY_NAME).read_bytes() == keys["release.pub"].read_bytes()
    assert fingerprint in (bundle / "REPORT.md").read_text()
    bundle_report = next(
        r for r in json.loads((bundle / MANIFEST_NAME).read_text())["stages"] if r["stage"] == "bundle"
    )
    assert bundle_report["pinned_key"]["fingerprint"] == fingerprint
    np.save(tmp_path / "in.npy", cnn_input())
    args = ("run", tmp_path / "in.npy", "-o", tmp_path / "out.npz")
    assert_refused(shim_cli(bundle, *args), 7, "not signed", fingerprint)
    assert_refused(shim_cli(bundle, *args, "--no-verify"), 2, "cannot be skipped")
    assert_refused(shim_cli(bundle, *args, "--public-key", keys["other.pub"]), 2, "not the key pinned")
    assert edgepack("sign", bundle, "--key", keys["release"], "--passphrase-env", PASSPHRASE_ENV).returncode == 0
    done = shim_cli(bundle, *args)
    assert done.returncode == 0, done.stderr
    (bundle / SIGNATURE_NAME).unlink()
    assert edgepack("sign", bundle, "--key", keys["other"]).returncode == 0
    assert_refused(shim_cli(bundle, *args), 7, "signed with another key")
