"""Fleets: build files, --jobs, the bundle cache, --shard and --executor ray, on real models and a real Ray.

The reference for every executor is the sequential run (jobs=1, no cache): worker processes, Ray tasks
and cache hits must give the same bytes, file for file, signature included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgepack import cache as cache_module
from edgepack.build import load_build_file, parse_shard, select_pairs
from edgepack.bundle.manifest import verify_bundle
from edgepack.bundle.signing import generate_key, load_public_key, verify_signature
from edgepack.cache import BundleCache, bundle_key, model_digests, options_digest
from edgepack.errors import ProfileError, UsageError
from edgepack.examples import write_example
from edgepack.execution import Execution
from edgepack.pipeline.job import Options
from edgepack.pipeline.run import package_model
from edgepack.profiles import builtin_profile_names, load_profile

TARGETS = ["linux-x64", "rpi-arm64"]
ENV = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``folder``: its bytes and mode."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mode & 0o777)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def package(model: Path, out: Path, key: Path | None, **execution) -> list:
    options = Options(output=out, sign_key=key, execution=Execution(**execution))
    return package_model(model, [load_profile(t) for t in TARGETS], options)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The example CNN, a signing key, and the sequential reference bundles."""
    root = tmp_path_factory.mktemp("fleet")
    model = write_example("cnn", root)
    key = root / "release"
    generate_key(key.with_suffix(".priv"), key.with_suffix(".pub"), None)
    results = package(model, root / "sequential", key.with_suffix(".priv"))
    assert all(r.ok for r in results), [str(r.error) for r in results]
    return {
        "root": root,
        "model": model,
        "key": key.with_suffix(".priv"),
        "public": key.with_suffix(".pub"),
        "reference": tree(root / "sequential"),
    }


def test_jobs_2_gives_the_sequential_bytes(fleet, tmp_path):
    results = package(fleet["model"], tmp_path, fleet["key"], jobs=2)
    assert [r.target for r in results] == TARGETS and all(r.ok for r in results)
    assert tree(tmp_path) == fleet["reference"]


@pytest.fixture
def local_ray():
    """A real single-node Ray cluster on 127.0.0.1 (2 CPUs, no dashboard, no usage statistics), always shut down."""
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=100 * 1024 * 1024,
        log_to_driver=False,
        logging_level="ERROR",
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_tasks_give_the_sequential_bytes(fleet, tmp_path, local_ray):
    results = package(fleet["model"], tmp_path, fleet["key"], jobs=2, executor="ray")
    assert all(r.ok for r in results), [str(r.error) for r in results]
    assert {r.signed_by for r in results} == {
        verify_signature(tmp_path / f"cnn-{TARGETS[0]}", load_public_key(fleet["public"]))
    }
    assert tree(tmp_path) == fleet["reference"]
    assert local_ray.is_initialized(), "a cluster the caller started is left running"


def test_cache_hit_restores_the_same_signed_bundle(fleet, tmp_path):
    cache = tmp_path / "cache"
    first = package(fleet["model"], tmp_path / "a", fleet["key"], cache=cache)
    assert [r.cache for r in first] == ["stored", "stored"]
    second = package(fleet["model"], tmp_path / "b", fleet["key"], cache=cache)
    assert [r.cache for r in second] == ["hit", "hit"]
    assert tree(tmp_path / "b") == fleet["reference"]
    for target in TARGETS:
        assert verify_bundle(tmp_path / "b" / f"cnn-{target}").ok
        verify_signature(tmp_path / "b" / f"cnn-{target}", load_public_key(fleet["public"]))
    # unsigned is another bundle: a miss, never the signed one
    unsigned = package(fleet["model"], tmp_path / "c", None, cache=cache)
    assert [r.cache for r in unsigned] == ["stored", "stored"]
    assert not (tmp_path / "c" / f"cnn-{TARGETS[0]}" / "model.sig").exists()
    assert BundleCache(cache, 1000).info().entries == 4


