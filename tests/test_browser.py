"""Web bundles in real headless Chromium (Debian's chromium, driven by Playwright for Python).

Bundles of models built in code are packaged for browser-wasm / browser-webgpu, served by
``edgepack.serve`` on 127.0.0.1, loaded by the bundle's own ``edgepack.mjs``, and their outputs compared
with Python onnxruntime on the source model. The onnxruntime-web tarball is fetched once per session
(from the user cache, or the npm registry the first time).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.accuracy import check, compare
from edgepack.bundle import ortweb
from edgepack.bundle.manifest import hash_file, read_manifest, seal_matches
from edgepack.examples import write_example
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from edgepack.samples import generate_inputs
from edgepack.serve import start_server
from tests import shaped_models
from tests.in_browser import CHROMIUM, WITHOUT_FETCH_INTEGRITY, chromium, flip_byte, fresh_page, run_bundle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium (scripts/test.sh installs it)"
    ),
]

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ort_web_tarball() -> Path:
    """onnxruntime-web at the browser profiles' pinned version: downloaded once, then from the cache."""
    version = ortweb.pinned_version(load_profile("browser-wasm"))
    return ortweb.fetch_tarball(version).path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder served on 127.0.0.1 (with COOP/COEP) into which the tests package bundles."""
    root = tmp_path_factory.mktemp("site")
    (root / "blank.html").write_text("<!doctype html><title>blank</title>", encoding="utf-8")
    server = start_server(root, require_manifest=False)
    yield root, server.url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as instance:
        yield instance


@pytest.fixture(scope="module")
def browser(playwright):
    with chromium(playwright) as context:
        yield context


def mlp_with_external_data(folder: Path, seed: int = 3) -> Path:
    """A two-layer MLP whose weights live in a side file ``weights.bin`` (external data)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 64)) / 4).astype(np.float32), "w1"),
        numpy_helper.from_array((0.1 * rng.standard_normal(64)).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((64, 8)) / 8).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "mlp.onnx"
    onnx.save_model(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    return path


def package(
    model: Path, target: str, output: Path, tarball: Path, name: str | None = None, quantize: str | None = None
) -> Path:
    [result] = package_model(
        model, [load_profile(target)], Options(output=output, ort_web=tarball, quantize=quantize), name=name
    )
    assert result.ok, result.error
    return result.bundle


def newest_opset(folder: Path) -> Path:
    """Opset 26 and IR 13, the newest onnxruntime reads: RMSNormalization (opset 23) and Reshape 25 in a block."""
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.3, "w"),
        numpy_helper.from_array(np.ones(16, np.float32) * 1.5, "gamma"),
        numpy_helper.from_array(np.array([0, -1, 4, 4], np.int64), "grid"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("RMSNormalization", ["h", "gamma"], ["n"], axis=-1),
        helper.make_node("Reshape", ["n", "grid"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "newest",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        inits,
    )
    path = folder / "newest.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26)], ir_version=13), path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "cnn": write_example("cnn", folder),
        "transformer": write_example("transformer", folder),
        "mlp": mlp_with_external_data(folder),
        "newest": newest_opset(folder),
    }


@pytest.fixture(scope="module")
def onnx_profile(tmp_path_factory) -> Path:
    """browser-wasm, but shipping the .onnx (with its external data) instead of converting to .ort."""
    text = Path(load_profile("browser-wasm").source).read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("profiles") / "browser-wasm-onnx.yaml"
    path.write_text(
        text.replace("name: browser-wasm", "name: browser-wasm-onnx").replace("style: Fixed", "style: none"),
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def bundles(site, models, ort_web_tarball, onnx_profile) -> dict[str, Path]:
    root, _ = site
    return {
        "cnn": package(models["cnn"], "browser-wasm", root, ort_web_tarball),
        "transformer": package(models["transformer"], "browser-wasm", root, ort_web_tarball),
        "mlp-ort": package(models["mlp"], "browser-wasm", root, ort_web_tarball),
        "mlp-onnx": package(models["mlp"], str(onnx_profile), root, ort_web_tarball),
        "newest-ort": package(models["newest"], "browser-wasm", root, ort_web_tarball, quantize="none"),
        "newest-onnx": package(models["newest"], str(onnx_profile), root, ort_web_tarball, quantize="none"),
        "cnn-webgpu": package(models["cnn"], "browser-webgpu", root, ort_web_tarball),
        # FP32: the only WebGPU adapter here (SwiftShader) has no shader-f16 for the profile's FP16 default
        "cnn-webgpu-fp32": package(
            models["cnn"], "browser-webgpu", root, ort_web_tarball, name="cnn-fp32", quantize="none"
        ),
    }


def url_of(site, bundle: Path) -> str:
    root, url = site
    return f"{url}{bundle.relative_to(root).as_posix()}/"


def reference(model: Path, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, f))) for f in feeds]


