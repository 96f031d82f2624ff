"""Freeze a python bundle's shim into a standalone executable with PyInstaller (``package --freeze``).

Where it goes: beside the bundle, in ``<bundle>.frozen/`` (``edgepack_shim`` plus ``_internal/`` for the
default onedir build, a single ``edgepack_shim`` file with ``--onefile``), not inside it, because:

1. The bundle is what manifest.json checksums and what ``verify`` compares file by file. The frozen
   runtime is a ~100 MB per-architecture program that often has to be built later, on the device
   itself (PyInstaller cannot cross-build); built inside, it would change a sealed bundle after the fact.
2. The executable holds no model: it is the shim with Python, numpy and onnxruntime. It finds its bundle
   beside it (``X.frozen/edgepack_shim`` runs ``X/``) or through ``--bundle``, and verifies it as the
   Python shim does. A device with Python needs only the bundle; the frozen folder is optional to copy.

How:

1. PyInstaller runs in a runtime-only virtual environment (onnxruntime, numpy, pyinstaller: no torch,
   no onnx), created once and cached in the user cache folder (``~/.cache/edgepack/freeze-venv-<key>``):
   frozen from the packaging environment, onnxruntime.transformers pulls torch in (796 MB instead of 118 MB).
2. The build goes to a temporary folder beside the destination; the frozen executable must run the
   bundle's model once (``bench --runs 3``) before it is renamed into place. A failure leaves nothing.
3. When the host's architecture is not the profile's ``device.arch``, the step stops (exit 8) with the
   one-line command that does the same on the device, from the bundle folder.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from ..destination import check_destination
from ..errors import EdgepackError, UsageError
from ..profiles import Profile
from ..progress import step

__all__ = [
    "FreezeError",
    "freeze_bundle",
    "freeze_result",
    "frozen_path",
    "host_arch",
    "device_command",
    "pyinstaller_args",
    "runtime_requirements",
]

SHIM = "edgepack_shim.py"
EXECUTABLE = "edgepack_shim"
EXCLUDES = [
    "torch",
    "onnx",
    "onnxruntime.transformers",
    "onnxruntime.quantization",
    "onnxruntime.tools",
    "sympy",
    "matplotlib",
    "tkinter",
    "IPython",
]
"""Never needed by the shim; excluded even where the environment has them (a device's system packages)."""


class FreezeError(EdgepackError):
    """The frozen executable could not be built here."""

    exit_code = 8


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "armv8l": "arm64"}.get(machine, machine)


def frozen_path(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".frozen")


def runtime_requirements(profile: Profile) -> list[str]:
    """What the runtime-only environment installs: this host's versions (the self-test ran on them)
    when they fit the profile's range, else the range itself."""
    from packaging.specifiers import SpecifierSet

    def pinned(distribution: str, fallback: str) -> str:
        try:
            return f"{distribution}=={metadata.version(distribution)}"
        except metadata.PackageNotFoundError:
            return fallback

    runtime = profile.runtime
    ort = pinned("onnxruntime", f"{runtime.package}{runtime.version}")
    if not SpecifierSet(runtime.version).contains(ort.split("==")[-1], prereleases=True):
        ort = f"{runtime.package}{runtime.version}"
    elif runtime.package != "onnxruntime":
        ort = f"{runtime.package}=={ort.split('==')[-1]}"
    return [ort, pinned("numpy", "numpy"), pinned("pyinstaller", "pyinstaller>=6.10")]


def pyinstaller_args(script: Path | str, *, onefile: bool, distpath: Path | str, workpath: Path | str) -> list[str]:
    """Arguments after ``python -m PyInstaller``: the same on the host and in the device command."""
    return [
        "--noconfirm",
        "--log-level",
        "WARN",
        "--onefile" if onefile else "--onedir",
        "--name",
        EXECUTABLE,
        "--distpath",
        str(distpath),
        "--workpath",
        str(workpath),
        "--specpath",
        str(workpath),
        *[f"--exclude-module={name}" for name in EXCLUDES],
        str(script),
    ]


def device_command(bundle: Path, profile: Profile, *, onefile: bool) -> str:
    """One line to run in the bundle folder on the device. The venv sees system packages, so a device
    runtime installed outside PyPI (onnxruntime-gpu on a Jetson) is used as it is."""
    work = "/tmp/edgepack-freeze"
    venv = f"{work}/venv"
    target = f"../{frozen_path(bundle).name}"
    requirements = [f"{profile.runtime.package}{profile.runtime.version}", "numpy", "pyinstaller>=6.10"]
    args = pyinstaller_args(SHIM, onefile=onefile, distpath=f"{work}/dist", workpath=f"{work}/build")
    place = (
        f"mkdir -p {target} && mv {work}/dist/{EXECUTABLE} {target}/"
        if onefile
        else f"mv {work}/dist/{EXECUTABLE} {target}"
    )
    return " && ".join(
        [
            f"rm -rf {work} {target}",
            f"python3 -m venv --system-site-packages {venv}",
            f"{venv}/bin/python -m pip install {shlex.join(requirements)}",
            f"{venv}/bin/python -m PyInstaller {shlex.join(args)}",
            place,
        ]
    )


