"""Web bundles (onnxruntime-web): a static folder a web developer drops into any site.

    manifest.json   edgepack.mjs   index.html   README.md   ort/...   model/...

Rules:
1. onnxruntime-web is the npm package at the profile's pinned version, verified against the registry's
   integrity (edgepack/ortweb.py); only the files the profile lists in ``web.ort_web_files`` go to ``ort/``.
2. ``edgepack.mjs`` (the loader) and ``index.html`` (the demo page) come from ``runtime_shim/`` unchanged:
   they read everything bundle-specific from ``manifest.json`` at run time.
3. README.md says how to embed the model and which server headers it needs.
4. onnxruntime-web takes and returns tensors only: outputs that are sequences, maps or optionals (ZipMap's
   probabilities, as skl2onnx writes them) are left out of what the loader fetches, and the stage's notice
   says so; the other outputs are returned. A model with such an input, or with no tensor output at all,
   is refused before the bundle is written.
"""

from __future__ import annotations

import json
from importlib import resources
from string import Template

import onnx

from ..errors import CompatibilityError, ProfileError
from ..fileops import copy_file
from ..onnxio.modelinfo import describe_io, is_tensor
from ..pipeline.job import Artifact, Job
from ..samples import concrete_shape
from .ortweb import extract_files, fetch_tarball, open_tarball, pinned_version

LOADER = "edgepack.mjs"
DEMO = "index.html"
README_TEMPLATE = "web_README.md"

_JS_ARRAYS = {
    "float32": "Float32Array",
    "float64": "Float64Array",
    "int32": "Int32Array",
    "int64": "BigInt64Array",
    "uint8": "Uint8Array",
    "int8": "Int8Array",
    "bool": "Uint8Array",
    "float16": "Uint16Array",
    "int16": "Int16Array",
    "uint16": "Uint16Array",
    "uint32": "Uint32Array",
    "uint64": "BigUint64Array",
}


class WebBundler:
    def write(self, model: Artifact, job: Job) -> dict:
        profile = job.profile
        web = profile.web
        wasm = [name for name in web.ort_web_files if name.endswith(".wasm")]
        if web.entry not in web.ort_web_files or not web.entry.endswith(".mjs") or len(wasm) != 1:
            raise ProfileError(
                "key 'web': a web bundle needs ort_web_files with one .wasm and an entry .mjs listed in them, "
                f"found ort_web_files={web.ort_web_files}, entry={web.entry!r}",
                where=profile.source or profile.name,
            )
        inputs, outputs = describe_io(onnx.load_model(model.onnx_path, load_external_data=False))
        notice = _untensored_outputs(inputs, outputs, job)
        version = pinned_version(profile)
        if job.options.ort_web:
            ort_web = open_tarball(job.options.ort_web, profile)
        else:
            job.say(f"onnxruntime-web {version}: fetching from the npm registry unless cached")
            ort_web = fetch_tarball(version)
        files = extract_files(ort_web, web.ort_web_files, job.staging / "ort")
        shim = resources.files("edgepack.runtime_shim")
        copy_file(shim / LOADER, job.staging / LOADER)
        copy_file(shim / DEMO, job.staging / DEMO)
        (job.staging / "README.md").write_text(
            _readme(shim / README_TEMPLATE, model, inputs, outputs, job, ort_web.version), encoding="utf-8"
        )
        runtime_bytes = sum(f.stat().st_size for f in files)
        return {
            "summary": f"web bundle, onnxruntime-web {ort_web.version} ({runtime_bytes / 1e6:.1f} MB in ort/)",
            **({"notice": notice} if notice else {}),
            "ort_web": {**ort_web.to_dict(), "files": [f"ort/{f.name}" for f in files], "bytes": runtime_bytes},
            "loader": LOADER,
            "demo": DEMO,
        }


def _untensored_outputs(inputs: list[dict], outputs: list[dict], job: Job) -> str | None:
    """Rule 4: the notice for outputs onnxruntime-web cannot return, or None; refuses a model it cannot feed or
    that has no tensor output."""
    unfed = [f"{i['name']} ({i['dtype'].removesuffix('_type')})" for i in inputs if not is_tensor(i)]
    if unfed:
        raise CompatibilityError(
            f"onnxruntime-web takes tensors only, and this model takes {', '.join(unfed)}",
            where=job.profile.name,
            hint="export the model with tensor inputs, or package it for a Python target (linux-x64, rpi-arm64)",
        )
    left_out = [o for o in outputs if not is_tensor(o)]
    if not left_out:
        return None
    named = ", ".join(f"{o['name']} ({o['dtype'].removesuffix('_type')})" for o in left_out)
    if len(left_out) == len(outputs):
        raise CompatibilityError(
            f"onnxruntime-web returns tensors only, and no output of this model is one: {named}",
            where=job.profile.name,
            hint="export the model with tensor outputs (skl2onnx: options={'zipmap': False} returns the "
            "probabilities as a tensor), or package it for a Python target (linux-x64, rpi-arm64)",
        )
    kept = ", ".join(o["name"] for o in outputs if o not in left_out)
    return f"onnxruntime-web cannot return {named}: the loader's run() returns the other outputs ({kept})"


def _readme(template, model: Artifact, inputs: list[dict], outputs: list[dict], job: Job, version: str) -> str:
    feeds = []
    for spec in inputs:
        dims = concrete_shape(spec["shape"])
        count = 1
        for d in dims:
            count *= d
        if spec["dtype"] == "object":  # a string tensor: a plain array of strings
            data = f"Array({count}).fill('')"
        else:
            data = f"new {_JS_ARRAYS.get(spec['dtype'], 'Float32Array')}({count})"
        feeds.append(f"    {json.dumps(spec['name'])}: {{ data: {data}, dims: {json.dumps(dims)} }},")
    shown = ", ".join(f"outputs[{json.dumps(o['name'])}].data" for o in outputs)
    example = "\n".join(["  const outputs = await model.run({", *feeds, "  });", f"  console.log({shown});"])
    listing = [
        f"| `ort/{name}` | onnxruntime-web {version}{' (the module the loader imports)' if name == job.profile.web.entry else ''} |"
        for name in job.profile.web.ort_web_files
    ]
    model_file = model.path.relative_to(job.staging).as_posix()
    listing.append(
        f"| `{model_file}` | the model ({model.format}{', ' + model.ort_style + ' style' if model.ort_style else ''}) |"
    )
    listing += [
        f"| `{p.relative_to(job.staging).as_posix()}` | its external data |"
        for p in sorted(model.path.parent.glob(model.path.name + ".*data"))
    ]
    return Template(template.read_text(encoding="utf-8")).substitute(
        name=job.source.name,
        target=job.profile.name,
        description=job.profile.description,
        version=version,
        folder=job.destination.name,
        files="\n".join(listing),
        example=example,
        providers=", ".join(f"`{ep.name}`" for ep in job.profile.execution_providers),
    )
