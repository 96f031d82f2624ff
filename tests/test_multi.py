"""Multi-model bundles (edgepack/pipeline/multi.py): three models of different recipes in one bundle per
target, opened by name by the shim, the web loader in headless Chromium and the Android loader's code,
each verified before it loads; a tampered second model is refused."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.accuracy import check, compare
from edgepack.api import package_several
from edgepack.bundle import ortweb
from edgepack.bundle.manifest import read_manifest, verify_bundle
from edgepack.checked import quiet_session
from edgepack.examples import write_example
from edgepack.pipeline.job import Options
from edgepack.pipeline.multi import Member
from edgepack.profiles import load_profile
from edgepack.runtime_shim import edgepack_shim
from edgepack.samples import generate_inputs
from edgepack.serve import start_server
from tests.in_browser import CHROMIUM, chromium, flip_byte, fresh_page

SHIM_DIR = Path(edgepack_shim.__file__).parent
RECIPES = {"det": "fp16", "rec": "dynamic", "cls": "none"}


def _classifier(path: Path) -> Path:
    """cls: features[batch, 10] -> Gemm -> Sigmoid -> scores[batch, 3] (ops neither other model has)."""
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["features", "w", "b"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["scores"]),
        ],
        "cls",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(rng.standard_normal((10, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """det (the example CNN), rec (the example transformer), cls (a small classifier), named after their files."""
    folder = tmp_path_factory.mktemp("members")
    made = {"det": write_example("cnn", folder), "rec": write_example("transformer", folder)}
    paths = {name: made[name].rename(folder / f"{name}.onnx") for name in made}
    paths["cls"] = _classifier(folder / "cls.onnx")
    return {name: paths[name] for name in RECIPES}


def _members(sources: dict[str, Path]) -> list[Member]:
    return [Member(name, path, RECIPES[name]) for name, path in sources.items()]


@pytest.fixture(scope="module")
def python_bundle(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multi")
    [result] = package_several(
        _members(sources), [load_profile("linux-x64")], Options(output=out), name="trio", progress=print
    )
    assert result.ok, result.error
    return result.bundle


def _feeds(manifest: dict, name: str) -> dict[str, np.ndarray]:
    specs = manifest["models"][name]["inputs"]
    return generate_inputs(specs, seed=3, count=1)[0]


def test_one_manifest_lists_every_model_with_its_recipe_and_self_test(python_bundle):
    manifest = read_manifest(python_bundle)
    assert list(manifest["models"]) == sorted(RECIPES)  # JSON keys sorted; "model" is the first given
    assert manifest["model"]["file"] == "model/det.ort"
    precisions = {name: entry["precision"] for name, entry in manifest["models"].items()}
    assert precisions == {"det": "fp16", "rec": "int8", "cls": "fp32"}
    for name, entry in manifest["models"].items():
        assert entry["file"] == f"model/{name}.ort" and entry["file"] in manifest["files"]
        stages = {r["stage"]: r for r in entry["stages"]}
        assert stages["self_test"]["passed"], name  # run on the finished bundle, the model opened by name
        assert stages["load"]["source"] == f"{name}.onnx"
    schema = json.loads((SHIM_DIR / "manifest.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(manifest)
    assert verify_bundle(python_bundle).ok


def test_the_reduced_operator_config_is_the_union_over_the_models(python_bundle):
    text = (python_bundle / "required_operators_and_types.config").read_text(encoding="utf-8")
    body = [line.split(";", 2)[2] for line in text.splitlines() if line and not line.startswith("#")]
    ops = {op for line in body for op in re.findall(r"(?:^|,)([A-Z][A-Za-z0-9]*)(?=\{|,|$)", line)}
    # det's Conv (as x86 NCHWc), rec's attention and its dynamic INT8, cls's Gemm+Sigmoid (fused by the Fixed style)
    assert {"Conv", "Softmax", "DynamicQuantizeLinear", "FusedGemm"} <= ops, ops
    for name in RECIPES:
        assert f"# - model/{name}.ort" in text


def test_the_shim_runs_each_model_by_name_within_its_tolerance(python_bundle, sources, tmp_path):
    manifest = read_manifest(python_bundle)
    tolerance = manifest["profile"]["quantization"]["tolerance"]
    for name, source in sources.items():
        feeds = _feeds(manifest, name)
        np.savez(tmp_path / f"{name}.npz", **feeds)
        done = subprocess.run(
            [sys.executable, python_bundle / "edgepack_shim.py", "run", tmp_path / f"{name}.npz", "--model", name]
            + ["-o", tmp_path / f"{name}-out.npz"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        got = dict(np.load(tmp_path / f"{name}-out.npz"))
        session = quiet_session(source)
        names = [o.name for o in session.get_outputs()]
        expected = dict(zip(names, session.run(names, feeds)))
        figures = compare([expected], [got])
        assert not check(figures, min_cosine=tolerance["min_cosine"], max_abs_error=tolerance["max_abs_error"]), (
            name,
            figures,
        )
    info = subprocess.run(
        [sys.executable, python_bundle / "edgepack_shim.py", "info", "--model", "rec", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    described = json.loads(info.stdout)
    assert described["model_name"] == "rec" and set(described["models"]) == set(RECIPES)
    assert [i["name"] for i in described["inputs"]] == ["input_ids", "attention_mask"]
    unknown = subprocess.run(
        [sys.executable, python_bundle / "edgepack_shim.py", "info", "--model", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2 and "no model 'nope'; it holds: cls, det, rec" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_a_tampered_second_model_stops_every_model_from_loading(python_bundle, tmp_path):
    copy = tmp_path / "trio-linux-x64"
    shutil.copytree(python_bundle, copy)
    flip_byte(copy / "model/rec.ort")
    for name in (None, "det", "rec"):
        with pytest.raises(edgepack_shim.VerificationError, match="changed: model/rec.ort"):
            edgepack_shim.load(copy, model=name, check_runtime=False)
    assert not verify_bundle(copy).ok


def test_bad_multi_model_requests_are_refused_before_any_work(sources, tmp_path, cli, clean_failure):
    paths = [str(p) for p in sources.values()]
    clean_failure(cli("package", *paths, "-t", "linux-x64", "-o", tmp_path), "needs a name", "--name")
    clean_failure(
        cli("package", *paths, "--name", "x", "--quantize", "rec=dynamic,ocr=fp16", "-t", "linux-x64", "-o", tmp_path),
        "model 'ocr', which this bundle does not have (it has: det, rec, cls)",
    )
    clean_failure(
        cli("package", *paths, "--name", "x", "--quantize", "rec=int3", "-t", "linux-x64", "-o", tmp_path),
        "model rec: --quantize 'int3': expected one of",
    )
    clean_failure(
        cli("package", *paths, "--name", "x", "--quantize", "rec=int4", "-t", "android-nnapi", "-o", tmp_path),
        "model rec: the recipe writes operators these targets' runtimes have no kernel for: android-nnapi (int4)",
    )
    twice = tmp_path / "again"
    twice.mkdir()
    shutil.copyfile(sources["det"], twice / "det.onnx")
    clean_failure(
        cli("package", paths[0], str(twice / "det.onnx"), "--name", "x", "-t", "linux-x64", "-o", tmp_path),
        "both named 'det'",
    )
    assert not any(tmp_path.glob("x-*"))


# --- the web loader in headless Chromium ----------------------------------------------------------------

MULTI_JS = """async ({ bundleUrl, feeds }) => {
  const { load } = await import(new URL('edgepack.mjs', bundleUrl).href);
  const tensors = (outputs) => Object.fromEntries(Object.entries(outputs).map(([n, t]) => [n, { dims: t.dims, data: Array.from(t.data, Number) }]));
  const found = { outputs: {} };
  let bundle;
  try {
    bundle = await load();
    found.models = bundle.models;
    found.first = bundle.manifest.model.file;
    for (const [name, set] of Object.entries(feeds)) {
      const model = name === 'det' ? bundle : await bundle.session(name);
      found.outputs[name] = tensors(await model.run(set));
    }
  } catch (error) {
    found.error = error.message;
    found.file = error.file ?? null;
  }
  return found;
}"""


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_the_web_loader_opens_each_model_by_name_and_refuses_a_tampered_one(sources, tmp_path):
    from playwright.sync_api import sync_playwright

    tarball = ortweb.fetch_tarball(ortweb.pinned_version(load_profile("browser-wasm"))).path
    members = [Member(name, path, "none" if name == "cls" else None) for name, path in sources.items()]
    [result] = package_several(
        members, [load_profile("browser-wasm")], Options(output=tmp_path, ort_web=tarball), name="trio"
    )
    assert result.ok, result.error
    bundle = result.bundle
    tampered = tmp_path / "trio-tampered"
    shutil.copytree(bundle, tampered)
    flip_byte(tampered / "model/rec.ort")
    manifest = read_manifest(bundle)
    feeds = {name: _feeds(manifest, name) for name in ("det", "rec", "cls")}
    js_feeds = {
        name: {k: {"data": v.ravel().tolist(), "dims": list(v.shape)} for k, v in f.items()}
        for name, f in feeds.items()
    }
    server = start_server(tmp_path, require_manifest=False)
    try:
        with sync_playwright() as playwright, chromium(playwright) as context:
            page = fresh_page(context, server.url + "trio-browser-wasm/index.html")
            found = page.evaluate(MULTI_JS, {"bundleUrl": server.url + "trio-browser-wasm/", "feeds": js_feeds})
            page.close()
            page = fresh_page(context, server.url + "trio-tampered/index.html")
            refused = page.evaluate(MULTI_JS, {"bundleUrl": server.url + "trio-tampered/", "feeds": js_feeds})
            page.close()
    finally:
        server.shutdown()
        server.server_close()
    assert not found.get("error"), found
    assert sorted(found["models"]) == ["cls", "det", "rec"] and found["first"] == "model/det.ort"
    for name, set_ in feeds.items():
        entry = manifest["models"][name]
        session = edgepack_shim.load(bundle, model=name, check_runtime=False)
        expected = session.run(set_)
        for output, value in expected.items():
            got = np.asarray(found["outputs"][name][output]["data"]).reshape(found["outputs"][name][output]["dims"])
            np.testing.assert_allclose(got, value, rtol=1e-3, atol=1e-3, err_msg=f"{name} ({entry['precision']})")
    # the first model still opens (its files are intact); the tampered one is refused when it is opened
    assert "det" in refused["outputs"] and "rec" not in refused["outputs"]
    assert refused["file"] == "model/rec.ort"
    assert refused["error"].startswith("model/rec.ort: refused: its content does not match manifest.json")


def test_a_build_file_lists_a_multi_model_bundle_beside_a_single_model(sources, tmp_path, cli, clean_failure):
    build = tmp_path / "edgepack.yaml"
    build.write_text(
        f"""
