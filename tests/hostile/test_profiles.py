"""Hostile target profiles: settings that make onnxruntime write or read outside the bundle, paths to any
file on the host, alias bombs and huge values are refused when the profile loads, with a bounded message."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from edgepack import safety
from edgepack.errors import ProfileError
from edgepack.profiles import builtin_profile_names, load_profile
from edgepack.runtime_shim import edgepack_shim
from tests.hostile.support import relu_model

TARGETS = Path(__file__).resolve().parents[2] / "targets"


def _profile(tmp_path: Path, change, base: str = "linux-x64") -> Path:
    data = yaml.safe_load((TARGETS / f"{base}.yaml").read_text())
    data = copy.deepcopy(data)
    change(data)
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _entry(key, value="x"):
    return lambda d: d.setdefault("session", {}).setdefault("config_entries", {}).update({key: value})


def _provider_option(key, value, provider=0):
    return lambda d: d["execution_providers"][provider].setdefault("options", {}).update({key: value})


def _op_list(value):
    return lambda d: d.setdefault("coverage", {}).update(checker="tensorrt", op_list=value)


REFUSED = [
    (
        "memory_stats_file",
        "linux-x64",
        _entry("session.collect_node_memory_stats_to_file", "/tmp/pwned.txt"),
        "session.collect_node_memory_stats_to_file",
    ),
    (
        "memory_stats_relative",
        "linux-x64",
        _entry("session.collect_node_memory_stats_to_file", "stats.txt"),
        "not an entry known to be safe",
    ),
    ("ep_context_file", "linux-x64", _entry("ep.context_file_path", "/tmp/ctx.onnx"), "ep.context_file_path"),
    (
        "optimized_model_file",
        "linux-x64",
        _entry("session.optimized_model_filepath", "/tmp/o.onnx"),
        "not an entry known to be safe",
    ),
    (
        "entry_value_is_a_path",
        "linux-x64",
        _entry("optimization.disable_specified_optimizers", "../../x"),
        "looks like a path",
    ),
    (
        "trt_engine_cache_path",
        "jetson-orin-trt",
        _provider_option("trt_engine_cache_path", "/etc/cron.d"),
        "trt_engine_cache_path",
    ),
    (
        "trt_timing_cache_path",
        "jetson-orin-trt",
        _provider_option("trt_timing_cache_path", "/tmp/t"),
        "trt_timing_cache_path",
    ),
    (
        "trt_calibration_table",
        "jetson-orin-trt",
        _provider_option("trt_int8_calibration_table_name", "x"),
        "trt_int8_calibration_table_name",
    ),
    (
        "trt_option_value_path",
        "jetson-orin-trt",
        _provider_option("tensorrt_version", "../../dev/zero"),
        "looks like a path",
    ),
    (
        "coreml_cache_absolute",
        "ios-coreml",
        _provider_option("ModelCacheDirectory", "/var/mobile/x"),
        "expected $CACHES/<folder name>",
    ),
    (
        "coreml_cache_escapes",
        "ios-coreml",
        _provider_option("ModelCacheDirectory", "$CACHES/../../Documents"),
        "expected $CACHES/<folder name>",
    ),
    ("unknown_provider_option", "linux-x64", _provider_option("cache_dir", "c"), "cache_dir"),
    (
        "op_list_traversal",
        "jetson-orin-trt",
        _op_list("../../../../etc/passwd"),
        "operator lists shipped with edgepack",
    ),
    ("op_list_absolute", "jetson-orin-trt", _op_list("/etc/passwd"), "operator lists shipped with edgepack"),
    ("op_list_other_data_file", "jetson-orin-trt", _op_list("../__init__.py"), "operator lists shipped with edgepack"),
    (
        "threads_1e11",
        "linux-x64",
        lambda d: d["session"].update(intra_op_num_threads=100_000_000_000),
        "expected at most 1024",
    ),
]


@pytest.mark.parametrize("base, change, says", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_hostile_profile_is_refused_when_it_loads(tmp_path, base, change, says):
    with pytest.raises(ProfileError) as caught:
        load_profile(str(_profile(tmp_path, change, base)))
    assert says in str(caught.value)


def test_a_refused_profile_is_a_usage_error_on_the_command_line_and_writes_nothing(tmp_path, cli):
    profile = _profile(tmp_path, _entry("session.collect_node_memory_stats_to_file", str(tmp_path / "stats.txt")))
    done = cli("package", relu_model(tmp_path / "m.onnx"), "-t", profile, "--quantize", "none", "-o", tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "stats.txt").exists() and not (tmp_path / "out").exists()


def test_the_coreml_cache_in_the_app_caches_is_accepted(tmp_path):
    load_profile(str(_profile(tmp_path, _provider_option("ModelCacheDirectory", "$CACHES/my-models"), "ios-coreml")))


def test_every_builtin_profile_passes_the_allow_list():
    for name in builtin_profile_names():
        load_profile(name)


def test_billion_laughs_is_refused_at_once_with_a_short_message(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\nname: *i\n")
    started = time.perf_counter()
    with pytest.raises(ProfileError, match="aliases") as caught:
        load_profile(str(path))
    assert time.perf_counter() - started < 2
    assert len(str(caught.value)) < 500


def test_a_huge_value_in_a_typed_field_gives_a_bounded_message(tmp_path):
    profile = _profile(tmp_path, lambda d: d.update(name=["x" * 100_000] * 50))
    with pytest.raises(ProfileError) as caught:
        load_profile(str(profile))
    assert len(str(caught.value)) < 500
    profile = _profile(tmp_path, lambda d: d["device"].update(arch="y" * 1_000_000))
    with pytest.raises(ProfileError) as caught:
        load_profile(str(profile))
    assert len(str(caught.value)) < 500


def test_every_option_a_backend_declares_is_on_the_allow_list():
    """Backends type their providers' options; the allow-list must not refuse what a backend accepts."""
    import dataclasses

    from edgepack.backends import BACKENDS

    for backend in BACKENDS.values():
        for provider, options in backend.options.items():
            declared = {f.name for f in dataclasses.fields(options)}
            assert declared <= safety.PROVIDER_OPTIONS.get(provider, frozenset()), (provider, declared)


def test_the_shim_holds_the_same_allow_lists():
    """The shim must stand alone, so it keeps its own copy: it must be this one."""
    assert edgepack_shim.CONFIG_ENTRIES == safety.CONFIG_ENTRIES
    assert edgepack_shim.PROVIDER_OPTIONS == safety.PROVIDER_OPTIONS
    assert edgepack_shim.CACHE_OPTION == safety.CACHE_OPTION
    assert edgepack_shim.CACHE_VALUE.pattern == safety.CACHE_VALUE.pattern
    assert (edgepack_shim.MAX_THREADS, edgepack_shim.MAX_TEXT) == (safety.MAX_THREADS, safety.MAX_TEXT)


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "../safety.py", ""])
def test_the_op_list_reader_itself_opens_only_shipped_lists(name):
    """For a Coverage built in code, not loaded from a profile."""
    from edgepack.coverage import load_op_list

    with pytest.raises(ProfileError, match="is not a list in edgepack/data"):
        load_op_list(name)
