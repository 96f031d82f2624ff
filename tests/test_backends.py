"""Backends own their knowledge: the coverage checker, the session entries and the provider-option rules
the shim applies on the device, checked here before a bundle is made."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from edgepack.backends import BACKENDS, checker_backend, session_entries
from edgepack.errors import ProfileError
from edgepack.profiles import builtin_profile_names, load_profile
from edgepack.runtime_shim import edgepack_shim as shim

MODEL_KINDS = [("onnx", None), ("ort", "Fixed"), ("ort", "Runtime")]
ADDED = ("session.load_model_format", "session.enable_saved_runtime_optimizations")
"""The entries the rule may add."""


@pytest.mark.parametrize("name", builtin_profile_names())
def test_the_packager_and_the_shim_add_the_same_session_entries(name):
    """The shim keeps its own copy of the rule (runtime_shim/ stands alone): from the profile's entries alone
    it sets what the packager writes, and on the packager's entries it changes nothing."""
    profile = load_profile(name)
    for model_format, style in MODEL_KINDS:
        written = session_entries(profile, model_format, style)
        model = {"format": model_format, "ort_style": style}
        for given in (profile.session.config_entries, written):
            manifest = {"model": model, "runtime": {"session_options": {"config_entries": given}}}
            applied = _config_entries(shim.session_options(ort, manifest), {*written, *ADDED})
            assert applied == written, (model_format, style)
    assert session_entries(profile, "ort", "Runtime")["session.enable_saved_runtime_optimizations"] == "1"
    assert "session.load_model_format" not in session_entries(profile, "onnx", None)


def _config_entries(options: ort.SessionOptions, keys: set[str]) -> dict[str, str]:
    """The entries among ``keys`` that ``options`` holds (onnxruntime lists none: it answers per key)."""
    found = {}
    for key in keys:
        try:
            found[key] = options.get_session_config_entry(key)
        except RuntimeError:  # "SessionOptions does not have configuration with key"
            continue
    return found


def test_every_checker_belongs_to_the_backend_that_measures_it():
    for backend in BACKENDS.values():
        if backend.checker is None:
            continue
        assert checker_backend(backend.checker) is backend
        assert type(backend).measure is not type(backend).__mro__[-2].measure, f"{backend.name} measures nothing"
    assert checker_backend("none") is None


def _jetson(tmp_path: Path, options: str, default: str | None = None) -> Path:
    source = Path(load_profile("jetson-orin-trt").source).read_text(encoding="utf-8")
    anchor = "      trt_fp16_enable: true\n"
    assert anchor in source and "  default: fp16\n" in source
    source = source.replace(anchor, anchor + "".join(f"      {line}\n" for line in options.splitlines()))
    if default:
        source = source.replace("  default: fp16\n", f"  default: {default}\n")
    path = tmp_path / "p.yaml"
    path.write_text(source, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "option",
    [
        "trt_engine_cache_path: /tmp/engines",
        "trt_timing_cache_path: /tmp/timing",
        "trt_profile_opt_shapes: image:1x3x32x32",
    ],
)
def test_options_the_shim_chooses_are_refused_with_the_reason(option, tmp_path):
    with pytest.raises(ProfileError, match=f"options.{option.split(':')[0]}': the shim"):
        load_profile(str(_jetson(tmp_path, option)))


@pytest.mark.parametrize(
    "value, default, allowed",
    [
        ("true", None, False),
        ("false", None, True),
        ("true", "dynamic", True),
        ("false", "dynamic", False),
    ],
)
def test_an_explicit_int8_switch_must_agree_with_the_default_recipe(value, default, allowed, tmp_path):
    path = _jetson(tmp_path, f"trt_int8_enable: {value}", default)
    if allowed:
        load_profile(str(path))
    else:
        with pytest.raises(ProfileError, match="trt_int8_enable: .* contradicts the default recipe"):
            load_profile(str(path))


def test_left_out_int8_follows_the_model_in_the_shim():
    """The rule the profile check mirrors, as the shim applies it."""
    for precision in ("fp32", "fp16", "int8"):
        options = shim.tensorrt_options(
            {}, inputs=[], precision=precision, model_sha256="0" * 64, cache_dir=Path("/c"), gpu="g", trt_version="10"
        )
        assert options.get("trt_int8_enable") == ("True" if precision == "int8" else None)
