"""Reproducible bundles: packaging the same input again gives the same bytes, file for file.

onnxruntime's converter lays out the .ort's kernel type string table in hash-map order, which changes
with the state of the converting process (without edgepack's rewrite, 15 conversions of the example
transformer gave 7-8 different files). ``edgepack.onnxio.ort_canonical`` rewrites that table in one
canonical layout; these tests check the rewrite on real converter output and on the whole pipeline.
"""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgepack.examples import write_example
from edgepack.onnxio.ort_canonical import canonical_ort_bytes, canonicalize_ort_file

ENV = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, bytes]:
    """The example transformer converted by onnxruntime's converter (as edgepack's child process runs it,
    before the rewrite), in both styles."""
    folder = tmp_path_factory.mktemp("convert")
    model = write_example("transformer", folder)
    files = {}
    for style, name in (("Fixed", f"{model.stem}.ort"), ("Runtime", f"{model.stem}.with_runtime_opt.ort")):
        out = folder / style
        out.mkdir()
        subprocess.run(
            [sys.executable, "-m", "edgepack.onnxio.ort_convert", str(model), str(out), style, "arm"],
            check=True,
            capture_output=True,
            env=ENV,
        )
        files[style] = (out / name).read_bytes()
    return files


def _shuffled(seed: int):
    def order(items):
        items = list(items)
        random.Random(seed).shuffle(items)
        return items

    return order


@pytest.mark.parametrize("style", ["Fixed", "Runtime"])
def test_every_layout_of_the_table_gives_the_same_canonical_bytes(converted, style):
    raw = converted[style]
    canonical = canonical_ort_bytes(raw)
    assert canonical_ort_bytes(canonical) == canonical
    # other layouts of the same table, as other hash-map orders would write it
    variants = {canonical_ort_bytes(raw, _write_order=_shuffled(seed)) for seed in range(6)}
    variants.add(canonical_ort_bytes(raw, _write_order=lambda items: sorted(items, reverse=True)))
    # onnxruntime's own files end on various alignments, so the front padding of the input differs too
    padded = {canonical_ort_bytes(raw, _write_order=_shuffled(seed), _alignment=8) for seed in range(6)}
    assert {len(v) % 64 for v in padded} - {0}, "some variants should end off a 64-byte boundary"
    variants |= padded
    assert len(variants - {canonical}) >= 3, "the variants should differ in bytes, else this test proves nothing"
    assert len(canonical) % 64 == 0
    assert {canonical_ort_bytes(variant) for variant in variants} == {canonical}
    assert canonical[-200_000:] == raw[-200_000:]  # the model part is kept byte for byte


def _run(model: bytes, style: str) -> tuple[list[str], list[np.ndarray]]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if style == "Runtime":
        options.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    feeds = {
        "input_ids": rng.integers(0, 100, (2, 16)).astype(np.int64),
        "attention_mask": np.array([[1] * 16, [1] * 9 + [0] * 7], dtype=np.int64),
    }
    assert sorted(feeds) == sorted(i.name for i in session.get_inputs())
    return [o.name for o in session.get_outputs()], session.run(None, feeds)


@pytest.mark.parametrize("style", ["Fixed", "Runtime"])
def test_the_canonical_file_loads_and_runs_like_the_converted_one(converted, style):
    raw = converted[style]
    variant = canonical_ort_bytes(raw, _write_order=_shuffled(1))
    names, expected = _run(raw, style)
    for model in (canonical_ort_bytes(raw), variant):
        got_names, got = _run(model, style)
        assert got_names == names
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_file_that_is_not_an_ort_model_is_refused(tmp_path):
    path = tmp_path / "model.ort"
    path.write_bytes(b"\x08\x00\x00\x00ONNXnot a flatbuffer")
    with pytest.raises(ValueError, match="not an ORT-format model"):
        canonicalize_ort_file(path)
    path.write_bytes(b"\xff\xff\x00\x00ORTM" + bytes(20))
    with pytest.raises(ValueError, match="damaged"):
        canonicalize_ort_file(path)


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file and folder under ``root``: relative path -> (permission bits, bytes)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        assert not path.is_symlink(), path
        tree[path.relative_to(root).as_posix()] = (
            stat.S_IMODE(path.stat().st_mode),
            path.read_bytes() if path.is_file() else b"",
        )
    return tree


@pytest.mark.slow
def test_packaging_three_times_gives_identical_bundles(tmp_path):
    """The whole pipeline, every target, three times in fresh processes that differ (output path, hash
    seed): every file of every bundle must be the same, byte for byte (manifest checksums included)."""
    trees = []
    for run, out in enumerate([tmp_path / "a", tmp_path / "second", tmp_path / "third-run-folder"]):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgepack",
                "package",
                "--example",
                "transformer",
                "--target",
                "all",
                "-o",
                str(out),
                "-q",
            ],
            capture_output=True,
            text=True,
            env={**ENV, "PYTHONHASHSEED": str(run)},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        trees.append(_tree(out))
    first = trees[0]
    ort_files = [p for p in first if p.endswith(".ort")]
    assert len(ort_files) >= 5 and any("nnapi" in p for p in ort_files)  # Fixed and Runtime styles
    assert all(p.split("/")[0] + "/manifest.json" in first for p in ort_files)
    for other in trees[1:]:
        assert sorted(other) == sorted(first)
        differing = [p for p in first if other[p] != first[p]]
        assert not differing, f"not reproducible: {differing}"


def test_static_quantization_gives_identical_bundles(tmp_path):
    """Static INT8 (calibration, held-out validation, QDQ, Fixed and Runtime .ort) in two processes that differ
    (output path, hash seed): the same bytes, manifest included."""
    trees = []
    for run, out in enumerate([tmp_path / "a", tmp_path / "second-run"]):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgepack",
                "package",
                "--example",
                "cnn",
                "--target",
                "linux-x64,rpi-arm64,jetson-orin-trt",
                "--quantize",
                "static",
                "--calibration",
                "random",
                "-o",
                str(out),
                "-q",
            ],
            capture_output=True,
            text=True,
            env={**ENV, "PYTHONHASHSEED": str(run)},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        trees.append(_tree(out))
    assert sum(p.endswith(".ort") for p in trees[0]) == 3
    assert sorted(trees[1]) == sorted(trees[0])
    assert not [p for p in trees[0] if trees[1][p] != trees[0][p]], "not reproducible"
