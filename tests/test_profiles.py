"""Target profiles: every built-in loads; a broken profile gives one error naming file, key, expected and found."""

from __future__ import annotations

import pytest
import yaml

from edgepack.errors import ProfileError, UsageError
from edgepack.profiles import builtin_profile_names, load_profile, resolve_targets

SEED_TARGETS = {"jetson-orin-trt", "rpi-arm64", "android-nnapi", "ios-coreml", "browser-wasm"}


def test_builtin_profiles_load_and_cover_the_seed_targets():
    names = set(builtin_profile_names())
    assert SEED_TARGETS <= names
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.execution_providers
        assert profile.bundle.kind in {"python", "web", "mobile"}


def test_all_expands_to_every_builtin_profile_once():
    profiles = resolve_targets(["all", "rpi-arm64"])
    assert [p.name for p in profiles] == builtin_profile_names()


def test_unknown_target_names_the_choices():
    with pytest.raises(UsageError) as info:
        load_profile("raspberry")
    assert "rpi-arm64" in str(info.value)


def _write(tmp_path, data) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def _valid() -> dict:
    data = yaml.safe_load(open(load_profile("rpi-arm64").source))
    data["name"] = "mine"
    return data


def test_own_profile_file_loads(tmp_path):
    profile = load_profile(_write(tmp_path, _valid()))
    assert profile.name == "mine"
    assert profile.source.endswith("mine.yaml")


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["runtime"].pop("max_opset"), "missing key 'runtime.max_opset'"),
        (
            lambda d: d["runtime"].update(max_opset="twenty"),
            "key 'runtime.max_opset': expected an integer, found the string 'twenty'",
        ),
        (
            lambda d: d["ort_format"].update(style="Fast"),
            "key 'ort_format.style': expected one of 'Fixed', 'Runtime', 'none', found 'Fast'",
        ),
        (lambda d: d.update(colour="blue"), "unknown key 'colour'"),
        (lambda d: d["runtime"].update(version="latest"), "key 'runtime.version': expected a version specifier"),
        (lambda d: d.update(execution_providers=[]), "expected at least one provider"),
        (lambda d: d["accuracy"].update(min_cosine=2), "key 'accuracy.min_cosine'"),
        (
            lambda d: d.update(execution_providers="CPU"),
            "key 'execution_providers': expected a list, found the string 'CPU'",
        ),
    ],
)
def test_invalid_profile_is_one_clear_error(tmp_path, mutate, expected):
    data = _valid()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert expected in str(info.value)
    assert path in str(info.value)


def test_yaml_syntax_error_gives_line(tmp_path):
    path = _write(tmp_path, "name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML at line"):
        load_profile(path)
