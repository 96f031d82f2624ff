"""The ``edgepack`` command line. Errors become one message and an exit code; ``--debug`` shows tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import __version__
from . import progress as steps
from .build import add_execution_flags
from .errors import EdgepackError, UsageError
from .recipes import RECIPES

EPILOG = """\
examples:
  edgepack targets                                   list the built-in target profiles
  edgepack package --example cnn --target all        package the built-in example CNN for every target
  edgepack package model.onnx --target rpi-arm64     package your model for a Raspberry Pi
  edgepack package model.onnx --target my.yaml       ...for a target described in your own profile
  edgepack package mypkg.models:build_model --example-input 2x3x224x224 --dynamic input:0=batch --target all
                                                     export a PyTorch module (pip install 'edgepack[torch]')
  edgepack package model.pt2 --target rpi-arm64      ...or a torch.export program saved with torch.export.save
  edgepack package model.onnx --target rpi-arm64 --quantize static --calibration calib/
                                                     static INT8 calibrated on your data (.npz files)
  edgepack package det.onnx rec.onnx --name ocr --quantize rec=dynamic --target all
                                                     one bundle per target holding both models (shim: run --model rec)
  edgepack verify build/model-rpi-arm64              check every file of a bundle against its manifest
  edgepack keygen keys/release                       new P-256 signing key: keys/release.priv, keys/release.pub
  edgepack package model.onnx --target rpi-arm64 --sign-key keys/release.priv
                                                     ...and sign the bundle (model.sig, OpenSSF model-signing format)
  edgepack verify build/model-rpi-arm64 --public-key keys/release.pub
                                                     ...check its files and its signature
  edgepack inspect model.onnx                        IR, opsets, ops, inputs/outputs, external data
  edgepack report build                              compare the bundles in build/ (report.html, report.md)
  edgepack serve build/model-browser-wasm            try a web bundle at http://127.0.0.1:8000/
  edgepack build edgepack.yaml --jobs 2              every model of a build file for its targets, two at a time
  edgepack build edgepack.yaml --shard 2/4           ...the second quarter of the pairs (a CI matrix sharing a cache)
  edgepack cache info                                where the bundle cache is, how many bundles, how big

exit codes: 0 ok, 1 internal error, 2 usage or profile error, 3 unreadable model, 4 model needs a newer
runtime, 5 conversion failed, 6 accuracy or size budget missed, 7 bundle verification failed,
8 --freeze failed or must run on the device (the bundle itself is ready),
9 a download failed.
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except EdgepackError as exc:
        if args.debug:
            raise
        _error(str(exc))
        return _failed(args, type(exc).__name__, exc.message, exc.exit_code, where=exc.where, hint=exc.hint)
    except KeyboardInterrupt:
        _error("interrupted")
        return _failed(args, "KeyboardInterrupt", "interrupted", 130)
    except OSError as exc:  # a path the system refuses (too long, no permission, a file where a folder must be)
        if args.debug:
            raise
        hint = "check the paths given on the command line"
        _error(f"{exc.filename or 'a file'}: {exc.strerror or exc}\n  hint: {hint}")
        return _failed(args, "OSError", str(exc.strerror or exc), 2, where=exc.filename, hint=hint)
    except Exception as exc:  # a bug in edgepack or a library: still one clear line unless --debug
        if args.debug:
            raise
        hint = "rerun with --debug and report the traceback"
        _error(f"internal error: {type(exc).__name__}: {exc}\n  hint: {hint}")
        return _failed(args, "InternalError", f"{type(exc).__name__}: {exc}", 1, hint=hint)