def bundle_reference(bundle: Path, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Python onnxruntime on the bundle's own model file (quantized as the profile's default made it), with the
    session entries its manifest records: what the browser must reproduce."""
    import onnxruntime as ort

    manifest = read_manifest(bundle)
    options = ort.SessionOptions()
    for key, value in manifest["runtime"]["session_options"]["config_entries"].items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(bundle / manifest["model"]["file"]), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, f))) for f in feeds]


def assert_within_quantization_tolerance(bundle: Path, got: list[dict], source: Path, feeds: list[dict]) -> None:
    """A quantized bundle against the FP32 source: the profile's quantization tolerance, as the packager's gate."""
    manifest = read_manifest(bundle)
    assert manifest["model"]["precision"] != "fp32", "an FP32 bundle is held to assert_close against its source"
    tolerance = manifest["profile"]["quantization"]["tolerance"]
    figures = compare(reference(source, feeds), got)
    assert not check(
        figures,
        min_cosine=tolerance["min_cosine"],
        min_top1_agreement=tolerance["min_top1_agreement"],
        max_abs_error=tolerance.get("max_abs_error"),
    ), figures


def assert_close(got: list[dict], expected: list[dict], atol: float = 1e-4) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for name in e:
            np.testing.assert_allclose(g[name], e[name], rtol=1e-3, atol=atol, err_msg=name)


def inputs_for(bundle: Path, batch: int = 2) -> list[dict[str, np.ndarray]]:
    specs = read_manifest(bundle)["model"]["inputs"]
    sets = generate_inputs(specs, seed=7, count=2)
    # a second batch size too, so dynamic dims are really dynamic in the browser
    sets += [{k: np.concatenate([v] * batch) for k, v in sets[0].items()}]
    return sets


# --- outputs match Python onnxruntime ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "transformer", "mlp-ort", "mlp-onnx"])
def test_outputs_match_python_onnxruntime(browser, site, bundles, models, name):
    bundle = bundles[name]
    feeds = inputs_for(bundle)
    page = fresh_page(browser, site[1] + "blank.html")
    result = run_bundle(page, url_of(site, bundle), feeds)
    page.close()
    assert "error" not in result, result.get("error")
    assert result["backend"] == "wasm"
    assert_close(result["outputs"], bundle_reference(bundle, feeds))
    assert_within_quantization_tolerance(bundle, result["outputs"], models[name.split("-")[0]], feeds)
    # threads: the server sends COOP/COEP, so the page is isolated and runs more than one thread
    assert result["crossOriginIsolated"] is True and result["warnings"] == []
    assert result["threads"] >= min(2, os.cpu_count() or 1)


@pytest.mark.parametrize("name", ["newest-ort", "newest-onnx"])
def test_the_newest_opset_onnxruntime_reads_runs_in_the_browser(browser, site, bundles, models, name):
    """browser profiles' max_opset/max_ir_version: what the pinned onnxruntime-web ran here, in both formats."""
    bundle = bundles[name]
    assert read_manifest(bundle)["model"]["format"] == name.split("-")[1]
    feeds = inputs_for(bundle)
    page = fresh_page(browser, site[1] + "blank.html")
    result = run_bundle(page, url_of(site, bundle), feeds)
    page.close()
    assert "error" not in result, result.get("error")
    assert_close(result["outputs"], reference(models["newest"], feeds))


def test_external_data_ships_as_onnx_with_side_file_or_inlined_in_ort(bundles):
    onnx_manifest = read_manifest(bundles["mlp-onnx"])
    assert onnx_manifest["model"]["file"] == "model/mlp.onnx"
    assert onnx_manifest["model"]["external_data"] == ["model/mlp.onnx.data"]
    proto = onnx.load_model(bundles["mlp-onnx"] / "model/mlp.onnx", load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"mlp.onnx.data"}, "the loader passes externalData paths relative to the model's folder"
    ort_manifest = read_manifest(bundles["mlp-ort"])
    assert ort_manifest["model"]["file"] == "model/mlp.ort" and ort_manifest["model"]["external_data"] == []


def test_feeds_accept_tensors_typed_arrays_and_refuse_bad_inputs(browser, site, bundles):
    page = fresh_page(browser, site[1] + "blank.html")
    result = page.evaluate(
        """async (bundleUrl) => {
      const { load } = await import(bundleUrl + 'edgepack.mjs');
      const m = await load();
      const ids = new BigInt64Array([1n, 2n, 3n, 4n]), mask = [1, 1, 1, 0];
      const a = await m.run({ input_ids: new m.ort.Tensor('int64', ids, [1, 4]), attention_mask: { data: mask, dims: [1, 4] } });
      const b = await m.run({ input_ids: { data: ids, dims: [1, 4] }, attention_mask: { data: BigInt64Array.from(mask, BigInt), dims: [1, 4] } });
      const errors = [];
      for (const feeds of [{ input_ids: { data: ids, dims: [1, 4] } },
                           { input_ids: { data: new Float32Array(4), dims: [1, 4] }, attention_mask: { data: mask, dims: [1, 4] } },
                           { input_ids: { data: ids, dims: [1, 5] }, attention_mask: { data: mask, dims: [1, 4] } }]) {
        try { await m.run(feeds); errors.push(null); } catch (e) { errors.push(e.message); }
      }
      return { same: a.last_hidden_state.data.every((v, i) => v === b.last_hidden_state.data[i]), dims: a.last_hidden_state.dims, errors };
    }""",
        url_of(site, bundles["transformer"]),
    )
    page.close()
    assert result["same"] and result["dims"] == [1, 4, 64]
    missing, wrong_type, wrong_size = result["errors"]
    assert "missing inputs [attention_mask]" in missing
    assert "input_ids is int64: pass a BigInt64Array" in wrong_type
    assert "4 values, but dims [1, 5] need 5" in wrong_size


# --- every kind of file is verified, on both paths -----------------------------------------------------------

# 'sri': fetch(url, {integrity}) checks each file; 'hash': a browser without that, where crypto.subtle does.
PATHS = {"sri": None, "hash": WITHOUT_FETCH_INTEGRITY}


def tampered_copy(bundle: Path, rel: str, name: str) -> Path:
    copy = bundle.with_name(f"{bundle.name}-{name}")
    shutil.copytree(bundle, copy, copy_function=os.link)
    flip_byte(copy / rel)
    return copy


