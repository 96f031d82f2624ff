"""The pipeline's contract: the order of the stages, when each applies, that every result reaches the
manifest, and that every recipe and plug-in a profile names is registered."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from edgepack.backends import backend_of
from edgepack.bundle import bundler_for
from edgepack.coverage import load_op_list
from edgepack.errors import ProfileError
from edgepack.pipeline.job import Job, Options, Source
from edgepack.pipeline.plan import plan
from edgepack.pipeline.run import package_model
from edgepack.pipeline.stage import StageResult
from edgepack.profiles import builtin_profile_names, load_profile
from edgepack.recipes import RECIPES, variants

ORDER = [
    "check",
    "fix_shapes",
    "optimize",
    "quantize",
    "coverage",
    "convert",
    "bundle",
    "manifest",
    "self_test",
    "budget",
]
SKIPPED = {  # the stages each built-in profile does not need
    "android-nnapi": set(),
    "android-xnnpack": {"fix_shapes"},
    "ios-coreml": set(),
    "jetson-orin-trt": {"fix_shapes"},
    "browser-webgpu": {"fix_shapes"},
    "browser-wasm": {"fix_shapes", "coverage"},
    "linux-x64": {"fix_shapes", "coverage"},
    "rpi-arm64": {"fix_shapes", "coverage"},
}


def _job(name: str, tmp_path: Path, **options) -> Job:
    return Job(
        profile=load_profile(name),
        options=Options(output=tmp_path, **options),
        workdir=tmp_path,
        source=Source(name="m", path=tmp_path / "m.onnx", reference=tmp_path / "m.onnx", info={}),
        staging=tmp_path,
        destination=tmp_path,
    )


@pytest.mark.parametrize("name", builtin_profile_names())
def test_every_profile_runs_the_stages_in_one_order(name, tmp_path):
    assert [s.name for s in plan(load_profile(name), Options(output=tmp_path))] == ORDER


@pytest.mark.parametrize("name", builtin_profile_names())
def test_which_stages_apply_is_decided_by_the_profile(name, tmp_path):
    job = _job(name, tmp_path)
    skipped = {s.name for s in plan(job.profile, job.options) if not s.applies(job)}
    assert skipped == SKIPPED[name]


def test_the_table_above_covers_every_builtin_profile():
    assert set(SKIPPED) == set(builtin_profile_names())


def test_tune_is_a_search_inside_the_quantize_stage(tmp_path):
    stages = plan(load_profile("linux-x64"), Options(output=tmp_path, tune=True))
    assert [s.name for s in stages] == ORDER
    assert next(s for s in stages if s.name == "quantize").tune


def _result_classes() -> list[type[StageResult]]:
    found, pending = [], list(StageResult.__subclasses__())
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending += cls.__subclasses__()
    return sorted(found, key=lambda c: c.stage)


def test_every_stage_has_a_result_class_with_a_summary():
    classes = _result_classes()
    assert {c.stage for c in classes} == {"load", *ORDER}
    for cls in classes:
        names = [f.name for f in dataclasses.fields(cls)]
        assert "summary" in names, cls.__name__


@pytest.mark.parametrize("cls", _result_classes(), ids=lambda c: c.__name__)
def test_every_result_field_reaches_the_record(cls):
    """Every field but the artifact is written into the manifest's entry for the stage."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name == "artifact":
            continue
        values[f.name] = {f"{f.name}_key": 1} if f.metadata.get("flatten") else f"{f.name}-value"
    record = cls(**values).record()
    assert record["stage"] == cls.stage
    for name, value in values.items():
        if isinstance(value, dict):
            assert record[f"{name}_key"] == 1
        else:
            assert record[name] == value, name


