"""Tampered bundles and careless use on the device. Every reader applies one set of manifest rules
(``edgepack verify`` refuses what the shim refuses), opens only regular files inside the bundle through
no link (a FIFO would hang the reader: each case runs under a timeout), and the shim's usage as documented
keeps ``verify`` passing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.hostile.support import SHIM, relu_model, reseal, run_shim

TARGET = "linux-x64"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, cli) -> Path:
    root = tmp_path_factory.mktemp("hostile-bundle")
    done = cli("package", relu_model(root / "m.onnx"), "-t", TARGET, "--quantize", "none", "-o", root / "out", "-q")
    assert done.returncode == 0, done.stderr
    return root / "out" / f"m-{TARGET}"


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    copy = tmp_path / "side" / pristine.name
    shutil.copytree(pristine, copy)
    return copy


def verify_both(bundle: Path, timeout: float = 30) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    packager = subprocess.run(
        [sys.executable, "-m", "edgepack", "verify", str(bundle)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    shim = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[2] / "runtime_shim" / SHIM),
            "--bundle",
            str(bundle),
            "verify",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return packager, shim


def both_refuse(bundle: Path, *needles: str) -> None:
    for done in verify_both(bundle):
        assert done.returncode == 7, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
        for needle in needles:
            assert needle in done.stderr + done.stdout, done.stderr + done.stdout


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


# --- resealed manifests: one validator for every reader ----------------------------------------------


def _set(path: str, value):
    def change(m):
        *parents, last = path.split(".")
        node = m
        for key in parents:
            node = node[key]
        node[last] = value

    return change


RESEALED = [
    ("absolute_model_file", _set("model.file", "/etc/passwd"), "not a relative path inside the bundle"),
    ("model_as_string", _set("model", "model/m.ort"), "'model' and 'runtime' must be mappings"),
    ("inputs_as_dict", _set("model.inputs", {"x": "float32"}), "'model.inputs' must be a list"),
    ("side_files_as_string", _set("model.external_data", "../x"), "'model.external_data' must be a list"),
    (
        "memory_stats_entry",
        _set(
            "runtime.session_options.config_entries",
            {"session.collect_node_memory_stats_to_file": "/tmp/edgepack-pwned"},
        ),
        "session.collect_node_memory_stats_to_file",
    ),
    (
        "trt_cache_path",
        _set(
            "runtime.execution_providers",
            [
                {"name": "TensorrtExecutionProvider", "options": {"trt_engine_cache_path": "/etc"}},
                {"name": "CPUExecutionProvider", "options": {}},
            ],
        ),
        "trt_engine_cache_path",
    ),
    ("threads_huge", _set("runtime.session_options.intra_op_num_threads", 10**11), "intra_op_num_threads"),
    (
        "files_escape",
        lambda m: m["files"].update({"../outside": {"sha256": "0" * 64, "size": 1}}),
        "outside the bundle",
    ),
]


@pytest.mark.parametrize("change, says", [c[1:] for c in RESEALED], ids=[c[0] for c in RESEALED])
def test_resealed_manifest_refused_by_every_reader(bundle, change, says):
    manifest = _manifest(bundle)
    change(manifest)
    reseal(bundle, manifest)
    both_refuse(bundle, says)
    done = run_shim(bundle, "bench", "--no-verify", "--runs", "1")
    assert done.returncode == 7 and says in done.stderr, done.stderr


def test_a_session_entry_naming_a_file_never_reaches_onnxruntime(bundle, tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    manifest = _manifest(bundle)
    manifest["runtime"]["session_options"]["config_entries"]["session.collect_node_memory_stats_to_file"] = str(target)
    reseal(bundle, manifest)
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    for verify in ([], ["--no-verify"]):
        done = run_shim(bundle, "run", *verify, tmp_path / "x.npy", "-o", tmp_path / "y.npy")
        assert done.returncode == 7, done.stderr
    assert target.read_text() == "precious"


# --- links, FIFOs and other files that are not the bundle's ------------------------------------------


def test_manifest_that_is_a_link_is_not_followed(bundle, tmp_path):
    real = tmp_path / "real-manifest.json"
    shutil.move(bundle / "manifest.json", real)
    (bundle / "manifest.json").symlink_to(real)
    both_refuse(bundle, "not a regular file")


def test_manifest_that_is_a_fifo_does_not_hang_a_reader(bundle):
    (bundle / "manifest.json").unlink()
    os.mkfifo(bundle / "manifest.json")
    both_refuse(bundle, "not a regular file")


def test_listed_file_that_is_a_fifo_is_missing_not_read(bundle):
    (bundle / "README.md").unlink()
    os.mkfifo(bundle / "README.md")
    both_refuse(bundle, "README.md")


def test_file_reached_through_a_linked_folder_is_never_opened(bundle, tmp_path):
    """The linked folder holds a FIFO under the model's name: a reader that followed the link would hang."""
    model_dir = bundle / "model"
    outside = tmp_path / "outside"
    outside.mkdir()
    for entry in model_dir.iterdir():
        os.mkfifo(outside / entry.name)
    shutil.rmtree(model_dir)
    model_dir.symlink_to(outside)
    both_refuse(bundle, "model")


