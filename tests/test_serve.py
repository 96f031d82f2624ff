"""``edgepack serve``: MIME types, cross-origin isolation headers and revalidation for web bundles."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgepack.errors import UsageError
from edgepack.serve import start_server


@pytest.fixture
def bundle(tmp_path) -> Path:
    folder = tmp_path / "bundle"
    (folder / "ort").mkdir(parents=True)
    (folder / "manifest.json").write_text("{}", encoding="utf-8")
    (folder / "edgepack.mjs").write_text("export const x = 1;\n", encoding="utf-8")
    (folder / "ort" / "runtime.wasm").write_bytes(b"\0asm" + bytes(16))
    (folder / "index.html").write_text("<!doctype html><title>demo</title>", encoding="utf-8")
    return folder


def get(url: str, headers: dict | None = None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_mime_types_and_isolation_headers(bundle):
    server = start_server(bundle)
    try:
        for path, mime in [
            ("edgepack.mjs", "text/javascript"),
            ("ort/runtime.wasm", "application/wasm"),
            ("manifest.json", "application/json"),
            ("", "text/html; charset=utf-8"),
        ]:
            status, headers, _ = get(server.url + path)
            assert status == 200 and headers["Content-Type"] == mime, path
            assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert server.url.startswith("http://127.0.0.1:")
        assert get(server.url + "ort/")[0] == 404, "no directory listings"
        assert get(server.url + "../../etc/passwd")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_revalidation_serves_a_changed_file_fresh(bundle):
    server = start_server(bundle)
    try:
        status, headers, _ = get(server.url + "edgepack.mjs")
        etag = headers["ETag"]
        assert headers["Cache-Control"] == "no-cache"
        assert get(server.url + "edgepack.mjs", {"If-None-Match": etag})[0] == 304
        (bundle / "edgepack.mjs").write_text("export const x = 2;\n", encoding="utf-8")
        status, _, body = get(server.url + "edgepack.mjs", {"If-None-Match": etag})
        assert status == 200 and b"x = 2" in body
    finally:
        server.shutdown()
        server.server_close()


def test_only_bundles_are_served(tmp_path):
    with pytest.raises(UsageError, match="not an edgepack bundle"):
        start_server(tmp_path)
    with pytest.raises(UsageError, match="not a folder"):
        start_server(tmp_path / "missing")


def test_cli_serve(bundle):
    process = subprocess.Popen(
        [sys.executable, "-m", "edgepack", "serve", str(bundle), "--port", "0", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        url = json.loads(line)["url"]
        status, headers, body = get(url + "edgepack.mjs")
        assert status == 200 and headers["Content-Type"] == "text/javascript" and b"export" in body
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_cli_serve_refuses_a_folder_without_manifest(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "edgepack", "serve", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "not an edgepack bundle" in done.stderr