@pytest.mark.parametrize("path", PATHS)
def test_each_verification_path_loads_and_says_it_ran(browser, site, bundles, path):
    bundle = bundles["mlp-onnx"]
    feeds = inputs_for(bundle)[:1]
    page = fresh_page(browser, site[1] + "blank.html", PATHS[path])
    messages = []
    page.on("console", lambda m: messages.append(m.text))
    result = run_bundle(page, url_of(site, bundle), feeds)
    page.close()
    assert "error" not in result, result.get("error")
    assert result["verification"] == path and result["warnings"] == []
    assert_close(result["outputs"], bundle_reference(bundle, feeds))
    noticed = [m for m in messages if "verified with crypto.subtle" in m]
    assert len(noticed) == (1 if path == "hash" else 0), messages


# Records what each WebAssembly.instantiate() call was given and counts compileStreaming() calls, before any loader runs.
WASM_SPY = """
window.wasmCalls = { compiled: 0, instantiated: [] };
const instantiate = WebAssembly.instantiate;
WebAssembly.instantiate = function (source, ...rest) {
  window.wasmCalls.instantiated.push(source instanceof WebAssembly.Module ? 'module' : 'bytes');
  return instantiate.call(this, source, ...rest);
};
const compileStreaming = WebAssembly.compileStreaming;
WebAssembly.compileStreaming = function (...args) {
  window.wasmCalls.compiled += 1;
  return compileStreaming.apply(this, args);
};
"""


@pytest.mark.parametrize("path", PATHS)
def test_the_webassembly_compiles_as_it_streams_and_runs_only_once_verified(browser, site, bundles, path):
    bundle = bundles["mlp-onnx"]
    feeds = inputs_for(bundle)[:1]
    tampered = tampered_copy(bundle, "ort/ort-wasm-simd-threaded.wasm", f"spied-{path}")
    runs = {}
    for case, target, extra in (
        ("streamed", bundle, ""),
        ("tampered", tampered, ""),
        ("no compileStreaming", bundle, "delete WebAssembly.compileStreaming;"),
    ):
        page = fresh_page(browser, site[1] + "blank.html", (PATHS[path] or "") + WASM_SPY + extra)
        runs[case] = run_bundle(page, url_of(site, target), feeds)
        runs[case]["calls"] = page.evaluate("window.wasmCalls")
        page.close()
    streamed, tampered_run, bytes_run = runs["streamed"], runs["tampered"], runs["no compileStreaming"]
    assert "error" not in streamed, streamed.get("error")
    assert streamed["calls"] == {"compiled": 1, "instantiated": ["module"]}
    assert_close(streamed["outputs"], bundle_reference(bundle, feeds))
    # compiled as it streamed in, then refused: never instantiated
    assert tampered_run["error"].startswith("ort/ort-wasm-simd-threaded.wasm: refused: its content does not match")
    assert tampered_run["calls"] == {"compiled": 1, "instantiated": []}
    # where the browser cannot compile as it streams, onnxruntime-web compiles the verified bytes
    assert "error" not in bytes_run, bytes_run.get("error")
    assert bytes_run["calls"]["instantiated"] == ["bytes"]
    assert_close(bytes_run["outputs"], streamed["outputs"], atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "kind, rel",
    [
        ("runtime-js", "ort/ort.wasm.bundle.min.mjs"),
        ("wasm", "ort/ort-wasm-simd-threaded.wasm"),
        ("model", "model/mlp.onnx"),
        ("external-data", "model/mlp.onnx.data"),
    ],
)
def test_a_flipped_byte_is_refused(browser, site, bundles, kind, rel, path):
    copy = tampered_copy(bundles["mlp-onnx"], rel, f"{kind}-{path}")
    page = fresh_page(browser, site[1] + "blank.html", PATHS[path])
    result = run_bundle(page, url_of(site, copy), [])
    page.close()
    assert result.get("error"), f"a flipped byte in {rel} was not noticed"
    assert result["file"] == rel
    assert result["error"].startswith(f"{rel}: refused: its content does not match manifest.json")
    # both paths name the digest the file really has
    assert hash_file(copy / rel)["integrity"] in result["error"]


@pytest.mark.parametrize("path", PATHS)
def test_a_longer_or_shorter_file_is_refused(browser, site, bundles, path):
    rel = "model/mlp.onnx.data"
    size = read_manifest(bundles["mlp-onnx"])["files"][rel]["size"]
    errors = {}
    for kind, change in (("longer", lambda data: data + b"\0"), ("shorter", lambda data: data[:-4])):
        copy = bundles["mlp-onnx"].with_name(f"mlp-{kind}-{path}")
        shutil.copytree(bundles["mlp-onnx"], copy, copy_function=os.link)
        data = (copy / rel).read_bytes()
        (copy / rel).unlink()
        (copy / rel).write_bytes(change(data))
        page = fresh_page(browser, site[1] + "blank.html", PATHS[path])
        errors[kind] = run_bundle(page, url_of(site, copy), [])["error"]
        page.close()
    assert errors["longer"] == f"{rel}: refused: longer than the {size} bytes manifest.json records"
    assert errors["shorter"].startswith(f"{rel}: refused: its content does not match manifest.json")
    assert f"{size - 4} bytes" in errors["shorter"]


def resealed(manifest: bytes) -> bytes:
    """``manifest`` with its manifest_sha256 computed again, as write_manifest computes it."""
    seal = re.compile(rb'"manifest_sha256": "[0-9a-f]{64}"')
    blank = seal.sub(b'"manifest_sha256": "' + b"0" * 64 + b'"', manifest)
    out = seal.sub(b'"manifest_sha256": "' + hashlib.sha256(blank).hexdigest().encode() + b'"', manifest)
    assert seal_matches(out)
    return out


