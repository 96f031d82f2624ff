"""Signed web bundles in real headless Chromium: edgepack.mjs checks model.sig with WebCrypto (ECDSA
P-256) before it fetches any other file, and refuses another key, a missing signature, a file changed
under a re-computed manifest, and a tampered signature."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgepack.bundle import ortweb
from edgepack.bundle.manifest import MANIFEST_NAME, write_manifest
from edgepack.bundle.signing import SIGNATURE_NAME, generate_key
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from edgepack.serve import start_server
from tests.in_browser import CHROMIUM, chromium, flip_byte, fresh_page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium (scripts/test.sh installs it)"
    ),
]

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("keys")
    for name in ("release", "other"):
        generate_key(folder / f"{name}.priv", folder / f"{name}.pub", None)
    return {
        "release": folder / "release.priv",
        "release.pub": (folder / "release.pub").read_text(),
        "other.pub": (folder / "other.pub").read_text(),
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory, keys):
    """The example CNN for browser-wasm, signed, served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("site")
    (root / "blank.html").write_text("<!doctype html><title>blank</title>", encoding="utf-8")
    tarball = ortweb.fetch_tarball(ortweb.pinned_version(load_profile("browser-wasm"))).path
    from edgepack.examples import write_example

    model = write_example("cnn", tmp_path_factory.mktemp("models"))
    [result] = package_model(
        model, [load_profile("browser-wasm")], Options(output=root, ort_web=tarball, sign_key=keys["release"])
    )
    assert result.ok, result.error
    server = start_server(root, require_manifest=False)
    yield root, server.url, result.bundle
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    with chromium() as context:
        yield context


def served_copy(site, name: str) -> tuple[Path, str]:
    root, url, bundle = site
    copy = root / name / bundle.name
    if copy.parent.exists():
        shutil.rmtree(copy.parent)
    shutil.copytree(bundle, copy)
    return copy, f"{url}{name}/{bundle.name}/"


def load_in_page(browser, site, bundle_url: str, public_key: str) -> dict:
    page = fresh_page(browser, f"{site[1]}blank.html")
    try:
        feeds = [{"image": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}]
        result = page.evaluate(
            """async ({ bundleUrl, publicKey, feeds }) => {
          const { load } = await import(new URL('edgepack.mjs', bundleUrl).href);
          const files = [];
          try {
            const model = await load({ baseUrl: bundleUrl, publicKey, onProgress: (p) => files.push(p.file) });
            const out = await model.run(feeds[0]);
            const signedBy = model.signedBy;
            await model.dispose();
            return { signedBy, dims: out.logits.dims, files };
          } catch (error) {
            return { error: error.message, file: error.file ?? null, files };
          }
        }""",
            {
                "bundleUrl": bundle_url,
                "publicKey": public_key,
                "feeds": [
                    {k: {"data": v.ravel().tolist(), "dims": list(v.shape)} for k, v in f.items()} for f in feeds
                ],
            },
        )
    finally:
        page.close()
    return result


def fingerprint(pem: str) -> str:
    import hashlib

    return hashlib.sha256(pem.encode()).hexdigest()


def test_a_signed_bundle_loads_with_its_key(browser, site, keys):
    root, url, bundle = site
    result = load_in_page(browser, site, f"{url}{bundle.relative_to(root).as_posix()}/", keys["release.pub"])
    assert "error" not in result, result
    assert result["signedBy"] == fingerprint(keys["release.pub"])
    assert result["dims"] == [1, 10]


def _refused(result: dict, *needles: str) -> None:
    assert "error" in result, result
    assert result["file"] == SIGNATURE_NAME, result
    for needle in needles:
        assert needle in result["error"], (needle, result["error"])
    assert result["files"] == []  # refused before any runtime or model byte was fetched


def test_another_key_is_refused(browser, site, keys):
    root, url, bundle = site
    result = load_in_page(browser, site, f"{url}{bundle.relative_to(root).as_posix()}/", keys["other.pub"])
    _refused(result, "signed with another key", fingerprint(keys["other.pub"]))


def test_an_unsigned_bundle_is_refused_when_a_key_is_given(browser, site, keys):
    copy, copy_url = served_copy(site, "unsigned")
    (copy / SIGNATURE_NAME).unlink()
    _refused(load_in_page(browser, site, copy_url, keys["release.pub"]), "not signed")


def test_a_changed_file_with_a_recomputed_manifest_is_refused(browser, site, keys):
    copy, copy_url = served_copy(site, "changed")
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    flip_byte(copy / manifest["model"]["file"], 0.9)
    write_manifest(copy, {k: v for k, v in manifest.items() if k not in ("schema", "files", "manifest_sha256")})
    _refused(
        load_in_page(browser, site, copy_url, keys["release.pub"]),
        f"changed since signing: {MANIFEST_NAME}, {manifest['model']['file']}",
    )


def test_a_tampered_signature_is_refused(browser, site, keys):
    copy, copy_url = served_copy(site, "tampered")
    document = json.loads((copy / SIGNATURE_NAME).read_text())
    raw = bytearray(base64.b64decode(document["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[12] ^= 1
    document["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    (copy / SIGNATURE_NAME).write_text(json.dumps(document))
    _refused(load_in_page(browser, site, copy_url, keys["release.pub"]), "does not verify")
