"""Mobile bundles (Android NNAPI or XNNPACK, iOS CoreML): the .ort model, its reduced-operator config and what an app needs.

Rules:
1. The profile's ``mobile`` section is the only source of package coordinates and build arguments; its
   ``onnxruntime_version`` must satisfy ``runtime.version`` and be at least the onnxruntime that wrote
   the .ort (an older runtime may not read it).
2. ``session_options.json`` holds what the app's session needs: threads, optimization level, config
   entries (ORT format, saved runtime optimizations) and the providers with their options, in order.
3. The loader (Kotlin or Swift, from ``runtime_shim/mobile``) verifies every file's SHA-256 against
   ``manifest.json`` before it creates the session.
4. ``BUILD.md`` gives the exact build.py command line for a reduced-size onnxruntime from the bundle's
   config, and the Gradle / CocoaPods / Swift Package Manager coordinates. A profile's build argument that
   would leave out a domain the config needs (``--disable_ml_ops`` for an ai.onnx.ml classifier,
   ``--disable_contrib_ops`` for com.microsoft ops) is dropped from the command, and BUILD.md says why.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Collection
from importlib import metadata, resources

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..backends import session_entries
from ..errors import ProfileError
from ..fileops import copy_file
from ..onnxio.ort_convert import CONFIG_NAME
from ..pipeline.job import Artifact, Job
from ..profiles import Mobile

__all__ = ["MobileBundler", "SESSION_OPTIONS", "LOADERS"]

SESSION_OPTIONS = "session_options.json"
LOADERS = {
    "kotlin": ["EdgepackVerifier.kt", "EdgepackSignature.kt", "EdgepackLoader.kt"],
    "swift": ["EdgepackLoader.swift"],
}


class MobileBundler:
    def write(self, model: Artifact, job: Job) -> dict:
        profile = job.profile
        mobile = profile.mobile
        if mobile is None:
            raise ProfileError(
                "bundle.kind is mobile but the profile has no 'mobile' section",
                where=profile.source,
                hint="add mobile: {loader, onnxruntime_version, gradle or cocoapods, build_args}",
            )
        version = _app_runtime_version(job, mobile)
        settings = session_options(model, job)
        (job.staging / SESSION_OPTIONS).write_text(
            json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        loader_dir = job.staging / "loader"
        loader_dir.mkdir()
        for name in LOADERS[mobile.loader]:
            copy_file(resources.files("edgepack.runtime_shim") / "mobile" / name, loader_dir / name)
        coordinates = package_coordinates(mobile)
        config = job.staging / CONFIG_NAME
        domains = config_domains(config.read_text(encoding="utf-8")) if config.is_file() else set()
        build, dropped = build_command(mobile, domains)
        (job.staging / "BUILD.md").write_text(_build_text(job, mobile, coordinates, build, dropped), encoding="utf-8")
        (job.staging / "README.md").write_text(_readme_text(job, mobile, coordinates), encoding="utf-8")
        return {
            "summary": f"{mobile.loader} loader, onnxruntime {version}",
            "loader": [f"loader/{n}" for n in LOADERS[mobile.loader]],
            "session_options": SESSION_OPTIONS,
            "onnxruntime_version": version,
            "coordinates": coordinates,
            "reduced_build_command": build,
        }


def session_options(model: Artifact, job: Job) -> dict:
    profile = job.profile
    entries = session_entries(profile, model.format, model.ort_style)
    return {
        "model": f"model/{model.path.name}",
        "intra_op_num_threads": profile.session.intra_op_num_threads,
        "graph_optimization_level": profile.session.graph_optimization_level,
        "config_entries": entries,
        "execution_providers": [{"name": ep.name, "options": ep.options} for ep in profile.execution_providers],
    }


def package_coordinates(mobile: Mobile) -> dict[str, str]:
    version = mobile.onnxruntime_version
    found = {}
    if mobile.gradle:
        found["gradle"] = f'implementation("{mobile.gradle}:{version}")'
    if mobile.cocoapods:
        found["cocoapods"] = f"pod '{mobile.cocoapods}', '{version}'"
    if mobile.swiftpm_url:
        found["swiftpm"] = (
            f'.package(url: "{mobile.swiftpm_url}", exact: "{version}")  // product: "{mobile.swiftpm_product}"'
        )
    return found


DOMAIN_FLAGS = {"ai.onnx.ml": "--disable_ml_ops", "com.microsoft": "--disable_contrib_ops"}
"""build.py flags that leave a domain's kernels out of the build (rule 4)."""