def _failed(args, kind: str, message: str, code: int, *, where=None, hint=None) -> int:
    """With --json, the error that stopped the command before it had results, on stdout as JSON too."""
    if getattr(args, "json", False):
        error = {"type": kind, "message": message, "exit_code": code, "where": where, "hint": hint}
        _print_json({"ok": False, "error": {k: v for k, v in error.items() if v is not None}})
    return code


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and tool logs")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    # the same flags after the command: SUPPRESS keeps a subcommand from resetting what was given before it
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and tool logs")
    after.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print machine-readable JSON on stdout"
    )

    parser = argparse.ArgumentParser(
        prog="edgepack",
        description="Turn one ONNX model into verified deployment bundles for edge and browser targets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"edgepack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    targets = sub.add_parser("targets", parents=[after], help="list the built-in target profiles")
    targets.set_defaults(handler=_cmd_targets)

    package = sub.add_parser(
        "package",
        parents=[after],
        help="package a model for one or more targets",
        description="Load, check, optimize, quantize, convert to ORT format, bundle, checksum and self-test "
        "a model for each target. Each bundle is written to OUTPUT/<model>-<target>; a failed target leaves nothing.",
    )
    package.add_argument(
        "model",
        nargs="*",
        type=Path,
        help="the .onnx file (side files next to it), a PyTorch pkg.module:factory, or a .pt2 program; "
        "several .onnx files make one multi-model bundle per target (with --name)",
    )
    package.add_argument(
        "--name",
        help="the bundle's name (OUTPUT/<name>-<target>; default: the model file's stem); required with several models",
    )
    package.add_argument("--example", choices=_example_names(), help="package a built-in example model instead")
    package.add_argument(
        "-t",
        "--target",
        action="append",
        required=True,
        metavar="TARGET",
        help="built-in profile name, 'all', or a path to a profile .yaml (repeatable, or comma-separated)",
    )
    package.add_argument("-o", "--output", type=Path, default=Path("build"), help="output folder (default: build/)")
    package.add_argument(
        "--force",
        action="store_true",
        help="replace existing bundles (only folders edgepack wrote, holding no file of yours)",
    )
    package.add_argument(
        "--sample-inputs",
        type=Path,
        metavar="NPZ",
        help="inputs for the self-test (.npz of named arrays, or .npy for one input)",
    )
    package.add_argument(
        "--self-test-shape",
        action="append",
        metavar="NAME=D0,D1,...",
        help="shape of an input for the inputs edgepack makes up to test the bundle, when the model "
        "needs particular sizes (repeatable), e.g. image=1,3,640,640",
    )
    package.add_argument(
        "--quantize",
        metavar="RECIPE",
        help=f"quantization recipe: {', '.join(RECIPES)} (default: the profile's); with several models, one "
        "recipe for all or NAME=RECIPE pairs, e.g. rec=dynamic,det=fp16 (the others take the profile's)",
    )
    package.add_argument(
        "--calibration",
        metavar="PATH|random",
        help="calibration data for static quantization: an .npy per input, an .npz of named arrays, "
        "a folder of .npz samples, or 'random' (a smoke test, marked in the manifest)",
    )
    package.add_argument(
        "--calibration-method",
        choices=["minmax", "entropy", "percentile"],
        help="how static quantization picks ranges (default: the profile's)",
    )
    package.add_argument(
        "--validation",
        type=Path,
        metavar="PATH",
        help="inputs for the quantization accuracy gate (default: held-out calibration samples, else generated inputs)",
    )
    package.add_argument(
        "--auto-exclude",
        action="store_true",
        help="take the nodes most hurt by quantization out of the recipe until the accuracy gate passes, as few as "
        "it needs (static: in float; int4: in dynamic INT8)",
    )
    package.add_argument(
        "--tune",
        action="store_true",
        help="choose the recipe by measurement: build FP32, dynamic and (with --calibration) static "
        "INT8 candidates, gate each on accuracy, time them as they ship and keep the fastest "
        "(only when the target's CPU is this machine's; otherwise the profile's default)",
    )
    package.add_argument(
        "--tune-budget",
        type=float,
        metavar="SECONDS",
        help="with --tune: time limit for building and timing candidates (default: 300)",
    )
    package.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    _add_shape_flags(package)
    package.add_argument(
        "--min-accelerated-fraction",
        type=float,
        metavar="F",
        help="coverage gate: least share of nodes on the accelerator, 0..1 (default: the profile's)",
    )
    package.add_argument(
        "--max-partitions",
        type=int,
        metavar="N",
        help="coverage gate: most accelerator partitions (default: the profile's)",
    )
    package.add_argument(
        "--freeze",
        action="store_true",
        help="also build a standalone executable of the shim beside each python bundle "
        "(<bundle>.frozen/, PyInstaller onedir, from a runtime-only environment)",
    )
    package.add_argument(
        "--onefile", action="store_true", help="with --freeze: one self-extracting file (slower start)"
    )
    package.add_argument(
        "--ort-web",
        type=Path,
        metavar="TGZ",
        help="onnxruntime-web npm tarball for web bundles, for offline use (default: fetched from the npm registry and cached)",
    )
    package.add_argument(
        "--example-input",
        action="append",
        metavar="SHAPE[:DTYPE]",
        help="PyTorch models: the example shape of each forward() argument, in order "
        "(repeatable), e.g. 2x3x224x224 or 2x128:int64",
    )
    package.add_argument(
        "--dynamic",
        action="append",
        metavar="INPUT:AXIS=NAME",
        help="PyTorch models: make an axis dynamic, e.g. input:0=batch (input by forward() name "
        "or index; repeatable); its example size must be at least 2",
    )
    package.add_argument(
        "--sign-key",
        type=Path,
        metavar="PEM",
        help="sign every bundle with this P-256 private key (model.sig, OpenSSF model-signing format)",
    )
    package.add_argument(
        "--sign-passphrase-env",
        metavar="VAR",
        help="with --sign-key: the environment variable holding the key's passphrase",
    )
    package.add_argument(
        "--pin-key",
        type=Path,
        metavar="PEM",
        help="pin this P-256 public key beside the shim of python bundles: the shim then refuses "
        "bundles not signed with it",
    )
    add_execution_flags(package)
    package.set_defaults(handler=_cmd_package)

    build = sub.add_parser(
        "build",
        parents=[after],
        help="package every model of a build file (edgepack.yaml) for its targets",
        description="Package every (model, target) pair a build file lists, in worker processes or on Ray, "
        "restoring unchanged bundles from the cache. Every pair is reported; the exit code is non-zero when one failed.",
    )
    build.add_argument("file", type=Path, help="the build file (schema edgepack.build/1, see README)")
    build.add_argument("-t", "--target", action="append", metavar="TARGET", help="only these targets (repeatable)")
    build.add_argument("-m", "--model", action="append", metavar="NAME", help="only these models (repeatable)")
    build.add_argument("--shard", metavar="I/N", help="only the I-th of N deterministic parts of the pairs")
    build.add_argument("-o", "--output", type=Path, help="output folder (default: the file's 'output')")
    build.add_argument("--force", action="store_true", help="replace existing bundles")
    build.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    build.add_argument(
        "--ort-web", type=Path, metavar="TGZ", help="onnxruntime-web npm tarball for web bundles (offline)"
    )
    build.add_argument("--sign-key", type=Path, metavar="PEM", help="sign every bundle with this P-256 private key")
    build.add_argument(
        "--sign-passphrase-env", metavar="VAR", help="with --sign-key: the variable holding its passphrase"
    )
    add_execution_flags(build)
    build.set_defaults(handler=_cmd_build)

    cache = sub.add_parser("cache", parents=[after], help="the bundle cache: info, or clear it")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="the cache folder (default: $EDGEPACK_BUNDLE_CACHE, else ~/.cache/edgepack/bundles)",
    )
    cache.set_defaults(handler=_cmd_cache)

    verify = sub.add_parser(
        "verify", parents=[after], help="check a bundle's files against its manifest (and its signature)"
    )
    verify.add_argument("bundle", type=Path)
    verify.add_argument(
        "--public-key",
        type=Path,
        metavar="PEM",
        help="also require model.sig signed with this P-256 public key over every file",
    )
    verify.set_defaults(handler=_cmd_verify)

    keygen = sub.add_parser(
        "keygen",
        parents=[after],
        help="create a P-256 key pair for signing bundles",
        description="Write NAME.priv (PEM PKCS#8, mode 0600, encrypted with --passphrase-env) and "
        "NAME.pub (PEM). Existing files are never overwritten.",
    )
    keygen.add_argument("name", type=Path, metavar="NAME")
    keygen.add_argument("--passphrase-env", metavar="VAR", help="encrypt the private key with the passphrase in VAR")
    keygen.set_defaults(handler=_cmd_keygen)

    sign = sub.add_parser(
        "sign",
        parents=[after],
        help="sign an existing bundle (writes model.sig)",
        description="Verify BUNDLE against its manifest, then write model.sig over every file "
        "(OpenSSF model-signing format, ECDSA P-256). Nothing else in the bundle changes.",
    )
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True, metavar="PEM", help="P-256 private key")
    sign.add_argument("--passphrase-env", metavar="VAR", help="the environment variable holding the key's passphrase")
    sign.set_defaults(handler=_cmd_sign)

    inspect = sub.add_parser("inspect", parents=[after], help="describe an ONNX model")
    inspect.add_argument("model", type=Path)
    inspect.add_argument(
        "-t",
        "--target",
        metavar="TARGET",
        help="also report the target accelerator's coverage, before and after fixing shapes",
    )
    _add_shape_flags(inspect)
    inspect.set_defaults(handler=_cmd_inspect)

    report = sub.add_parser(
        "report",
        parents=[after],
        help="compare the bundles of a build folder in report.html and report.md",
        description="Write BUILD_DIR/report.html (one self-contained page with charts) and "
        "BUILD_DIR/report.md comparing every bundle in BUILD_DIR from its manifest: sizes, accuracy "
        "against FP32, accelerator coverage, --tune candidates, notices, checksums and tool versions. "
        "package writes it by itself when it packages several targets.",
    )
    report.add_argument("build_dir", type=Path, metavar="BUILD_DIR")
    report.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    report.set_defaults(handler=_cmd_report)

    serve = sub.add_parser(
        "serve",
        parents=[after],
        help="serve a web bundle on 127.0.0.1 with the headers it needs",
        description="Serve BUNDLE on 127.0.0.1 with JavaScript/WebAssembly MIME types and the COOP/COEP "
        "headers that let onnxruntime-web use threads. For trying a bundle locally, not for production.",
    )
    serve.add_argument("bundle", type=Path)
    serve.add_argument("-p", "--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    serve.set_defaults(handler=_cmd_serve)
    return parser


def _add_shape_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=D0,D1,...",
        help="fixed shape of an input for targets that need fixed shapes (repeatable), e.g. image=1,3,224,224",
    )
    parser.add_argument(
        "--fix-dim",
        action="append",
        metavar="NAME=VALUE",
        help="value of a named dynamic dim (dim_param) for targets that need fixed shapes (repeatable)",
    )