targets: [linux-x64]
output: out
models:
  - name: trio
    quantize: dynamic
    models:
      - {{model: {sources["det"]}, quantize: fp16}}
      - {{model: {sources["rec"]}}}
      - {{model: {sources["cls"]}, name: scorer, quantize: none}}
  - model: {sources["cls"]}
""",
        encoding="utf-8",
    )
    done = cli("build", build, "--json", "--no-cache")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert [(r["name"], r["ok"]) for r in summary["results"]] == [("trio", True), ("cls", True)]
    manifest = read_manifest(tmp_path / "out" / "trio-linux-x64")
    precisions = {name: entry["precision"] for name, entry in manifest["models"].items()}
    assert precisions == {"det": "fp16", "rec": "int8", "scorer": "fp32"}
    assert summary["results"][0]["models"] == {name: f"model/{name}.ort" for name in ("det", "rec", "scorer")}
    build.write_text(
        f"targets: [linux-x64]\nmodels:\n  - name: one\n    models: [{{model: {sources['det']}}}]\n", encoding="utf-8"
    )
    clean_failure(cli("build", build), "key 'models[0].models': a multi-model bundle needs two models or more")
    build.write_text(
        f"targets: [linux-x64]\nmodels:\n  - model: {sources['det']}\n    quantize: int5\n", encoding="utf-8"
    )
    clean_failure(cli("build", build), "key 'models[0].quantize': expected one of none, static", "int4", "found 'int5'")
