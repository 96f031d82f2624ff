"""The manifest and `edgepack verify`: every flipped byte, extra file and missing file is caught."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from edgepack.bundle.manifest import BLOCK, MANIFEST_NAME, hash_file, seal_matches, verify_bundle, write_manifest
from tests.support.manifests import minimal_content


@pytest.fixture
def bundle(tmp_path) -> Path:
    root = tmp_path / "bundle"
    (root / "model").mkdir(parents=True)
    (root / "model" / "m.ort").write_bytes(bytes(range(256)) * 40)
    (root / "model" / "m.onnx.data").write_bytes(b"\x01" * 5000)
    (root / "README.md").write_text("hello\n")
    write_manifest(root, minimal_content("model/m.ort", ["model/m.onnx.data"]))
    return root


def test_hash_file_streams_sha256_and_sri(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    entry = hash_file(path)
    assert entry["size"] == 3
    assert entry["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert entry["integrity"].startswith("sha384-ywB1P0WjXou1oD1pmsZQBycsMqsO3tFjGotgWkP")


@pytest.mark.parametrize("size", [2 * BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 1, 3 * BLOCK])
def test_files_of_two_blocks_or_more_list_each_blocks_sha384(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    entry = hash_file(tmp_path / "f")
    if size < 2 * BLOCK:
        assert "blocks" not in entry
        return
    expected = [hashlib.sha384(data[at : at + BLOCK]).digest() for at in range(0, size, BLOCK)]
    assert entry["blocks"] == {"size": BLOCK, "sha384": [base64.b64encode(d).decode("ascii") for d in expected]}
    assert entry["integrity"] == "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode("ascii")


def test_manifest_lists_every_file_but_itself_sorted(bundle):
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert manifest["schema"] == "edgepack.manifest/1"
    assert list(manifest["files"]) == ["README.md", "model/m.onnx.data", "model/m.ort"]
    assert verify_bundle(bundle).ok


@pytest.mark.parametrize("victim", ["model/m.ort", "model/m.onnx.data", "README.md"])
def test_verify_catches_a_flipped_byte(bundle, victim):
    path = bundle / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify_bundle(bundle)
    assert result.changed == [victim] and not result.missing and not result.extra


def test_verify_catches_extra_and_missing_files(bundle):
    (bundle / "model" / "m.onnx.data").unlink()
    (bundle / "model" / "evil.onnx").write_bytes(b"x")
    result = verify_bundle(bundle)
    assert result.missing == ["model/m.onnx.data"]
    assert result.extra == ["model/evil.onnx"]


def test_verify_cli_exit_codes_and_listing(bundle, cli):
    ok = cli("verify", bundle)
    assert ok.returncode == 0 and "match" in ok.stdout
    (bundle / "model" / "m.ort").write_bytes(b"tampered")
    (bundle / "extra.txt").write_text("x")
    bad = cli("verify", bundle, "--json")
    assert bad.returncode == 7
    report = json.loads(bad.stdout)
    assert report["changed"] == ["model/m.ort"] and report["extra"] == ["extra.txt"] and not report["ok"]
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("field", ["integrity", "blocks"])
def test_verify_checks_the_digests_browsers_check_against_the_same_bytes(bundle, cli, field):
    """A manifest sealed over a wrong SHA-384 (as a faulty tool would write it): its SHA-256 still matches, the web
    loader would refuse the file, and so does `edgepack verify`."""
    (bundle / "model" / "m.ort").write_bytes(np.random.default_rng(3).bytes(2 * BLOCK + 5))
    write_manifest(bundle, minimal_content("model/m.ort", ["model/m.onnx.data"]))
    manifest = json.loads((bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
    entry = manifest["files"]["model/m.ort"]
    if field == "integrity":
        entry["integrity"] = "sha384-" + base64.b64encode(hashlib.sha384(b"other").digest()).decode("ascii")
    else:
        entry["blocks"]["sha384"][2] = base64.b64encode(hashlib.sha384(b"other").digest()).decode("ascii")
    # the wrong digest, sealed again as write_manifest seals
    manifest["manifest_sha256"] = "0" * 64
    blank = (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    seal = hashlib.sha256(blank).hexdigest().encode()
    sealed = re.sub(rb'"manifest_sha256": "0{64}"', b'"manifest_sha256": "' + seal + b'"', blank)
    (bundle / MANIFEST_NAME).write_bytes(sealed)
    assert seal_matches(sealed)
    assert verify_bundle(bundle).ok, "sizes, SHA-256 and the seal all match"
    assert verify_bundle(bundle, every_digest=True).changed == ["model/m.ort"]
    bad = cli("verify", bundle)
    assert bad.returncode == 7 and "changed: model/m.ort" in bad.stdout


def test_verify_refuses_a_folder_without_manifest(tmp_path, cli):
    done = cli("verify", tmp_path)
    assert done.returncode == 7
    assert "not an edgepack bundle" in done.stderr