def test_file_that_is_a_link_out_of_the_bundle_is_refused(bundle, tmp_path):
    secret = tmp_path / "secret"
    shutil.copy(bundle / "README.md", secret)  # same bytes: only the link itself can be refused
    (bundle / "README.md").unlink()
    (bundle / "README.md").symlink_to(secret)
    both_refuse(bundle, "README.md")


# --- the shim on the device: documented usage keeps verify passing; mistakes are usage errors ------------


def test_documented_usage_keeps_verify_passing(bundle):
    work = bundle.parent
    np.savez(work / "inputs.npz", x=np.ones((1, 4), np.float32))
    done = run_shim(bundle, "run", "inputs.npz", "-o", "out.npz", cwd=work)
    assert done.returncode == 0, done.stderr
    assert np.load(work / "out.npz")["y"].shape == (1, 4)
    assert all(done.returncode == 0 for done in verify_both(bundle))


def test_shim_never_writes_into_the_bundle(bundle):
    np.savez(bundle / ".." / "inputs.npz", x=np.ones((1, 4), np.float32))
    for output in ([], ["-o", "out.npz"], ["-o", str(bundle / "model" / "o.npz")]):
        done = run_shim(bundle, "run", "../inputs.npz", *output, cwd=bundle)
        assert done.returncode == 2 and "inside the bundle" in done.stderr, done.stderr
    assert all(done.returncode == 0 for done in verify_both(bundle))


def _garbage_npz(tmp):
    (tmp / "g.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    return ["g.npz", "-o", "o.npz"], "not a valid .npz or .npy file"


def _truncated_npz(tmp):
    np.savez(tmp / "t.npz", x=np.ones((1, 4), np.float32))
    data = (tmp / "t.npz").read_bytes()
    (tmp / "t.npz").write_bytes(data[: len(data) // 2])
    return ["t.npz", "-o", "o.npz"], "not a valid .npz or .npy file"


def _pickled_npy(tmp):
    np.save(tmp / "p.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return ["p.npy", "-o", "o.npz"], "cannot read inputs"


def _missing_output_folder(tmp):
    return ["x.npz", "-o", "nodir/x.npz"], "does not exist"


def _output_is_a_folder(tmp):
    (tmp / "existing").mkdir()
    return ["x.npz", "-o", "existing"], "is a folder"


def _output_unwritable(tmp):
    return ["x.npz", "-o", "/proc/o.npz"], "cannot write"


def _output_path_too_long(tmp):
    return ["x.npz", "-o", "o" * 5000 + ".npz"], "File name too long"


SHIM_MISTAKES = [
    _garbage_npz,
    _truncated_npz,
    _pickled_npy,
    _missing_output_folder,
    _output_is_a_folder,
    _output_unwritable,
    _output_path_too_long,
]


@pytest.mark.parametrize("case", SHIM_MISTAKES, ids=lambda c: c.__name__.strip("_"))
def test_shim_user_mistakes_are_usage_errors(bundle, case):
    work = bundle.parent
    np.savez(work / "x.npz", x=np.ones((1, 4), np.float32))
    args, says = case(work)
    before = sorted(p.name for p in work.iterdir())
    done = run_shim(bundle, "run", *args, cwd=work)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr) < 1000
    assert sorted(p.name for p in work.iterdir()) == before  # no .partial, no output


def test_shim_bench_refuses_generated_inputs_over_its_budget(bundle):
    manifest = _manifest(bundle)
    manifest["model"]["inputs"][0]["shape"] = [2**40, 2**40]
    reseal(bundle, manifest)
    done = run_shim(bundle, "bench", "--runs", "1")
    assert done.returncode == 2 and "generated inputs would take over 1 GiB" in done.stderr, done.stderr


def test_a_huge_name_in_the_inputs_gives_a_bounded_message(bundle):
    work = bundle.parent
    np.savez(work / "named.npz", **{"n" * 60_000: np.ones((1, 4), np.float32)})
    done = run_shim(bundle, "run", "named.npz", "-o", "o.npz", cwd=work)
    assert done.returncode == 2 and "unknown input" in done.stderr, done.stderr[:500]
    assert len(done.stderr) < 1000


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_a_signature_that_is_not_a_regular_file_is_never_read(bundle, tmp_path, kind):
    from edgepack.bundle.signing import generate_key

    generate_key(tmp_path / "k.pem", tmp_path / "k.pub", None)
    if kind == "fifo":
        os.mkfifo(bundle / "model.sig")
    else:
        (tmp_path / "elsewhere.sig").write_text("{}")
        (bundle / "model.sig").symlink_to(tmp_path / "elsewhere.sig")
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    packager = subprocess.run(
        [sys.executable, "-m", "edgepack", "verify", str(bundle), "--public-key", str(tmp_path / "k.pub")],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    device = run_shim(bundle, "verify", "--public-key", tmp_path / "k.pub", timeout=30)
    for done in (packager, device):
        assert done.returncode == 7 and "model.sig is not a regular file" in done.stderr, done.stderr
