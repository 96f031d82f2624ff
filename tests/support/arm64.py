"""An aarch64 Python with numpy and onnxruntime, run under qemu-user on any Debian host, without root.

What a Raspberry Pi 4/5 runs, close enough to check correctness (never speed) on an x86-64 machine:

1. qemu-user 10.x from Debian trixie's ``qemu-user`` package. Only ``qemu-aarch64`` is unpacked, nothing is
   installed. Never bookworm's qemu 7.2: ``import onnxruntime`` segfaults there and int8 results are wrong.
2. The arm64 debs of ``python3.11`` and its dependencies plus ``libstdc++6`` from Debian bookworm (what
   64-bit Raspberry Pi OS is built on), downloaded by apt as if this machine were arm64 with nothing
   installed, then unpacked with ``dpkg -x``.
3. The aarch64 wheels of numpy and onnxruntime, at the host's versions, put in ``opt/site`` by the host's pip.

apt works on its own sources list, state and cache inside the build folder: the system's apt configuration
is never changed. The result is cached in ``$XDG_CACHE_HOME/edgepack/arm64-sysroot-<key>`` (default
``~/.cache``), where the key hashes the recipe, so repeat runs take no network and no time. The build
happens in a temporary folder next to it and is renamed into place only after the emulated Python has
imported numpy and onnxruntime, so an interrupted or broken build is never trusted later.

Guest programs run with ``QEMU_CPU=cortex-a72`` (the Pi 4's core; ``cortex-a76`` is the Pi 5's): with
qemu's default ``max`` CPU onnxruntime picks int8 kernels for features no Pi has, and dynamic int8 results
then differ from the host's by 3e-2 on the example transformer (1e-6 as a Cortex-A72 or A76).

By hand: ``python -m tests.support.arm64 --build`` builds (or finds) the sysroot and describes it;
``python -m tests.support.arm64 -- script.py ARGS`` runs a script with the emulated Python.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BuildError", "EmulationUnavailable", "Sysroot", "ensure_sysroot", "recipe"]

RECIPE_VERSION = 2  # bump when the build steps change, so old caches are not reused
QEMU_SUITE = "trixie"  # qemu-user 10.x
QEMU_MIN_MAJOR = 10
GUEST_SUITE = "bookworm"  # python3.11, glibc 2.36: Raspberry Pi OS 12
GUEST_DEBS = ("python3.11", "libstdc++6")
GUEST_PYTHON = "3.11"
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
DEFAULT_CPU = "cortex-a72"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
MARKER = "sysroot.json"  # written last: a folder without it is not a sysroot

# Text in apt's or pip's output that means the package hosts could not be reached at all.
UNREACHABLE = (
    "Temporary failure resolving",
    "Could not resolve",
    "Could not connect",
    "Unable to connect",
    "Network is unreachable",
    "Connection timed out",
    "Connection refused",
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
)


class EmulationUnavailable(Exception):
    """This machine cannot build the sysroot at all (no Debian tools, no route to the package hosts)."""


class BuildError(Exception):
    """A build step failed for a reason other than reachability: a bug to fix, not a reason to skip."""


@dataclass(frozen=True)
class Sysroot:
    root: Path
    cpu: str = DEFAULT_CPU
    build_seconds: float | None = None  # None when it came from the cache

    @property
    def qemu(self) -> Path:
        return self.root / "host" / "qemu-aarch64"

    @property
    def interpreter(self) -> Path:
        return self.root / "usr" / "bin" / f"python{GUEST_PYTHON}"

    @property
    def site(self) -> Path:
        return self.root / "opt" / "site"

    @property
    def info(self) -> dict:
        return json.loads((self.root / MARKER).read_text(encoding="utf-8"))

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A small environment of its own: the host's PYTHON*, LD_* or virtualenv variables would leak in."""
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/tmp"),
            "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
            "LANG": "C.UTF-8",
            "QEMU_CPU": self.cpu,
            "QEMU_LD_PREFIX": str(self.root),
            "PYTHONPATH": str(self.site),
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",  # the cached sysroot stays as built; its .pyc files are made at build
        }
        env.update(extra or {})
        return env

    def python(
        self, args, *, cwd=None, env: dict[str, str] | None = None, timeout: float = 600, cpu: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run the emulated ``python3.11 ARGS`` and capture its output as text."""
        sysroot = self if cpu is None else Sysroot(self.root, cpu)
        return subprocess.run(
            [str(self.qemu), str(self.interpreter), *map(str, args)],
            cwd=cwd,
            env=sysroot.environment(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def recipe() -> dict:
    """Everything the sysroot is built from; its hash names the cache folder."""
    return {
        "recipe_version": RECIPE_VERSION,
        "host_arch": _host_arch(),
        "qemu": {"suite": QEMU_SUITE, "package": "qemu-user", "min_major": QEMU_MIN_MAJOR},
        "guest": {"suite": GUEST_SUITE, "arch": "arm64", "debs": list(GUEST_DEBS)},
        "wheels": {
            "python": GUEST_PYTHON,
            "platforms": list(WHEEL_PLATFORMS),
            "pins": {name: importlib.metadata.version(name) for name in ("numpy", "onnxruntime")},
        },
    }


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgepack"


def ensure_sysroot(cpu: str = DEFAULT_CPU, log=None) -> Sysroot:
    """The cached sysroot for the current recipe, built first if needed.

    Raises EmulationUnavailable when this machine cannot build one at all, BuildError when a step fails.
    """
    log = log or (lambda message: None)
    for tool in ("apt-get", "dpkg", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise EmulationUnavailable(f"building the ARM64 sysroot needs Debian's {tool}, which is not on PATH")
    spec = recipe()
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"arm64-sysroot-{key}"
    if (final / MARKER).is_file():
        return Sysroot(final, cpu)
    with _locked(root / f"arm64-sysroot-{key}.lock"):
        if (final / MARKER).is_file():  # built by another process while this one waited
            return Sysroot(final, cpu)
        for leftover in root.glob(f"arm64-sysroot-{key}.partial-*"):  # interrupted builds: never trusted
            shutil.rmtree(leftover, ignore_errors=True)
        if final.exists():  # a folder without its marker was not made by this module: do not trust it
            shutil.rmtree(final)
        partial = root / f"arm64-sysroot-{key}.partial-{os.getpid()}"
        started = time.monotonic()
        try:
            _build(partial, spec, log)
            seconds = time.monotonic() - started
            info = json.loads((partial / MARKER).read_text(encoding="utf-8"))
            info["build_seconds"] = round(seconds, 1)
            _write_json(partial / MARKER, info)
            partial.rename(final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    log(f"built {final} in {seconds:.0f} s")
    return Sysroot(final, cpu, build_seconds=seconds)


def _build(dest: Path, spec: dict, log) -> None:
    work = dest / ".build"  # apt's lists, state and downloads: removed before the rename
    work.mkdir(parents=True)
    mirror = _debian_mirror()
    steps: dict[str, float] = {}
    clock = [time.monotonic()]

    def done(step: str) -> None:
        now = time.monotonic()
        steps[step] = round(now - clock[0], 1)
        clock[0] = now

    log(f"qemu-user from {QEMU_SUITE} ({mirror})")
    apt = _Apt(work / "apt-qemu", mirror, QEMU_SUITE, spec["host_arch"])
    apt.update()
    qemu_deb = apt.download("qemu-user")
    (dest / "host").mkdir()
    _extract_member(qemu_deb, "./usr/bin/qemu-aarch64", dest / "host" / "qemu-aarch64")
    qemu_version = _run([str(dest / "host" / "qemu-aarch64"), "--version"]).splitlines()[0]
    major = re.search(r"version (\d+)\.", qemu_version)
    if not major or int(major.group(1)) < QEMU_MIN_MAJOR:
        raise BuildError(
            f"{qemu_deb.name} gave '{qemu_version}', need qemu {QEMU_MIN_MAJOR}.x or newer "
            "(older qemu-user crashes onnxruntime or computes wrong int8 results)"
        )
    done("qemu")

    log(f"arm64 {', '.join(GUEST_DEBS)} and dependencies from {GUEST_SUITE}")
    apt = _Apt(work / "apt-guest", mirror, GUEST_SUITE, "arm64")
    apt.update()
    debs = apt.download_with_dependencies(GUEST_DEBS)
    for deb in debs:
        _run(["dpkg", "-x", str(deb), str(dest)])
    done("debs")

    log("aarch64 wheels: " + ", ".join(f"{k}=={v}" for k, v in spec["wheels"]["pins"].items()))
    site = dest / "opt" / "site"
    platforms = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--target",
            str(site),
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            GUEST_PYTHON,
            *platforms,
            *(f"{k}=={v}" for k, v in spec["wheels"]["pins"].items()),
        ],
        timeout=900,
    )
    done("wheels")

    shutil.rmtree(work)
    _compile_bytecode(dest)
    done("bytecode")
    sysroot = Sysroot(dest)
    probe = sysroot.python(
        [
            "-c",
            (
                "import json, platform, sys, numpy, onnxruntime; print(json.dumps({"
                "'machine': platform.machine(), 'python': platform.python_version(), 'numpy': numpy.__version__, "
                "'onnxruntime': onnxruntime.__version__, 'providers': onnxruntime.get_available_providers()}))"
            ),
        ],
        timeout=600,
    )
    if probe.returncode != 0:
        raise BuildError(f"the emulated Python cannot import numpy and onnxruntime:\n{probe.stderr[-3000:]}")
    guest = json.loads(probe.stdout.strip().splitlines()[-1])
    if guest["machine"] != "aarch64" or any(guest[k] != v for k, v in spec["wheels"]["pins"].items()):
        raise BuildError(f"the emulated Python is not what the recipe asked for: {guest}")
    done("probe")
    _write_json(
        dest / MARKER,
        {
            "recipe": spec,
            "mirror": mirror,
            "qemu": qemu_version,
            "qemu_deb": qemu_deb.name,
            "guest": guest,
            "debs": sorted(deb.name for deb in debs),
            "size_bytes": _tree_size(dest),
            "step_seconds": steps,
        },
    )


class _Apt:
    """apt-get on a sources list, state and cache of its own, as a machine of ``arch`` with nothing installed."""

    def __init__(self, folder: Path, mirror: str, suite: str, arch: str):
        self.folder = folder
        for sub in ("lists/partial", "archives/partial", "parts", "preferences.d", "downloads"):
            (folder / sub).mkdir(parents=True)
        signed = f" [signed-by={KEYRING}]" if KEYRING.is_file() else ""
        (folder / "sources.list").write_text(f"deb{signed} {mirror} {suite} main\n", encoding="utf-8")
        (folder / "status").write_text("", encoding="utf-8")
        self.options = []
        for key, value in {
            "Dir::Etc::SourceList": folder / "sources.list",
            "Dir::Etc::SourceParts": folder / "parts",
            "Dir::Etc::Preferences": folder / "preferences",
            "Dir::Etc::PreferencesParts": folder / "preferences.d",
            "Dir::State": folder,
            "Dir::State::Lists": folder / "lists",
            "Dir::State::status": folder / "status",
            "Dir::Cache": folder,
            "Dir::Cache::archives": folder / "archives",
            "Debug::NoLocking": "1",
            "APT::Sandbox::User": pwd.getpwuid(os.geteuid()).pw_name,  # the lists are ours, not _apt's
            "APT::Architecture": arch,
            "APT::Architectures": arch,
            "APT::Get::List-Cleanup": "0",
            "APT::Install-Recommends": "0",
            "Acquire::Languages": "none",
        }.items():
            self.options += ["-o", f"{key}={value}"]

    def update(self) -> None:
        self._apt_get("update")

    def download(self, package: str) -> Path:
        self._apt_get("download", package, cwd=self.folder / "downloads")
        found = sorted((self.folder / "downloads").glob(f"{package}_*.deb"))
        if len(found) != 1:
            raise BuildError(f"apt-get download {package} gave {found}")
        return found[0]

    def download_with_dependencies(self, packages) -> list[Path]:
        self._apt_get("install", "--yes", "--download-only", *packages)
        debs = sorted((self.folder / "archives").glob("*.deb"))
        if not debs:
            raise BuildError(f"apt-get downloaded nothing for {' '.join(packages)}")
        return debs

    def _apt_get(self, *args: str, cwd: Path | None = None) -> None:
        command = ["apt-get", "-q", *self.options, *args]
        result = subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
        )
        output = result.stdout + result.stderr
        # apt-get update exits 0 even when an index could not be fetched: read its warnings too
        if result.returncode != 0 or re.search(r"^(W|E): (Failed to fetch|Some index files failed)", output, re.M):
            _raise_for(f"apt-get {' '.join(args)}", output)


def _raise_for(what: str, output: str):
    tail = "\n".join(output.strip().splitlines()[-15:])
    if any(marker in output for marker in UNREACHABLE):
        raise EmulationUnavailable(f"{what}: a package host cannot be reached:\n{tail}")
    raise BuildError(f"{what} failed:\n{tail}")


def _run(command: list[str], timeout: float = 600) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        _raise_for(" ".join(command[:4]), result.stdout + result.stderr)
    return result.stdout


def _debian_mirror() -> str:
    """The Debian archive this machine's apt already uses, so the build contacts no new host."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if path.suffix not in (".list", ".sources") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for uri in re.findall(r"^\s*(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return FALLBACK_MIRROR


def _host_arch() -> str:
    if shutil.which("dpkg") is None:
        return "unknown"
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()


def _extract_member(deb: Path, member: str, dest: Path) -> None:
    """One file of a .deb (qemu-user holds ~40 emulators; only one is needed)."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as tar_stream:
        untar = subprocess.run(["tar", "-x", "-O", member], stdin=tar_stream.stdout, capture_output=True)
    if tar_stream.returncode != 0 or untar.returncode != 0 or not untar.stdout:
        raise BuildError(f"cannot extract {member} from {deb.name}: {untar.stderr.decode(errors='replace')}")
    dest.write_bytes(untar.stdout)
    dest.chmod(0o755)


def _compile_bytecode(dest: Path) -> None:
    """Write the .pyc files once: dpkg -x skips the postinst that would, and emulated compiling is slow."""
    folders = [str(dest / "usr" / "lib" / f"python{GUEST_PYTHON}"), str(dest / "opt" / "site")]
    if f"{sys.version_info.major}.{sys.version_info.minor}" == GUEST_PYTHON:  # same bytecode format
        command = [sys.executable, "-m", "compileall", "-q", "-j", "0", *folders]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    else:
        result = Sysroot(dest).python(["-m", "compileall", "-q", "-j", "0", *folders], timeout=1800)
    if result.returncode != 0:
        raise BuildError(f"compileall failed:\n{(result.stdout + result.stderr)[-3000:]}")


def _tree_size(folder: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.stat(path).st_size
    return total


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="build (or find) the sysroot and describe it")
    parser.add_argument("--cpu", default=DEFAULT_CPU, help=f"QEMU_CPU for the guest (default {DEFAULT_CPU})")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="after --: arguments for the emulated python3.11")
    args = parser.parse_args(argv)
    try:
        sysroot = ensure_sysroot(args.cpu, log=lambda message: print(message, file=sys.stderr))
    except (EmulationUnavailable, BuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.build or not args.args:
        info = sysroot.info
        print(f"sysroot: {sysroot.root} ({info['size_bytes'] / 1e6:.0f} MB, built in {info['build_seconds']} s)")
        print(f"steps:   {json.dumps(info['step_seconds'])} (seconds)")
        print(f"qemu:    {info['qemu']}  (QEMU_CPU={sysroot.cpu})")
        print(f"guest:   {json.dumps(info['guest'])}")
        print(
            f"run:     QEMU_CPU={sysroot.cpu} QEMU_LD_PREFIX={sysroot.root} PYTHONPATH={sysroot.site} "
            f"{sysroot.qemu} {sysroot.interpreter} ..."
        )
    passthrough = args.args[1:] if args.args[:1] == ["--"] else args.args
    if passthrough:
        return subprocess.run(
            [str(sysroot.qemu), str(sysroot.interpreter), *passthrough], env=sysroot.environment()
        ).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
