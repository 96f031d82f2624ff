"""Packaging straight from PyTorch: export, opset fallback, checks against the module, clear errors.

Models are tiny and built here; each test exports once (a dynamo export costs a few seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import edgepack  # noqa: E402
from edgepack.errors import AccuracyError, CompatibilityError, ConversionError, UsageError  # noqa: E402
from edgepack.runtime_shim import edgepack_shim  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["rpi-arm64", "browser-wasm"]

MODELS_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn


    class TinyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 5)

        def forward(self, image):
            x = torch.relu(self.bn(self.conv(image)))
            return self.fc(x.mean((2, 3)))


    def build_model():
        torch.manual_seed(0)
        model = TinyCNN()
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
        return model
""")


class TinyEncoder(nn.Module):
    """A one-layer transformer encoder over token ids."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)

    def forward(self, input_ids):
        return self.layer(self.embed(input_ids))


class ConvAttention(nn.Module):
    """Conv + mean (dynamo cannot write it below opset 18) + SDPA (the legacy exporter needs opset 14)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, image):
        tokens = self.conv(image).flatten(2).transpose(1, 2).unsqueeze(1)
        return F.scaled_dot_product_attention(tokens, tokens, tokens).mean((1, 2))


class ValueBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class SizeBranch(nn.Module):
    def forward(self, x):
        if x.shape[0] > 3:
            return x * 2
        return x - 1


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    (tmp_path / "tinymodels.py").write_text(MODELS_SOURCE, encoding="utf-8")
    return tmp_path


def _edgepack(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ORT_DISABLE_TELEMETRY": "1", **(env or {})},
    )


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))


def _export_report(bundle: Path) -> dict:
    stages = _manifest(bundle)["stages"]
    assert stages[0]["stage"] == "export", [s["stage"] for s in stages]
    return stages[0]