def _example_names() -> list[str]:
    return ["cnn", "transformer"]


def _cmd_targets(args) -> int:
    from .profiles import builtin_profile_names, load_profile

    profiles = [load_profile(name) for name in builtin_profile_names()]
    if args.json:
        _print_json([p.to_dict() for p in profiles])
        return 0
    rows = [("TARGET", "KIND", "ARCH", "RUNTIME", "PROVIDERS", "ORT STYLE", "QUANTIZE")]
    rows += [
        (
            p.name,
            p.bundle.kind,
            p.device.arch,
            f"{p.runtime.package}{p.runtime.version}",
            ",".join(ep.name.replace("ExecutionProvider", "") for ep in p.execution_providers),
            f"{p.ort_format.style}/{p.ort_format.platform}",
            p.quantization.default,
        )
        for p in profiles
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _cmd_package(args) -> int:
    from .api import package_source
    from .build import execution_from_args
    from .flags import parse_fixed_dims, parse_input_shapes
    from .pipeline.job import Options
    from .profiles import resolve_targets

    if bool(args.model) == (args.example is not None):
        raise UsageError(
            "give either a model file or --example NAME", hint="e.g. edgepack package --example cnn --target all"
        )
    members = _members(args) if len(args.model) > 1 else None
    profiles = resolve_targets(args.target)
    options = Options(
        output=args.output,
        force=args.force,
        sample_inputs=args.sample_inputs,
        quantize=None if members else args.quantize,
        freeze=args.freeze,
        onefile=args.onefile,
        ort_web=args.ort_web,
        calibration=args.calibration,
        calibration_method=args.calibration_method,
        validation=args.validation,
        auto_exclude=args.auto_exclude,
        tune=args.tune,
        tune_budget=args.tune_budget,
        input_shapes=parse_input_shapes(args.input_shape),
        self_test_shapes=parse_input_shapes(args.self_test_shape, flag="--self-test-shape"),
        fixed_dims=parse_fixed_dims(args.fix_dim),
        min_accelerated_fraction=args.min_accelerated_fraction,
        max_partitions=args.max_partitions,
        sign_key=args.sign_key,
        sign_passphrase_env=args.sign_passphrase_env,
        pin_key=args.pin_key,
        execution=execution_from_args(args),
    )
    if args.pin_key:
        from .bundle.signing import load_public_key

        load_public_key(args.pin_key)  # before any work: a wrong file (a private key!) is refused at once
    progress = (
        (lambda message: None) if (args.quiet or args.json) else (lambda message: print(message, file=sys.stderr))
    )
    with (
        tempfile.TemporaryDirectory(prefix="edgepack-example-") as scratch,
        steps.shown(steps.mode_for(sys.stderr, quiet=args.quiet or args.json)),
    ):
        if args.example:
            from .examples import write_example

            model, name = write_example(args.example, Path(scratch)), args.name or args.example
            options = _with_example_shapes(options, args.example)
        else:
            model, name = args.model[0], args.name
        if members:
            from .api import package_several

            results = package_several(members, profiles, options, name=args.name, progress=progress)
        else:
            results = package_source(
                model,
                profiles,
                options,
                name=name,
                example_inputs=args.example_input,
                dynamic=args.dynamic,
                progress=progress,
            )
    if args.json:
        _print_json({"results": [r.to_dict() for r in results], "ok": all(r.ok for r in results)})
    else:
        built = [r for r in results if r.ok]
        shared = set.intersection(*(set(r.notices) for r in built)) if len(built) > 1 else set()
        for r in results:
            if r.ok:
                assert r.manifest is not None  # every written bundle has its manifest
                size = sum(f["size"] for f in r.manifest["files"].values())
                cached = "  cached" if r.cache == "hit" else ""
                print(f"ok      {r.target:<16} {r.bundle}  ({size / 1e6:.2f} MB, {r.seconds:.1f} s){cached}")
                if r.frozen:
                    print(
                        f"        {'':<16} {r.frozen['executable']}  ({r.frozen['mode']}, {r.frozen['bytes'] / 1e6:.0f} MB)"
                    )
                if r.signed_by:
                    print(f"        {'':<16} signed: model.sig, key {r.signed_by}")
                for notice in r.notices:
                    if notice not in shared:
                        print(f"        notice: {notice}")
            else:
                print(f"FAILED  {r.target:<16} (see the error below)")
        for notice in [n for n in built[0].notices if n in shared] if shared else []:
            print(f"notice (every bundle above): {notice}")
    for r in results:
        if r.error and not args.json:
            _error(f"[{r.target}] {r.error.stage + ' stage: ' if r.error.stage else ''}{r.error}")
    failed = [r.error for r in results if r.error]
    return failed[0].exit_code if failed else 0


def _members(args):
    """The models of a multi-model bundle (edgepack/pipeline/multi.py), each with its recipe from --quantize."""
    from .pipeline.multi import Member, member_name, parse_recipes

    if not args.name:
        raise UsageError(
            f"{len(args.model)} models make one bundle per target, which needs a name",
            hint="add --name NAME, e.g. --name ocr",
        )
    if args.example_input or args.dynamic:
        raise UsageError(
            "a multi-model bundle takes .onnx files; --example-input and --dynamic are for one PyTorch model"
        )
    names = [member_name(path) for path in args.model]
    for_all, by_name = parse_recipes(args.quantize, names)
    return [Member(n, path, by_name.get(n, for_all)) for n, path in zip(names, args.model, strict=True)]


def _cmd_build(args) -> int:
    from .build import execution_from_args, load_build_file, parse_shard, run_build, select_pairs
    from .pipeline.job import Options

    if args.sign_passphrase_env and not args.sign_key:
        raise UsageError("--sign-passphrase-env only applies with --sign-key")
    build = load_build_file(args.file)
    shard = parse_shard(args.shard) if args.shard else None
    pairs = select_pairs(build, models=args.model, targets=args.target, shard=shard)
    output = args.output or Path(build.source).parent / build.output
    options = Options(
        output=output,
        force=args.force,
        ort_web=args.ort_web,
        sign_key=args.sign_key,
        sign_passphrase_env=args.sign_passphrase_env,
        execution=execution_from_args(args),
    )
    progress = (
        (lambda message: None) if (args.quiet or args.json) else (lambda message: print(message, file=sys.stderr))
    )
    with steps.shown(steps.mode_for(sys.stderr, quiet=args.quiet or args.json)):
        done = run_build(build, pairs, options, progress=progress)
        if len(done) > 1 and any(r.ok for _, r in done):
            from .api import fresh_bundles
            from .report import write_report

            written = write_report(output, fresh=fresh_bundles([r for _, r in done], output))
            progress(f"report: {written.html} and {written.markdown.name} ({len(written.bundles)} bundles)")
    failed = [r for _, r in done if not r.ok]
    if args.json:
        _print_json(
            {
                "results": [{**r.to_dict(), "name": name} for name, r in done],
                "ok": not failed,
                "pairs": len(done),
                "shard": args.shard,
                "cache": {kind: sum(r.cache == kind for _, r in done) for kind in ("hit", "stored")},
            }
        )
    else:
        for name, r in done:
            if r.ok:
                size = sum(f["size"] for f in r.manifest["files"].values())
                cached = "  cached" if r.cache == "hit" else ""
                print(f"ok      {name:<16} {r.target:<16} {r.bundle}  ({size / 1e6:.2f} MB, {r.seconds:.1f} s){cached}")
            else:
                print(f"FAILED  {name:<16} {r.target:<16} (see the error below)")
        for name, r in done:
            if r.error:
                _error(f"[{name} {r.target}] {r.error.stage + ' stage: ' if r.error.stage else ''}{r.error}")
        if not done:
            print("no (model, target) pairs selected")
    return failed[0].error.exit_code if failed else 0


def _cmd_cache(args) -> int:
    from .cache import BundleCache
    from .execution import DEFAULT_CACHE_MAX_MB, default_cache_dir

    folder = args.cache_dir or default_cache_dir()
    if folder is None:
        raise UsageError("the bundle cache is off ($EDGEPACK_BUNDLE_CACHE=off)", hint="give --cache-dir DIR")
    cache = BundleCache(folder, DEFAULT_CACHE_MAX_MB)
    if args.action == "clear":
        removed = cache.clear()
        if args.json:
            _print_json({"path": str(cache.root), "removed": removed})
        else:
            print(f"removed {removed} bundle(s) from {cache.root}")
        return 0
    info = cache.info()
    if args.json:
        _print_json(info.to_dict())
    else:
        print(f"{info.path}: {info.entries} bundle(s), {info.bytes / 1e6:.1f} MB")
    return 0


def _with_example_shapes(options, example: str):
    """The example's documented input shapes for fixed-shape targets, unless the user gave some."""
    import dataclasses

    from .examples import EXAMPLE_SHAPES

    shapes = {**EXAMPLE_SHAPES.get(example, {}), **options.input_shapes}
    return dataclasses.replace(options, input_shapes=shapes)


def _cmd_verify(args) -> int:
    from .bundle.manifest import verify_bundle
    from .bundle.signing import load_public_key, verify_signature

    signed_by = verify_signature(args.bundle, load_public_key(args.public_key)) if args.public_key else None
    with steps.shown(steps.mode_for(sys.stderr, quiet=args.json)):
        result = verify_bundle(args.bundle, every_digest=True)
    if args.json:
        _print_json({**result.to_dict(), "signed_by": signed_by})
    elif result.ok:
        unchecked = " (model.sig not checked: give --public-key)" if (args.bundle / "model.sig").is_file() else ""
        print(
            f"ok: {result.checked} files of {args.bundle} match its manifest"
            + (f", signed by key {signed_by}" if signed_by else unchecked)
        )
    else:
        for kind in ("missing", "extra", "changed"):
            for rel in getattr(result, kind):
                print(f"{kind}: {rel}")
    if not result.ok:
        _error(
            f"{args.bundle}: {len(result.missing)} missing, {len(result.extra)} extra, "
            f"{len(result.changed)} changed file(s)"
        )
        return 7
    return 0


def _cmd_keygen(args) -> int:
    from .bundle.signing import generate_key

    passphrase = None
    if args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env)
        if not passphrase:
            raise UsageError(
                f"the environment variable {args.passphrase_env} is not set or empty",
                hint=f"export {args.passphrase_env}=... with the passphrase to encrypt the key with",
            )
    private, public = args.name.with_name(args.name.name + ".priv"), args.name.with_name(args.name.name + ".pub")
    key_id = generate_key(private, public, passphrase)
    if args.json:
        _print_json(
            {
                "private_key": str(private),
                "public_key": str(public),
                "fingerprint": key_id,
                "encrypted": passphrase is not None,
            }
        )
    else:
        print(
            f"private key: {private} ({'encrypted, ' if passphrase else ''}mode 0600: keep it out of bundles and repositories)"
        )
        print(f"public key:  {public}")
        print(f"fingerprint: {key_id}")
    return 0


