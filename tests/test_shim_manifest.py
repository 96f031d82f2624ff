"""The shim reads only well-formed manifests: damage is one clear error, never a traceback or a path
outside the bundle, even with --no-verify."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SHIM = "edgepack_shim.py"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, cli) -> Path:
    out = tmp_path_factory.mktemp("shim-manifest")
    done = cli("package", "--example", "cnn", "--target", "rpi-arm64", "--quantize", "none", "-o", out, "-q")
    assert done.returncode == 0, done.stderr
    return out / "cnn-rpi-arm64"


def _shim(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SHIM, *args], cwd=bundle, capture_output=True, text=True, timeout=120)


def _damaged(bundle: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["model"].update(file="../../etc/passwd"), "not a relative path inside the bundle"),
        (lambda m: m["model"].update(file="/etc/passwd"), "not a relative path inside the bundle"),
        (lambda m: m.pop("runtime"), "'model' and 'runtime' must be mappings"),
        (lambda m: m["runtime"].update(execution_providers="CPU"), "execution_providers"),
        (lambda m: m["runtime"]["session_options"].update(intra_op_num_threads="four"), "intra_op_num_threads"),
        (lambda m: m["runtime"]["session_options"].update(graph_optimization_level="max"), "graph_optimization_level"),
        (lambda m: m["model"].update(inputs=[{"name": 3}]), "model.inputs"),
    ],
)
def test_malformed_manifest_is_refused_even_without_verification(bundle, tmp_path, change, message):
    damaged = _damaged(bundle, tmp_path, change)
    done = _shim(damaged, "run", "--no-verify", "x.npz", "-o", str(tmp_path / "out.npz"))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert message in done.stderr, done.stderr


def test_deeply_nested_manifest_is_one_clear_error(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    done = _shim(copy, "verify")
    assert done.returncode == 7 and "Traceback" not in done.stderr and "manifest.json" in done.stderr