@pytest.mark.parametrize("path", PATHS)
def test_a_flipped_byte_in_the_manifest_is_refused(browser, site, bundles, path):
    bundle = bundles["mlp-onnx"]
    pinned = hash_file(bundle / "manifest.json")["integrity"]
    text = (bundle / "manifest.json").read_text(encoding="utf-8")
    files = read_manifest(bundle)["files"]
    wasm_integrity = files["ort/ort-wasm-simd-threaded.wasm"]["integrity"]
    wasm_block = files["ort/ort-wasm-simd-threaded.wasm"]["blocks"]["sha384"][1]
    data_integrity = files["model/mlp.onnx.data"]["integrity"]
    changed = lambda digest: digest[:20] + ("B" if digest[20] == "A" else "A") + digest[21:]  # noqa: E731
    cases = {
        # anywhere in a pinned manifest (here: the profile's description)
        "pinned": (
            "Any modern browser",
            "Any modern browsdr",
            {"manifestIntegrity": pinned},
            "manifest.json",
            "manifest.json: refused: its content does not match options.manifestIntegrity",
        ),
        # anywhere in an unpinned manifest (here: a recorded digest): its own checksum no longer matches
        "seal": (
            wasm_integrity,
            changed(wasm_integrity),
            {},
            "manifest.json",
            "manifest.json: refused: its content does not match its own manifest_sha256",
        ),
        # a recorded digest changed and the manifest sealed again, as a tool writing a wrong digest would: that file
        # is refused, whether hashed whole or block by block as it streams in (the WebAssembly)
        "digest": (
            data_integrity,
            changed(data_integrity),
            {"reseal": True},
            "model/mlp.onnx.data",
            "refused: its content does not match manifest.json",
        ),
        "block": (
            wasm_block,
            changed(wasm_block),
            {"reseal": True},
            "ort/ort-wasm-simd-threaded.wasm",
            "refused: its content does not match manifest.json",
        ),
        # a digest made malformed: browsers would skip the check, the loader refuses
        "malformed": (
            wasm_integrity,
            wasm_integrity[:20] + "!" + wasm_integrity[21:],
            {},
            "ort/ort-wasm-simd-threaded.wasm",
            "its integrity in manifest.json is malformed",
        ),
        "syntax": ('"schema"', '#schema"', {}, "manifest.json", "not valid JSON"),
    }
    for case, (old, new, options, file, message) in cases.items():
        copy = bundle.with_name(f"{bundle.name}-manifest-{case}-{path}")
        shutil.copytree(bundle, copy, copy_function=os.link)
        (copy / "manifest.json").unlink()
        assert text.count(old) >= 1
        edited = text.replace(old, new, 1).encode("utf-8")
        if options.pop("reseal", False):
            edited = resealed(edited)
        (copy / "manifest.json").write_bytes(edited)
        page = fresh_page(browser, site[1] + "blank.html", PATHS[path])
        result = run_bundle(page, url_of(site, copy), [], **options)
        page.close()
        assert result.get("error"), f"manifest case {case} was not noticed"
        assert result["file"] == file and message in result["error"], (case, result["error"])
    # and the untouched, pinned manifest loads
    page = fresh_page(browser, site[1] + "blank.html", PATHS[path])
    loaded = run_bundle(page, url_of(site, bundle), [], manifestIntegrity=pinned)
    page.close()
    assert "error" not in loaded and loaded["verification"] == path


def test_a_plain_http_page_without_crypto_subtle_or_cache_still_verifies(browser, site, bundles):
    """Plain-http pages (not localhost) have neither crypto.subtle nor the Cache API: fetch(url, {integrity}) checks."""
    good = bundles["mlp-onnx"]
    bad = tampered_copy(good, "model/mlp.onnx.data", "no-subtle")
    page = fresh_page(
        browser,
        site[1] + "blank.html",
        "Object.defineProperty(globalThis.crypto, 'subtle', { value: undefined });"
        "Object.defineProperty(globalThis, 'caches', { value: undefined });",
    )
    refused = run_bundle(page, url_of(site, bad), [])
    loaded = run_bundle(page, url_of(site, good), [])
    again = run_bundle(page, url_of(site, good), [])
    page.close()
    assert (
        refused["file"] == "model/mlp.onnx.data"
        and "refused: its content does not match manifest.json" in refused["error"]
    )
    assert "got another digest" in refused["error"]
    assert "error" not in loaded and loaded["verification"] == "sri"
    assert set(again["sources"].values()) == {"network"}


def test_http_errors_and_unreachable_servers_name_the_file(browser, site, bundles):
    copy = bundles["cnn"].with_name("cnn-missing-model")
    shutil.copytree(bundles["cnn"], copy, copy_function=os.link)
    (copy / "model/cnn.ort").unlink()
    page = fresh_page(browser, site[1] + "blank.html")
    missing = run_bundle(page, url_of(site, copy), [])
    not_a_bundle = run_bundle(page, url_of(site, bundles["cnn"]), [], baseUrl=site[1] + "no-such-bundle/")
    no_server = run_bundle(page, url_of(site, bundles["cnn"]), [], baseUrl="http://127.0.0.1:9/bundle/")
    page.close()
    assert missing["file"] == "model/cnn.ort" and "HTTP 404" in missing["error"]
    assert not_a_bundle["file"] == "manifest.json" and "HTTP 404" in not_a_bundle["error"]
    assert (
        no_server["file"] == "manifest.json"
        and "cannot fetch http://127.0.0.1:9/bundle/manifest.json" in no_server["error"]
    )


# --- the offline cache (Cache API, keyed by content) ---------------------------------------------------------

