"""One JSON Schema for the manifest (runtime_shim/manifest.schema.json): every bundle's manifest validates
against it, and every key the Python shim and the web loader read is one it declares."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from edgepack.bundle import manifest as packager_manifest
from edgepack.bundle.manifest import Content, ModelEntry, ProviderEntry, RuntimeEntry, SessionEntry, SourceModel, Tensor
from edgepack.examples import EXAMPLE_SHAPES
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import Bundle, builtin_profile_names, load_profile, resolve_targets
from edgepack.recipes import RECIPES
from edgepack.runtime_shim import edgepack_shim

SHIM = Path(edgepack_shim.__file__).parent
SCHEMA = json.loads((SHIM / "manifest.schema.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bundles(examples, tmp_path_factory) -> list[Path]:
    """Both examples for every built-in target."""
    out = tmp_path_factory.mktemp("schema")
    found = []
    for name, model in examples.items():
        options = Options(output=out, input_shapes=EXAMPLE_SHAPES.get(name, {}))
        results = package_model(model, resolve_targets(["all"]), options, name=name)
        assert all(r.ok for r in results), [str(r.error) for r in results if not r.ok]
        found += [r.bundle for r in results]
    return found


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_every_bundle_manifest_validates(bundles):
    validator = jsonschema.Draft202012Validator(SCHEMA)
    assert len(bundles) == 2 * len(builtin_profile_names())
    for bundle in bundles:
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(_manifest(bundle))]
        assert not errors, f"{bundle.name}: {errors[:5]}"


def test_every_reader_names_the_schema_it_reads():
    schema_id = SCHEMA["properties"]["schema"]["const"]
    assert packager_manifest.SCHEMA == edgepack_shim.SCHEMA == schema_id
    for reader in ("edgepack.mjs", "mobile/EdgepackVerifier.kt", "mobile/EdgepackLoader.swift"):
        assert f"{schema_id}" in (SHIM / reader).read_text(encoding="utf-8"), reader


def test_the_schema_allows_what_the_registries_and_profiles_allow():
    assert set(SCHEMA["properties"]["model"]["properties"]["precision"]["enum"]) == {
        r.precision for r in RECIPES.values()
    }
    assert set(SCHEMA["properties"]["bundle_kind"]["enum"]) == set(
        typing.get_args(typing.get_type_hints(Bundle)["kind"])
    )


WRITTEN_BESIDE = {"schema", "files", "created", "manifest_sha256"}
"""Top-level keys ``write_manifest`` adds to the content."""


def test_the_typed_manifest_declares_the_schemas_keys():
    """Each dataclass of the tree has exactly the keys its place in the schema declares, required ones included."""
    tree = {
        (): Content,
        ("model",): ModelEntry,
        ("model", "source"): SourceModel,
        ("model", "inputs", "[]"): Tensor,
        ("model", "outputs", "[]"): Tensor,
        ("runtime",): RuntimeEntry,
        ("runtime", "execution_providers", "[]"): ProviderEntry,
        ("runtime", "session_options"): SessionEntry,
    }
    for path, cls in tree.items():
        node = SCHEMA
        for step in path:
            node = _resolve(node["items"] if step == "[]" else node["properties"][step])
        node = _resolve(node)
        fields = {f.name for f in dataclasses.fields(cls)}
        declared = set(node["properties"]) - (WRITTEN_BESIDE if not path else set())
        assert fields == declared, (path, fields ^ declared)
        assert set(node["required"]) - WRITTEN_BESIDE <= fields, path


def test_a_typed_manifest_written_with_a_date_validates(tmp_path, monkeypatch):
    profile = load_profile("linux-x64")
    tensor = Tensor(name="x", dtype="float32", shape=["batch", 3, None])
    content = Content(
        target=profile.name,
        profile=profile,
        bundle_kind=profile.bundle.kind,
        model=ModelEntry(
            file="model/m.onnx",
            format="onnx",
            ort_style=None,
            external_data=[],
            precision="fp32",
            ir_version=10,
            opsets={"ai.onnx": 21},
            inputs=[tensor],
            outputs=[Tensor("y", "float32", None)],
            source=SourceModel(name="m.onnx", sha256="0" * 64, bytes=1),
        ),
        runtime=RuntimeEntry(
            package="onnxruntime",
            version=">=1.20",
            execution_providers=[ProviderEntry(name="CPUExecutionProvider", options={})],
            strict_providers=False,
            session_options=SessionEntry(intra_op_num_threads=0, graph_optimization_level="all", config_entries={}),
        ),
        reduced_ops_config=None,
        tools={"python": "3", "edgepack": "0", "onnxruntime": "1"},
        stages=[{"stage": "load", "summary": "loaded"}],
    )
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "m.onnx").write_bytes(b"\0")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    packager_manifest.write_manifest(tmp_path, content.to_dict())
    manifest = _manifest(tmp_path)
    assert manifest["model"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 3, None]}]
    assert manifest["profile"] == json.loads(json.dumps(profile.to_dict()))
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, errors


def test_the_python_shim_reads_only_declared_keys(bundles, monkeypatch):
    read: set[tuple[str, ...]] = set()
    loads = json.loads
    monkeypatch.setattr(edgepack_shim.json, "loads", lambda text, **kw: _recording(loads(text, **kw), (), read))
    for bundle in bundles:
        if (bundle / "edgepack_shim.py").is_file():
            edgepack_shim.load(bundle, providers=["CPUExecutionProvider"], check_runtime=False)
    assert ("model", "inputs") in read and ("runtime", "session_options", "config_entries") in read
    undeclared = sorted(path for path in read if not _declared(path))
    assert not undeclared, undeclared


def test_the_web_loader_reads_only_declared_keys():
    source = (SHIM / "edgepack.mjs").read_text(encoding="utf-8")
    # `view` is the manifest as one model of a multi-model bundle sees it (the same keys)
    paths = {tuple(m.split(".")[1:]) for m in re.findall(r"\b(?:manifest|view)(?:\.[A-Za-z_]\w*)+", source)}
    paths.discard(("json",))  # the file's name, not a key
    assert ("model", "inputs") in paths
    undeclared = sorted(path for path in paths if not _declared(path))
    assert not undeclared, undeclared


def _manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))


class _Recorder(dict):
    """A mapping that notes every key read from it, with its path from the manifest's top."""

    def __init__(self, data, path, read):
        super().__init__(data)
        self._path, self._read = path, read

    def __getitem__(self, key):
        self._read.add((*self._path, key))
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._read.add((*self._path, key))
        return super().get(key, default)


def _recording(value, path, read):
    if isinstance(value, dict):
        return _Recorder(
            {
                k: _recording(v, (*path, k) if path[:1] not in (("files",), ("profile",)) else (*path, "*"), read)
                for k, v in value.items()
            },
            path,
            read,
        )
    if isinstance(value, list):
        return [_recording(v, (*path, "[]"), read) for v in value]
    return value


def _declared(path: tuple[str, ...]) -> bool:
    """Whether the schema declares the key ``path`` ("[]" steps into array items, "*" into any key)."""
    node: Any = SCHEMA
    for step in path:
        node = _resolve(node)
        if step == "[]":
            node = node.get("items")
        elif step == "*" or step not in node.get("properties", {}):
            extra = node.get("additionalProperties", node.get("type") == "object" and "properties" not in node)
            if extra is False or extra is None:
                return False
            node = extra if isinstance(extra, dict) else {}
        else:
            node = node["properties"][step]
        if node is None:
            return False
    return True


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node
