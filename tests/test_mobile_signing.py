"""Signed mobile bundles: the Kotlin loader's signature check (runtime_shim/mobile/EdgepackSignature.kt,
java.security ECDSA P-256) compiled with Debian's kotlinc and run on real bundles: signed by edgepack,
signed by the upstream ``model_signing`` CLI, and each refusal. The Swift twin (CryptoKit) is not
compiled here: there is no Swift toolchain for iOS on this Linux host; its source is checked for the
same steps."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from edgepack.bundle.manifest import MANIFEST_NAME, write_manifest
from edgepack.bundle.signing import SIGNATURE_NAME, generate_key
from edgepack.examples import write_example
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile

ANDROID_JSON = Path("/usr/share/java/com.android.json.jar")
KOTLIN_MAIN = """
import ai.edgepack.BundleVerificationException
import ai.edgepack.EdgepackSignature
import ai.edgepack.EdgepackVerifier
import java.io.File

fun main(args: Array<String>) {
    val key = File(args[0]).readText()
    for (path in args.drop(1)) {
        val answer = try {
            val signer = EdgepackSignature.verify(File(path), key)
            EdgepackVerifier.verify(File(path))
            "ok " + signer
        } catch (e: BundleVerificationException) { e.problems.joinToString("|") }
        println(File(path).parentFile.name + "\\t" + answer)
    }
}
"""


def fingerprint(public: Path) -> str:
    return hashlib.sha256(public.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[dict[str, Path], dict[str, Path], dict[str, str]]:
    """Copies of a signed android-nnapi bundle, each changed one way, and what the loader must answer."""
    tmp = tmp_path_factory.mktemp("mobile-signed")
    keys = {}
    for name in ("release", "other"):
        generate_key(tmp / f"{name}.priv", tmp / f"{name}.pub", None)
        keys[name], keys[f"{name}.pub"] = tmp / f"{name}.priv", tmp / f"{name}.pub"
    [result] = package_model(
        write_example("cnn", tmp),
        [load_profile("android-nnapi")],
        Options(output=tmp / "out", sign_key=keys["release"]),
    )
    assert result.ok, result.error
    bundles, expected = {}, {}

    def copy(name: str) -> Path:
        bundles[name] = Path(shutil.copytree(result.bundle, tmp / "cases" / name / result.bundle.name))
        return bundles[name]

    copy("intact")
    expected["intact"] = f"ok {fingerprint(keys['release.pub'])}"
    (copy("unsigned") / SIGNATURE_NAME).unlink()
    expected["unsigned"] = "signature: the bundle is not signed"
    changed = copy("changed")
    model = changed / "model" / "cnn.ort"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    manifest = json.loads((changed / MANIFEST_NAME).read_text())
    write_manifest(changed, {k: v for k, v in manifest.items() if k not in ("schema", "files", "manifest_sha256")})
    expected["changed"] = "signature: changed since signing: manifest.json, model/cnn.ort"
    tampered = copy("tampered")
    document = json.loads((tampered / SIGNATURE_NAME).read_text())
    raw = bytearray(base64.b64decode(document["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[12] ^= 1
    document["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    (tampered / SIGNATURE_NAME).write_text(json.dumps(document))
    expected["tampered"] = "signature: the signature does not verify"
    upstream = copy("upstream")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_signing",
            "sign",
            "key",
            str(upstream),
            "--private_key",
            str(keys["release"]),
            "--signature",
            str(upstream / SIGNATURE_NAME),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    expected["upstream"] = f"ok {fingerprint(keys['release.pub'])}"
    return bundles, keys, expected


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("kotlinc") is None or not ANDROID_JSON.is_file(),
    reason="needs kotlinc and Android's org.json for the JVM (Debian packages kotlin, libandroid-json-java)",
)
def test_kotlin_loader_verifies_signatures_and_refuses_the_rest(cases, tmp_path):
    bundles, keys, expected = cases
    sources = [tmp_path / name for name in ("EdgepackVerifier.kt", "EdgepackSignature.kt")]
    for path in sources:
        shutil.copyfile(resources.files("edgepack.runtime_shim") / "mobile" / path.name, path)
    (tmp_path / "Main.kt").write_text(KOTLIN_MAIN)
    jar = tmp_path / "loader.jar"
    build = subprocess.run(
        [
            "kotlinc",
            *map(str, sources),
            str(tmp_path / "Main.kt"),
            "-cp",
            str(ANDROID_JSON),
            "-include-runtime",
            "-d",
            str(jar),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr

    def answers(key: Path) -> dict[str, str]:
        run = subprocess.run(
            ["java", "-cp", f"{jar}:{ANDROID_JSON}", "MainKt", str(key), *map(str, bundles.values())],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        return dict(line.split("\t", 1) for line in run.stdout.splitlines())

    found = answers(keys["release.pub"])
    for name, answer in expected.items():
        assert found[name].startswith(answer), (name, found[name])
    other = answers(keys["other.pub"])
    assert other["intact"].startswith("signature: signed with another key"), other["intact"]
    assert fingerprint(keys["other.pub"]) in other["intact"]


def test_loaders_check_the_signature_before_anything_else():
    kotlin = (resources.files("edgepack.runtime_shim") / "mobile" / "EdgepackLoader.kt").read_text()
    assert kotlin.index("EdgepackSignature.verify(bundle, publicKeyPem)") < kotlin.index(
        "EdgepackVerifier.verify(bundle)"
    )
    swift = (resources.files("edgepack.runtime_shim") / "mobile" / "EdgepackLoader.swift").read_text()
    start = swift.index("static func createSession(")
    assert (
        start
        < swift.index("try verifySignature(bundle: bundle", start)
        < swift.index("try verify(bundle: bundle)", start)
    )
    for step in (
        "P256.Signing.PublicKey(pemRepresentation:",
        "ECDSASignature(derRepresentation:",
        "isValidSignature(",
        "DSSEv1 ",
        "https://model_signing/signature/v1.0",
        "changed since signing",
        "signed with another key",
        "model.sig",
    ):
        assert step in swift, step
