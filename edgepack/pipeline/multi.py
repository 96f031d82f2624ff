"""Multi-model bundles: several models (a text detector, recognizer and classifier; an encoder and a
decoder) packaged for a target into one bundle, each with its own recipe.

    edgepack package det.onnx rec.onnx cls.onnx --name ocr --quantize rec=dynamic,det=fp16 --target all

Rules:
1. Every model is loaded once, then goes through the per-model stages of ``plan`` (check .. convert) with
   its own options (its recipe; the shapes given for inputs it has), exactly as a single-model bundle would.
2. The bundle holds every model as ``model/<name>.ort`` (or .onnx), one runtime (the bundle kind's files are
   the same for every model and are written once) and one reduced-operator config: the union over the
   models' .ort files, made by onnxruntime's own config writer.
3. One manifest: ``model`` is the first model (what a loader opens when no name is given), ``models``
   lists every model by name with its I/O, precision, session config entries and stage reports;
   ``files`` covers every file, so a loader verifies all the models before it loads any.
4. The self-test runs every model, opened by name from the finished bundle through the shim, against its
   own FP32 reference; the budget is the whole bundle's.
5. A model that fails any stage fails the target's bundle, naming the model; nothing is written for it.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle.signing import sign_checked
from ..errors import EdgepackError, UsageError
from ..fileops import atomic_folder
from ..onnxio.ort_convert import CONFIG_NAME
from ..profiles import Profile
from ..progress import about
from ..recipes.kernels import refuse_unsupported
from ..stages.budget import Budget
from ..stages.bundle import Bundle, lay_out, write_runtime
from ..stages.load import load, load_result
from ..stages.manifest import REPORT, describe, report_text
from ..stages.selftest import SelfTest
from .job import Artifact, Job, Options, Source
from .plan import plan
from .result import Result, refuse_existing_output
from .run import run_stage, source_files

__all__ = ["Member", "package_bundle", "parse_recipes", "member_name"]

Progress = Callable[[str], None]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Member:
    """One model of a multi-model bundle."""

    name: str
    """Its name in the bundle: ``model/<name>.ort``, ``run --model <name>``, ``bundle.session("<name>")``."""
    model: Path
    quantize: str | None = None
    """None: the bundle's --quantize, else the profile's default."""


def member_name(path: Path) -> str:
    return path.stem


def parse_recipes(value: str | None, names: list[str]) -> tuple[str | None, dict[str, str]]:
    """``--quantize`` for several models: ``fp16`` (all of them) or ``rec=dynamic,det=fp16`` (by name; the
    others take the profile's default). Returns (the recipe for all, recipes by model)."""
    if not value or "=" not in value:
        return value, {}
    by_name: dict[str, str] = {}
    for part in value.split(","):
        name, sep, recipe = part.partition("=")
        name, recipe = name.strip(), recipe.strip()
        if not sep or not name or not recipe:
            raise UsageError(f"--quantize {value!r}: expected NAME=RECIPE pairs separated by commas, e.g. rec=dynamic")
        if name not in names:
            raise UsageError(
                f"--quantize names model {name!r}, which this bundle does not have (it has: {', '.join(names)})"
            )
        if name in by_name:
            raise UsageError(f"--quantize gives model {name!r} twice")
        by_name[name] = recipe
    return None, by_name


def check_members(members: list[Member]) -> None:
    names = [m.name for m in members]
    if len(members) < 2:
        raise UsageError("a multi-model bundle needs two models or more")
    for m in members:
        if not _NAME.match(m.name):
            raise UsageError(
                f"model name {m.name!r}: expected letters, digits, '_', '.' or '-' (at most 64)", where=str(m.model)
            )
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise UsageError(
            f"two models of the bundle are both named {doubled[0]!r}",
            hint="rename one file, or name the models in a build file",
        )


def package_bundle(
    members: list[Member], profiles: list[Profile], options: Options, *, name: str, progress: Progress
) -> list[Result]:
    """One bundle per target holding every member; per-target failures are returned, not raised."""
    check_members(members)
    if options.sample_inputs:
        raise UsageError(
            "--sample-inputs gives one model's inputs; a multi-model bundle's self-test makes up each model's",
            hint="give sizes with --self-test-shape NAME=D0,D1,... (each applies to the models with that input)",
        )
    member_options = [_options_for(options, m) for m in members]
    for member, opts in zip(members, member_options, strict=True):
        try:
            refuse_unsupported(profiles, opts)
        except EdgepackError as exc:
            exc.message = f"model {member.name}: {exc.message}"
            raise
    inputs = tuple(m.model for m in members)
    destinations = refuse_existing_output(name, profiles, options, inputs=inputs)
    from ..executors import _signer

    unlocked = _signer(options.sign_key, options.sign_passphrase_env)
    signer = unlocked.key if unlocked else None
    results = []
    with tempfile.TemporaryDirectory(prefix="edgepack-") as scratch:
        sources = []
        for index, member in enumerate(members):
            progress(f"load {member.model} as {member.name}")
            folder = Path(scratch) / str(index) / "source"
            folder.mkdir(parents=True)
            sources.append(load(member.model, folder, member.name))
        member_options = [_for_inputs(opts, source) for opts, source in zip(member_options, sources, strict=True)]
        for profile in profiles:
            with about(profile.name):
                results.append(
                    _package_target(
                        list(zip(sources, member_options, strict=True)),
                        profile,
                        options,
                        Path(scratch) / profile.name,
                        destinations[profile.name],
                        progress,
                        signer,
                    )
                )
    if options.freeze:
        from ..bundle.freeze import freeze_result

        results = [
            freeze_result(r, p, onefile=options.onefile, force=options.force, progress=progress)
            for r, p in zip(results, profiles, strict=True)
        ]
    return results


def _options_for(options: Options, member: Member) -> Options:
    recipe = member.quantize or options.quantize
    try:
        return dataclasses.replace(options, quantize=recipe, tune=options.tune and recipe is None)
    except UsageError as exc:
        raise UsageError(f"model {member.name}: {exc}", hint=exc.hint) from None


def _for_inputs(options: Options, source: Source) -> Options:
    """The bundle's --input-shape and --self-test-shape, kept for the inputs this model has."""
    import onnx

    from ..onnxio.modelinfo import describe_io

    names = {spec["name"] for spec in describe_io(onnx.load_model(source.reference, load_external_data=False))[0]}
    return dataclasses.replace(
        options,
        input_shapes={k: v for k, v in options.input_shapes.items() if k in names},
        self_test_shapes={k: v for k, v in options.self_test_shapes.items() if k in names},
    )


def _package_target(
    members: list[tuple[Source, Options]],
    profile: Profile,
    options: Options,
    workdir: Path,
    destination: Path,
    progress: Progress,
    signing_key,
) -> Result:
    started = time.perf_counter()
    current = members[0][0].name
    try:
        inputs = [path for source, _ in members for path in source_files(source)]
        with atomic_folder(destination, force=options.force, inputs=inputs) as staging:
            jobs: list[Job] = []
            bundled: list[Artifact] = []
            for source, opts in members:
                current = source.name
                job = Job(
                    profile=profile,
                    options=opts,
                    source=source,
                    workdir=workdir / source.name,
                    staging=staging,
                    destination=destination,
                    progress=_prefixed(progress, source.name),
                    model_key=source.name,
                )
                job.workdir.mkdir(parents=True)
                job.results.append(load_result(source))
                artifact = Artifact(path=source.reference)
                for stage in _per_model(plan(profile, opts)):
                    artifact = run_stage(stage, artifact, job)
                bundled.append(lay_out(artifact, job))
                jobs.append(job)
            current = jobs[0].source.name  # what follows is the bundle's, reported under its first model
            bundle_record = write_runtime(bundled[0], jobs[0])
            if any(a.ops_config for a in bundled):
                write_union_config(bundled, jobs[0])
            for job, artifact in zip(jobs, bundled, strict=True):
                job.results.append(
                    dataclasses.replace(bundle_record, model_file=_rel(artifact, job), artifact=artifact)
                )
            written = write_bundle_manifest(bundled, jobs)
            jobs[0].say(f"manifest: {len(written['files'])} files for {len(jobs)} models")
            for job, artifact in zip(jobs, bundled, strict=True):
                current = job.source.name
                run_stage(SelfTest(), artifact, job)
            current = jobs[0].source.name
            run_stage(Budget(), bundled[0], jobs[0])  # the whole bundle's size: measured once, recorded for each
            for job in jobs[1:]:
                job.results.append(jobs[0].results[-1])
            written = write_bundle_manifest(bundled, jobs, final=True)
            signed_by = sign_checked(staging, signing_key, written, destination.name) if signing_key else None
            if signed_by:
                jobs[0].say(f"signed: model.sig, key {signed_by}")
        return Result(
            profile.name,
            destination,
            True,
            manifest=written,
            seconds=time.perf_counter() - started,
            signed_by=signed_by,
        )
    except EdgepackError as exc:
        if not exc.message.startswith(f"model {current}:"):
            exc.message = f"model {current}: {exc.message}"
        return Result(profile.name, destination, False, error=exc, seconds=time.perf_counter() - started)


def _prefixed(progress: Progress, name: str) -> Progress:
    """Progress lines of one model: ``[target] name: message``."""
    return lambda message: progress(message.replace("] ", f"] {name}: ", 1))


def _per_model(stages: list) -> list:
    """The stages each model goes through on its own: those before the bundle stage (rule 1)."""
    return stages[: next(i for i, stage in enumerate(stages) if isinstance(stage, Bundle))]


def _rel(artifact: Artifact, job: Job) -> str:
    return artifact.path.relative_to(job.staging).as_posix()


def write_union_config(bundled: list[Artifact], job: Job) -> None:
    """One reduced-operator config for every .ort of the bundle, by onnxruntime's own writer (rule 2)."""
    from ..ort_tools import load_ort_tools
    from ..stages.bundle import write_config

    load_ort_tools()
    import logging

    from onnxruntime.tools.ort_format_model import create_config_from_models

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    models = [a for a in bundled if a.format == "ort"]
    union = job.workdir / "union.config"
    create_config_from_models([a.path for a in models], union, enable_type_reduction=True)
    write_config(union, [(a.path, a.ort_style) for a in models], job)


def write_bundle_manifest(bundled: list[Artifact], jobs: list[Job], *, final: bool = False) -> dict[str, Any]:
    """The manifest of rule 3 (and with ``final``, REPORT.md): the first model's content plus ``models``."""
    from ..bundle.manifest import write_manifest

    contents = [describe(a, j) for a, j in zip(bundled, jobs, strict=True)]
    first = contents[0]
    config = CONFIG_NAME if any(a.ops_config for a in bundled) else None
    models = {
        job.source.name: {
            **dataclasses.asdict(content.model),
            "config_entries": content.runtime.session_options.config_entries,
            "stages": content.stages,
        }
        for job, content in zip(jobs, contents, strict=True)
    }
    data = dataclasses.replace(first, reduced_ops_config=config, models=models).to_dict()
    staging = jobs[0].staging
    if final:
        text = "\n\n".join(report_text(c) for c in contents)
        (staging / REPORT).write_text(text, encoding="utf-8")
        _add_models_section(staging / "README.md", contents, jobs[0])
    return write_manifest(staging, data)


def _add_models_section(readme: Path, contents: list, job: Job) -> None:
    kind = job.profile.bundle.kind
    folder = job.destination.name
    how = {
        "python": f"`python {folder}/edgepack_shim.py run inputs.npz --model NAME` (also info, bench, serve); "
        "from Python `edgepack_shim.load('.', model='NAME')`",
        "web": "`const bundle = await load(); const rec = await bundle.session('NAME');` (`load()` alone opens the first)",
        "mobile": '`EdgepackLoader.createSession(env, bundle, modelName = "NAME")` (Kotlin) or '
        '`EdgepackLoader.createSession(env: env, bundle: url, modelName: "NAME")` (Swift)',
    }[kind]
    rows = [
        f"| `{Path(c.model.file).stem}` | `{c.model.file}` | {c.model.precision} | "
        f"{', '.join(i.name for i in c.model.inputs)} | {', '.join(o.name for o in c.model.outputs)} |"
        for c in contents
    ]
    section = [
        "",
        "## The models of this bundle",
        "",
        f"This bundle holds {len(contents)} models; every file of all of them is verified before any is loaded. "
        f"Open one by name with {how}. Without a name, the first is opened (the one described above).",
        "",
        "| name | file | precision | inputs | outputs |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    readme.write_text(text.rstrip("\n") + "\n" + "\n".join(section), encoding="utf-8")