def config_domains(text: str) -> set[str]:
    """The op domains a reduced-operator config lists (its lines are ``domain;opset;op,op,...``)."""
    return {line.split(";", 1)[0] for line in text.splitlines() if line and not line.startswith("#") and ";" in line}


def build_command(mobile: Mobile, domains: Collection[str] = ()) -> tuple[str, dict[str, str]]:
    """The build.py command line, run from an onnxruntime checkout at the app's version, bundle config included,
    and the profile's flags left out because the config needs their domain (flag -> domain)."""
    dropped = {flag: domain for domain, flag in DOMAIN_FLAGS.items() if domain in domains and flag in mobile.build_args}
    args = [
        "python",
        "tools/ci_build/build.py",
        "--build_dir",
        "build/edgepack-reduced",
        *(a for a in mobile.build_args if a not in dropped),
        "--include_ops_by_config",
        f"<bundle>/{CONFIG_NAME}",
        "--enable_reduced_operator_type_support",
    ]
    return " ".join(a if a.startswith(("$", "<")) else shlex.quote(a) for a in args), dropped


def _app_runtime_version(job: Job, mobile: Mobile) -> str:
    profile = job.profile
    version = mobile.onnxruntime_version
    if Version(version) not in SpecifierSet(profile.runtime.version):
        raise ProfileError(
            f"mobile.onnxruntime_version {version} does not satisfy runtime.version {profile.runtime.version}",
            where=profile.source,
        )
    writer = metadata.version("onnxruntime")
    if Version(version).release[:2] < Version(writer).release[:2]:
        raise ProfileError(
            f"the .ort model is written by onnxruntime {writer}, but the app would link onnxruntime {version}, "
            "which may not read it",
            where=profile.source,
            hint=f"set mobile.onnxruntime_version to {writer} or later",
        )
    return version


def _build_text(job: Job, mobile: Mobile, coordinates: dict[str, str], build: str, dropped: dict[str, str]) -> str:
    lines = [f"# onnxruntime {mobile.onnxruntime_version} for {job.profile.name}", "", "## The full package", ""]
    names = {
        "gradle": "Gradle (app/build.gradle.kts)",
        "cocoapods": "CocoaPods (Podfile)",
        "swiftpm": "Swift Package Manager (Package.swift)",
    }
    for kind, line in coordinates.items():
        lines += [f"{names[kind]}:", "", "```", line, "```", ""]
    lines += [
        "## A reduced-size onnxruntime",
        "",
        f"`{CONFIG_NAME}` lists the operators and types of this bundle's model, taken from the .ort file",
        "itself. Build an onnxruntime that holds only those kernels, from a checkout of onnxruntime at tag",
        f"v{mobile.onnxruntime_version} (`<bundle>` is this folder; `$...` are your SDK paths):",
        "",
        "```",
        build,
        "```",
        "",
        "`--minimal_build extended` is needed for the runtime optimizations saved in the .ort and for the",
        "NNAPI/CoreML providers. A model packaged later with other operators needs a new build.",
        "",
    ]
    lines += [
        f"The profile's `{flag}` is left out: the model uses {domain} operators, which it would remove.\n"
        for flag, domain in dropped.items()
    ]
    return "\n".join(lines)


def _readme_text(job: Job, mobile: Mobile, coordinates: dict[str, str]) -> str:
    files = ", ".join(f"`loader/{n}`" for n in LOADERS[mobile.loader])
    return "\n".join(
        [
            f"# {job.source.name} for {job.profile.name}",
            "",
            f"{job.profile.description}.",
            "",
            f"- `model/`: the model in ORT format; `{SESSION_OPTIONS}`: the session settings the app must use",
            f"- {files}: load the bundle, verifying every file's SHA-256 against `manifest.json` first",
            f"- `{CONFIG_NAME}` and `BUILD.md`: build a reduced-size onnxruntime for this model",
            "",
            "Link onnxruntime " + mobile.onnxruntime_version + ": " + "; ".join(f"`{c}`" for c in coordinates.values()),
            "",
        ]
    )
