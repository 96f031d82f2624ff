"""4-bit bundles in real headless Chromium: int4 on browser-wasm, q4f16 on browser-webgpu (on the
SwiftShader adapter, which has no shader-f16, so it must fall back to wasm and say why), each compared
with Python onnxruntime on the bundle's own model and with the FP32 source within the profile's tolerance."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgepack.accuracy import compare
from edgepack.bundle import ortweb
from edgepack.bundle.manifest import read_manifest
from edgepack.examples import write_example
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from edgepack.serve import start_server
from tests.in_browser import CHROMIUM, chromium, fresh_page, run_bundle
from tests.test_browser import assert_within_quantization_tolerance, bundle_reference, inputs_for

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium (scripts/test.sh installs it)"
    ),
]

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / "blank.html").write_text("<!doctype html><title>blank</title>", encoding="utf-8")
    tarball = ortweb.fetch_tarball(ortweb.pinned_version(load_profile("browser-wasm"))).path
    model = write_example("transformer", tmp_path_factory.mktemp("models"))
    bundles = {}
    # int4 with its costliest MatMuls in dynamic INT8 (--auto-exclude): a gate the all-4-bit model misses
    text = (
        Path(load_profile("browser-wasm").source)
        .read_text(encoding="utf-8")
        .replace("name: browser-wasm", "name: tight")
    )
    tight = root.parent / "tight.yaml"
    tight.write_text(
        text.replace("    min_cosine: 0.99\n", "    min_cosine: 0.995\n").replace(
            "  tolerance:", "  int4:\n    max_int8_share: 1.0\n  tolerance:", 1
        ),
        encoding="utf-8",
    )
    for target, recipe, name, more in (
        ("browser-wasm", "int4", "int4", {}),
        ("browser-webgpu", "q4f16", "q4f16", {}),
        (str(tight), "int4", "int4-mixed", {"auto_exclude": True}),
    ):
        [result] = package_model(
            model,
            [load_profile(target)],
            Options(output=root, ort_web=tarball, quantize=recipe, **more),
            name=f"transformer-{name}",
        )
        assert result.ok, result.error
        bundles[name] = result.bundle
    server = start_server(root, require_manifest=False)
    yield root, server.url, bundles, model
    server.shutdown()
    server.server_close()


def url_of(root: Path, url: str, bundle: Path) -> str:
    return f"{url}{bundle.relative_to(root).as_posix()}/"


def assert_matches_host(got: list[dict], bundle: Path, feeds: list[dict]) -> None:
    """The browser against Python onnxruntime on the same bundle file. Not element-wise: MatMulNBits at
    accuracy_level 4 quantizes activations to int8 with each CPU's own kernel (x86 AVX vs WebAssembly),
    which moved single values by up to 0.023 on the transformer example."""
    figures = compare(bundle_reference(bundle, feeds), got)
    assert figures["cosine"] >= 0.999, figures


def test_int4_bundle_runs_on_wasm(served):
    root, url, bundles, model = served
    bundle = bundles["int4"]
    manifest = read_manifest(bundle)
    assert manifest["model"]["precision"] == "int4" and manifest["model"]["format"] == "ort"
    feeds = inputs_for(bundle)
    with chromium() as context:
        page = fresh_page(context, url + "blank.html")
        result = run_bundle(page, url_of(root, url, bundle), feeds)
    assert "error" not in result, result.get("error")
    assert result["backend"] == "wasm"
    assert_matches_host(result["outputs"], bundle, feeds)
    assert_within_quantization_tolerance(bundle, result["outputs"], model, feeds)


def test_int4_with_matmuls_in_dynamic_int8_runs_on_wasm(served):
    root, url, bundles, model = served
    bundle = bundles["int4-mixed"]
    quantize = next(s for s in read_manifest(bundle)["stages"] if s["stage"] == "quantize")
    assert quantize["result"]["notes"]["matmuls_in_dynamic_int8"] > 0, quantize["result"]
    feeds = inputs_for(bundle)
    with chromium() as context:
        page = fresh_page(context, url + "blank.html")
        result = run_bundle(page, url_of(root, url, bundle), feeds)
    assert "error" not in result, result.get("error")
    assert result["backend"] == "wasm"
    assert_matches_host(result["outputs"], bundle, feeds)
    assert_within_quantization_tolerance(bundle, result["outputs"], model, feeds)


@pytest.mark.slow
def test_q4f16_bundle_falls_back_to_wasm_without_shader_f16(served):
    root, url, bundles, model = served
    bundle = bundles["q4f16"]
    assert read_manifest(bundle)["model"]["precision"] == "q4f16"
    feeds = inputs_for(bundle)[:2]
    with chromium(extra_args=["--enable-unsafe-webgpu"]) as context:
        page = fresh_page(context, url + "blank.html")
        has_f16 = page.evaluate("async () => (await navigator.gpu.requestAdapter()).features.has('shader-f16')")
        result = run_bundle(page, url_of(root, url, bundle), feeds)
    assert "error" not in result, result.get("error")
    if has_f16:  # a real GPU: the bundle must run there
        assert result["backend"] == "webgpu" and result["fallbacks"] == []
    else:
        assert result["backend"] == "wasm"
        assert [f["backend"] for f in result["fallbacks"]] == ["webgpu"]
        assert "shader-f16" in result["fallbacks"][0]["error"] and "q4f16" in result["fallbacks"][0]["error"]
    assert_matches_host(result["outputs"], bundle, feeds)
    assert_within_quantization_tolerance(bundle, result["outputs"], model, feeds)
    assert np.isfinite(np.concatenate([o["last_hidden_state"].ravel() for o in result["outputs"]])).all()