def _cmd_sign(args) -> int:
    from .bundle.signing import load_private_key, sign_bundle

    signed = sign_bundle(args.bundle, load_private_key(args.key, args.passphrase_env))
    if args.json:
        _print_json(
            {
                "bundle": str(args.bundle),
                "signature": str(signed.signature),
                "fingerprint": signed.fingerprint,
                "files": signed.files,
            }
        )
    else:
        print(f"signed: {signed.signature} over {signed.files} files, key {signed.fingerprint}")
    return 0


def _cmd_inspect(args) -> int:
    from .onnxio.modelinfo import format_shape, summarize
    from .stages.load import parse_model

    info = summarize(parse_model(args.model), args.model)
    if args.target:
        info["coverage"] = _inspect_coverage(args)
    if args.json:
        _print_json(info)
        return 0
    print(
        f"{info['file']}: IR {info['ir_version']}, opsets {_fmt_opsets(info['opsets'])}, producer {info['producer'] or '?'}"
    )
    size = info["size_bytes"] + info["external_data"]["bytes"]
    ext = info["external_data"]
    print(
        f"size: {size / 1e6:.2f} MB"
        + (f" ({len(ext['files'])} external data file(s): {', '.join(ext['files'])})" if ext["files"] else "")
    )
    print(
        f"nodes: {info['nodes']} ({info['subgraphs']} subgraphs), initializers: {info['initializers']}, "
        f"Constant nodes: {info['constant_nodes']}, quantized: {'yes' if info['quantized'] else 'no'}"
    )
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for io in info[kind]:
            shape = format_shape(io["shape"])
            print(f"  {io['name']}: {io['dtype']} {shape}")
    print("ops: " + ", ".join(f"{op} x{n}" for op, n in info["ops"].items()))
    if args.target:
        _print_coverage(info["coverage"])
    return 0


