"""Mobile bundles (edgepack/bundlers/mobile.py) and the checksum logic of their Kotlin and Swift loaders.

The loaders' verification is mirrored by ``verify_like_loaders`` below: the same algorithm (streamed
SHA-256 and size of every listed file, then a walk for unlisted files) and the same refusal cases,
run on the same manifest. When kotlinc is installed the Kotlin verifier itself is compiled and run on
each case, and its answers must equal the mirror's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgepack.api import package_several
from edgepack.errors import ProfileError
from edgepack.examples import write_example
from edgepack.pipeline.job import Options
from edgepack.pipeline.multi import Member
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile

REFUSALS = ("manifest: ", "unsafe: ", "missing: ", "changed: ", "extra: ")


def verify_like_loaders(bundle: Path) -> list[str]:
    """The loaders' verification in Python: [] when the bundle matches, else the problems, in their order."""
    try:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"manifest: cannot read manifest.json: {exc}"]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("schema") != "edgepack.manifest/1" or not isinstance(files, dict):
        return ["manifest: manifest.json is not an edgepack manifest (edgepack.manifest/1)"]
    problems = []
    for rel in sorted(files):
        entry = files[rel]
        safe = (
            rel
            and not rel.startswith("/")
            and "\\" not in rel
            and all(part not in ("", ".", "..") for part in rel.split("/"))
        )
        if not isinstance(entry, dict) or not safe:
            problems.append(f"unsafe: {rel}")
            continue
        path = bundle / rel
        if path.is_symlink() or not path.is_file():
            problems.append(f"missing: {rel}")
        elif path.stat().st_size != entry.get("size", -1) or _sha256(path) != entry.get("sha256"):
            problems.append(f"changed: {rel}")
    for dirpath, dirnames, filenames in os.walk(bundle):
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            rel = (Path(dirpath) / name).relative_to(bundle).as_posix()
            if rel != "manifest.json" and rel not in files:
                problems.append(f"extra: {rel}")
    return problems


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mobile")
    model = write_example("cnn", folder)
    results = package_model(
        model, [load_profile("android-nnapi"), load_profile("ios-coreml")], Options(output=folder / "out")
    )
    assert all(r.ok for r in results), [str(r.error) for r in results]
    return {r.target: r.bundle for r in results}


@pytest.fixture(scope="module")
def multi_bundle(tmp_path_factory) -> Path:
    """An android-nnapi bundle of two models (edgepack/pipeline/multi.py): det (the profile's recipe) and cls (FP32)."""
    folder = tmp_path_factory.mktemp("mobile-multi")
    det = write_example("cnn", folder).rename(folder / "det.onnx")
    cls = shutil.copyfile(det, folder / "cls.onnx")
    [result] = package_several(
        [Member("det", det), Member("cls", cls, "none")],
        [load_profile("android-nnapi")],
        Options(output=folder / "out"),
        name="pair",
    )
    assert result.ok, result.error
    return result.bundle


@pytest.mark.parametrize(
    "target, loader, build_flag",
    [
        ("android-nnapi", ["loader/EdgepackVerifier.kt", "loader/EdgepackLoader.kt"], "--use_nnapi"),
        ("ios-coreml", ["loader/EdgepackLoader.swift"], "--use_coreml"),
    ],
)
def test_mobile_bundle_has_what_an_app_needs(bundles, target, loader, build_flag):
    bundle = bundles[target]
    profile = load_profile(target)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel in [
        "model/cnn.ort",
        "required_operators_and_types.config",
        "session_options.json",
        "BUILD.md",
        "README.md",
        "REPORT.md",
        *loader,
    ]:
        assert rel in manifest["files"], rel
    assert manifest["model"]["ort_style"] == "Runtime"

    build = (bundle / "BUILD.md").read_text()
    version = profile.mobile.onnxruntime_version
    if profile.mobile.gradle:
        assert f'implementation("{profile.mobile.gradle}:{version}")' in build
        assert profile.runtime.package == profile.mobile.gradle
    if profile.mobile.cocoapods:
        assert f"pod '{profile.mobile.cocoapods}', '{version}'" in build
        assert f'.package(url: "{profile.mobile.swiftpm_url}", exact: "{version}")' in build
    command = next(line for line in build.splitlines() if line.startswith("python tools/ci_build/build.py"))
    for flag in (
        build_flag,
        "--minimal_build extended",
        "--include_ops_by_config <bundle>/required_operators_and_types.config",
        "--enable_reduced_operator_type_support",
    ):
        assert flag in command
    bundle_stage = next(r for r in manifest["stages"] if r["stage"] == "bundle")
    assert bundle_stage["reduced_build_command"] == command


