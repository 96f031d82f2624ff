"""`edgepack package` end to end: every profile packages both examples; bad input is refused cleanly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper

from edgepack.accuracy import check, compare
from edgepack.bundle.manifest import verify_bundle
from edgepack.profiles import builtin_profile_names, load_profile
from edgepack.runtime_shim import edgepack_shim


@pytest.fixture(scope="module", params=["cnn", "transformer"])
def packaged(request, tmp_path_factory, cli):
    """One `--example NAME --target all` run; its JSON results and output folder."""
    out = tmp_path_factory.mktemp(f"build-{request.param}")
    done = cli("package", "--example", request.param, "--target", "all", "-o", out, "--json")
    assert done.returncode == 0, done.stderr + done.stdout
    return request.param, out, json.loads(done.stdout)


def test_every_profile_packages_the_example(packaged):
    name, out, report = packaged
    assert report["ok"]
    assert sorted(r["target"] for r in report["results"]) == builtin_profile_names()
    for result in report["results"]:
        bundle = out / f"{name}-{result['target']}"
        assert Path(result["bundle"]) == bundle and bundle.is_dir()
        assert verify_bundle(bundle).ok
        assert not list(out.glob(".*partial")), "no temporary folder may remain"


def test_manifest_describes_the_bundle(packaged):
    name, out, _ = packaged
    for target in builtin_profile_names():
        profile = load_profile(target)
        manifest = json.loads((out / f"{name}-{target}" / "manifest.json").read_text())
        assert manifest["schema"] == "edgepack.manifest/1"
        assert manifest["target"] == target and manifest["profile"]["name"] == target
        model = manifest["model"]
        assert model["file"] in manifest["files"]
        assert model["format"] == ("ort" if profile.ort_format.style != "none" else "onnx")
        assert model["ir_version"] <= profile.runtime.max_ir_version
        assert model["opsets"]["ai.onnx"] <= profile.runtime.max_opset
        assert all({"name", "dtype", "shape"} <= set(io) for io in model["inputs"] + model["outputs"])
        assert manifest["runtime"]["version"] == profile.runtime.version
        assert [ep["name"] for ep in manifest["runtime"]["execution_providers"]] == [
            ep.name for ep in profile.execution_providers
        ]
        assert manifest["reduced_ops_config"] == "required_operators_and_types.config"
        assert set(manifest["tools"]) >= {"edgepack", "onnx", "onnxruntime", "python"}
        stages = [r["stage"] for r in manifest["stages"]]
        for expected in (
            "load",
            "check",
            "optimize",
            "quantize",
            "convert",
            "bundle",
            "manifest",
            "self_test",
            "budget",
        ):
            assert expected in stages
        self_test = next(r for r in manifest["stages"] if r["stage"] == "self_test")
        assert self_test["passed"] and self_test["cosine"] > 0.99
        assert "REPORT.md" in manifest["files"]
        if manifest["model"]["ort_style"] == "Runtime":
            assert (
                manifest["runtime"]["session_options"]["config_entries"]["session.enable_saved_runtime_optimizations"]
                == "1"
            )


def test_reduced_operator_config_parses_and_covers_the_model(packaged):
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    name, out, _ = packaged
    bundle = out / f"{name}-rpi-arm64"
    manifest = json.loads((bundle / "manifest.json").read_text())
    # without calibration data the profile falls back to dynamic INT8 (MatMul/Gather; convs stay FP32)
    assert next(r for r in manifest["stages"] if r["stage"] == "quantize")["recipe"] == "dynamic"
    required_ops, _ = parse_config(str(bundle / "required_operators_and_types.config"))
    ops = {op for domain_ops in required_ops.values() for version_ops in domain_ops.values() for op in version_ops}
    # generated from the final .ort: Conv+BatchNormalization+Relu appear as the fused kernel the device runs,
    # quantized MatMul+Add as the fused INT8 kernels
    assert (
        {"FusedConv", "DynamicQuantizeMatMul"}
        if name == "cnn"
        else {"FusedMatMul", "Softmax", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    ) <= ops


def test_python_bundle_runs_through_its_shim_like_the_reference(packaged, examples):
    """The shim runs the bundle's model exactly as plain onnxruntime runs that file, and (the bundle being
    quantized by the profile's default) within the profile's quantization tolerance of the FP32 source."""
    name, out, _ = packaged
    bundle = out / f"{name}-rpi-arm64"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["precision"] == "int8"
    model = edgepack_shim.load(bundle)
    same_file = ort.InferenceSession(str(bundle / manifest["model"]["file"]), providers=["CPUExecutionProvider"])
    source = ort.InferenceSession(str(examples[name]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    if name == "cnn":
        feeds = {"image": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)}
    else:
        feeds = {"input_ids": rng.integers(0, 1000, (2, 128)), "attention_mask": np.ones((2, 128), np.int64)}
    got = next(iter(model.run(feeds).values()))
    np.testing.assert_allclose(got, same_file.run(None, feeds)[0], atol=1e-4)
    tolerance = load_profile("rpi-arm64").quantization.tolerance
    figures = compare([{"out": source.run(None, feeds)[0]}], [{"out": got}])
    assert not check(
        figures,
        min_cosine=tolerance.min_cosine,
        min_top1_agreement=tolerance.min_top1_agreement,
        max_abs_error=tolerance.max_abs_error,
    ), figures


def test_existing_bundle_needs_force(packaged, cli):
    name, out, _ = packaged
    before = (out / f"{name}-rpi-arm64" / "manifest.json").read_bytes()
    refused = cli("package", "--example", name, "--target", "rpi-arm64", "-o", out)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert (out / f"{name}-rpi-arm64" / "manifest.json").read_bytes() == before
    forced = cli("package", "--example", name, "--target", "rpi-arm64", "-o", out, "--force", "-q")
    assert forced.returncode == 0, forced.stderr
    assert verify_bundle(out / f"{name}-rpi-arm64").ok


def test_self_test_runs_on_the_users_sample_inputs(tmp_path, examples, cli, clean_failure):
    samples = tmp_path / "samples.npz"
    np.savez(samples, image=np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32))
    done = cli(
        "package",
        examples["cnn"],
        "--target",
        "rpi-arm64",
        "--quantize",
        "none",
        "-o",
        tmp_path / "out",
        "--sample-inputs",
        samples,
        "-q",
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "cnn-rpi-arm64" / "manifest.json").read_text())
    report = next(r for r in manifest["stages"] if r["stage"] == "self_test")
    assert report["inputs"] == str(samples) and report["sample_sets"] == 4 and report["passed"]

    np.savez(samples, pixels=np.zeros((1, 3, 32, 32), np.float32))
    wrong = cli("package", examples["cnn"], "--target", "rpi-arm64", "-o", tmp_path / "bad", "--sample-inputs", samples)
    clean_failure(wrong, "missing input(s) image", "unknown name(s) pixels")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_input_model_is_never_modified(tmp_path, examples, cli):
    model = tmp_path / "cnn.onnx"
    model.write_bytes(examples["cnn"].read_bytes())
    model.chmod(0o444)
    before = (_sha(model), model.stat().st_mtime_ns)
    done = cli("package", model, "--target", "rpi-arm64,browser-wasm", "-o", tmp_path / "out", "-q")
    assert done.returncode == 0, done.stderr
    assert (_sha(model), model.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "out"]


def _tiny(opset: int = 17, ir: int = 8, op: str = "Relu", domain: str = "") -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], domain=domain)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir
    return model


def _bad_inputs(tmp_path: Path, examples) -> dict[str, tuple[Path, list[str], str]]:
    (tmp_path / "text.onnx").write_text("this is not a model\n" * 20)
    (tmp_path / "truncated.onnx").write_bytes(examples["cnn"].read_bytes()[:5000])
    (tmp_path / "empty.onnx").write_bytes(b"")
    onnx.save_model(_tiny(opset=24), tmp_path / "opset24.onnx")
    onnx.save_model(_tiny(ir=12), tmp_path / "ir12.onnx")
    onnx.save_model(_tiny(op="Frobnicate", domain="com.example"), tmp_path / "custom.onnx")
    profile = yaml.safe_load(open(load_profile("rpi-arm64").source))
    profile["runtime"]["max_opset"] = "many"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(profile))
    return {
        "not onnx": (tmp_path / "text.onnx", ["rpi-arm64"], "not a valid ONNX model"),
        "truncated": (tmp_path / "truncated.onnx", ["rpi-arm64"], "not a valid ONNX model"),
        "empty": (tmp_path / "empty.onnx", ["rpi-arm64"], "empty"),
        "missing": (tmp_path / "nowhere.onnx", ["rpi-arm64"], "no such file"),
        "folder": (tmp_path, ["rpi-arm64"], "is a folder"),
        "opset too new": (tmp_path / "opset24.onnx", ["rpi-arm64"], "opset 24"),
        "ir too new": (tmp_path / "ir12.onnx", ["rpi-arm64"], "IR version 12"),
        "unknown op": (tmp_path / "custom.onnx", ["rpi-arm64"], "com.example::Frobnicate"),
        "unknown target": (examples["cnn"], ["raspberry-pi"], "unknown target 'raspberry-pi'"),
        "invalid profile": (
            examples["cnn"],
            [str(tmp_path / "broken.yaml")],
            "key 'runtime.max_opset': expected an integer",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not onnx",
        "truncated",
        "empty",
        "missing",
        "folder",
        "opset too new",
        "ir too new",
        "unknown op",
        "unknown target",
        "invalid profile",
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, examples, cli, clean_failure, case):
    model, targets, message = _bad_inputs(tmp_path, examples)[case]
    out = tmp_path / "out"
    done = cli("package", model, "--target", ",".join(targets), "-o", out)
    clean_failure(done, message)
    assert not out.exists() or not any(out.iterdir()), f"{case}: output written: {list(out.iterdir())}"


def test_compatibility_error_names_the_runtime_and_a_fix(tmp_path, cli):
    onnx.save_model(_tiny(opset=24), tmp_path / "m.onnx")
    done = cli("package", tmp_path / "m.onnx", "--target", "rpi-arm64", "-o", tmp_path / "out")
    assert done.returncode == 4
    assert "onnxruntime >=1.20" in done.stderr and "opset 21" in done.stderr and "hint:" in done.stderr


def test_targets_table_and_json(cli):
    table = cli("targets")
    assert table.returncode == 0
    for name in builtin_profile_names():
        assert name in table.stdout
    data = json.loads(cli("targets", "--json").stdout)
    assert {p["name"] for p in data} == set(builtin_profile_names())


@pytest.mark.parametrize("where", ["before the command", "after the command"])
def test_debug_and_json_work_on_either_side_of_the_command(tmp_path, cli, where):
    def run(flag: str, *args):
        return cli(flag, *args) if where == "before the command" else cli(*args, flag)

    (tmp_path / "m.onnx").write_bytes(b"not onnx")
    debug = run("--debug", "package", tmp_path / "m.onnx", "--target", "rpi-arm64", "-o", tmp_path / "out")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ModelError" in debug.stderr, debug.stderr
    quiet = cli("package", tmp_path / "m.onnx", "--target", "rpi-arm64", "-o", tmp_path / "out")
    assert quiet.returncode == 3 and "Traceback" not in quiet.stderr
    listed = run("--json", "targets")
    assert listed.returncode == 0 and {p["name"] for p in json.loads(listed.stdout)} == set(builtin_profile_names())


@pytest.mark.parametrize(
    "args, kind, code",
    [
        (["package", "missing.onnx", "-t", "linux-x64"], "ModelError", 3),
        (["package", "--example", "cnn", "-t", "no-such-target"], "UsageError", 2),
    ],
    ids=["missing model", "unknown target"],
)
def test_json_reports_an_error_that_stops_the_command_before_any_target(tmp_path, cli, args, kind, code):
    done = cli(*args, "-o", tmp_path / "out", "--json", cwd=tmp_path)
    assert done.returncode == code and "edgepack: error:" in done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["error"]["type"] == kind and report["error"]["exit_code"] == code


def test_inspect_describes_a_model(examples, cli):
    done = cli("inspect", examples["transformer"])
    assert done.returncode == 0, done.stderr
    assert "IR 8" in done.stdout and "input_ids: int64 [batch, sequence]" in done.stdout
    info = json.loads(cli("inspect", examples["cnn"], "--json").stdout)
    assert info["opsets"] == {"ai.onnx": 17} and info["ops"]["Conv"] == 3
    assert info["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]


def test_help_teaches(cli):
    done = cli("--help")
    assert done.returncode == 0
    assert "edgepack package --example cnn --target all" in done.stdout
    assert "exit codes" in done.stdout