def test_corrupt_entry_is_detected_and_rebuilt(fleet, tmp_path):
    cache = tmp_path / "cache"
    package(fleet["model"], tmp_path / "a", fleet["key"], cache=cache)
    entries = sorted((cache / "entries").iterdir())
    victim = next(p for p in (entries[0] / "bundle").rglob("*.ort"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    victim.write_bytes(bytes(data))
    messages: list[str] = []
    options = Options(output=tmp_path / "b", sign_key=fleet["key"], execution=Execution(cache=cache))
    results = package_model(fleet["model"], [load_profile(t) for t in TARGETS], options, progress=messages.append)
    assert sorted(r.cache for r in results) == ["hit", "stored"]
    assert any("was corrupt" in m and "changed" in m for m in messages), messages
    assert tree(tmp_path / "b") == fleet["reference"]
    assert BundleCache(cache, 1000).info().entries == 2  # the rebuilt bundle replaced the corrupt entry


def test_every_key_component_changes_the_key(fleet, tmp_path, monkeypatch):
    model, profile = model_digests(fleet["model"]), load_profile("linux-x64")
    options = Options(output=tmp_path)
    base = bundle_key(model, "cnn-linux-x64", profile, options_digest(options))
    assert base == bundle_key(model, "cnn-linux-x64", profile, options_digest(options))
    # how the build runs is not in the key
    run_only = dataclasses.replace(
        options, output=tmp_path / "elsewhere", force=True, execution=Execution(jobs=4, executor="ray", cache=tmp_path)
    )
    assert bundle_key(model, "cnn-linux-x64", profile, options_digest(run_only)) == base

    changed_model = tmp_path / "changed.onnx"
    proto = onnx.load(fleet["model"])
    proto.doc_string = "another build of the model"
    onnx.save(proto, changed_model)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input=np.zeros((1, 3, 32, 32), np.float32))
    other_calibration = tmp_path / "calib2.npz"
    np.savez(other_calibration, input=np.ones((1, 3, 32, 32), np.float32))
    static = dataclasses.replace(options, quantize="static", calibration=str(calibration))
    keys = {
        "model": bundle_key(model_digests(changed_model), "cnn-linux-x64", profile, options_digest(options)),
        "name": bundle_key(model, "other-linux-x64", profile, options_digest(options)),
        "profile": bundle_key(
            model,
            "cnn-linux-x64",
            dataclasses.replace(profile, budget=dataclasses.replace(profile.budget, max_bundle_mb=1.0)),
            options_digest(options),
        ),
        "options": bundle_key(
            model, "cnn-linux-x64", profile, options_digest(dataclasses.replace(options, quantize="dynamic"))
        ),
        "calibration": bundle_key(model, "cnn-linux-x64", profile, options_digest(static)),
        "calibration data": bundle_key(
            model,
            "cnn-linux-x64",
            profile,
            options_digest(dataclasses.replace(static, calibration=str(other_calibration))),
        ),
        "signing key": bundle_key(model, "cnn-linux-x64", profile, options_digest(options), signer="ab" * 32),
        "other signing key": bundle_key(model, "cnn-linux-x64", profile, options_digest(options), signer="cd" * 32),
    }
    tools = cache_module.tool_versions()
    assert {"edgepack", "edgepack-files", "onnx", "onnxruntime", "onnx-ir", "python"} <= set(tools)
    for package_name in ("onnxruntime", "onnx", "onnx-ir", "edgepack", "edgepack-files"):
        other = {**tools, package_name: "0.0.0-other"}
        monkeypatch.setattr(cache_module, "tool_versions", lambda other=other: other)
        keys[package_name] = bundle_key(model, "cnn-linux-x64", profile, options_digest(options))
    monkeypatch.undo()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    keys["SOURCE_DATE_EPOCH"] = bundle_key(model, "cnn-linux-x64", profile, options_digest(options))
    monkeypatch.undo()
    assert len(set(keys.values()) | {base}) == len(keys) + 1, keys
    assert bundle_key(model, "cnn-linux-x64", profile, options_digest(options)) == base


def test_external_data_is_part_of_the_key(tmp_path):
    model = onnx.load(write_example("cnn", tmp_path))
    external = tmp_path / "ext" / "m.onnx"
    external.parent.mkdir()
    onnx.save_model(model, external, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    profile, options = load_profile("linux-x64"), Options()
    before = bundle_key(model_digests(external), "m-linux-x64", profile, options_digest(options))
    side = external.with_name("m.onnx.data")
    data = bytearray(side.read_bytes())
    data[0] ^= 1
    side.write_bytes(bytes(data))
    assert list(model_digests(external)) == ["m.onnx", "m.onnx.data"]
    assert bundle_key(model_digests(external), "m-linux-x64", profile, options_digest(options)) != before
    memo = BundleCache(tmp_path / "cache", 100)
    assert memo.model_files(external) == model_digests(external)
    assert memo.model_files(external) == model_digests(external)  # from the remembered names this time
    assert memo.model_files(tmp_path / "ext" / "m.onnx.data") is None  # not a model: the load stage says why


def test_lru_eviction_keeps_the_recently_used(tmp_path):
    bundles = []
    for i in range(3):
        folder = tmp_path / f"b{i}"
        folder.mkdir()
        (folder / "model.bin").write_bytes(bytes([i]) * 400_000)
        bundles.append(folder)
    cache = BundleCache(tmp_path / "cache", max_mb=1.0)
    cache.store("a" * 64, bundles[0])
    cache.store("b" * 64, bundles[1])
    os.utime(cache.root / "entries" / ("a" * 64) / "entry.json", (1, 1))  # a: used long ago
    os.utime(cache.root / "entries" / ("b" * 64) / "entry.json")
    cache.store("c" * 64, bundles[2])  # 1.2 MB > 1 MB: the least recently used goes
    assert sorted(p.name[0] for p in (cache.root / "entries").iterdir()) == ["b", "c"]
    assert cache.info().bytes == 800_000
    assert cache.clear() == 2 and cache.info().entries == 0


def write_build_file(folder: Path, text: str) -> Path:
    path = folder / "edgepack.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "text, needles",
    [
        ("models: [{model: a.onnx, colour: red}]\ntargets: [linux-x64]\n", ["unknown key models[0].'colour'"]),
        (
            "models: [{model: a.onnx, quantize: int5}]\ntargets: [linux-x64]\n",
            ["'models[0].quantize'", "static", "int4", "q4f16", "found 'int5'"],
        ),
        ("models: [{name: x}]\ntargets: [linux-x64]\n", ["'models[0]'", "either 'model'", "found neither"]),
        (
            "models: [{model: a.onnx, input_shapes: {x: five}}]\ntargets: [linux-x64]\n",
            ["models[0].input_shapes.", "'x'", "expected a list", "the string 'five'"],
        ),
        (
            "models: [{model: a.onnx}, {model: b/a.onnx}]\ntargets: [linux-x64]\n",
            ["'models[1].name'", "'a'", "models[0]"],
        ),
        ("models: [{model: a.onnx}]\n", ["'models[0].targets'", "at least one target"]),
        ("models: []\ntargets: [linux-x64]\n", ["'models'", "at least one model"]),
        ("targets: [linux-x64]\n", ["missing key 'models'"]),
        ("schema: edgepack.build/9\nmodels: [{model: a.onnx}]\n", ["'schema'", "edgepack.build/1"]),
        ("models: [{model: a.onnx\n", ["not valid YAML"]),
    ],
)
def test_build_file_errors_name_file_key_expected_found(tmp_path, text, needles):
    path = write_build_file(tmp_path, text)
    with pytest.raises(ProfileError) as caught:
        load_build_file(path)
    message = str(caught.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message


def test_shards_split_the_pairs_deterministically(tmp_path):
    path = write_build_file(
        tmp_path, "targets: [all]\nmodels:\n" + "".join(f"  - {{model: m{i}.onnx}}\n" for i in range(5))
    )
    build = load_build_file(path)
    every = [(p.entry.model, p.profile.name) for p in select_pairs(build)]
    assert len(every) == 5 * len(builtin_profile_names())
    parts = [[(p.entry.model, p.profile.name) for p in select_pairs(build, shard=(i, 3))] for i in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(every) and sum(map(len, parts)) == len(every)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts[1] == [(p.entry.model, p.profile.name) for p in select_pairs(load_build_file(path), shard=(2, 3))]
    only = select_pairs(build, models=["m3"], targets=["rpi-arm64,linux-x64"])
    assert [(p.entry.model, p.profile.name) for p in only] == [("m3.onnx", "linux-x64"), ("m3.onnx", "rpi-arm64")]
    for bad in ("0/3", "4/3", "1of3", "1/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)
    with pytest.raises(UsageError, match="no such model"):
        select_pairs(build, models=["m9"])


def build_cli(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgepack", "build", *map(str, args)],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_failing_pairs_do_not_stop_the_others(tmp_path, clean_failure):
    write_example("cnn", tmp_path)
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    tiny = (
        (Path(__file__).parent.parent / "targets" / "linux-x64.yaml")
        .read_text()
        .replace("name: linux-x64", "name: tiny")
    )
    tiny = tiny.replace("max_bundle_mb:", "max_bundle_mb: 0.001 #")
    (tmp_path / "tiny.yaml").write_text(tiny)
    path = write_build_file(
        tmp_path, "targets: [linux-x64, tiny.yaml]\nmodels:\n  - {model: broken.onnx}\n  - {model: cnn.onnx}\n"
    )
    done = build_cli(path, "--json", "--jobs", "2", "--no-cache", cwd=tmp_path)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 3, err  # the first failure's code: the unreadable model
    assert "Traceback" not in err
    summary = json.loads(out)
    outcome = {(r["name"], r["target"]): (r["ok"], r.get("error", {}).get("type")) for r in summary["results"]}
    assert outcome == {
        ("broken", "linux-x64"): (False, "ModelError"),
        ("broken", "tiny"): (False, "ModelError"),
        ("cnn", "linux-x64"): (True, None),
        ("cnn", "tiny"): (False, "BudgetError"),
    }
    assert verify_bundle(tmp_path / "build" / "cnn-linux-x64").ok
    assert not (tmp_path / "build" / "cnn-tiny").exists()


def test_two_concurrent_builds_share_one_cache(tmp_path):
    """Two runners, one cache folder, started together: both finish, every entry verifies, the second pass hits."""
    for name in ("cnn", "transformer"):
        write_example(name, tmp_path)
    path = write_build_file(tmp_path, "targets: [linux-x64]\nmodels: [{model: cnn.onnx}, {model: transformer.onnx}]\n")
    cache = tmp_path / "shared-cache"
    runners = [
        build_cli(path, "--json", "--jobs", "1", "--cache-dir", cache, "-o", tmp_path / f"out{i}", cwd=tmp_path)
        for i in (1, 2)
    ]
    outputs = [r.communicate(timeout=600) for r in runners]
    for runner, (_, err) in zip(runners, outputs, strict=True):
        assert runner.returncode == 0, err
    assert tree(tmp_path / "out1") == tree(tmp_path / "out2")
    entries = list((cache / "entries").iterdir())
    assert len(entries) == 2 and not list((cache / "tmp").iterdir())
    for entry in entries:
        assert verify_bundle(entry / "bundle").ok
    again = build_cli(path, "--json", "--cache-dir", cache, "-o", tmp_path / "out3", cwd=tmp_path)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert json.loads(out)["cache"] == {"hit": 2, "stored": 0}
    assert tree(tmp_path / "out3") == tree(tmp_path / "out1")
    info = subprocess.run(
        [sys.executable, "-m", "edgepack", "cache", "info", "--json", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert json.loads(info.stdout)["entries"] == 2
    shutil.rmtree(tmp_path / "out3")


def test_targets_with_the_same_input_share_one_optimize_step(tmp_path, monkeypatch):
    """pipeline.shared: three dynamic-shape targets of one model optimize it once, and record the same steps."""
    from edgepack.stages import optimize

    calls = []
    real = optimize.run_ir_passes

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(optimize, "run_ir_passes", counted)
    model = write_example("cnn", tmp_path)
    targets = ["linux-x64", "rpi-arm64", "android-xnnpack"]
    results = package_model(model, [load_profile(t) for t in targets], Options(output=tmp_path / "out"))
    assert all(r.ok for r in results), [str(r.error) for r in results]
    assert len(calls) == 1, calls
    steps = [next(s for s in r.manifest["stages"] if s["stage"] == "optimize") for r in results]
    assert steps[0]["steps"] and all(s == steps[0] for s in steps), steps


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_worker_killed_mid_pair_costs_nothing_its_pair_runs_again_alone(tmp_path):
    """A worker dies of a signal, as of a native crash in onnxruntime: the pool breaks, the pairs it held run
    again each in a fresh worker, every target ships and no staging folder is left behind."""
    import signal
    import time

    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "edgepack",
        "package",
        "--example",
        "transformer",
        "-t",
        "all",
        "-o",
        str(out),
        "-j",
        "2",
    ]
    cli = subprocess.Popen(
        [*command, "--json", "--no-cache"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline and cli.poll() is None:
        workers = [w for server in _children(cli.pid) for w in _children(server)]  # the fork server's children
        if workers:
            time.sleep(1.0)  # into its first pair
            with contextlib.suppress(ProcessLookupError):
                os.kill(workers[0], signal.SIGSEGV)
                killed = workers[0]
        time.sleep(0.05)
    stdout, stderr = cli.communicate(timeout=600)
    assert killed is not None, "no worker was seen"
    results = json.loads(stdout)["results"]
    assert cli.returncode == 0, [r["error"] for r in results if not r["ok"]]
    assert len(results) == len(builtin_profile_names()) and all(r["ok"] for r in results), results
    assert not list(out.glob(".*.partial")), list(out.iterdir())
