"""Data safety of ``edgepack package``: --force never deletes the user's data, a destination that cannot
hold a bundle is refused before any work, and a failure leaves nothing behind: no .old or .partial
folder, no empty -o folder, nothing in the working directory or $TMPDIR."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.bundle.freeze import not_frozen
from edgepack.destination import check_destination
from edgepack.errors import UsageError
from tests.hostile.support import relu_model, tree, unmergeable_dims_model

TARGET = "linux-x64"


def package(*args, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepack", "package", *map(str, args), "-q"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env or {**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
    )


def refused(done: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def no_leftovers(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if p.name.endswith((".old", ".partial")) or ".edgepack-probe" in p.name]
    assert not left, left


# --- --force replaces only what edgepack wrote -------------------------------------------------------


def test_force_never_deletes_the_input_inside_the_destination(tmp_path):
    """The reported case: the model copied into the old bundle folder, packaged from there with --force."""
    model = relu_model(tmp_path / "w" / f"m-{TARGET}" / "m.onnx")
    before = model.read_bytes()
    refused(
        package(model, "-t", TARGET, "-o", tmp_path / "w", "--force", "--quantize", "none"),
        2,
        "the input",
        "is inside the output folder",
    )
    assert model.read_bytes() == before


def test_force_never_deletes_the_input_inside_a_real_bundle(tmp_path):
    model = relu_model(tmp_path / "m.onnx")
    assert package(model, "-t", TARGET, "-o", tmp_path / "out", "--quantize", "none").returncode == 0
    inside = tmp_path / "out" / f"m-{TARGET}" / "m.onnx"
    inside.write_bytes(model.read_bytes())
    refused(package(inside, "-t", TARGET, "-o", tmp_path / "out", "--force", "--quantize", "none"), 2, "the input")
    assert inside.read_bytes() == model.read_bytes()


def test_force_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    model = relu_model(tmp_path / "m.onnx")
    mine = tmp_path / "out" / f"m-{TARGET}"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    before = tree(tmp_path / "out")
    refused(
        package(model, "-t", TARGET, "-o", tmp_path / "out", "--force", "--quantize", "none"), 2, "has no manifest.json"
    )
    assert tree(tmp_path / "out") == before


def test_force_refuses_a_bundle_holding_files_its_manifest_does_not_list(tmp_path):
    model = relu_model(tmp_path / "m.onnx")
    assert package(model, "-t", TARGET, "-o", tmp_path / "out", "--quantize", "none").returncode == 0
    (tmp_path / "out" / f"m-{TARGET}" / "results.npz").write_bytes(b"user data")
    before = tree(tmp_path / "out")
    refused(
        package(model, "-t", TARGET, "-o", tmp_path / "out", "--force", "--quantize", "none"),
        2,
        "does not list: results.npz",
    )
    assert tree(tmp_path / "out") == before


def test_force_replaces_a_bundle_it_wrote(tmp_path):
    model = relu_model(tmp_path / "m.onnx")
    for _ in range(2):
        done = package(model, "-t", TARGET, "-o", tmp_path / "out", "--force", "--quantize", "none")
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"m-{TARGET}"]


def test_force_replaces_only_a_frozen_executable_folder(tmp_path):
    frozen = tmp_path / "b.frozen"
    frozen.mkdir()
    (frozen / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no edgepack_shim executable"):
        check_destination(frozen, force=True, recognise=not_frozen)
    (frozen / "edgepack_shim").write_bytes(b"\x7fELF")
    check_destination(frozen, force=True, recognise=not_frozen)


# --- destinations that cannot hold a bundle: refused before any work ----------------------------------


@pytest.mark.parametrize("kind", ["file", "link to a folder", "link to nothing"])
def test_destination_that_is_a_file_or_a_link_is_refused_before_work(tmp_path, kind):
    model = relu_model(tmp_path / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    destination = out / f"m-{TARGET}"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
    if kind == "file":
        destination.write_text("a file")
    elif kind == "link to a folder":
        destination.symlink_to(tmp_path / "elsewhere")
    else:
        destination.symlink_to(tmp_path / "nothing")
    before = tree(tmp_path)
    done = package(model, "-t", TARGET, "-o", out, "--force", "--quantize", "none")
    refused(done, 2, "file, not a bundle folder" if kind == "file" else "symbolic link")
    assert "load" not in done.stdout  # refused before the model was loaded
    assert tree(tmp_path) == before
    no_leftovers(tmp_path)


def test_output_naming_the_input_file_is_a_usage_error(tmp_path):
    model = relu_model(tmp_path / "m.onnx")
    refused(package(model, "-t", TARGET, "-o", model), 2, "is a file, so no bundle folder can be made below it")
    assert model.is_file()


def test_output_where_nothing_can_be_written_is_a_usage_error(tmp_path):
    """/proc refuses new folders even to root, where permission bits would say yes."""
    refused(package(relu_model(tmp_path / "m.onnx"), "-t", TARGET, "-o", "/proc/edgepack-out"), 2, "cannot write in")


def test_output_path_too_long_is_a_usage_error_and_message_stays_short(tmp_path):
    done = package(relu_model(tmp_path / "m.onnx"), "-t", TARGET, "-o", tmp_path / ("x" * 5000))
    refused(done, 2, "too long")
    assert len(done.stderr) < 1000


# --- failures leave nothing: no empty -o folder ------------------------------------------------------


def _opset_too_new(tmp_path):
    return [relu_model(tmp_path / "m.onnx", opset=30), "-t", TARGET], 4


def _static_without_calibration(tmp_path):
    return [relu_model(tmp_path / "m.onnx"), "-t", TARGET, "--quantize", "static"], 2


def _bad_sample_inputs(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    return [
        relu_model(tmp_path / "m.onnx"),
        "-t",
        TARGET,
        "--quantize",
        "none",
        "--sample-inputs",
        tmp_path / "bad.npz",
    ], 2


def _huge_declared_input(tmp_path):
    return [relu_model(tmp_path / "m.onnx", shape=(40000, 40000)), "-t", TARGET, "--quantize", "none"], 2


@pytest.mark.parametrize(
    "case",
    [_opset_too_new, _static_without_calibration, _bad_sample_inputs, _huge_declared_input],
    ids=lambda c: c.__name__.strip("_"),
)
def test_a_failure_after_load_leaves_no_output_folder(tmp_path, case):
    args, code = case(tmp_path)
    out = tmp_path / "new" / "out"
    done = package(*args, "-o", out)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    assert not (tmp_path / "new").exists()
    no_leftovers(tmp_path)


def test_generated_inputs_over_the_memory_budget_are_refused_with_a_clear_message(tmp_path):
    done = package(
        relu_model(tmp_path / "m.onnx", shape=(2**40, 2**40)),
        "-t",
        TARGET,
        "--quantize",
        "none",
        "-o",
        tmp_path / "out",
    )
    refused(done, 2, "over the budget of 2 GiB", "--sample-inputs")


# --- nothing in the working directory or $TMPDIR ---------------------------------------------------


# "static" without calibration data refuses after load: a failing run must leave nothing behind either
@pytest.mark.parametrize("recipe, code", [("fp16", 0), ("dynamic", 0), ("static", 2)])
def test_working_directory_and_tmpdir_unchanged_after_package(tmp_path, recipe, code):
    """The model stops onnxruntime's symbolic shape inference, which then writes into the current folder; and
    onnxruntime's telemetry leaves .ses in $TMPDIR unless edgepack turns it off (the environment here does not)."""
    model = unmergeable_dims_model(tmp_path / "model" / "m.onnx")
    cwd, tmpdir = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    env.update(TMPDIR=str(tmpdir), HOME=str(tmp_path / "home"))
    done = package(model, "-t", TARGET, "--quantize", recipe, "-o", tmp_path / "out", cwd=cwd, env=env)
    assert done.returncode == code, done.stderr
    assert list(cwd.iterdir()) == [] and list(tmpdir.iterdir()) == []
    assert not (tmp_path / "home").exists()  # no telemetry database in ~/.cache either