NEEDED = {"ort/ort.wasm.bundle.min.mjs", "ort/ort-wasm-simd-threaded.wasm", "model/mlp.onnx", "model/mlp.onnx.data"}


def cache_key(origin: str, integrity: str) -> str:
    """The loader's Cache API key of a file's content."""
    return f"{origin}.edgepack-cache/{integrity.replace('/', '_').replace('+', '-')}"


def cached_keys(page) -> set[str]:
    return set(page.evaluate("async () => (await (await caches.open('edgepack')).keys()).map((r) => r.url)"))


def served(folder: Path, bundle: Path):
    """``bundle`` copied (hard links) to ``folder/app/`` and ``folder`` served on a port of its own (an origin, so
    a cache, of its own)."""
    shutil.copytree(bundle, folder / "app", copy_function=os.link)
    (folder / "blank.html").write_text("<!doctype html><title>blank</title>", encoding="utf-8")
    return start_server(folder, require_manifest=False)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_a_second_visit_works_with_the_server_stopped(
    browser, bundles, models, ort_web_tarball, onnx_profile, tmp_path, signed
):
    options = {}
    bundle = bundles["mlp-onnx"]
    if signed:
        from edgepack.bundle.signing import generate_key

        generate_key(tmp_path / "release.priv", tmp_path / "release.pub", None)
        [result] = package_model(
            models["mlp"],
            [load_profile(str(onnx_profile))],
            Options(output=tmp_path / "signed", ort_web=ort_web_tarball, sign_key=tmp_path / "release.priv"),
        )
        assert result.ok, result.error
        bundle, options = result.bundle, {"publicKey": (tmp_path / "release.pub").read_text()}
    feeds = inputs_for(bundle)[:1]
    server = served(tmp_path / "site", bundle)
    url = server.url
    page = fresh_page(browser, url + "blank.html")
    online = run_bundle(page, url + "app/", feeds, **options)
    page.close()
    server.shutdown()
    server.server_close()
    assert "error" not in online, online.get("error")
    assert set(online["sources"].values()) == {"network"}

    # The page and edgepack.mjs stand for the site's own offline copy (e.g. its service worker's); everything
    # else goes to the network, where nothing listens any more.
    shell = {
        url + "blank.html": ("text/html", tmp_path / "site/blank.html"),
        url + "app/edgepack.mjs": ("text/javascript", tmp_path / "site/app/edgepack.mjs"),
    }
    tried = []

    def route(request_route):
        request = request_route.request
        if request.url in shell:
            kind, path = shell[request.url]
            request_route.fulfill(
                body=path.read_bytes(),
                content_type=kind,
                headers={"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"},
            )
        else:
            tried.append(request.url)
            request_route.continue_()

    # and again after the site cleared its localStorage, where the loader keeps its hint that the cache is filled
    for forget in (False, True):
        tried.clear()
        page = browser.new_page()
        page.route(url + "**", route)
        page.goto(url + "blank.html")
        if forget:
            page.evaluate("localStorage.clear()")
        offline = run_bundle(page, url + "app/", feeds, **options)
        page.close()
        assert "error" not in offline, (forget, offline.get("error"))
        latest = ["manifest.json", "model.sig"] if signed else ["manifest.json"]
        assert offline["sources"] == {**{rel: "cache" for rel in latest}, **{rel: "cache" for rel in NEEDED}}
        assert tried == [url + "app/" + rel for rel in latest], "only these are asked of the network (for a newer one)"
        assert (offline["signedBy"] is not None) == signed and offline["signedBy"] == online["signedBy"]
        assert_close(offline["outputs"], online["outputs"], atol=0)
        assert offline["crossOriginIsolated"] is True and offline["threads"] >= 2


def test_a_new_bundle_version_replaces_the_changed_files_in_the_cache(
    browser, models, ort_web_tarball, onnx_profile, tmp_path
):
    v1 = package(models["mlp"], str(onnx_profile), tmp_path / "v1", ort_web_tarball)
    v2 = package(
        mlp_with_external_data(tmp_path / "retrained", seed=4), str(onnx_profile), tmp_path / "v2", ort_web_tarball
    )
    old, new = read_manifest(v1)["files"], read_manifest(v2)["files"]
    changed = {rel for rel in NEEDED if old[rel]["integrity"] != new[rel]["integrity"]}
    assert changed == {"model/mlp.onnx", "model/mlp.onnx.data"}
    feeds = inputs_for(v2)[:1]
    server = served(tmp_path / "site", v1)
    try:
        page = fresh_page(browser, server.url + "blank.html")
        first = run_bundle(page, server.url + "app/", feeds)
        before = cached_keys(page)
        page.close()
        shutil.rmtree(tmp_path / "site/app")
        shutil.copytree(v2, tmp_path / "site/app", copy_function=os.link)
        page = browser.new_page()
        page.goto(server.url + "blank.html")
        second = run_bundle(page, server.url + "app/", feeds)
        after = cached_keys(page)
        page.close()
    finally:
        server.shutdown()
        server.server_close()
    assert "error" not in first and "error" not in second, (first.get("error"), second.get("error"))
    assert_close(second["outputs"], bundle_reference(v2, feeds))
    assert second["sources"] == {
        "manifest.json": "network",
        **{rel: "network" if rel in changed else "cache" for rel in NEEDED},
    }
    for rel in NEEDED:
        assert cache_key(server.url, old[rel]["integrity"]) in before
        assert cache_key(server.url, new[rel]["integrity"]) in after
    assert not {cache_key(server.url, old[rel]["integrity"]) for rel in changed} & after, (
        "the old version's files stay cached"
    )


