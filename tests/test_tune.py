"""--tune: the faster of two clearly different candidates wins, a candidate that fails the gate never ships,
the budget bounds the time, and a target whose CPU is not this machine's falls back to the profile's
default with the reason. Real models, real onnxruntime sessions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgepack.examples import write_example
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import load_profile
from edgepack.recipes.search import Candidate, choose, host_arch, select, time_round_robin

WIDTH = 256


def _model(path: Path, *, factor: float = 2.0, heavy_layers: int = 0) -> Path:
    """y = factor * x for x[1, WIDTH]; with ``heavy_layers``, plus 0 x (a chain of that many 256x256 MatMul+Tanh
    layers on x): the same outputs, many times the work (onnxruntime does not fold a multiplication by zero)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Mul", ["x", "factor"], ["scaled"])]
    inits = [numpy_helper.from_array(np.array(factor, np.float32), "factor")]
    if heavy_layers:
        h = "x"
        for i in range(heavy_layers):
            inits.append(
                numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / 16).astype(np.float32), f"w{i}")
            )
            nodes += [
                helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]),
                helper.make_node("Tanh", [f"m{i}"], [f"h{i}"]),
            ]
            h = f"h{i}"
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
        nodes += [
            helper.make_node("ReduceSum", [h], ["s"], keepdims=1),
            helper.make_node("Mul", ["s", "zero"], ["nothing"]),
            helper.make_node("Add", ["scaled", "nothing"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["scaled"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


FEEDS = [{"x": np.random.default_rng(i).standard_normal((1, WIDTH)).astype(np.float32)} for i in range(4)]
GATE = {"min_cosine": 0.9999, "max_abs_error": 1e-3}


def _select(candidates: list[Candidate], reference: Path, *, budget: float = 30.0, max_rounds: int = 15):
    return select(
        candidates,
        reference,
        FEEDS,
        _session,
        lambda c: GATE,
        deadline=time.perf_counter() + budget,
        budget=budget,
        max_rounds=max_rounds,
    )


def test_the_faster_of_two_clearly_different_candidates_wins_whatever_the_order(tmp_path: Path):
    fast = _model(tmp_path / "fast.onnx")
    slow = _model(tmp_path / "slow.onnx", heavy_layers=200)
    for order in ((fast, slow), (slow, fast)):
        # the slow one is the smaller: only its speed can make the fast one win
        candidates = [Candidate(name=p.stem, model=p, bytes=1 if p == slow else 10**9) for p in order]
        winner, _ = _select(candidates, fast)
        assert winner is not None and winner.name == "fast"
        times = {c.name: c.median for c in candidates}
        assert times["slow"] > 5 * times["fast"], times
        assert all(c.passed and len(c.latencies) >= 5 for c in candidates)


def test_a_candidate_failing_the_gate_is_never_timed_nor_shipped(tmp_path: Path):
    reference = _model(tmp_path / "reference.onnx")
    wrong = _model(tmp_path / "wrong.onnx", factor=2.1)  # fastest and smallest, 5% off
    slow = _model(tmp_path / "slow.onnx", heavy_layers=50)
    candidates = [Candidate(name="wrong", model=wrong, bytes=1), Candidate(name="slow", model=slow, bytes=10**9)]
    winner, _ = _select(candidates, reference)
    assert winner.name == "slow"
    assert candidates[0].misses and "max abs error" in candidates[0].misses[0]
    assert candidates[0].latencies == []
    candidates[0].latencies = [1e-9]  # even with a time, choose() passes over a failed gate
    assert choose(candidates).name == "slow"


def test_timing_stops_when_the_budget_is_spent(tmp_path: Path):
    slow = _model(tmp_path / "slow.onnx", heavy_layers=200)
    fast = _model(tmp_path / "fast.onnx")
    candidates = [Candidate(name="slow", model=slow), Candidate(name="fast", model=fast)]
    sessions = {"slow": _session(slow), "fast": _session(fast)}
    for c in candidates:
        c.figures = {"cosine": 1.0}
    started = time.perf_counter()
    notes = time_round_robin(candidates, sessions, FEEDS[0], deadline=started + 1.0, budget=1.0, max_rounds=10**6)
    elapsed = time.perf_counter() - started
    round_time = sum(c.median for c in candidates)
    assert elapsed < 1.0 + 2 * round_time + 0.5, elapsed
    assert notes and "budget of 1 s was spent" in notes[0]
    assert len(candidates[1].latencies) < 10**6


# --- through the pipeline ---------------------------------------------------------------------


def _profile(tmp_path: Path, name: str, arch: str, extra: str = "") -> object:
    text = Path(load_profile("linux-x64").source).read_text()
    text = text.replace("name: linux-x64", f"name: {name}").replace("arch: x86_64", f"arch: {arch}")
    text = text.replace("intra_op_num_threads: 0 ", "intra_op_num_threads: 1 ") + extra
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return load_profile(str(path))


def _quantize_report(manifest: dict) -> dict:
    return next(r for r in manifest["stages"] if r["stage"] == "quantize")


def test_tune_on_this_host_records_every_candidate_and_ships_the_fastest_that_passed(tmp_path: Path):
    source = write_example("cnn", tmp_path)
    profile = _profile(tmp_path, "host", host_arch())
    (result,) = package_model(
        source, [profile], Options(output=tmp_path / "out", calibration="random", tune=True, tune_budget=120)
    )
    assert result.ok, result.error
    tune = _quantize_report(result.manifest)["tune"]
    assert tune["timed"] and tune["threads"] == 1
    rows = {c["name"]: c for c in tune["candidates"]}
    assert set(rows) == {"fp32", "dynamic_u8", "dynamic_s8", "static_u8s8", "static_s8s8", "fp16"}
    for row in rows.values():
        assert row["gate"] in ("passed", "failed") and row["bytes"] > 0 and "cosine" in row["accuracy"]
        if row["gate"] == "passed":
            assert row["runs"] >= 5 and 0 < row["median_ms"] <= row["p90_ms"]
    winner = rows[tune["winner"]]
    assert winner["gate"] == "passed"
    fastest = min(r["median_ms"] for r in rows.values() if "median_ms" in r)
    assert winner["median_ms"] <= fastest * 1.03 + 2e-4  # the manifest rounds to 0.1 us
    assert tune["why"].startswith(tune["winner"])
    expected = {"fp32": "fp32", "fp16": "fp16"}.get(tune["winner"], "int8")
    assert result.manifest["model"]["precision"] == expected
    selftest = next(r for r in result.manifest["stages"] if r["stage"] == "self_test")
    assert selftest["summary"].startswith("passed")


def test_candidates_failing_the_gate_are_recorded_and_fp32_ships(tmp_path: Path):
    source = write_example("cnn", tmp_path)
    profile = _profile(tmp_path, "strict", host_arch())
    # no quantized or FP16 candidate comes this close
    text = (
        Path(profile.source)
        .read_text()
        .replace("    min_top1_agreement: 0.98\n", "    min_top1_agreement: 0.98\n    max_abs_error: 1.0e-7\n")
    )
    Path(profile.source).write_text(text)
    profile = load_profile(profile.source)
    (result,) = package_model(source, [profile], Options(output=tmp_path / "out", tune=True, tune_budget=120))
    assert result.ok, result.error
    tune = _quantize_report(result.manifest)["tune"]
    assert tune["winner"] == "fp32"
    rows = {c["name"]: c for c in tune["candidates"]}
    assert {n for n, r in rows.items() if r["gate"] == "failed"} == {"dynamic_u8", "dynamic_s8", "fp16"}
    assert all("median_ms" not in r and r["gate_misses"] for n, r in rows.items() if n != "fp32")
    assert any("static_u8s8 not built: static quantization needs --calibration" in n for n in tune["notes"])
    assert "failed the gate or did not run: dynamic_u8, dynamic_s8, fp16" in tune["why"]
    assert result.manifest["model"]["precision"] == "fp32"


def test_a_small_budget_cuts_tuning_short_and_says_so(tmp_path: Path):
    source = write_example("cnn", tmp_path)
    profile = _profile(tmp_path, "hurried", host_arch())
    started = time.perf_counter()
    (result,) = package_model(
        source, [profile], Options(output=tmp_path / "out", calibration="random", tune=True, tune_budget=0.5)
    )
    assert result.ok, result.error
    tune = _quantize_report(result.manifest)["tune"]
    assert tune["seconds"] < 0.5 + 10  # one candidate built (conversion in a child process) and a few rounds
    assert any("budget of 0.5 s was spent" in n for n in tune["notes"])
    assert "budget of 0.5 s was spent" in _quantize_report(result.manifest)["notice"]
    assert len(tune["candidates"]) < 6
    assert time.perf_counter() - started < 60


def test_a_foreign_cpu_is_not_timed_and_the_profile_default_is_used(tmp_path: Path, cli):
    source = write_example("cnn", tmp_path)
    foreign = {"x86_64": "arm64"}.get(host_arch(), "x86_64")
    profile = _profile(tmp_path, "elsewhere", foreign)
    done = cli("package", source, "--target", profile.source, "--tune", "-o", tmp_path / "out", "--json")
    assert done.returncode == 0, done.stderr
    (entry,) = json.loads(done.stdout)["results"]
    notice = " ".join(entry["notices"])
    assert f"its CPU is {foreign} and this machine is {host_arch()}" in notice
    assert "say nothing about the device" in notice and "benchmarks/quantization.py" in notice
    manifest = json.loads((Path(entry["bundle"]) / "manifest.json").read_text())
    report = _quantize_report(manifest)
    assert report["tune"]["timed"] is False and "candidates" not in report["tune"]
    assert report["recipe"] == "dynamic"  # the profile's default static, without calibration: its fallback
    assert report["tune"]["default_evidence"] == profile.quantization.default_evidence


def test_every_builtin_profile_a_host_cannot_time_documents_its_default():
    from edgepack.profiles import builtin_profile_names

    for name in builtin_profile_names():
        profile = load_profile(name)
        assert (
            "measured" in profile.quantization.default_evidence
            or "benchmarks/" in profile.quantization.default_evidence
        ), name


def test_tune_and_quantize_together_is_a_usage_error(tmp_path: Path, cli, clean_failure):
    source = write_example("cnn", tmp_path)
    done = cli("package", source, "--target", "linux-x64", "--tune", "--quantize", "dynamic", "-o", tmp_path / "out")
    clean_failure(done, "--tune chooses the recipe itself")
    assert done.returncode == 2 and not (tmp_path / "out" / "cnn-linux-x64").exists()


def test_an_already_quantized_model_is_kept_as_it_is(tmp_path: Path):
    from edgepack.recipes.dynamic import DynamicSettings
    from edgepack.recipes.quantize import quantize_model

    quantized = quantize_model(
        write_example("cnn", tmp_path),
        tmp_path / "q" / "cnnq.onnx",
        "dynamic",
        DynamicSettings(op_types=["Conv", "MatMul"]),
    ).path
    (result,) = package_model(
        quantized, [_profile(tmp_path, "host", host_arch())], Options(output=tmp_path / "out", tune=True)
    )
    assert result.ok, result.error
    report = _quantize_report(result.manifest)
    assert report["recipe"] == "none" and report["tune"]["timed"] is False
    assert "already quantized" in report["tune"]["reason"]


def test_a_budget_without_tune_or_below_zero_is_a_usage_error(tmp_path: Path, cli, clean_failure):
    source = write_example("cnn", tmp_path)
    for flags in (["--tune-budget", "10"], ["--tune", "--tune-budget", "0"]):
        done = cli("package", source, "--target", "linux-x64", *flags, "-o", tmp_path / "out")
        clean_failure(done, "--tune-budget")
        assert done.returncode == 2
