"""Run an edgepack bundle on the device: verify its checksums, then load and run its model.

Needs only the Python standard library, numpy and onnxruntime. Usage:

    python edgepack_shim.py verify
    python edgepack_shim.py run inputs.npz -o outputs.npz

or from Python:

    import edgepack_shim
    model = edgepack_shim.load("path/to/bundle")
    outputs = model.run({"input": x})
"""

from __future__ import annotations

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before onnxruntime is imported: no telemetry file on the device

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
SCHEMA = "edgepack.manifest/1"
HERE = Path(__file__).resolve().parent


class ShimError(Exception):
    """A problem with the bundle or the inputs, stated for the person at the device."""


def read_manifest(bundle: Path) -> dict:
    try:
        manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShimError(f"{bundle}: cannot read {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or not isinstance(manifest.get("files"), dict):
        raise ShimError(f"{bundle}: {MANIFEST} is not an edgepack manifest ({SCHEMA})")
    return manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(bundle: Path, manifest: dict) -> None:
    """Refuse a bundle whose files differ from the manifest: changed, missing or extra."""
    problems = []
    expected = manifest["files"]
    for rel, entry in sorted(expected.items()):
        path = bundle / rel
        if not path.is_file() or path.is_symlink():
            problems.append(f"missing: {rel}")
        elif path.stat().st_size != entry.get("size") or sha256_of(path) != entry.get("sha256"):
            problems.append(f"changed: {rel}")
    for dirpath, _, filenames in os.walk(bundle):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(bundle).as_posix()
            if rel != MANIFEST and rel not in expected and "__pycache__" not in rel:
                problems.append(f"extra: {rel}")
    if problems:
        raise ShimError(f"{bundle}: bundle does not match its manifest:\n  " + "\n  ".join(problems))


class Model:
    def __init__(self, bundle: Path, manifest: dict, session):
        self.bundle = bundle
        self.manifest = manifest
        self.session = session
        self.inputs = manifest["model"]["inputs"]
        self.outputs = manifest["model"]["outputs"]
        self.providers = session.get_providers()

    def run(self, feeds: dict) -> dict:
        names = [o["name"] for o in self.outputs]
        arrays = self.session.run(names, {k: np.asarray(v) for k, v in feeds.items()})
        return dict(zip(names, arrays))


def load(bundle=HERE, *, providers=None, verify_files: bool = True) -> Model:
    import onnxruntime as ort

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if verify_files:
        verify(bundle, manifest)
    runtime = manifest["runtime"]
    settings = runtime["session_options"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(settings.get("intra_op_num_threads", 0))
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[settings.get("graph_optimization_level", "all")]
    for key, value in settings.get("config_entries", {}).items():
        options.add_session_config_entry(key, str(value))
    if providers is None:
        available = set(ort.get_available_providers())
        providers = [p["name"] for p in runtime["execution_providers"] if p["name"] in available] or ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(bundle / manifest["model"]["file"]), options, providers=providers)
    return Model(bundle, manifest, session)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(HERE), help="bundle folder (default: the folder of this file)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="check every file's checksum against the manifest")
    run = sub.add_parser("run", help="run the model on inputs from an .npz (or .npy for one input)")
    run.add_argument("inputs")
    run.add_argument("-o", "--output", default="outputs.npz")
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    try:
        if args.command == "verify":
            manifest = read_manifest(bundle)
            verify(bundle, manifest)
            print(f"ok: {len(manifest['files'])} files match the manifest")
            return 0
        model = load(bundle)
        data = np.load(args.inputs)
        feeds = dict(data) if hasattr(data, "files") else {model.inputs[0]["name"]: data}
        outputs = model.run(feeds)
        np.savez(args.output, **outputs)
        print(f"wrote {args.output}")
        return 0
    except ShimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