def _scaled(folder: Path) -> Path:
    """An ai.onnx.ml Scaler before a Relu: the op onnx's shape inference cannot type (so the coverage check runs on
    what it can), and a domain the profile's --disable_ml_ops would remove from a reduced build."""
    from onnx import TensorProto, helper, save_model

    nodes = [
        helper.make_node("Scaler", ["x"], ["scaled"], domain="ai.onnx.ml", offset=[0.5] * 4, scale=[2.0] * 4),
        helper.make_node("Relu", ["scaled"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    imports = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    path = folder / "scaled.onnx"
    save_model(helper.make_model(graph, opset_imports=imports, ir_version=8), path)
    return path


def test_a_model_with_ml_ops_gets_a_build_command_that_keeps_them(tmp_path):
    profile = load_profile("android-nnapi")
    assert "--disable_ml_ops" in profile.mobile.build_args
    [refused] = package_model(_scaled(tmp_path), [profile], Options(output=tmp_path / "gated"))
    assert not refused.ok and "0/2 nodes (0.0%) run on nnapi" in str(refused.error)  # measured, not "cannot run"
    [result] = package_model(
        _scaled(tmp_path), [profile], Options(output=tmp_path / "out", min_accelerated_fraction=0.0)
    )
    assert result.ok, result.error
    build = (result.bundle / "BUILD.md").read_text()
    command = next(line for line in build.splitlines() if line.startswith("python tools/ci_build/build.py"))
    assert "--disable_ml_ops" not in command and "--disable_exceptions" in command
    assert "`--disable_ml_ops` is left out: the model uses ai.onnx.ml operators" in build
    assert "ai.onnx.ml;" in (result.bundle / "required_operators_and_types.config").read_text()


def test_session_options_json_loads_and_runs_the_ort_model(bundles):
    for target, bundle in bundles.items():
        settings = json.loads((bundle / "session_options.json").read_text())
        profile = load_profile(target)
        assert [p["name"] for p in settings["execution_providers"]] == [ep.name for ep in profile.execution_providers]
        assert settings["config_entries"]["session.enable_saved_runtime_optimizations"] == "1"
        assert settings["config_entries"]["session.load_model_format"] == "ORT"
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings["intra_op_num_threads"]
        for key, value in settings["config_entries"].items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(bundle / settings["model"]), options, providers=["CPUExecutionProvider"])
        [out] = session.run(None, {"image": np.ones((1, 3, 32, 32), np.float32)})
        assert out.shape == (1, 10) and np.isfinite(out).all()
    coreml = json.loads((bundles["ios-coreml"] / "session_options.json").read_text())["execution_providers"][0]
    assert coreml["options"]["ModelFormat"] == "MLProgram" and coreml["options"]["MLComputeUnits"] == "ALL"
    assert coreml["options"]["ModelCacheDirectory"].startswith("$CACHES/")
    nnapi = json.loads((bundles["android-nnapi"] / "session_options.json").read_text())["execution_providers"][0]
    assert nnapi["options"]["flags"] == ["NNAPI_FLAG_USE_FP16"]


def _tamper_cases():
    """(name, change to a copy of the bundle, the problems every loader must report)."""

    def flip_byte(b):
        path = b / "model/cnn.ort"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def truncate(b):
        path = b / "model/cnn.ort"
        path.write_bytes(path.read_bytes()[:-1])

    def symlink(b):
        target = b / "BUILD.md"
        shutil.copyfile(target, b / "elsewhere.md")
        target.unlink()
        target.symlink_to("elsewhere.md")

    def unsafe_entry(b):
        manifest = json.loads((b / "manifest.json").read_text())
        manifest["files"]["../outside.txt"] = {"size": 1, "sha256": "0" * 64}
        (b / "manifest.json").write_text(json.dumps(manifest))

    def wrong_schema(b):
        manifest = json.loads((b / "manifest.json").read_text())
        manifest["schema"] = "something/2"
        (b / "manifest.json").write_text(json.dumps(manifest))

    return [
        ("intact", lambda b: None, []),
        ("changed-same-size", flip_byte, ["changed: model/cnn.ort"]),
        ("truncated", truncate, ["changed: model/cnn.ort"]),
        ("missing", lambda b: (b / "session_options.json").unlink(), ["missing: session_options.json"]),
        ("extra", lambda b: (b / "model/extra.bin").write_bytes(b"x"), ["extra: model/extra.bin"]),
        ("symlink", symlink, ["missing: BUILD.md", "extra: elsewhere.md"]),
        ("unsafe-path", unsafe_entry, ["unsafe: ../outside.txt"]),
        ("wrong-schema", wrong_schema, ["manifest: manifest.json is not an edgepack manifest (edgepack.manifest/1)"]),
    ]


@pytest.fixture(scope="module")
def tampered(bundles, tmp_path_factory) -> list[tuple[str, Path, list[str]]]:
    root = tmp_path_factory.mktemp("tampered")
    cases = []
    for name, change, expected in _tamper_cases():
        copy = root / name
        shutil.copytree(bundles["android-nnapi"], copy, symlinks=True)
        change(copy)
        cases.append((name, copy, expected))
    return cases


def test_python_mirror_refuses_what_the_loaders_refuse(tampered):
    for name, bundle, expected in tampered:
        assert verify_like_loaders(bundle) == expected, name


def test_loader_sources_carry_the_same_algorithm_and_refusals():
    sources = {
        name: (resources.files("edgepack.runtime_shim") / "mobile" / name).read_text()
        for name in ("EdgepackVerifier.kt", "EdgepackLoader.swift")
    }
    for name, text in sources.items():
        for refusal in REFUSALS:
            assert f'"{refusal}' in text, (name, refusal)
        assert "SHA-256" in text or "SHA256" in text
        assert "manifest.json" in text and "edgepack.manifest/1" in text
    assert "1 shl 20" in sources["EdgepackVerifier.kt"] and "1 << 20" in sources["EdgepackLoader.swift"]
    loader = (resources.files("edgepack.runtime_shim") / "mobile" / "EdgepackLoader.kt").read_text()
    assert loader.index("EdgepackVerifier.verify(bundle)") < loader.index("env.createSession(")  # verify first
    swift = sources["EdgepackLoader.swift"]
    assert swift.index("try verify(bundle: bundle)") < swift.index("try ORTSession(")


KOTLIN_MAIN = """
import ai.edgepack.BundleVerificationException
import ai.edgepack.EdgepackVerifier
import java.io.File

fun main(args: Array<String>) {
    for (arg in args) {
        // PATH: the problems of the bundle; PATH#NAME: the file of its model NAME (or why not)
        val path = arg.substringBefore("#")
        val problems = try { EdgepackVerifier.verify(File(path)); emptyList<String>() }
            catch (e: BundleVerificationException) { e.problems }
        if (!arg.contains("#")) { println(File(path).name + "\\t" + problems.joinToString("|")); continue }
        val manifest = EdgepackVerifier.verify(File(path))
        val answer = try { EdgepackVerifier.modelEntry(manifest, arg.substringAfter("#")).getString("file") }
            catch (e: IllegalArgumentException) { e.message }
        println(File(path).name + "#" + arg.substringAfter("#") + "\\t" + answer)
    }
}
"""
ANDROID_JSON = Path("/usr/share/java/com.android.json.jar")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("kotlinc") is None or not ANDROID_JSON.is_file(),
    reason="needs kotlinc and Android's org.json for the JVM (Debian packages kotlin, libandroid-json-java)",
)
def test_kotlin_verifier_compiled_and_run_agrees_with_the_mirror(tampered, multi_bundle, tmp_path):
    source = resources.files("edgepack.runtime_shim") / "mobile" / "EdgepackVerifier.kt"
    shutil.copyfile(source, tmp_path / "EdgepackVerifier.kt")
    (tmp_path / "Main.kt").write_text(KOTLIN_MAIN)
    jar = tmp_path / "verifier.jar"
    build = subprocess.run(
        [
            "kotlinc",
            str(tmp_path / "EdgepackVerifier.kt"),
            str(tmp_path / "Main.kt"),
            "-cp",
            str(ANDROID_JSON),
            "-include-runtime",
            "-d",
            str(jar),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    intact = next(b for name, b, _ in tampered if name == "intact")
    by_name = [f"{multi_bundle}#cls", f"{multi_bundle}#det", f"{multi_bundle}#nope", f"{intact}#cnn"]
    run = subprocess.run(
        ["java", "-cp", f"{jar}:{ANDROID_JSON}", "MainKt", *[str(b) for _, b, _ in tampered], *by_name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    answers = dict(line.split("\t", 1) for line in run.stdout.splitlines())
    for name, bundle, expected in tampered:
        kotlin = [p for p in answers[name].split("|") if p]
        assert kotlin == verify_like_loaders(bundle) == expected, name
    # a multi-model bundle's models by name (the loader's modelEntry), and a single model's own name
    multi = multi_bundle.name
    assert answers[f"{multi}#cls"] == "model/cls.ort" and answers[f"{multi}#det"] == "model/det.ort"
    assert answers[f"{multi}#nope"] == "this bundle has no model nope; it holds: cls, det"
    assert answers["intact#cnn"] == "model/cnn.ort"


def test_app_runtime_version_must_match_the_profile_and_read_the_ort(tmp_path):
    model = write_example("cnn", tmp_path)
    base = load_profile("android-nnapi")
    too_old = dataclasses.replace(base, mobile=dataclasses.replace(base.mobile, onnxruntime_version="1.20.0"))
    outside = dataclasses.replace(base, mobile=dataclasses.replace(base.mobile, onnxruntime_version="1.19.2"))
    results = package_model(model, [too_old], Options(output=tmp_path / "a"))
    assert isinstance(results[0].error, ProfileError) and "may not read it" in str(results[0].error)
    results = package_model(model, [outside], Options(output=tmp_path / "b"))
    assert isinstance(results[0].error, ProfileError) and "does not satisfy runtime.version" in str(results[0].error)
    assert not (tmp_path / "a" / "cnn-android-nnapi").exists() and not (tmp_path / "b" / "cnn-android-nnapi").exists()
