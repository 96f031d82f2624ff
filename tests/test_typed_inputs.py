"""Inputs that are not float32: a string input (an ai.onnx.ml LabelEncoder, as text classifiers' vocabularies
are) fed through the Python shim (in process and as JSON, as `serve` reads them) and in headless Chromium
through the web loader; a float16 input given to the web loader as plain numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgepack.bundle import ortweb
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from edgepack.runtime_shim import edgepack_shim
from edgepack.serve import start_server
from tests.in_browser import CHROMIUM, chromium, fresh_page, run_bundle

WORDS = np.array([["cat", "dog", "bird", "fish"]], dtype=object)
HALVES = np.array(
    [[0.0, -0.0, 1.0, -2.5, 0.1, 1 / 3, 65504.0, 70000.0, 2049.0, 2051.0, 6e-8, 3e-5, 1e-9, -1e-4, 123.456, np.inf]]
)


def _halves(folder: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["h"], ["f"], to=TensorProto.FLOAT), helper.make_node("Neg", ["f"], ["y"])],
        "halves",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT16, [1, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"])],
    )
    path = folder / "halves.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _labels(folder: Path) -> Path:
    nodes = [
        helper.make_node(
            "LabelEncoder",
            ["words"],
            ["ids"],
            domain="ai.onnx.ml",
            keys_strings=["cat", "dog", "bird"],
            values_int64s=[1, 2, 3],
            default_int64=-1,
        ),
        helper.make_node("Cast", ["ids"], ["scores"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "labels",
        [helper.make_tensor_value_info("words", TensorProto.STRING, ["batch", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])],
    )
    imports = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    path = folder / "labels.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=imports, ir_version=8), path)
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("strings")
    model = _labels(folder)
    tarball = ortweb.fetch_tarball(ortweb.pinned_version(load_profile("browser-wasm"))).path
    results = package_model(
        model,
        [load_profile("linux-x64"), load_profile("browser-wasm")],
        Options(output=folder / "site", ort_web=tarball),
    )
    [halves] = package_model(
        _halves(folder),
        [load_profile("browser-wasm")],
        Options(output=folder / "site", ort_web=tarball, quantize="none"),
    )
    assert all(r.ok for r in [*results, halves]), [r.error for r in [*results, halves]]
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"words": WORDS})[0]
    return folder / "site", {**{r.target: r.bundle for r in results}, "halves": halves.bundle}, expected


def test_the_shim_takes_strings_as_arrays_and_as_json(bundles):
    _, by_target, expected = bundles
    model = edgepack_shim.load(by_target["linux-x64"], check_runtime=False)
    np.testing.assert_array_equal(model.run({"words": WORDS})["scores"], expected)
    np.testing.assert_array_equal(model.run({"words": WORDS.astype(str)})["scores"], expected)  # numpy str too
    feeds = edgepack_shim.from_json(model.inputs, {"words": WORDS.tolist()})
    np.testing.assert_array_equal(model.run(feeds)["scores"], expected)
    with pytest.raises(edgepack_shim.InputError, match="expected strings"):
        edgepack_shim.from_json(model.inputs, {"words": [[1, 2, 3, 4]]})


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/test.sh installs it)")
def test_the_web_loader_feeds_strings(bundles):
    root, by_target, expected = bundles
    bundle = by_target["browser-wasm"]
    (root / "blank.html").write_text("<!doctype html><title>blank</title>", encoding="utf-8")
    assert "Array(4).fill('')" in (bundle / "README.md").read_text()
    server = start_server(root, require_manifest=False)
    try:
        with chromium() as context:
            page = fresh_page(context, server.url + "blank.html")
            url = f"{server.url}{bundle.relative_to(root).as_posix()}/"
            result = run_bundle(page, url, [{"words": WORDS}])
            refused = run_bundle(page, url, [{"words": np.zeros((1, 4), np.float32)}])
            halves = run_bundle(
                page, f"{server.url}{by_target['halves'].relative_to(root).as_posix()}/", [{"h": HALVES}]
            )
    finally:
        server.shutdown()
        server.server_close()
    assert "error" not in result, result.get("error")
    np.testing.assert_array_equal(result["outputs"][0]["scores"], expected)
    assert "is a string tensor: pass a plain array of strings" in refused["error"]
    # plain numbers become half-precision bits, rounded as numpy rounds them (ties to even, subnormals, overflow)
    assert "error" not in halves, halves.get("error")
    with np.errstate(over="ignore"):  # 70000 overflows to inf, as it must
        rounded = HALVES.astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(halves["outputs"][0]["y"], -rounded)
