"""Options checks itself: the Python API and the CLI refuse the same bad values with the same message."""

from __future__ import annotations

from pathlib import Path

import pytest

import edgepack
from edgepack.errors import UsageError
from edgepack.pipeline.job import Options

BAD = [
    ({"quantize": "int3"}, ["--quantize", "int3"], "--quantize 'int3': expected one of none, static, dynamic, fp16"),
    (
        {"quantize": "dynamic", "auto_exclude": True},
        ["--quantize", "dynamic", "--auto-exclude"],
        "--auto-exclude works with static or int4 quantization, not dynamic",
    ),
    (
        {"tune_budget": 10.0},
        ["--tune-budget", "10"],
        "--tune-budget 10: expected a number of seconds above 0, with --tune",
    ),
    ({"tune": True, "tune_budget": 0.0}, ["--tune", "--tune-budget", "0"], "--tune-budget 0: expected a number"),
    ({"tune": True, "quantize": "fp16"}, ["--tune", "--quantize", "fp16"], "--tune chooses the recipe itself"),
    ({"onefile": True}, ["--onefile"], "--onefile only applies with --freeze"),
    ({"min_accelerated_fraction": 1.5}, ["--min-accelerated-fraction", "1.5"], "expected a share between 0 and 1"),
    ({"max_partitions": -1}, ["--max-partitions", "-1"], "--max-partitions -1: expected 0 or more"),
]


@pytest.mark.parametrize("given, flags, message", BAD, ids=[" ".join(f) for _, f, _ in BAD])
def test_api_and_cli_refuse_the_same_values_alike(given, flags, message, tmp_path: Path, cli, clean_failure):
    with pytest.raises(UsageError) as raised:
        Options(output=tmp_path / "out", **given)
    assert message in str(raised.value)
    done = cli("package", "--example", "cnn", "--target", "linux-x64", "-o", tmp_path / "out", *flags)
    clean_failure(done, message)
    assert done.returncode == UsageError.exit_code


def test_the_python_api_refuses_an_unknown_recipe_before_any_work(tmp_path: Path):
    with pytest.raises(UsageError, match="expected one of none, static, dynamic, fp16"):
        edgepack.package(tmp_path / "missing.onnx", targets="linux-x64", output=tmp_path / "out", quantize="int3")
    assert not (tmp_path / "out").exists()