def _profile(tmp_path: Path, name: str, max_opset: int, max_ir: int) -> str:
    text = (ROOT / "targets" / "rpi-arm64.yaml").read_text(encoding="utf-8")
    text = text.replace("name: rpi-arm64", f"name: {name}")
    text = text.replace("max_opset: 21", f"max_opset: {max_opset}").replace(
        "max_ir_version: 10", f"max_ir_version: {max_ir}"
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _assert_runs_like(bundle: Path, module: nn.Module, x: torch.Tensor) -> None:
    """The bundle, loaded as the device loads it, gives the module's outputs at this (new) size."""
    model = edgepack_shim.load(bundle, providers=["CPUExecutionProvider"], check_runtime=False)
    (name,) = [i["name"] for i in model.inputs]
    got = list(model.run({name: x.numpy()}).values())[0]
    with torch.no_grad():
        expected = module.eval()(x).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_cli_packages_a_cnn_factory_with_a_dynamic_batch(models_dir: Path):
    out = models_dir / "build"
    # FP32 (--quantize none): the bundle is compared with the PyTorch module at the export's tolerance
    done = _edgepack(
        "package",
        "tinymodels:build_model",
        "--example-input",
        "2x3x16x16",
        "--dynamic",
        "image:0=batch",
        "--target",
        ",".join(TARGETS),
        "--quantize",
        "none",
        "-o",
        str(out),
        "--json",
        cwd=models_dir,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert [r["target"] for r in results] == TARGETS and all(r["ok"] for r in results)
    sys.path.insert(0, str(models_dir))
    try:
        import tinymodels
    finally:
        sys.path.remove(str(models_dir))
    module = tinymodels.build_model()
    for target in TARGETS:
        bundle = out / f"build_model-{target}"
        manifest = _manifest(bundle)
        assert manifest["model"]["inputs"][0]["shape"] == ["batch", 3, 16, 16]
        report = _export_report(bundle)
        assert report["exporter"] == "dynamo" and report["opset_written"] == 21 and report["ir_version"] <= 10
        assert report["dynamic"] == {"image": {"0": "batch"}}
        assert [c["case"] for c in report["checks"]] == ["example", "batch=3"]
        assert report["max_abs_error"] < 1e-4 and report["cosine"] > 0.9999
        _assert_runs_like(bundle, module, torch.randn(5, 3, 16, 16))


@pytest.mark.slow
def test_transformer_keeps_batch_and_sequence_dynamic(tmp_path: Path):
    """One export serves every target. A runtime at opset 16 gets a legacy export, which bakes the
    sequence length into the attention's Reshape: the check at another length catches it."""
    module = TinyEncoder()
    old = _profile(tmp_path, "pi-ort112", 16, 8)
    results = edgepack.package(
        module,
        example_inputs=("2x8:int64",),
        dynamic=["input_ids:0=batch", "input_ids:1=seq"],
        targets=[*TARGETS, old],
        output=tmp_path / "out",
        quantize="none",
    )  # FP32 parity below
    assert module.training, "the user's module is given back in the mode it was in"
    *fine, baked = results
    assert [r.error for r in fine] == [None, None]
    for result in fine:
        assert result.manifest["model"]["inputs"][0]["shape"] == ["batch", "seq"]
        report = _export_report(result.bundle)
        assert (report["exporter"], report["opset_requested"], report["opset_written"]) == ("dynamo", 16, 18)
        assert [c["case"] for c in report["checks"]] == ["example", "batch=3", "seq=9"]
        assert report["cosine"] > 0.9999
        model = edgepack_shim.load(result.bundle, providers=["CPUExecutionProvider"], check_runtime=False)
        ids = torch.randint(0, 32, (3, 11))
        got = list(model.run({"input_ids": ids.numpy()}).values())[0]
        with torch.no_grad():
            expected = module.eval()(ids).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert isinstance(baked.error, AccuracyError) and not baked.bundle.exists()
    message = str(baked.error)
    assert "legacy exporter" in message and "disagrees with the PyTorch module on seq=9 inputs" in message
    assert "onnxruntime failed" in message and "Reshape" in message


@pytest.mark.slow
def test_old_runtimes_get_a_legacy_export_or_a_clear_error(tmp_path: Path):
    """Dynamo writes opset 18 when asked 13: a 17 runtime gets a legacy export at 17 (IR 8), a 13 runtime
    fails (the legacy exporter has no attention before opset 14) naming the runtime the model needs."""
    targets = [_profile(tmp_path, "pi-ort113", 17, 8), _profile(tmp_path, "pi-ort16", 13, 7), "browser-wasm"]
    module = ConvAttention()
    results = edgepack.package(
        module,
        example_inputs=(torch.randn(2, 3, 6, 6),),
        dynamic={"image": {0: "batch"}},
        targets=targets,
        output=tmp_path / "out",
    )
    by_target = {r.target: r for r in results}
    old, too_old, browser = by_target["pi-ort113"], by_target["pi-ort16"], by_target["browser-wasm"]

    assert old.ok, old.error
    report = _export_report(old.bundle)
    assert (report["exporter"], report["opset_written"], report["ir_version"]) == ("legacy", 17, 8)
    assert report["dynamo_opset_written"] == 18 and "legacy exporter at opset 17" in report["fallback"]
    assert old.manifest["model"]["opsets"]["ai.onnx"] == 17 and old.manifest["model"]["ir_version"] == 8
    _assert_runs_like(old.bundle, module, torch.randn(4, 3, 6, 6))

    assert not too_old.ok and isinstance(too_old.error, CompatibilityError)
    message = str(too_old.error)
    assert "opset 18" in message and "onnxruntime 1.14 or newer" in message and "implements up to opset 13" in message
    assert not too_old.bundle.exists()

    assert browser.ok, browser.error
    report = _export_report(browser.bundle)
    assert (report["exporter"], report["opset_written"], report["fallback"]) == ("dynamo", 18, None)


def test_value_dependent_control_flow_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConversionError) as caught:
        edgepack.package(
            ValueBranch(), example_inputs=(torch.randn(2, 4),), targets=["rpi-arm64"], output=tmp_path / "out"
        )
    message = str(caught.value)
    assert "control flow depends on tensor values" in message and "torch.where" in message
    assert f"{Path(__file__).name}:" in message and "if x.sum() > 0" in message
    assert not (tmp_path / "out").exists()


def test_branch_on_a_dynamic_size_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConversionError, match=r"branches on the size of dynamic axis 'batch'.*batch <= 3"):
        edgepack.package(
            SizeBranch(),
            example_inputs=(torch.randn(2, 4),),
            dynamic={0: {0: "batch"}},
            targets=["rpi-arm64"],
            output=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_wrong_example_shape_is_one_clear_message(models_dir: Path):
    out = models_dir / "build"
    done = _edgepack(
        "package",
        "tinymodels:build_model",
        "--example-input",
        "2x4x16x16",
        "--target",
        "rpi-arm64",
        "-o",
        str(out),
        cwd=models_dir,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "the module fails on the example input(s) 2x4x16x16:float32" in done.stderr
    assert "expected input[2, 4, 16, 16] to have 3 channels" in done.stderr
    assert "--example-input" in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_pt2_program_keeps_its_dynamic_shapes(tmp_path: Path):
    module = TinyEncoder().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (torch.randint(0, 32, (2, 8)),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "encoder.pt2")
    done = _edgepack("package", "encoder.pt2", "--target", "rpi-arm64", "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    bundle = tmp_path / "out" / "encoder-rpi-arm64"
    dim, seq = _manifest(bundle)["model"]["inputs"][0]["shape"]
    assert isinstance(dim, str) and seq == 8, "a saved program keeps the dim dynamic (its name is torch's symbol)"
    report = _export_report(bundle)
    assert report["sha256"] and [c["case"] for c in report["checks"]] == ["example", f"{dim}=3"]


def test_example_input_and_dynamic_specs_are_checked():
    from edgepack.torch import inputs as torch_inputs

    assert torch_inputs.parse_example_input("2x128:int64") == ([2, 128], torch.int64)
    assert torch_inputs.parse_example_input("1x3x8x8") == ([1, 3, 8, 8], torch.float32)
    for bad in ("2x", "2,3", "2x3:float8", "x3"):
        with pytest.raises(UsageError, match="--example-input"):
            torch_inputs.parse_example_input(bad)
    assert torch_inputs.parse_dynamic(["x:0=batch", "1:-1=seq"]) == [("x", 0, "batch"), ("1", -1, "seq")]
    assert torch_inputs.parse_dynamic({"x": {0: "batch"}}) == [("x", 0, "batch")]
    with pytest.raises(UsageError, match="INPUT:AXIS=NAME"):
        torch_inputs.parse_dynamic(["x=batch"])


@pytest.mark.parametrize(
    "dynamic, message",
    [
        (["image:0=batch"], "example size of a dynamic axis must be at least 2, found 1"),
        (["pixels:0=batch"], "no input 'pixels'"),
        (["image:4=batch"], "has 4 axes"),
    ],
)
def test_bad_dynamic_axes_fail_before_export(tmp_path: Path, dynamic, message):
    with pytest.raises(UsageError, match=message):
        edgepack.package(
            ConvAttention(),
            example_inputs=("1x3x6x6",),
            dynamic=dynamic,
            targets=["rpi-arm64"],
            output=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_cli_rejects_torch_flags_for_an_onnx_model(tmp_path: Path):
    from edgepack.examples import write_example

    model = write_example("cnn", tmp_path)
    done = _edgepack(
        "package",
        str(model),
        "--example-input",
        "1x3x32x32",
        "--target",
        "rpi-arm64",
        "-o",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "apply to PyTorch models only" in done.stderr and "Traceback" not in done.stderr


def test_without_torch_a_torch_input_says_what_to_install(models_dir: Path):
    code = (
        "import sys; sys.modules['torch'] = None; from edgepack.cli import main; "
        "sys.exit(main(['package', 'tinymodels:build_model', '--example-input', '2x3x8x8', '-t', 'rpi-arm64']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=models_dir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "pip install 'edgepack[torch]'" in done.stderr and "Traceback" not in done.stderr
    assert not (models_dir / "build").exists()


def _imported_modules(stderr: str) -> set[str]:
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.slow
def test_help_and_onnx_packaging_never_import_torch(tmp_path: Path):
    def heavy(modules: set[str]) -> set[str]:
        return {m for m in modules if m.split(".")[0] in ("torch", "onnxscript")}

    light = subprocess.run(
        [
            sys.executable,
            "-c",
            "import edgepack, sys; print(sorted(m for m in sys.modules if m.startswith(('edgepack', 'onnx'))))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert light.stdout.strip() == "['edgepack']", light.stdout
    for args in (
        ["--help"],
        ["package", "--help"],
        ["package", "--example", "cnn", "-t", "rpi-arm64", "-o", str(tmp_path / "out"), "-q"],
    ):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "edgepack", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        modules = _imported_modules(done.stderr)
        assert "edgepack.cli" in modules
        assert not heavy(modules), f"{args}: imported {sorted(heavy(modules))[:5]}"
    assert "onnxruntime" in modules, "the packaging run was measured"


class SizeAsNumber(nn.Module):
    def forward(self, x):
        return x.mean(2) * float(x.shape[1])


def test_a_size_baked_in_by_tracing_is_caught_at_a_second_size(tmp_path: Path):
    """The TorchScript tracer turns float(x.shape[1]) into the constant 8 while keeping the axis named
    dynamic: right on the example, wrong at any other length."""
    import warnings

    from edgepack.torch.verify import check_export

    x = torch.randn(2, 8, 4)
    path = tmp_path / "baked.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            SizeAsNumber(),
            (x,),
            path,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {1: "seq"}},
        )
    figures = check_export(path, SizeAsNumber(), (x,))
    example, other = figures["checks"]
    assert example["case"] == "example" and example["max_abs_error"] < 1e-5
    assert other["case"] == "seq=9" and other["shapes"] == {"x": [2, 9, 4]}
    assert other["max_abs_error"] > 0.1 and figures["max_abs_error"] == other["max_abs_error"]


def test_an_axis_the_exporter_fixes_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConversionError, match=r"asked to be dynamic \(seq\) but the exported model fixes it to 8"):
        edgepack.package(
            SizeAsNumber(),
            example_inputs=("2x8x4",),
            dynamic=["x:1=seq"],
            targets=["rpi-arm64"],
            output=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()