def cache_dir() -> Path:
    if os.environ.get("EDGEPACK_CACHE_DIR"):
        return Path(os.environ["EDGEPACK_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepack"


def runtime_venv(requirements: list[str], progress: Callable[[str], None]) -> Path:
    """The Python of a cached virtual environment holding only ``requirements``; created on first use."""
    key = hashlib.sha256("\n".join([sys.version, host_arch(), *requirements]).encode()).hexdigest()[:12]
    venv = cache_dir() / f"freeze-venv-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    progress(f"freeze: creating the runtime-only environment {venv} ({', '.join(requirements)})")
    staging = Path(tempfile.mkdtemp(prefix=f".{venv.name}.", dir=venv.parent))
    try:
        _run([sys.executable, "-m", "venv", str(staging)], "creating a virtual environment")
        _run(
            [
                str(staging / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *requirements,
            ],
            f"installing {' '.join(requirements)}",
        )
        (staging / ".complete").write_text("\n".join(requirements) + "\n", encoding="utf-8")
        try:
            staging.rename(venv)
        except OSError:  # built meanwhile by another process
            if not (venv / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return python


def freeze_bundle(
    bundle: Path,
    profile: Profile,
    *,
    onefile: bool = False,
    force: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> dict:
    """Build ``<bundle>.frozen/edgepack_shim`` and return facts for the report."""
    if profile.bundle.kind != "python":
        raise FreezeError(
            f"only python bundles can be frozen, this one is a {profile.bundle.kind} bundle", where=profile.name
        )
    if profile.device.arch != host_arch():
        raise FreezeError(
            f"cannot freeze for {profile.device.arch} on this {host_arch()} host (PyInstaller does not cross-build); "
            f"the bundle {bundle} is ready. On the device, in the bundle folder, run:\n"
            f"  {device_command(bundle, profile, onefile=onefile)}",
            where=profile.name,
        )
    destination = frozen_path(bundle)
    _check_frozen_destination(destination, force)
    started = time.perf_counter()
    python = runtime_venv(runtime_requirements(profile), progress)
    progress(f"[{profile.name}] freeze: PyInstaller {'onefile' if onefile else 'onedir'} build")
    with tempfile.TemporaryDirectory(prefix=f".{destination.name}.", dir=bundle.parent) as folder:
        scratch = Path(folder)
        _run(
            [
                str(python),
                "-m",
                "PyInstaller",
                *pyinstaller_args(
                    bundle / SHIM, onefile=onefile, distpath=scratch / "dist", workpath=scratch / "build"
                ),
            ],
            "PyInstaller",
        )
        if onefile:
            built = scratch / "frozen"
            built.mkdir()
            (scratch / "dist" / EXECUTABLE).rename(built / EXECUTABLE)
        else:
            built = scratch / "dist" / EXECUTABLE
        _self_check(built / EXECUTABLE, bundle)
        size = sum(p.stat().st_size for p in built.rglob("*") if p.is_file() and not p.is_symlink())
        _check_frozen_destination(destination, force)
        if destination.exists():
            shutil.rmtree(destination)
        built.rename(destination)
    return {
        "path": str(destination),
        "executable": str(destination / EXECUTABLE),
        "mode": "onefile" if onefile else "onedir",
        "bytes": size,
        "seconds": round(time.perf_counter() - started, 1),
        "environment": str(python.parent.parent),
    }


def _check_frozen_destination(destination: Path, force: bool) -> None:
    try:
        check_destination(destination, force=force, recognise=not_frozen)
    except UsageError as exc:
        raise FreezeError(exc.message, where=exc.where, hint=exc.hint) from None


def not_frozen(folder: Path) -> str | None:
    """Why --force may not replace ``folder`` (it must be a frozen executable's folder), or None."""
    executable = folder / EXECUTABLE
    if executable.is_symlink() or not executable.is_file():
        return f"holds no {EXECUTABLE} executable (it is not a frozen bundle executable)"
    return None


def _self_check(executable: Path, bundle: Path) -> None:
    """The frozen shim must verify the bundle and run its model once before it is kept."""
    _run(
        [str(executable), "--bundle", str(bundle), "bench", "--runs", "3", "--warmup", "0", "--json"],
        "the frozen executable's first run",
        env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
    )


def _run(command: list[str], what: str, env: dict | None = None) -> None:
    try:
        with step(f"freeze: {what}"):
            done = subprocess.run(command, capture_output=True, text=True, env=env)
    except OSError as exc:
        raise FreezeError(f"{what} failed: {exc}") from None
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-5:]
        raise FreezeError(
            f"{what} failed (exit {done.returncode}): " + " | ".join(tail),
            hint=f"the runtime-only environments live in {cache_dir()}; delete one to rebuild it",
        )


def freeze_result(result, profile: Profile, *, onefile: bool, force: bool, progress: Callable[[str], None]):
    """Freeze a packaged python bundle; a failure marks the result failed (the bundle itself stays)."""
    if not result.ok:
        return result
    if profile.bundle.kind != "python":
        progress(f"[{profile.name}] freeze: skipped, a {profile.bundle.kind} bundle has no Python shim")
        return result
    try:
        result.frozen = freeze_bundle(result.bundle, profile, onefile=onefile, force=force, progress=progress)
        progress(
            f"[{profile.name}] freeze: {result.frozen['executable']} "
            f"({result.frozen['bytes'] / 1e6:.0f} MB, {result.frozen['seconds']:.0f} s)"
        )
    except FreezeError as exc:
        result.ok, result.error = False, exc
    return result