def test_a_real_manifest_holds_one_record_per_stage_with_declared_keys_only(examples, tmp_path):
    (result,) = package_model(examples["cnn"], [load_profile("android-nnapi")], Options(output=tmp_path))
    assert result.ok, result.error
    records = result.manifest["stages"]
    assert [r["stage"] for r in records] == ["load", *ORDER]
    by_stage = {c.stage: c for c in _result_classes()}
    for record in records:
        cls = by_stage[record["stage"]]
        declared = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("flatten")} | {"stage"}
        if not any(f.metadata.get("flatten") for f in dataclasses.fields(cls)):
            assert set(record) <= declared, (record["stage"], set(record) - declared)


@pytest.mark.parametrize("name", builtin_profile_names())
def test_every_recipe_and_plugin_a_profile_names_is_registered(name):
    profile = load_profile(name)
    quantization = profile.quantization
    assert quantization.default in RECIPES
    assert quantization.without_calibration == "refuse" or quantization.without_calibration in RECIPES
    assert set(quantization.tune_candidates) <= set(variants())
    for recipe_name, recipe in RECIPES.items():
        if recipe.settings:
            assert isinstance(quantization.settings(recipe_name), recipe.settings)
    if profile.coverage.op_list:
        assert load_op_list(profile.coverage.op_list)[0], profile.coverage.op_list
    assert bundler_for(profile.bundle.kind) is not None


def test_every_registered_recipe_declares_its_interface():
    for name, recipe in RECIPES.items():
        assert recipe.precision in ("fp32", "int8", "fp16", "int4", "q4f16")
        assert recipe.name == name and recipe.description
        assert recipe.variants, f"{name} has no --tune candidate"
        if recipe.settings:
            assert dataclasses.is_dataclass(recipe.settings)
            assert type(recipe).apply is not type(recipe).__mro__[-2].apply, f"{name} writes no model"
    assert typing.get_type_hints(Options)["quantize"] == (str | None)


@pytest.mark.parametrize("name", builtin_profile_names())
def test_every_provider_a_profile_names_has_a_backend(name):
    profile = load_profile(name)
    backends = [backend_of(ep.name) for ep in profile.execution_providers]
    assert all(backends), [ep.name for ep, b in zip(profile.execution_providers, backends) if b is None]
    if profile.coverage.checker != "none":
        assert profile.coverage.checker in {b.checker for b in backends if b}


@pytest.mark.parametrize(
    "change, message",
    [
        ("trt_fp16_enable: true", "trt_fp16_enabled: true"),
        ("batch: [1, 1, 8]", "batch: [4, 1, 8]"),
        ("name: CUDAExecutionProvider", "name: CudaExecutionProvider"),
        ("checker: tensorrt", "checker: coreml"),
    ],
    ids=["unknown option", "dim range", "unknown provider", "checker of another backend"],
)
def test_a_wrong_provider_setting_fails_when_the_profile_loads(change, message, tmp_path):
    """Found on the packaging host, not by the shim on the device."""
    source = Path(load_profile("jetson-orin-trt").source).read_text(encoding="utf-8")
    assert change in source
    path = tmp_path / "p.yaml"
    path.write_text(source.replace(change, message), encoding="utf-8")
    with pytest.raises(ProfileError):
        load_profile(str(path))


def test_a_stage_error_names_the_users_model_not_a_working_copy(tmp_path):
    import tempfile

    from edgepack.errors import ConversionError
    from edgepack.pipeline.run import run_stage
    from edgepack.pipeline.stage import Stage

    copy = f"{tempfile.gettempdir()}/edgepack-abc123/0/source/1-LiftConstantsToInitializersPass/reference.onnx"

    class Failing(Stage):
        name = "coverage"

        def run(self, artifact, job):
            raise ConversionError(f"{copy}: the check could not run", where=copy, hint=f"look at {copy}, then retry")

    job = _job("linux-x64", tmp_path)
    with pytest.raises(ConversionError) as raised:
        run_stage(Failing(), None, job)
    user = str(tmp_path / "m.onnx")
    assert raised.value.where == user and raised.value.stage == "coverage"
    assert (
        raised.value.message == f"{user}: the check could not run"
        and raised.value.hint == f"look at {user}, then retry"
    )