def _inspect_coverage(args) -> dict[str, Any]:
    from .flags import parse_fixed_dims, parse_input_shapes
    from .inspect_coverage import coverage_for_target

    return coverage_for_target(
        args.model, args.target, parse_input_shapes(args.input_shape), parse_fixed_dims(args.fix_dim)
    )


def _print_coverage(data: dict[str, Any]) -> None:
    print(f"coverage for {data['target']} ({data['checker']}):")
    for line in data["lines"]:
        print(f"  {line}")


def _cmd_report(args) -> int:
    from .report import write_report

    with steps.shown(steps.mode_for(sys.stderr, quiet=args.quiet or args.json)):
        written = write_report(args.build_dir)
    if args.json:
        _print_json(written.to_dict())
    else:
        print(f"wrote {written.html} and {written.markdown} ({len(written.bundles)} bundles)")
    return 0


def _cmd_serve(args) -> int:
    from .serve import make_server

    server = make_server(args.bundle, args.port, quiet=args.json)
    if args.json:  # one line, so a caller can read it while the server runs
        print(json.dumps({"url": server.url, "bundle": str(args.bundle)}))
    else:
        print(f"serving {args.bundle} at {server.url} (Ctrl+C stops)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _fmt_opsets(opsets: dict[str, int]) -> str:
    return ", ".join(f"{domain} {version}" for domain, version in opsets.items())


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _error(message: str) -> None:
    print(f"edgepack: error: {_bounded(message)}", file=sys.stderr)


def _bounded(message: str, longest: int = 200) -> str:
    """``message`` with every run of over ``longest`` non-blank characters (a path or value the user or a
    file gave) cut in the middle, so that no message grows with its input."""
    return re.sub(
        rf"\S{{{longest + 1},}}", lambda m: m.group()[: longest // 2] + "..." + m.group()[-longest // 4 :], message
    )


if __name__ == "__main__":
    sys.exit(main())