DAMAGE = """async ({ key, how }) => {
  const cache = await caches.open('edgepack');
  let bytes = new Uint8Array(await (await cache.match(key)).arrayBuffer());
  if (how === 'flip') bytes[bytes.length >> 1] ^= 1;
  if (how === 'truncate') bytes = bytes.slice(0, -1);
  const type = how === 'mime' ? 'application/octet-stream' : 'application/wasm';
  await cache.put(key, new Response(bytes, { headers: { 'Content-Type': type } }));
}"""


def test_a_damaged_cache_entry_is_detected_and_replaced_and_clear_cache_empties_it(browser, site, bundles):
    bundle = bundles["mlp-onnx"]
    feeds = inputs_for(bundle)[:1]
    url = url_of(site, bundle)
    files = read_manifest(bundle)["files"]
    page = fresh_page(browser, site[1] + "blank.html")
    first = run_bundle(page, url, feeds)
    page.close()

    def visit(damage=None):
        page = browser.new_page()
        page.goto(site[1] + "blank.html")
        messages = []
        page.on("console", lambda m: messages.append(m.text))
        page.evaluate(
            """async (url) => {
          window.damaged = [];
          (await import(url + 'edgepack.mjs')).events.addEventListener('cache-damaged', (e) => window.damaged.push(e.detail.file));
        }""",
            url,
        )
        if damage:
            rel, how = damage
            page.evaluate(DAMAGE, {"key": cache_key(site[1], files[rel]["integrity"]), "how": how})
        result = run_bundle(page, url, feeds)  # it waits for model.cached, which includes the check after the load
        result["damaged"] = page.evaluate("window.damaged")
        page.close()
        assert "error" not in result, result.get("error")
        return result, messages

    # as a disk error or another script of the site could: a cached copy one byte short is seen before use
    short, messages = visit(("ort/ort-wasm-simd-threaded.wasm", "truncate"))
    assert (
        short["sources"]["ort/ort-wasm-simd-threaded.wasm"] == "network"
        and short["sources"]["model/mlp.onnx"] == "cache"
    )
    assert short["damaged"] == ["ort/ort-wasm-simd-threaded.wasm"]
    assert any("ort/ort-wasm-simd-threaded.wasm: its cached copy no longer matches" in m for m in messages), messages
    assert_close(short["outputs"], first["outputs"], atol=0)
    # one bit flipped, same size: found by hashing it again after the load, said, deleted and fetched again
    flipped, messages = visit(("model/mlp.onnx.data", "flip"))
    assert flipped["sources"]["model/mlp.onnx.data"] == "cache"
    assert flipped["damaged"] == ["model/mlp.onnx.data"]
    assert any("model/mlp.onnx.data: its cached copy no longer matches" in m for m in messages), messages
    # a cached WebAssembly that cannot be compiled as it streams (here: stored without its MIME type) comes
    # from the network instead
    mime, messages = visit(("ort/ort-wasm-simd-threaded.wasm", "mime"))
    assert mime["sources"]["ort/ort-wasm-simd-threaded.wasm"] == "network" and mime["damaged"] == []
    assert_close(mime["outputs"], first["outputs"], atol=0)
    # replaced: the next visit takes every file from the cache again, and computes what the first did
    again, messages = visit()
    assert {rel for rel, source in again["sources"].items() if source == "cache"} == NEEDED and again["damaged"] == []
    assert_close(again["outputs"], first["outputs"], atol=0)

    page = browser.new_page()
    page.goto(site[1] + "blank.html")
    cleared = page.evaluate(f"async () => (await import('{url}edgepack.mjs')).clearCache()")
    exists = page.evaluate("caches.has('edgepack')")
    after_clear = run_bundle(page, url, feeds)
    page.close()
    assert cleared is True and exists is False
    assert set(after_clear["sources"].values()) == {"network"}


# --- progress, threads, file:// and the demo page ----------------------------------------------------------


def test_progress_reports_every_file_up_to_its_size(browser, site, bundles):
    bundle = bundles["mlp-onnx"]
    files = read_manifest(bundle)["files"]
    runs = {}
    for visit, path in (("sri", "sri"), ("hash", "hash"), ("cached", "sri")):
        page = fresh_page(browser, site[1] + "blank.html", PATHS[path]) if visit != "cached" else browser.new_page()
        if visit == "cached":
            page.goto(site[1] + "blank.html")
        runs[visit] = run_bundle(page, url_of(site, bundle), [])["progress"]
        page.close()
    for visit, progress in runs.items():
        seen = {}
        for p in progress:
            assert p["total"] == files[p["file"]]["size"] and 0 <= p["loaded"] <= p["total"]
            assert p["loaded"] >= seen.get(p["file"], 0)
            assert p["source"] == ("cache" if visit == "cached" else "network")
            seen[p["file"]] = p["loaded"]
        assert seen == {rel: files[rel]["size"] for rel in NEEDED}, visit
    steps = {
        visit: [p["loaded"] for p in progress if p["file"] == "ort/ort-wasm-simd-threaded.wasm"]
        for visit, progress in runs.items()
    }
    # the browser hands over a fetch(url, {integrity}) body only once verified: the model goes from 0 to its size;
    # the WebAssembly, compiled and hashed as it streams in, reports its chunks on both paths
    data_steps = [p["loaded"] for p in runs["sri"] if p["file"] == "model/mlp.onnx.data"]
    assert data_steps == [0, files["model/mlp.onnx.data"]["size"]]
    for visit in ("sri", "hash"):
        assert len(steps[visit]) > 2, f"{visit}: the 14 MB WebAssembly file should stream in several chunks"
    assert steps["cached"] == [files["ort/ort-wasm-simd-threaded.wasm"]["size"]]


