"""``edgepack package --freeze``: a PyInstaller executable of the shim beside the bundle, built for real.

The runtime-only environment is cached in the user cache folder (~/.cache/edgepack/freeze-venv-*), so
only the first run on a machine pays for creating it.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from edgepack.bundle.freeze import device_command, frozen_path, host_arch, pyinstaller_args, runtime_requirements
from edgepack.profiles import builtin_profile_names, load_profile

PYTHON_PROFILES = [load_profile(name) for name in builtin_profile_names() if load_profile(name).bundle.kind == "python"]
NATIVE = next((p for p in PYTHON_PROFILES if p.device.arch == host_arch()), None)
FOREIGN = next(p for p in PYTHON_PROFILES if p.device.arch != host_arch())


def edgepack(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, timeout=900, cwd=cwd
    )


def test_device_command_is_one_line_that_freezes_from_the_bundle_folder(tmp_path):
    rpi = load_profile("rpi-arm64")
    command = device_command(tmp_path / "cnn-rpi-arm64", rpi, onefile=False)
    assert "\n" not in command
    words = shlex.split(command)
    assert "edgepack_shim.py" in words and "--onedir" in words and "--exclude-module=torch" in words
    assert "onnxruntime>=1.20" in words  # the profile's runtime range, as the device installs it
    assert command.endswith("mv /tmp/edgepack-freeze/dist/edgepack_shim ../cnn-rpi-arm64.frozen")
    onefile = device_command(tmp_path / "cnn-rpi-arm64", rpi, onefile=True)
    assert "--onefile" in shlex.split(onefile) and "../cnn-rpi-arm64.frozen/" in onefile


def test_runtime_environment_has_no_torch_or_onnx():
    requirements = runtime_requirements(load_profile("linux-x64"))
    assert requirements[0] == f"onnxruntime=={metadata.version('onnxruntime')}"  # what the self-test ran on
    assert [r.split("=")[0].split(">")[0] for r in requirements] == ["onnxruntime", "numpy", "pyinstaller"]
    assert pyinstaller_args("s.py", onefile=False, distpath="d", workpath="w")[-1] == "s.py"


def test_foreign_architecture_prints_the_device_command_and_fails(tmp_path):
    done = edgepack("package", "--example", "cnn", "--target", FOREIGN.name, "-o", str(tmp_path), "--freeze", "-q")
    assert done.returncode == 8, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    assert f"cannot freeze for {FOREIGN.device.arch} on this {host_arch()} host" in done.stderr
    command = next(line.strip() for line in done.stderr.splitlines() if line.strip().startswith("rm -rf "))
    assert "-m PyInstaller" in command and command.endswith(f"../cnn-{FOREIGN.name}.frozen")
    bundle = tmp_path / f"cnn-{FOREIGN.name}"
    assert edgepack("verify", str(bundle)).returncode == 0  # the bundle itself is complete
    assert not frozen_path(bundle).exists()


def test_onefile_needs_freeze(tmp_path):
    done = edgepack("package", "--example", "cnn", "--target", "linux-x64", "-o", str(tmp_path), "--onefile")
    assert done.returncode == 2 and "--onefile only applies with --freeze" in done.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(NATIVE is None, reason=f"no built-in python profile for this host's architecture ({host_arch()})")
def test_frozen_onedir_runs_the_bundle_without_python(tmp_path):
    out = tmp_path / "build"
    done = edgepack("package", "--example", "cnn", "--target", NATIVE.name, "-o", str(out), "--freeze", "--json")
    assert done.returncode == 0, (done.stdout, done.stderr)
    result = json.loads(done.stdout)["results"][0]
    bundle = Path(result["bundle"])
    frozen = result["frozen"]
    executable = Path(frozen["executable"])
    assert executable == frozen_path(bundle) / "edgepack_shim" and frozen["mode"] == "onedir"
    assert edgepack("verify", str(bundle)).returncode == 0  # beside the bundle, not in it

    # runtime-only: no torch, no onnx, and nowhere near the 796 MB of a freeze from the packaging environment
    internal = executable.parent / "_internal"
    assert not (internal / "torch").exists() and not (internal / "onnx").exists()
    assert (internal / "onnxruntime").is_dir()
    assert frozen["bytes"] < 250e6

    # the executable finds its bundle beside its folder, from any working directory
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", image=x)
    run = subprocess.run(
        [str(executable), "run", str(tmp_path / "in.npz"), "-o", str(tmp_path / "frozen.npz"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["verified"] is True
    python = subprocess.run(
        [
            sys.executable,
            str(bundle / "edgepack_shim.py"),
            "run",
            str(tmp_path / "in.npz"),
            "-o",
            str(tmp_path / "python.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert python.returncode == 0, python.stderr
    assert np.array_equal(np.load(tmp_path / "frozen.npz")["logits"], np.load(tmp_path / "python.npz")["logits"])

    # and refuses a tampered bundle like the Python shim
    (bundle / "notes.txt").write_text("hello")
    refused = subprocess.run([str(executable), "verify"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 7 and "extra: notes.txt" in refused.stderr

    # an existing frozen folder is replaced only with --force
    again = edgepack("package", "--example", "cnn", "--target", NATIVE.name, "-o", str(out), "--freeze")
    assert again.returncode == 2 and f"{frozen_path(bundle)}" in again.stderr and "--force" in again.stderr
