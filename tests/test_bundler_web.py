"""The web bundle's layout, README and report, packaged through the CLI with a local onnxruntime-web tarball."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.bundle import ortweb
from edgepack.bundle.manifest import list_files, read_manifest, verify_bundle
from edgepack.examples import write_example
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from tests.test_ortweb import make_tarball


@pytest.fixture(scope="module")
def tarball() -> Path:
    return ortweb.fetch_tarball(ortweb.pinned_version(load_profile("browser-wasm"))).path


def test_cli_packages_a_web_bundle_offline_from_a_local_tarball(tarball, tmp_path):
    env = {
        **os.environ,
        "npm_config_registry": "http://127.0.0.1:9",
        "EDGEPACK_CACHE_DIR": str(tmp_path / "empty-cache"),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgepack",
            "package",
            "--example",
            "cnn",
            "--target",
            "browser-wasm",
            "--ort-web",
            str(tarball),
            "-o",
            str(tmp_path / "out"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    bundle = Path(json.loads(done.stdout)["results"][0]["bundle"])
    assert set(list_files(bundle)) == {
        "README.md",
        "REPORT.md",
        "edgepack.mjs",
        "index.html",
        "model/cnn.ort",
        "required_operators_and_types.config",
        "ort/ort.wasm.bundle.min.mjs",
        "ort/ort-wasm-simd-threaded.wasm",
    }
    assert verify_bundle(bundle).ok
    manifest = read_manifest(bundle)
    report = next(r for r in manifest["stages"] if r["stage"] == "bundle")
    assert report["ort_web"]["version"] == "1.30.0"
    assert report["ort_web"]["integrity"] == ortweb.fetch_tarball("1.30.0").integrity
    assert report["ort_web"]["origin"] == f"local tarball {tarball}"
    assert manifest["profile"]["web"]["entry"] == "ort.wasm.bundle.min.mjs"
    readme = (bundle / "README.md").read_text(encoding="utf-8")
    for expected in [
        "import { load, clearCache, events } from './cnn-browser-wasm/edgepack.mjs'",
        "clearCache()",
        "## Offline cache",
        "not-isolated",
        '"image": { data: new Float32Array(3072), dims: [1, 3, 32, 32] }',
        "Cross-Origin-Embedder-Policy: require-corp",
        "nginx",
        "Apache",
        "Caddy",
        "_headers",
        "ThreadingHTTPServer",
        "application/wasm",
        "manifestIntegrity",
    ]:
        assert expected in readme, expected
    assert not list((tmp_path / "empty-cache").glob("**/*.tgz")), "a local tarball is not copied into the cache"


def test_a_wrong_local_tarball_leaves_no_bundle(tmp_path):
    model = write_example("cnn", tmp_path)
    wrong = make_tarball(tmp_path / "old.tgz", "1.29.0")
    [result] = package_model(model, [load_profile("browser-wasm")], Options(output=tmp_path / "out", ort_web=wrong))
    assert not result.ok and "pins ==1.30.0" in str(result.error) and result.error.exit_code == 2
    assert not (tmp_path / "out").exists()  # not even the output folder