@pytest.fixture(scope="module")
def three_thread_bundle(site, models, ort_web_tarball, tmp_path_factory) -> Path:
    text = Path(load_profile("browser-wasm").source).read_text(encoding="utf-8")
    assert "intra_op_num_threads: 0" in text
    path = tmp_path_factory.mktemp("profiles") / "browser-wasm-3-threads.yaml"
    path.write_text(
        text.replace("name: browser-wasm", "name: browser-wasm-3-threads").replace(
            "intra_op_num_threads: 0", "intra_op_num_threads: 3"
        ),
        encoding="utf-8",
    )
    return package(models["cnn"], str(path), site[0], ort_web_tarball)


def test_an_isolated_page_runs_the_profiles_thread_count(browser, site, three_thread_bundle):
    feeds = inputs_for(three_thread_bundle)[:1]
    page = fresh_page(browser, site[1] + "blank.html")
    result = run_bundle(page, url_of(site, three_thread_bundle), feeds)
    page.close()
    assert "error" not in result, result.get("error")
    assert result["crossOriginIsolated"] is True and result["threads"] == 3
    assert_close(result["outputs"], bundle_reference(three_thread_bundle, feeds))


def test_not_isolated_page_runs_one_thread_and_says_so_once(browser, bundles, tmp_path):
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Plain(SimpleHTTPRequestHandler):  # right MIME types, no COOP/COEP headers
        extensions_map = {
            **SimpleHTTPRequestHandler.extensions_map,
            ".mjs": "text/javascript",
            ".wasm": "application/wasm",
        }

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Plain, directory=str(bundles["cnn"])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        page = fresh_page(browser, url + "README.md")
        messages = []
        page.on("console", lambda m: messages.append(m.text))
        page.evaluate(
            """async (url) => {
          window.notices = [];
          (await import(url + 'edgepack.mjs')).events.addEventListener('not-isolated', (e) => window.notices.push(e.detail));
        }""",
            url,
        )
        feeds = inputs_for(bundles["cnn"])[:1]
        results = [run_bundle(page, url, feeds) for _ in range(2)]
        notices = page.evaluate("window.notices")
        page.close()
    finally:
        server.shutdown()
        server.server_close()
    for result in results:
        assert "error" not in result, result.get("error")
        assert result["crossOriginIsolated"] is False and result["threads"] == 1
        assert any("not crossOriginIsolated" in w for w in result["warnings"])
    assert len([m for m in messages if "not crossOriginIsolated" in m]) == 1, messages
    assert len(notices) == 1 and notices[0]["threads"] == 1 and "Cross-Origin-Embedder-Policy" in notices[0]["message"]


def test_file_url_gives_a_clear_error(browser, bundles):
    page = browser.new_page()
    page.goto((bundles["cnn"] / "index.html").as_uri())
    page.wait_for_function("window.edgepackDemo && window.edgepackDemo.status !== 'loading'")
    text = page.inner_text("#status")
    page.close()
    assert "file://" in text and "edgepack serve" in text


