"""onnxruntime-web tarballs: registry download with integrity, the cache, local tarballs, extraction.

A fake npm registry (the tarball and its metadata, served by ``edgepack.serve`` on 127.0.0.1) stands
in for registry.npmjs.org, so failures can be produced on purpose; one test reads the real package.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from edgepack.bundle import ortweb
from edgepack.errors import DownloadError, ProfileError, UsageError, VerificationError
from edgepack.profiles import load_profile
from edgepack.serve import start_server


def make_tarball(
    path: Path, version: str, name: str = "onnxruntime-web", files: dict[str, bytes] | None = None
) -> Path:
    files = (
        files if files is not None else {"ort.entry.mjs": b"export const x = 1;\n", "ort.wasm": b"\0asm" + bytes(64)}
    )
    members = {"package/package.json": json.dumps({"name": name, "version": version}).encode()}
    members.update({f"package/dist/{k}": v for k, v in files.items()})
    members["package/lib/not-wanted.js"] = b"// not copied\n"
    with tarfile.open(path, "w:gz") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sri512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A fake npm registry with onnxruntime-web 9.9.9; returns a function to set the metadata's integrity."""
    root = tmp_path / "registry"
    (root / "onnxruntime-web" / "-").mkdir(parents=True)
    tarball = make_tarball(root / "onnxruntime-web" / "-" / "onnxruntime-web-9.9.9.tgz", "9.9.9")
    server = start_server(root, require_manifest=False)
    monkeypatch.setenv("npm_config_registry", server.url)

    def publish(integrity: str | None = None) -> bytes:
        data = tarball.read_bytes()
        meta = {
            "name": "onnxruntime-web",
            "version": "9.9.9",
            "dist": {
                "tarball": f"{server.url}onnxruntime-web/-/onnxruntime-web-9.9.9.tgz",
                "integrity": integrity or sri512(data),
            },
        }
        (root / "onnxruntime-web" / "9.9.9").write_text(json.dumps(meta), encoding="utf-8")
        return data

    yield publish
    server.shutdown()
    server.server_close()


def test_fetch_verifies_caches_and_then_works_offline(registry, tmp_path, monkeypatch):
    data = registry()
    cache = tmp_path / "cache"
    fetched = ortweb.fetch_tarball("9.9.9", cache)
    assert fetched.path.read_bytes() == data and fetched.integrity == sri512(data)
    assert fetched.origin.endswith("onnxruntime-web-9.9.9.tgz")
    assert (cache / "onnxruntime-web-9.9.9.tgz.integrity").read_text().strip() == sri512(data)
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9")  # nothing listens there
    again = ortweb.fetch_tarball("9.9.9", cache)
    assert again.origin.startswith("cache ") and again.integrity == fetched.integrity


def test_an_integrity_mismatch_keeps_nothing(registry, tmp_path):
    registry(integrity=sri512(b"some other tarball"))
    cache = tmp_path / "cache"
    with pytest.raises(VerificationError, match="does not match the registry's integrity"):
        ortweb.fetch_tarball("9.9.9", cache)
    assert list(cache.iterdir()) == []


def test_a_changed_cached_tarball_is_fetched_again(registry, tmp_path):
    data = registry()
    cache = tmp_path / "cache"
    path = ortweb.fetch_tarball("9.9.9", cache).path
    path.write_bytes(data[:-10])
    assert ortweb.fetch_tarball("9.9.9", cache).path.read_bytes() == data


def test_registry_unreachable_or_version_unknown(registry, tmp_path, monkeypatch):
    registry()
    with pytest.raises(DownloadError, match="HTTP 404") as exc:
        ortweb.fetch_tarball("0.0.1", tmp_path / "cache")
    assert "--ort-web" in str(exc.value)
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9")
    with pytest.raises(DownloadError, match="cannot reach the npm registry") as exc:
        ortweb.fetch_tarball("9.9.9", tmp_path / "cache")
    assert exc.value.exit_code == 9 and "--ort-web PATH" in str(exc.value)


def test_web_bundles_need_an_exact_version(tmp_path):
    profile = load_profile("browser-wasm")
    assert ortweb.pinned_version(profile) == "1.30.0"
    text = Path(profile.source).read_text(encoding="utf-8").replace('"==1.30.0"', '">=1.30"')
    (tmp_path / "loose.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError, match="must be pinned like '==1.30.0'"):
        ortweb.pinned_version(load_profile(str(tmp_path / "loose.yaml")))


def test_local_tarball_must_be_the_pinned_package(tmp_path):
    profile = load_profile("browser-wasm")
    good = ortweb.open_tarball(make_tarball(tmp_path / "good.tgz", "1.30.0"), profile)
    assert good.version == "1.30.0" and good.origin.startswith("local tarball")
    with pytest.raises(UsageError, match="is onnxruntime-web 1.29.0 but the profile browser-wasm pins ==1.30.0"):
        ortweb.open_tarball(make_tarball(tmp_path / "old.tgz", "1.29.0"), profile)
    with pytest.raises(UsageError, match="holds the npm package 'left-pad'"):
        ortweb.open_tarball(make_tarball(tmp_path / "other.tgz", "1.30.0", name="left-pad"), profile)
    (tmp_path / "junk.tgz").write_bytes(b"not a tarball")
    with pytest.raises(UsageError, match="not an npm package tarball"):
        ortweb.open_tarball(tmp_path / "junk.tgz", profile)
    with pytest.raises(UsageError, match="no such file"):
        ortweb.open_tarball(tmp_path / "missing.tgz", profile)


def test_extract_copies_only_the_listed_files(tmp_path):
    tarball = ortweb.open_tarball(make_tarball(tmp_path / "p.tgz", "1.30.0"), load_profile("browser-wasm"))
    out = tmp_path / "out"
    written = ortweb.extract_files(tarball, ["ort.wasm", "ort.entry.mjs"], out)
    assert [p.name for p in written] == ["ort.wasm", "ort.entry.mjs"]
    assert sorted(p.name for p in out.iterdir()) == ["ort.entry.mjs", "ort.wasm"]
    assert (out / "ort.wasm").stat().st_mode & 0o777 == 0o644
    with pytest.raises(UsageError, match="has no dist/ort.webgpu.mjs"):
        ortweb.extract_files(tarball, ["ort.webgpu.mjs"], tmp_path / "out2")
    with pytest.raises(ProfileError, match="not a plain file name"):
        ortweb.extract_files(tarball, ["../package.json"], tmp_path / "out3")


def test_builtin_web_profiles_name_files_of_the_real_package(tmp_path):
    """The profiles' ort_web_files exist in the pinned onnxruntime-web (fetched once, then cached)."""
    sizes = {}
    for name in ("browser-wasm", "browser-webgpu"):
        profile = load_profile(name)
        tarball = ortweb.fetch_tarball(ortweb.pinned_version(profile))
        written = ortweb.extract_files(tarball, profile.web.ort_web_files, tmp_path / name)
        assert profile.web.entry in [p.name for p in written]
        sizes[name] = sum(p.stat().st_size for p in written)
    assert sizes["browser-wasm"] <= 15e6, "the wasm profile's runtime files must stay within 15 MB"