def test_demo_page_renders(browser, site, bundles, tmp_path):
    page = browser.new_page()
    page.goto(url_of(site, bundles["cnn"]) + "index.html")
    page.wait_for_function("window.edgepackDemo.status !== 'loading'", timeout=60_000)
    demo = page.evaluate("window.edgepackDemo")
    screenshot = tmp_path / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    text = page.inner_text("body")
    page.close()
    assert demo["status"] == "done", demo.get("error")
    assert screenshot.stat().st_size > 10_000
    for visible in (
        "cnn.onnx for browser-wasm",
        "Ran cnn.onnx on wasm",
        "backend",
        "crossOriginIsolated",
        "ort/ort-wasm-simd-threaded.wasm",
        "model/cnn.ort",
        "time to first inference",
        "logits",
        "[1, 10]",
    ):
        assert visible in text, visible
    assert len(demo["outputs"]["logits"]["data"]) == 10
    if os.environ.get("EDGEPACK_KEEP_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["EDGEPACK_KEEP_SCREENSHOT"])


def test_demo_page_feeds_ids_the_model_takes(browser, site, ort_web_tarball, tmp_path):
    """token_type_ids index a 2-row table, as in BERT: the page's sample input uses the value range and shapes
    the self-test ran on (its input_values and input_shapes), not ids in [0, 16) that Gather refuses."""
    model = tmp_path / "bert_like.onnx"
    onnx.save_model(shaped_models.token_types(), model)
    bundle = package(model, "browser-wasm", site[0], ort_web_tarball, quantize="none")
    self_test = next(s for s in read_manifest(bundle)["stages"] if s["stage"] == "self_test")
    assert self_test["input_values"] == {"token_type_ids": {"ints": [0, 2]}}, self_test
    page = browser.new_page()
    page.goto(url_of(site, bundle) + "index.html")
    page.wait_for_function("window.edgepackDemo.status !== 'loading'", timeout=60_000)
    demo = page.evaluate("window.edgepackDemo")
    page.close()
    assert demo["status"] == "done", demo.get("error")


# --- WebGPU profile ----------------------------------------------------------------------------------------


def test_webgpu_bundle_falls_back_to_wasm_without_an_adapter(browser, site, bundles, models):
    bundle = bundles["cnn-webgpu"]
    assert read_manifest(bundle)["model"]["ort_style"] == "Runtime"
    feeds = inputs_for(bundle)
    page = fresh_page(browser, site[1] + "blank.html")
    result = run_bundle(page, url_of(site, bundle), feeds)
    page.close()
    assert "error" not in result, result.get("error")
    assert result["backend"] == "wasm"
    assert [f["backend"] for f in result["fallbacks"]] == ["webgpu"]
    assert any("webgpu is not available" in w for w in result["warnings"])
    assert_close(result["outputs"], bundle_reference(bundle, feeds))
    assert_within_quantization_tolerance(bundle, result["outputs"], models["cnn"], feeds)


@pytest.mark.slow
def test_webgpu_bundle_runs_on_webgpu_when_there_is_an_adapter(playwright, site, bundles, models):
    """--enable-unsafe-webgpu gives headless Chromium a software (SwiftShader) WebGPU adapter, without shader-f16:
    an FP32 bundle runs on it; the profile's default FP16 bundle falls back to wasm and says why (onnxruntime-web
    would create the session and fail on the first run: "Program Cast requires f16")."""
    fp32, fp16 = bundles["cnn-webgpu-fp32"], bundles["cnn-webgpu"]
    assert read_manifest(fp32)["model"]["precision"] == "fp32" and read_manifest(fp16)["model"]["precision"] == "fp16"
    feeds = inputs_for(fp32)[:1]
    with chromium(playwright, ["--enable-unsafe-webgpu"]) as context:
        page = fresh_page(context, site[1] + "blank.html")
        has_f16 = page.evaluate("async () => (await navigator.gpu.requestAdapter()).features.has('shader-f16')")
        on_gpu = run_bundle(page, url_of(site, fp32), feeds)
        page.close()
        page = fresh_page(context, site[1] + "blank.html")
        half = run_bundle(page, url_of(site, fp16), feeds)
    assert "error" not in on_gpu, on_gpu.get("error")
    assert on_gpu["backend"] == "webgpu" and on_gpu["fallbacks"] == []
    assert_close(on_gpu["outputs"], reference(models["cnn"], feeds), atol=1e-3)
    assert "error" not in half, half.get("error")
    if has_f16:  # not SwiftShader today; then the FP16 bundle must run on the GPU
        assert half["backend"] == "webgpu" and half["fallbacks"] == []
    else:
        assert half["backend"] == "wasm"
        assert [f["backend"] for f in half["fallbacks"]] == ["webgpu"] and "shader-f16" in half["fallbacks"][0]["error"]
        assert any("shader-f16" in w for w in half["warnings"])
    assert_close(half["outputs"], bundle_reference(fp16, feeds), atol=1e-3)


def test_an_import_map_integrity_pins_the_loader(browser, site, bundles):
    """The README's way to pin edgepack.mjs itself: an import map's integrity entry."""
    root, url = site
    bundle = bundles["cnn"]
    good = read_manifest(bundle)["files"]["edgepack.mjs"]["integrity"]
    wrong = hash_file(bundle / "index.html")["integrity"]
    outcomes = {}
    for name, integrity in (("good", good), ("wrong", wrong)):
        page_path = root / f"pinned-{name}.html"
        loader = f"./{bundle.name}/edgepack.mjs"
        page_path.write_text(
            f'<!doctype html><script type="importmap">{{"imports": {{"edgepack": "{loader}"}}, '
            f'"integrity": {{"{loader}": "{integrity}"}}}}</script>'
            '<script type="module">import("edgepack").then((m) => m.load()).then((model) => { window.outcome = model.backend; },'
            ' (error) => { window.outcome = "error: " + error.message; });</script>',
            encoding="utf-8",
        )
        page = browser.new_page()
        page.goto(f"{url}{page_path.name}")
        page.wait_for_function("window.outcome !== undefined", timeout=60_000)
        outcomes[name] = page.evaluate("window.outcome")
        page.close()
    assert outcomes["good"] == "wasm"
    assert outcomes["wrong"].startswith("error: Failed to fetch dynamically imported module")


def test_a_classifier_with_a_zipmap_output_runs_and_returns_its_tensor_outputs(
    browser, site, ort_web_tarball, tmp_path
):
    """skl2onnx's classifiers end in ZipMap (a sequence of maps), which onnxruntime-web cannot return: the loader
    fetches the label alone, and says so."""

    model = shaped_models.save(shaped_models.zipmap_classifier(), tmp_path, "classifier")
    bundle = package(model, "browser-wasm", site[0], ort_web_tarball)
    features = np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32)
    page = fresh_page(browser, site[1] + "blank.html")
    result = run_bundle(page, url_of(site, bundle), [{"features": features}])
    page.close()
    assert "error" not in result, result.get("error")
    [outputs] = result["outputs"]
    assert set(outputs) == {"label"}
    [expected] = bundle_reference(bundle, [{"features": features}])
    np.testing.assert_array_equal(outputs["label"], expected["label"])
    assert (
        "output probabilities is a sequence, which onnxruntime-web cannot return: run() leaves it out"
        in result["warnings"]
    )


def test_a_dim_written_as_minus_one_is_dynamic(browser, site, ort_web_tarball, tmp_path):
    """Paddle2ONNX writes dynamic dims as -1 (PaddleOCR's classifier: [-1, 3, ?, ?]): any size fits, as in the shim."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, "?", "?"])
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "minus_one", [x], [y], [two])
    path = tmp_path / "minus_one.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    bundle = package(path, "browser-wasm", site[0], ort_web_tarball, quantize="none")
    assert read_manifest(bundle)["model"]["inputs"][0]["shape"][0] == -1
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, 4, 5)).astype(np.float32)}
    page = fresh_page(browser, site[1] + "blank.html")
    result = run_bundle(page, url_of(site, bundle), [feeds])
    page.close()
    assert "error" not in result, result.get("error")
    np.testing.assert_allclose(result["outputs"][0]["y"], 2 * feeds["x"], rtol=1e-6)
