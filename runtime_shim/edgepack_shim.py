"""Run an edgepack bundle on the device: verify its files, then load and run its model.

Needs only the Python standard library, numpy and onnxruntime. From the folder holding the bundle
(inputs and outputs stay outside it: `run` refuses to write into the bundle, whose files are checksummed):

    python BUNDLE/edgepack_shim.py info                        # model I/O, target, providers wanted vs available
    python BUNDLE/edgepack_shim.py verify                      # every file's checksum against manifest.json
    python BUNDLE/edgepack_shim.py run inputs.npz -o out.npz   # .npy for a single-input model; --json: a summary
    python BUNDLE/edgepack_shim.py bench --runs 200            # first-run time, p50/p90/p99 latency, throughput
    python BUNDLE/edgepack_shim.py serve --port 8080           # HTTP JSON endpoint on 127.0.0.1

or from Python:

    import edgepack_shim
    model = edgepack_shim.load("path/to/bundle")
    outputs = model.run({"input": x})      # safe to call from several threads

What it guarantees:
- Nothing is loaded before every file listed in manifest.json has been checked (size and SHA-256, read
  in chunks) and the manifest's own checksum matches; a changed, missing or extra file is refused by
  name. ``--no-verify`` skips this and says it is unsafe.
- With ``--public-key KEY`` (or a key pinned beside this file at packaging time), the bundle must carry
  ``model.sig`` (OpenSSF model-signing format) signed by that key over every file's SHA-256; an unsigned
  bundle, another key, a tampered signature or a file changed since signing is refused before loading.
- The installed onnxruntime must be in the bundle's version range; if not, it says what to install.
- The session is built from the manifest (ORT format, session options, execution providers in order
  with their options). A missing preferred provider is reported; with ``--strict-providers`` (or the
  manifest's ``strict_providers``) it is refused instead of silently falling back to the CPU.
- Inputs are checked by name, dtype (lossless casts only), rank and fixed dims before running.
- Only regular files inside the bundle are opened, through no symbolic link; session config entries and
  provider options must be on this file's allow-list (none names a file), so a manifest cannot make
  onnxruntime write or read outside the bundle.

Exit codes: 0 ok, 1 other errors, 2 usage or bad inputs, 4 onnxruntime or providers do not match the
bundle, 5 onnxruntime failed to load or run the model, 7 the bundle's files do not match its manifest.
"""

from __future__ import annotations

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before onnxruntime is imported: no telemetry file on the device

import argparse
import base64
import errno
import hashlib
import json
import math
import re
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
SCHEMA = "edgepack.manifest/1"
SEAL_KEY = "manifest_sha256"
"""The manifest's own checksum: SHA-256 of manifest.json with this value written as 64 zeros."""
CHUNK = 1 << 20
CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


class ShimError(Exception):
    """A problem with the bundle, the runtime or the inputs, stated for the person at the device."""

    exit_code = 1


class UsageError(ShimError):
    exit_code = 2


class InputError(UsageError):
    """The inputs given to ``run`` do not fit the model."""


class RuntimeMismatch(ShimError):
    """The installed onnxruntime (version or providers) is not what the bundle needs."""

    exit_code = 4


class ModelError(ShimError):
    """onnxruntime failed to load or run the model."""

    exit_code = 5


class VerificationError(ShimError):
    exit_code = 7


def default_bundle() -> Path:
    """The folder of this script; for a frozen executable in ``<bundle>.frozen/``, that ``<bundle>``."""
    if getattr(sys, "frozen", False):
        for parent in Path(sys.executable).resolve().parents:
            if parent.name.endswith(".frozen"):
                return parent.with_name(parent.name[: -len(".frozen")])
        return Path.cwd()
    return Path(__file__).resolve().parent


# --- the bundle: manifest and checksums ---------------------------------------------------------


def read_manifest(bundle: Path, *, check_seal: bool = True) -> dict:
    """The parsed manifest. With ``check_seal``, any changed byte of manifest.json is refused."""
    try:
        with open_in_bundle(bundle, MANIFEST) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise VerificationError(
            f"{bundle}: no {MANIFEST} here, so this is not an edgepack bundle (pass --bundle FOLDER)"
        ) from None
    except OSError as exc:
        raise VerificationError(
            f"{bundle}: {MANIFEST} is not a regular file of the bundle ({exc.strerror or type(exc).__name__})"
        ) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise VerificationError(
            f"{bundle}: {MANIFEST} is over {MAX_MANIFEST_BYTES >> 20} MiB: not an edgepack manifest"
        )
    try:
        if _nesting(raw) > MAX_NESTING:
            raise ValueError("nested too deeply")
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise VerificationError(
            f"{bundle}: {MANIFEST} is unreadable ({type(exc).__name__}): changed, or not an edgepack manifest"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise VerificationError(f"{bundle}: {MANIFEST} is not an edgepack manifest ({SCHEMA})")
    if check_seal and not seal_matches(raw, manifest):
        raise VerificationError(f"{bundle}: changed: {MANIFEST} (its own checksum does not match)")
    problem = manifest_problem(manifest)
    if problem:
        raise VerificationError(f"{bundle}: {MANIFEST} is malformed: {problem}")
    return manifest


def manifest_problem(manifest) -> str | None:
    """What is wrong with a parsed manifest (None: nothing): the one set of rules every reader applies
    (``edgepack verify`` calls this function too), so that a damaged manifest is one clear error even
    with --no-verify, no path leads outside the bundle, and no session setting names a file."""
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        return f"not an edgepack manifest ({SCHEMA})"
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(_safe_entry(rel, entry) for rel, entry in files.items()):
        return "the 'files' list is missing, malformed or names a path outside the bundle"
    return _structure_problem(manifest)


def _structure_problem(manifest: dict) -> str | None:
    model, runtime = manifest.get("model"), manifest.get("runtime")
    if not isinstance(model, dict) or not isinstance(runtime, dict):
        return "'model' and 'runtime' must be mappings"
    problem = _model_problem(model, "model")
    if problem:
        return problem
    models = manifest.get("models")
    if models is not None:
        if not isinstance(models, dict) or not models or not all(isinstance(name, str) for name in models):
            return "'models' must be a mapping of model names"
        for name, entry in models.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("config_entries", {}), dict):
                return f"'models.{_shown(name)}' must be a mapping, its config_entries too"
            problem = _model_problem(entry, f"models.{_shown(name)}")
            if problem:
                return problem
            for key, value in (entry.get("config_entries") or {}).items():
                problem = config_entry_problem(key, value)
                if problem:
                    return f"session config entry {_shown(key)} of model {_shown(name)}: {problem}"
    providers = runtime.get("execution_providers")
    if (
        not isinstance(providers, list)
        or not providers
        or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("options", {}), dict)
            for p in providers
        )
    ):
        return "'runtime.execution_providers' must be a non-empty list of {name, options}"
    for p in providers:
        for key, value in (p.get("options") or {}).items():
            problem = provider_option_problem(p["name"], key, value)
            if problem:
                return f"provider option {_shown(p['name'])}: {_shown(key)}: {problem}"
    settings = runtime.get("session_options", {})
    if not isinstance(settings, dict) or not isinstance(settings.get("config_entries", {}), dict):
        return "'runtime.session_options' must be a mapping"
    for key, value in (settings.get("config_entries") or {}).items():
        problem = config_entry_problem(key, value)
        if problem:
            return f"session config entry {_shown(key)}: {problem}"
    threads = settings.get("intra_op_num_threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= MAX_THREADS:
        return f"'runtime.session_options.intra_op_num_threads' must be a whole number from 0 to {MAX_THREADS}"
    if settings.get("graph_optimization_level", "all") not in ("disable", "basic", "extended", "all"):
        return "'runtime.session_options.graph_optimization_level' must be disable, basic, extended or all"
    return None


def _model_problem(model: dict, where: str) -> str | None:
    side_files = model.get("external_data") or []
    if not isinstance(side_files, list):
        return f"'{where}.external_data' must be a list of file names"
    for rel in [model.get("file")] + side_files:
        if not _safe_entry(rel, {"sha256": "", "size": 0}):
            return f"model file {_shown(rel)} is not a relative path inside the bundle"
    for key in ("inputs", "outputs"):
        specs = model.get(key)
        if not isinstance(specs, list) or not all(
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and isinstance(s.get("dtype"), str)
            and (s.get("shape") is None or isinstance(s.get("shape"), list))
            for s in specs
        ):
            return f"'{where}.{key}' must be a list of {{name, dtype, shape}}"
    return None


def model_names(manifest: dict) -> list:
    """The names of the bundle's models: those of ``models`` (a multi-model bundle), else its one model's."""
    models = manifest.get("models")
    if models:
        return list(models)
    return [Path(manifest["model"]["file"]).stem]


def model_view(manifest: dict, name=None) -> dict:
    """The manifest as a single-model bundle of model ``name`` (None: the first): its ``model`` and its
    session config entries in ``runtime``. Every file of the bundle stays listed, so all are verified."""
    if name is None:
        return manifest
    names = model_names(manifest)
    if name not in names:
        raise UsageError(f"this bundle has no model {name!r}; it holds: {', '.join(names)}")
    models = manifest.get("models")
    if not models:
        return manifest
    entry = models[name]
    runtime = dict(manifest["runtime"])
    settings = dict(runtime.get("session_options") or {})
    if "config_entries" in entry:
        settings["config_entries"] = entry["config_entries"]
    runtime["session_options"] = settings
    model = {k: v for k, v in entry.items() if k not in ("config_entries", "stages")}
    return {**manifest, "model": model, "runtime": runtime, "model_name": name}


def _nesting(raw: bytes) -> int:
    """How deeply the JSON text nests arrays and objects (brackets inside strings do not count)."""
    depth = deepest = 0
    for token in re.finditer(rb'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]', raw):
        char = token.group()[:1]
        if char in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif char in (b"]", b"}"):
            depth -= 1
    return deepest


def _bounded(message: str, longest: int = 200) -> str:
    """``message`` with every run of over ``longest`` non-blank characters (a path, a name from a file) cut
    in the middle, so that no message grows with its input."""
    return re.sub(
        rf"\S{{{longest + 1},}}", lambda m: m.group()[: longest // 2] + "..." + m.group()[-longest // 4 :], message
    )


def _shown(value) -> str:
    """A value from a file for a message: at most 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Session settings a bundle may ask for: those known to name no file onnxruntime would write or read.
# The same lists as edgepack/safety.py (a test keeps them equal); this file must stand alone.
CONFIG_ENTRIES = frozenset(
    {
        "session.load_model_format",
        "session.enable_saved_runtime_optimizations",
        "session.qdqisint8allowed",
        "session.disable_prepacking",
        "session.disable_quant_qdq",
        "session.disable_double_qdq_remover",
        "session.enable_quant_qdq_cleanup",
        "session.disable_cpu_ep_fallback",
        "session.allow_released_opsets_only",
        "session.set_denormal_as_zero",
        "session.use_deterministic_compute",
        "session.x64quantprecision",
        "session.intra_op.allow_spinning",
        "session.inter_op.allow_spinning",
        "session.disable_aot_function_inlining",
        "optimization.enable_gelu_approximation",
        "optimization.disable_specified_optimizers",
        "optimization.minimal_build_optimizations",
    }
)
PROVIDER_OPTIONS = {
    "CPUExecutionProvider": frozenset(),
    "CUDAExecutionProvider": frozenset(
        {
            "device_id",
            "gpu_mem_limit",
            "arena_extend_strategy",
            "cudnn_conv_algo_search",
            "do_copy_in_default_stream",
            "cudnn_conv_use_max_workspace",
            "cudnn_conv1d_pad_to_nc1d",
            "enable_cuda_graph",
            "prefer_nhwc",
            "use_tf32",
            "tunable_op_enable",
            "tunable_op_tuning_enable",
            "enable_skip_layer_norm_strict_mode",
        }
    ),
    "TensorrtExecutionProvider": frozenset(
        {
            "device_id",
            "trt_fp16_enable",
            "trt_int8_enable",
            "trt_bf16_enable",
            "trt_engine_cache_enable",
            "trt_timing_cache_enable",
            "trt_max_workspace_size",
            "trt_builder_optimization_level",
            "trt_max_partition_iterations",
            "trt_min_subgraph_size",
            "trt_dla_enable",
            "trt_dla_core",
            "trt_force_sequential_engine_build",
            "trt_context_memory_sharing_enable",
            "trt_layer_norm_fp32_fallback",
            "trt_cuda_graph_enable",
            "trt_sparsity_enable",
            "trt_auxiliary_streams",
            "trt_build_heuristics_enable",
            "tensorrt_version",
            "dynamic_dims",
        }
    ),
    "NnapiExecutionProvider": frozenset({"flags"}),
    "CoreMLExecutionProvider": frozenset(
        {
            "ModelFormat",
            "MLComputeUnits",
            "RequireStaticInputShapes",
            "EnableOnSubgraphs",
            "SpecializationStrategy",
            "AllowLowPrecisionAccumulationOnGPU",
            "ModelCacheDirectory",
        }
    ),
    "XnnpackExecutionProvider": frozenset({"intra_op_num_threads"}),
    "wasm": frozenset(),
    "webgpu": frozenset({"preferredLayout"}),
}
CACHE_OPTION = ("CoreMLExecutionProvider", "ModelCacheDirectory")
CACHE_VALUE = re.compile(r"\$CACHES/[A-Za-z0-9._-]{1,100}")
MAX_THREADS = 1024
MAX_TEXT = 256
MAX_MANIFEST_BYTES = 16 << 20
MAX_NESTING = 64


def config_entry_problem(key, value) -> str | None:
    if key not in CONFIG_ENTRIES:
        return "not an entry known to be safe (it may name a file onnxruntime writes)"
    return _text_problem(value)


def provider_option_problem(provider, key, value) -> str | None:
    if key not in PROVIDER_OPTIONS.get(provider, ()):
        return "not an option known to be safe for this provider (it may name a file or folder)"
    if (provider, key) == CACHE_OPTION:
        return (
            None
            if isinstance(value, str) and CACHE_VALUE.fullmatch(value)
            else "expected $CACHES/<folder name> (the app's caches folder), found another path"
        )
    if key == "dynamic_dims":
        return None  # [min, opt, max] lists of numbers, checked where TensorRT options are made
    for item in value if isinstance(value, list) else [value]:
        problem = _text_problem(item)
        if problem:
            return problem
    return None


def _text_problem(value) -> str | None:
    if not isinstance(value, (str, int, float, bool)):
        return "expected text, a number or true/false"
    text = str(value)
    if len(text) > MAX_TEXT:
        return f"the value is longer than {MAX_TEXT} characters"
    if "/" in text or "\\" in text or "\x00" in text:
        return f"the value {_shown(value)} looks like a path, and paths are not accepted here"
    return None


def seal_matches(raw: bytes, manifest: dict) -> bool:
    field = re.compile(rb'"' + SEAL_KEY.encode() + rb'": "([0-9a-f]{64})"')
    found = field.findall(raw)
    if len(found) != 1 or manifest.get(SEAL_KEY) != found[0].decode():
        return False
    blanked = field.sub(b'"' + SEAL_KEY.encode() + b'": "' + b"0" * 64 + b'"', raw)
    return hashlib.sha256(blanked).hexdigest() == found[0].decode()


def _safe_entry(rel, entry) -> bool:
    return (
        isinstance(rel, str)
        and rel != ""
        and not rel.startswith("/")
        and "\\" not in rel
        and ".." not in rel.split("/")
        and isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("size"), int)
    )


def open_in_bundle(bundle: Path, rel: str):
    """``bundle/rel`` opened for reading only if it is a regular file reached through real folders: no
    symbolic link on the way (O_NOFOLLOW on every component), and no FIFO or device, which could block
    forever or never end. Raises OSError (FileNotFoundError when a component does not exist)."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    flags = os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    parts = rel.split("/")
    if os.open in os.supports_dir_fd and nofollow:
        folder = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=folder)
                os.close(folder)
                folder = inner
            fd = os.open(parts[-1], flags, dir_fd=folder)
        finally:
            os.close(folder)
    else:  # no dir_fd (Windows): check each component, then open
        path = Path(bundle)
        for part in parts:
            path = path / part
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise OSError(errno.ELOOP, "a symbolic link", str(path))
        fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", rel)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def sha256_of(bundle: Path, rel: str) -> tuple:
    """(size, SHA-256) of a bundle file, read in chunks through ``open_in_bundle``."""
    digest, size = hashlib.sha256(), 0
    with open_in_bundle(bundle, rel) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@dataclass
class VerifyReport:
    bundle: Path
    checked: int
    changed: list
    missing: list
    extra: list

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra)

    def to_dict(self) -> dict:
        return {
            "bundle": str(self.bundle),
            "ok": self.ok,
            "checked": self.checked,
            "changed": self.changed,
            "missing": self.missing,
            "extra": self.extra,
        }

    def problems(self) -> str:
        return "; ".join(f"{kind}: {rel}" for kind in ("changed", "missing", "extra") for rel in getattr(self, kind))


def check_files(bundle: Path, manifest: dict) -> VerifyReport:
    """Compare every file below ``bundle`` with the manifest's ``files`` (size first, then SHA-256)."""
    expected = manifest["files"]
    changed, missing = [], []
    for rel, entry in sorted(expected.items()):
        try:
            found = sha256_of(bundle, rel)
        except (OSError, ValueError):  # a link, a FIFO, a name impossible here: not the bundle's file
            missing.append(rel)
            continue
        if found != (entry["size"], entry["sha256"]):
            changed.append(rel)
    extra = []
    for dirpath, dirnames, filenames in os.walk(bundle):
        base = Path(dirpath)
        for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
            rel = (base / name).relative_to(bundle).as_posix()
            if rel not in (MANIFEST, SIGNATURE) and rel not in expected and not _own_bytecode(rel):
                extra.append(rel)
    return VerifyReport(bundle, len(expected) - len(missing), changed, missing, sorted(extra))


def _own_bytecode(rel: str) -> bool:
    # `import edgepack_shim` from the bundle folder writes this before any of our code runs
    return re.fullmatch(r"__pycache__/edgepack_shim\.[\w.-]+\.pyc", rel) is not None


def verify_bundle(bundle: Path, key=None) -> dict:
    """Check the manifest, the signature by ``key`` (a PublicKey; None: no signature required) and every
    file; return the manifest or raise VerificationError naming each problem."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if key is not None:
        verify_signature(bundle, manifest, key)
    report = check_files(bundle, manifest)
    if not report.ok:
        raise VerificationError(f"{bundle}: the bundle does not match its manifest: {report.problems()}")
    model = manifest.get("model", {})
    for rel in [model.get("file")] + list(model.get("external_data") or []):
        if rel not in manifest["files"]:
            raise VerificationError(f"{bundle}: {MANIFEST} does not checksum the model file {rel!r}")
    return manifest


# --- signatures: model.sig in the OpenSSF model-signing format, ECDSA P-256 ---------------------------
#
# model.sig is a Sigstore bundle whose DSSE envelope holds an in-toto statement listing every file of the
# bundle with its SHA-256 (manifest.json included). The signature is checked here, then the statement is
# compared with the manifest's digests and manifest.json's own: check_files then ties every byte to the
# manifest, so one ECDSA verification and one hash of manifest.json cover the whole bundle. The ECDSA
# arithmetic is plain Python: no dependency beyond the standard library, and verification handles public
# data only, so it needs no constant-time code. One verification takes 1.8 ms here; `cryptography` takes
# 0.06 ms but its import alone 20-180 ms, so for one check per process plain Python is also the faster.
# Checked against Project Wycheproof's 484 P-256 vectors (tests/test_signing.py).

SIGNATURE = "model.sig"
PINNED_KEY = "edgepack_signing.pub"
"""A public key placed beside this file when the bundle was packaged: then every bundle must be signed by it."""
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"

P256_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
P256_G = (
    0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
)
# the DER SubjectPublicKeyInfo of every uncompressed P-256 key starts with these bytes (id-ecPublicKey, prime256v1)
P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
_INFINITY = (1, 1, 0)


def _double(point: tuple) -> tuple:
    """2P in Jacobian coordinates (a = -3)."""
    x, y, z = point
    if z == 0 or y == 0:
        return _INFINITY
    p = P256_P
    delta, gamma = z * z % p, y * y % p
    beta = x * gamma % p
    alpha = 3 * (x - delta) * (x + delta) % p
    x3 = (alpha * alpha - 8 * beta) % p
    z3 = ((y + z) * (y + z) - gamma - delta) % p
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % p
    return x3, y3, z3


def _add(a: tuple, b: tuple) -> tuple:
    """A + B in Jacobian coordinates."""
    if a[2] == 0:
        return b
    if b[2] == 0:
        return a
    p = P256_P
    x1, y1, z1 = a
    x2, y2, z2 = b
    z1z1, z2z2 = z1 * z1 % p, z2 * z2 % p
    u1, u2 = x1 * z2z2 % p, x2 * z1z1 % p
    s1, s2 = y1 * z2 * z2z2 % p, y2 * z1 * z1z1 % p
    h, r = (u2 - u1) % p, (s2 - s1) % p
    if h == 0:
        return _double(a) if r == 0 else _INFINITY
    hh = h * h % p
    hhh, v = h * hh % p, u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    y3 = (r * (v - x3) - s1 * hhh) % p
    return x3, y3, z1 * z2 * h % p


def _on_curve(x: int, y: int) -> bool:
    return 0 <= x < P256_P and 0 <= y < P256_P and (y * y - (x * x * x - 3 * x + P256_B)) % P256_P == 0


def p256_key_from_der(der: bytes) -> tuple:
    """The point (x, y) of a DER SubjectPublicKeyInfo P-256 key (uncompressed, as openssl and edgepack write)."""
    if len(der) != len(P256_SPKI_PREFIX) + 65 or not der.startswith(P256_SPKI_PREFIX) or der[26] != 4:
        raise ValueError("not an uncompressed P-256 (prime256v1) public key")
    x, y = int.from_bytes(der[27:59], "big"), int.from_bytes(der[59:], "big")
    if not _on_curve(x, y):
        raise ValueError("the public key's point is not on the P-256 curve")
    return x, y


def _der_signature(sig: bytes):
    """(r, s) from a strict DER ECDSA signature, None when it is not one (BER forms are refused)."""
    if len(sig) < 8 or sig[0] != 0x30 or sig[1] >= 0x80 or sig[1] != len(sig) - 2:
        return None
    values, i = [], 2
    for _ in range(2):
        if i + 2 > len(sig) or sig[i] != 0x02:
            return None
        size = sig[i + 1]
        body = sig[i + 2 : i + 2 + size]
        if (
            size == 0
            or size > 33
            or len(body) != size
            or body[0] & 0x80
            or (size > 1 and body[0] == 0 and not body[1] & 0x80)
        ):
            return None
        values.append(int.from_bytes(body, "big"))
        i += 2 + size
    return tuple(values) if i == len(sig) else None


def ecdsa_p256_verify(point: tuple, signature: bytes, message: bytes) -> bool:
    """ECDSA P-256 / SHA-256 verification of a DER ``signature`` over ``message`` with public ``point``."""
    parsed = _der_signature(signature)
    if parsed is None:
        return False
    r, s = parsed
    if not (0 < r < P256_N and 0 < s < P256_N):
        return False
    e = int.from_bytes(hashlib.sha256(message).digest(), "big")
    w = pow(s, -1, P256_N)
    u1, u2 = e * w % P256_N, r * w % P256_N
    g, q = (*P256_G, 1), (*point, 1)
    both = _add(g, q)
    acc = _INFINITY
    for bit in range(max(u1.bit_length(), u2.bit_length()) - 1, -1, -1):  # Shamir's trick: u1*G + u2*Q at once
        acc = _double(acc)
        pick = (u1 >> bit & 1, u2 >> bit & 1)
        if pick == (1, 1):
            acc = _add(acc, both)
        elif pick == (1, 0):
            acc = _add(acc, g)
        elif pick == (0, 1):
            acc = _add(acc, q)
    x, _, z = acc
    if z == 0:
        return False
    return x * pow(z * z, -1, P256_P) % P256_P % P256_N == r


@dataclass(frozen=True)
class PublicKey:
    point: tuple
    fingerprint: str
    """SHA-256 (hex) of the key as canonical PEM: model-signing's key hint."""
    source: str


def read_public_key(path) -> PublicKey:
    """A PEM public key file (-----BEGIN PUBLIC KEY-----, P-256)."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"cannot read the public key {path}: {getattr(exc, 'strerror', None) or type(exc).__name__}"
        ) from None
    return public_key_from_pem(text, str(path))


def public_key_from_pem(text: str, source: str) -> PublicKey:
    match = re.search(r"-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\s]+)-----END PUBLIC KEY-----", text)
    try:
        if not match:
            raise ValueError("no -----BEGIN PUBLIC KEY----- block")
        der = base64.b64decode("".join(match.group(1).split()), validate=True)
        point = p256_key_from_der(der)
    except ValueError as exc:
        raise UsageError(f"{source} is not a P-256 public key in PEM form: {exc}") from None
    body = base64.b64encode(der).decode("ascii")
    pem = (
        "-----BEGIN PUBLIC KEY-----\n"
        + "".join(body[i : i + 64] + "\n" for i in range(0, len(body), 64))
        + "-----END PUBLIC KEY-----\n"
    )
    return PublicKey(point, hashlib.sha256(pem.encode("ascii")).hexdigest(), source)


def pinned_key_file():
    """The key pinned beside this file at packaging time (``edgepack package --pin-key``), or None."""
    path = Path(__file__).resolve().with_name(PINNED_KEY)
    return path if path.is_file() else None


def required_key(public_key=None):
    """The key every bundle must be signed with: ``public_key`` (a path), else the pinned one, else None.
    A given key that differs from the pinned one is refused: a pinned key cannot be swapped from the command line."""
    pinned = pinned_key_file()
    pinned_key = read_public_key(pinned) if pinned else None
    given = read_public_key(public_key) if public_key is not None else None
    if given and pinned_key and given.fingerprint != pinned_key.fingerprint:
        raise UsageError(
            f"--public-key {public_key} is not the key pinned beside this shim ({pinned}, "
            f"fingerprint {pinned_key.fingerprint})"
        )
    return given or pinned_key


def verify_signature(bundle: Path, manifest: dict, key: PublicKey) -> str:
    """Check model.sig against ``key`` and the manifest; return the key's fingerprint or raise VerificationError."""
    try:
        with open_in_bundle(Path(bundle), SIGNATURE) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise VerificationError(
            f"{bundle}: the bundle is not signed (no {SIGNATURE}) and a signature by key "
            f"{key.fingerprint} ({key.source}) is required"
        ) from None
    except OSError as exc:
        raise VerificationError(
            f"{bundle}: {SIGNATURE} is not a regular file of the bundle ({exc.strerror or type(exc).__name__})"
        ) from None
    try:
        if len(raw) > MAX_MANIFEST_BYTES or _nesting(raw) > MAX_NESTING:
            raise ValueError("too large or nested too deeply")
        document = json.loads(raw.decode("utf-8"))
        hint = (document["verificationMaterial"].get("publicKey") or {}).get("hint")
        envelope = document["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = envelope["signatures"]
        signature = base64.b64decode(signatures[0]["sig"], validate=True)
        kinds = (document["mediaType"], envelope["payloadType"], len(signatures))
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise VerificationError(f"{bundle}: {SIGNATURE} is malformed ({type(exc).__name__})") from None
    if kinds != (BUNDLE_MEDIA_TYPE, PAYLOAD_TYPE, 1):
        raise VerificationError(f"{bundle}: {SIGNATURE} is not a model-signing key signature {kinds}")
    if hint and hint != key.fingerprint:
        raise VerificationError(
            f"{bundle}: signed with another key: {SIGNATURE} names key {hint}, the required "
            f"key is {key.fingerprint} ({key.source})"
        )
    signed = b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)
    if not ecdsa_p256_verify(key.point, signature, signed):
        raise VerificationError(
            f"{bundle}: {SIGNATURE}: the signature does not verify with key {key.fingerprint} "
            "(tampered, or signed with another key)"
        )
    digests = {rel: entry["sha256"] for rel, entry in manifest["files"].items()}
    digests[MANIFEST] = sha256_of(Path(bundle), MANIFEST)[1]
    problem = _statement_problem(payload, digests)
    if problem:
        raise VerificationError(f"{bundle}: {SIGNATURE}: {problem}")
    return key.fingerprint


def _statement_problem(payload: bytes, digests: dict):
    """What differs between the signed statement and the bundle's digests (None: nothing)."""
    try:
        statement = json.loads(payload)
        serialization = statement["predicate"]["serialization"]
        resources = statement["predicate"]["resources"]
        listed = {r["name"]: r["digest"] for r in resources if r["algorithm"] == "sha256"}
        root = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources)).hexdigest()
        subject = statement["subject"][0]["digest"]["sha256"]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "the signed statement is malformed"
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        return f"the signed statement is not a model-signing v1.0 statement ({statement.get('predicateType')!r})"
    if (serialization.get("method"), serialization.get("hash_type")) != ("files", "sha256") or len(listed) != len(
        resources
    ):
        return "only files/sha256 serialization is read"
    if root != subject:
        return "the signed statement is inconsistent (its subject digest does not match its resources)"
    found = {
        "not signed": sorted(set(digests) - set(listed)),
        "signed but not in the bundle": sorted(set(listed) - set(digests)),
        "changed since signing": sorted(rel for rel in set(digests) & set(listed) if digests[rel] != listed[rel]),
    }
    return "; ".join(f"{kind}: {', '.join(names)}" for kind, names in found.items() if names) or None


# --- the runtime: version range, providers and their options ---------------------------------------


SIMPLE_CLAUSE = re.compile(r"(~=|==|!=|<=|>=|<|>)\s*\d+(\.\d+)*(\.\*)?")


def version_satisfies(version: str, spec: str) -> bool:
    """PEP 440 check. Plain releases against plain clauses (">=1.20,<2", "==1.31.*") are compared here:
    importing `packaging` costs more start-up time than the rest of the check. Anything else (pre-releases,
    local versions) goes to `packaging`, installed with onnxruntime; the small parser is the last resort."""
    clauses = [c.strip() for c in spec.split(",") if c.strip()]
    if re.fullmatch(r"\d+(\.\d+)*", version) and all(SIMPLE_CLAUSE.fullmatch(c) for c in clauses):
        return _simple_satisfies(version, spec)
    try:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _simple_satisfies(version, spec)
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        raise RuntimeMismatch(f"cannot compare onnxruntime {version} with the bundle's range {spec!r}") from None


def _release(version: str) -> tuple:
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if not match:
        raise RuntimeMismatch(f"cannot read the version {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _simple_satisfies(version: str, spec: str) -> bool:
    have = _release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        match = re.fullmatch(r"(~=|===|==|!=|<=|>=|<|>)\s*(\S+)", clause)
        if not match:
            raise RuntimeMismatch(f"cannot read the bundle's version range {spec!r}")
        op, text = match.groups()
        if text.endswith(".*") and op in ("==", "!="):
            prefix = _release(text[:-2])
            same = have[: len(prefix)] + (0,) * max(0, len(prefix) - len(have)) == prefix
            if same != (op == "=="):
                return False
            continue
        want = _release(text)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {
            "==": a == b,
            "===": a == b,
            "!=": a != b,
            "<=": a <= b,
            ">=": a >= b,
            "<": a < b,
            ">": a > b,
            "~=": a >= b and have[: len(want) - 1] == want[: len(want) - 1],
        }[op]
        if not ok:
            return False
    return True


def check_runtime_version(manifest: dict, installed: str) -> None:
    runtime = manifest["runtime"]
    package, spec = runtime.get("package", "onnxruntime"), runtime.get("version", "")
    if spec and not version_satisfies(installed, spec):
        if getattr(sys, "frozen", False):
            fix = f"rebuild this executable with {package}{spec} (edgepack package ... --freeze)"
        else:
            fix = f"run: {Path(sys.executable).name} -m pip install '{package}{spec}'"
        raise RuntimeMismatch(f"onnxruntime {installed} is installed but this bundle needs {package}{spec}; {fix}")


def cache_root() -> Path:
    """A writable folder outside the bundle (whose files are checksummed): $EDGEPACK_CACHE_DIR or ~/.cache/edgepack."""
    if os.environ.get("EDGEPACK_CACHE_DIR"):
        return Path(os.environ["EDGEPACK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgepack"


def option_text(value) -> str:
    """onnxruntime takes provider options as strings ("True", "2", "a,b")."""
    if isinstance(value, (list, tuple)):
        return ",".join(option_text(v) for v in value)
    return str(value)


DIM_RANGE_FIRST = (1, 1, 16)
DIM_RANGE_OTHER = (1, 128, 512)
"""min/opt/max for a dynamic dim the profile's ``dynamic_dims`` does not name: the first axis
(batch) and any other axis (sequence, image side)."""

TENSORRT_META = ("tensorrt_version", "dynamic_dims")
"""Keys of the profile's TensorRT options that describe the device for this shim; not passed to onnxruntime."""


def tensorrt_profile_shapes(inputs: list, dynamic_dims: dict) -> dict:
    """``trt_profile_{min,opt,max}_shapes`` for every input with a dynamic dim, e.g. ``"ids:1x1,mask:1x1"``."""
    rows: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for spec in inputs:
        shape = spec.get("shape")
        if not shape or all(isinstance(d, int) and d > 0 for d in shape):
            continue
        dims = []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int) and dim > 0:
                dims.append((dim, dim, dim))
            elif isinstance(dim, str) and dim in dynamic_dims:
                dims.append(_dim_range(dim, dynamic_dims[dim]))
            else:
                dims.append(DIM_RANGE_FIRST if axis == 0 else DIM_RANGE_OTHER)
        for i, key in enumerate(("min", "opt", "max")):
            rows[key].append(f"{spec['name']}:" + "x".join(str(d[i]) for d in dims))
    return {f"trt_profile_{key}_shapes": ",".join(row) for key, row in rows.items() if row}


def _dim_range(name: str, value) -> tuple:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, int) for v in value)
        or not 1 <= value[0] <= value[1] <= value[2]
    ):
        raise ShimError(
            f"the manifest's TensorRT dynamic_dims[{name!r}] must be [min, opt, max] with "
            f"1 <= min <= opt <= max, found {value!r}"
        )
    return tuple(value)


def tensorrt_options(
    options: dict, *, inputs: list, precision: str, model_sha256: str, cache_dir: Path, gpu: str, trt_version: str
) -> dict:
    """TensorRT provider options from the profile's, as data (no GPU needed to compute them).

    - ``trt_*`` options pass through as strings; INT8 is switched on for an int8 (QDQ) model unless the
      profile says otherwise.
    - Engine and timing caches go to ``cache_dir/tensorrt/<gpu>-trt<version>/<model>``: an engine is only
      valid for the GPU and TensorRT version that built it, and the bundle folder itself stays read-only.
    - Dynamic dims get an explicit optimization profile (min/opt/max), so TensorRT builds one engine for
      the whole range instead of rebuilding when a shape changes.
    """
    result = {key: option_text(value) for key, value in options.items() if key not in TENSORRT_META}
    if "int8" in precision.lower() and "trt_int8_enable" not in options:
        result["trt_int8_enable"] = "True"
    engine_cache, timing_cache = (
        _enabled(options.get("trt_engine_cache_enable")),
        _enabled(options.get("trt_timing_cache_enable")),
    )
    if engine_cache or timing_cache:
        key = re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu}-trt{trt_version}").strip("-")
        folder = str(Path(cache_dir) / "tensorrt" / key / model_sha256[:16])
        if engine_cache:
            result["trt_engine_cache_path"] = folder
        if timing_cache:
            result["trt_timing_cache_path"] = folder
    result.update(tensorrt_profile_shapes(inputs, options.get("dynamic_dims") or {}))
    return result


def _enabled(value) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true")


def gpu_name() -> str:
    """The GPU's name for the TensorRT cache key (nvidia-smi, else the board's name on a Jetson)."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # Jetson boards have no nvidia-smi on older JetPacks; the board names its GPU
        return Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return "unknown-gpu"


def tensorrt_library_version(profile_value: str | None) -> str:
    """TensorRT's version for the cache key: the Python package's, else libnvinfer's version number,
    else the one the profile names."""
    from importlib import metadata

    try:
        return metadata.version("tensorrt")
    except metadata.PackageNotFoundError:
        pass
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            return str(ctypes.CDLL(name).getInferLibVersion())
        except (OSError, AttributeError):
            continue
    return profile_value or "unknown"


def provider_plan(manifest: dict, available: list, *, providers=None, cache_dir: Path | None = None) -> list:
    """[(name, options)] to try, in the manifest's order, keeping those this onnxruntime build has."""
    declared = {ep["name"]: ep.get("options") or {} for ep in manifest["runtime"]["execution_providers"]}
    wanted = list(providers) if providers else list(declared)
    plan = []
    for name in wanted:
        if name not in available:
            continue
        options = declared.get(name, {})
        if name == TENSORRT:
            model = manifest["model"]
            folder = Path(cache_dir) if cache_dir else cache_root()
            options = tensorrt_options(
                options,
                inputs=model["inputs"],
                precision=model.get("precision", "fp32"),
                model_sha256=manifest["files"][model["file"]]["sha256"],
                cache_dir=folder,
                gpu=gpu_name(),
                trt_version=tensorrt_library_version(options.get("tensorrt_version")),
            )
            _make_cache_dirs(options)
        else:
            options = {key: option_text(value) for key, value in options.items()}
        plan.append((name, options))
    return plan or [(CPU, {})]


def _make_cache_dirs(options: dict) -> None:
    for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
        if key in options:
            try:
                Path(options[key]).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(
                    f"cannot create the TensorRT cache folder {options[key]}: {exc.strerror}; "
                    "set EDGEPACK_CACHE_DIR to a writable folder"
                ) from None


GRAPH_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


EXACT_INT8 = "session.x64quantprecision"


def session_options(ort, manifest: dict, *, exact_int8: bool = True):
    """The manifest's session options; ``exact_int8=False``: without EXACT_INT8 (see open_session)."""
    settings = manifest["runtime"].get("session_options", {})
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fallbacks are reported by this shim, once
    options.intra_op_num_threads = int(settings.get("intra_op_num_threads", 0))
    level = settings.get("graph_optimization_level", "all")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_LEVELS[level])
    entries = dict(settings.get("config_entries") or {})
    # onnxruntime's exact INT8 kernels on x86 CPUs without VNNI, whose U8S8 kernels saturate (edgepack/backends)
    entries.setdefault(EXACT_INT8, "1")
    if not exact_int8:
        entries.pop(EXACT_INT8)
    model = manifest["model"]
    if model.get("format") == "ort":
        entries.setdefault("session.load_model_format", "ORT")
    if model.get("ort_style") == "Runtime":
        # without it onnxruntime silently ignores the optimizations saved in a Runtime-style .ort
        entries.setdefault("session.enable_saved_runtime_optimizations", "1")
    for key, value in entries.items():
        options.add_session_config_entry(key, str(value))
    return options


# --- the model ------------------------------------------------------------------------------------


NON_TENSOR_TYPES = ("sequence_type", "map_type", "optional_type", "sparse_tensor_type")


def _numpy_dtype(name):
    try:
        return np.dtype(name)
    except TypeError:
        return None  # e.g. bfloat16: onnxruntime checks it


def lossless(source: np.dtype, target: np.dtype) -> bool:
    """True when every value of ``source`` is exactly representable in ``target``."""
    if not np.can_cast(source, target, casting="safe"):
        return False
    if source.kind in "iu" and target.kind == "f":  # numpy calls int64 -> float64 safe; it is not above 2**53
        return np.iinfo(source).bits - (source.kind == "i") <= np.finfo(target).nmant + 1
    return True


def _shape_text(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_feeds(specs: list, feeds) -> dict:
    """The inputs as arrays onnxruntime takes, or one InputError saying what is wrong."""
    if not hasattr(feeds, "keys"):
        raise InputError(f"inputs must be a mapping of input name to array, got {type(feeds).__name__}")
    names = [spec["name"] for spec in specs]
    unknown = [str(key) for key in feeds.keys() if key not in names]
    if unknown:
        raise InputError(f"unknown input {', '.join(map(repr, unknown))}: the model's inputs are {', '.join(names)}")
    missing = [name for name in names if name not in feeds]
    if missing:
        raise InputError(f"missing input {', '.join(map(repr, missing))}: the model's inputs are {', '.join(names)}")
    arrays: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[int, str]] = {}  # dim name -> (size, the input that set it)
    for spec in specs:
        arrays[spec["name"]] = _check_input(spec, feeds[spec["name"]], sizes)
    return arrays


def _check_input(spec: dict, value, sizes: dict) -> np.ndarray:
    name, shape = spec["name"], spec.get("shape")
    if spec["dtype"] in NON_TENSOR_TYPES:
        return value  # a list (sequence) or dict (map): onnxruntime checks its element types itself
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"input {name!r} is not an array: {exc}") from None
    want = _numpy_dtype(spec["dtype"])
    if want is not None and array.dtype != want:
        if not lossless(array.dtype, want):
            raise InputError(
                f"input {name!r} must be {want}, got {array.dtype}: only lossless casts are made "
                f"(convert it yourself, e.g. x.astype('{want}'), if that is what you mean)"
            )
        array = array.astype(want)
    if shape is not None:
        if array.ndim != len(shape):
            raise InputError(
                f"input {name!r} must have {len(shape)} dims {_shape_text(shape)}, "
                f"got {array.ndim}: {tuple(array.shape)}"
            )
        for axis, (dim, size) in enumerate(zip(shape, array.shape)):
            if isinstance(dim, int) and dim > 0 and size != dim:
                raise InputError(
                    f"input {name!r} dim {axis} must be {dim} (shape {_shape_text(shape)}), "
                    f"got {size}: {tuple(array.shape)}"
                )
            if isinstance(dim, str) and dim != "?":  # some exporters (PaddleOCR) name every unknown dim "?"
                first = sizes.setdefault(dim, (size, name))
                if first[0] != size:
                    raise InputError(
                        f"input {name!r} dim {axis} ({dim!r}) is {size} but {dim!r} is {first[0]} in input {first[1]!r}"
                    )
    # np.ascontiguousarray would make a rank-0 input rank 1; a rank-0 array is contiguous already
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


class Model:
    """A verified bundle's model in an onnxruntime session. ``run`` is safe to call from several threads:
    onnxruntime sessions allow concurrent runs and nothing here changes after loading."""

    def __init__(
        self, bundle: Path, manifest: dict, session, wanted: list, fallback: str | None, warnings: list | None = None
    ):
        self.bundle = bundle
        self.manifest = manifest
        self.session = session
        self.inputs = manifest["model"]["inputs"]
        self.outputs = manifest["model"]["outputs"]
        self.output_names = [o["name"] for o in self.outputs]
        self.wanted_providers = wanted
        self.providers = session.get_providers()
        """The providers actually active, best first."""
        self.fallback = fallback
        """Why the preferred provider is not active (None when it is)."""
        self.warnings = list(warnings or [])
        """What else differs from the manifest's session (an entry onnxruntime could not load the model with)."""

    def run(self, feeds) -> dict:
        arrays = check_feeds(self.inputs, feeds)
        try:
            values = self.session.run(self.output_names, arrays)
        except Exception as exc:  # onnxruntime raises bare Exception subclasses from C++
            raise ModelError(f"onnxruntime failed to run the model: {_first_line(exc)}") from None
        return dict(zip(self.output_names, values))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load(
    bundle=None,
    *,
    providers=None,
    verify: bool = True,
    strict_providers: bool | None = None,
    check_runtime: bool = True,
    cache_dir=None,
    public_key=None,
    model=None,
) -> Model:
    """Verify ``bundle`` (default: the folder of this file), check onnxruntime, and open a session.

    ``public_key``: a PEM public key file; the bundle must then be signed with it (model.sig). A key
    pinned beside this file is required the same way, without being given.

    ``providers``: names to use instead of the manifest's list (options still come from the manifest).
    ``strict_providers``: refuse to load unless the preferred provider is active (None: the manifest's flag).
    ``check_runtime``: compare onnxruntime's version with the bundle's range.
    ``model``: which model of a multi-model bundle to open, by name (None: the first); every file of the
    bundle is verified whichever is opened.
    """
    bundle = Path(bundle) if bundle is not None else default_bundle()
    key = required_key(public_key)
    if key is not None and not verify:
        raise UsageError(
            f"a signature by key {key.fingerprint} ({key.source}) is required, so verification cannot be skipped"
        )
    manifest = verify_bundle(bundle, key) if verify else read_manifest(bundle, check_seal=False)
    manifest = model_view(manifest, model)
    import onnxruntime as ort

    if check_runtime:
        check_runtime_version(manifest, ort.__version__)
    wanted = list(providers) if providers else [ep["name"] for ep in manifest["runtime"]["execution_providers"]]
    strict = bool(manifest["runtime"].get("strict_providers")) if strict_providers is None else strict_providers
    available = ort.get_available_providers()
    if strict and wanted[0] not in available:
        raise RuntimeMismatch(
            f"the preferred provider {wanted[0]} is not in this onnxruntime "
            f"(available: {', '.join(available)}) and strict providers are on "
            "(--strict-providers or the bundle's strict_providers); install "
            f"{manifest['runtime'].get('package', 'onnxruntime')} with {wanted[0]}, "
            "or choose providers with --providers"
        )
    plan = provider_plan(manifest, available, providers=providers, cache_dir=cache_dir)
    path = str(bundle / manifest["model"]["file"])
    fallback = None
    try:
        session, warning = open_session(ort, path, manifest, plan)
    except Exception as exc:
        if strict or plan == [(CPU, {})]:
            raise ModelError(
                f"onnxruntime cannot load {manifest['model']['file']} with "
                f"{', '.join(name for name, _ in plan)}: {_first_line(exc)}"
            ) from None
        # e.g. TensorRT is in the build but its libraries or the GPU are not there
        fallback = f"{plan[0][0]} failed to start ({_first_line(exc)})"
        try:
            session, warning = open_session(ort, path, manifest, [(CPU, {})])
        except Exception as exc2:
            raise ModelError(f"onnxruntime cannot load {manifest['model']['file']}: {_first_line(exc2)}") from None
    active = session.get_providers()
    if active[0] != wanted[0] and fallback is None:
        fallback = f"{', '.join(name for name in wanted if name not in available)} not in this onnxruntime build"
    if strict and active[0] != wanted[0]:
        raise RuntimeMismatch(
            f"the preferred provider {wanted[0]} is not active ({fallback}) and strict providers are on"
        )
    return Model(bundle, manifest, session, wanted, fallback, [warning] if warning else [])


def open_session(ort, path: str, manifest: dict, plan: list):
    """(session, warning): a session with the manifest's options, or, when it fails to load with the exact INT8
    entry, without it (warning says so; None otherwise). Where that entry applies (x86 CPUs without VNNI)
    onnxruntime converts int8 weights to uint8 at load, and onnxruntime 1.31's converter fails on QDQ models
    whose int8 zero points several DequantizeLinear nodes share ("Attempt to replace the existing tensor")."""
    entries = (manifest["runtime"].get("session_options") or {}).get("config_entries") or {}
    if str(entries.get(EXACT_INT8, "1")) != "1":
        return _session(ort, path, session_options(ort, manifest), plan), None
    options = session_options(ort, manifest)
    options.log_severity_level = 4  # a failure is raised, or retried below: not also logged
    try:
        return _session(ort, path, options, plan), None
    except Exception as exc:
        failure = exc
    try:
        session = _session(ort, path, session_options(ort, manifest, exact_int8=False), plan)
    except Exception:
        raise failure from None
    return session, (
        f"loaded without {EXACT_INT8}=1, with which onnxruntime fails to load the model ({_first_line(failure)}): "
        "on x86 CPUs without VNNI its default INT8 kernels may saturate"
    )


def _session(ort, path: str, options, plan: list):
    names, provider_options = [name for name, _ in plan], [opts for _, opts in plan]
    # enable_fallback=0: onnxruntime's own silent retry on the CPU (at load and in run) is off; this shim reports it
    session = ort.InferenceSession(path, options, providers=names, provider_options=provider_options, enable_fallback=0)
    session.disable_fallback()
    return session


# --- inputs from files and generated inputs ---------------------------------------------------------


def read_inputs(path: Path, model: Model) -> dict:
    """An .npz of named arrays, or an .npy for a single-input model."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.ndarray):
            with data:
                return {name: data[name] for name in data.files}
    except OSError as exc:
        raise UsageError(f"cannot read inputs from {_shown(str(path))}: {exc.strerror or exc}") from None
    except Exception as exc:  # numpy and zipfile raise many types for a file that is not .npy/.npz
        raise UsageError(
            f"cannot read inputs from {_shown(str(path))}: not a valid .npz or .npy file "
            f"({type(exc).__name__}: {_shown(_first_line(exc))[1:-1]})"
        ) from None
    if len(model.inputs) != 1:
        names = ", ".join(spec["name"] for spec in model.inputs)
        raise UsageError(
            f"{path} holds one array but the model has {len(model.inputs)} inputs ({names}); "
            "use an .npz with one array per input name"
        )
    return {model.inputs[0]["name"]: data}


MAX_SAMPLE_BYTES = 1 << 30
"""Generated inputs larger than this (dims from the manifest, which may be huge) are refused, not allocated."""


def sample_inputs(specs: list, dims: dict, seed: int = 0, tested: dict | None = None) -> dict:
    """Random inputs of the model's shapes: dynamic dims from ``dims`` by name, else those the self-test ran the
    bundle on (``tested``, its manifest record: input_shapes, and input_values for ids below a table's size,
    fills and Reshape targets), else 1 (first axis) or 8."""
    rng = np.random.default_rng(seed)
    feeds, total = {}, 0
    tested = tested or {}
    for spec in specs:
        shape = [
            d if isinstance(d, int) and d > 0 else dims.get(d, 1 if axis == 0 else 8)
            for axis, d in enumerate(spec.get("shape") or [])
        ]
        declared = spec.get("shape") or []
        ran = tested.get("input_shapes", {}).get(spec["name"])
        dynamic = [d for d in declared if not (isinstance(d, int) and d > 0)]
        if ran and dynamic and not any(d in dims for d in dynamic) and len(ran) == len(declared):
            # the self-test's sizes for the dynamic dims; the fixed ones stay as declared
            shape = [d if isinstance(d, int) and d > 0 else int(r) for d, r in zip(declared, ran)]
        rule = tested.get("input_values", {}).get(spec["name"], {})
        dtype = _numpy_dtype(spec["dtype"]) or np.dtype("float32")
        total += math.prod(shape) * dtype.itemsize
        if total > MAX_SAMPLE_BYTES:
            raise UsageError(
                f"generated inputs would take over {MAX_SAMPLE_BYTES >> 30} GiB (input "
                f"{_shown(spec['name'])} is {_shape_text(shape)}): give real inputs with --inputs, "
                "or smaller dynamic dims with --dim"
            )
        if dtype.kind == "O":  # a string tensor
            feeds[spec["name"]] = np.full(shape, "a", dtype=object)
        elif "fill" in rule:
            feeds[spec["name"]] = np.full(shape, rule["fill"], dtype=dtype)
        elif rule.get("reshape"):
            feeds[spec["name"]] = np.zeros(shape, dtype=dtype)
            feeds[spec["name"]].reshape(-1)[-1:] = -1
        elif "ints" in rule:
            low, high = rule["ints"]
            feeds[spec["name"]] = rng.integers(int(low), int(high), size=tuple(shape)).astype(dtype)
        elif "mask" in spec["name"].lower() or dtype == np.bool_:
            feeds[spec["name"]] = np.ones(shape, dtype=dtype)
        elif dtype.kind in "iu":
            feeds[spec["name"]] = rng.integers(0, 16, size=shape).astype(dtype)
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return feeds


def from_json(specs: list, values) -> dict:
    """JSON numbers carry no dtype: read them as the input's dtype when no value changes (decimals as floats)."""
    if not isinstance(values, dict):
        raise InputError('the request body must be {"inputs": {"<input name>": [nested lists of numbers], ...}}')
    by_name = {spec["name"]: spec for spec in specs}
    feeds = {}
    for name, value in values.items():
        spec = by_name.get(name)
        want = _numpy_dtype(spec["dtype"]) if spec else None
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):
            raise InputError(f"input {name!r}: nested lists of different lengths") from None
        if want is not None and want.kind == "O":  # a string tensor: JSON strings
            if array.size and array.dtype.kind != "U":
                raise InputError(f"input {name!r}: expected strings, got {array.dtype.name} values")
            feeds[name] = array.astype(object)
            continue
        if array.dtype.kind not in "biuf" and array.size:
            raise InputError(f"input {name!r}: expected numbers, got {array.dtype.name} values")
        if want is not None and want.kind == "f" and array.dtype.kind in "biuf":
            array = array.astype(want)
        elif want is not None and want.kind in "iub" and array.dtype.kind in "biu":
            cast = array.astype(want)
            if not np.array_equal(cast, array):
                raise InputError(f"input {name!r}: values do not fit {want}")
            array = cast
        feeds[name] = array
    return feeds


# --- commands -------------------------------------------------------------------------------------


def describe(bundle: Path, manifest: dict) -> dict:
    """What `info` shows: read from the manifest, plus what this device's onnxruntime offers."""
    model, runtime = manifest["model"], manifest["runtime"]
    wanted = [ep["name"] for ep in runtime["execution_providers"]]
    try:
        import onnxruntime as ort

        installed, available = ort.__version__, ort.get_available_providers()
        in_range = version_satisfies(installed, runtime.get("version", ""))
    except ImportError:
        installed, available, in_range = None, [], False
    distribution = _ort_distribution(runtime.get("package")) if installed else None
    usable = [name for name in wanted if name in available] or [CPU]
    return {
        "bundle": str(bundle),
        "target": manifest.get("target"),
        "description": (manifest.get("profile") or {}).get("description", ""),
        "model": {
            key: model.get(key)
            for key in ("file", "format", "ort_style", "precision", "ir_version", "opsets", "external_data")
        },
        "inputs": model["inputs"],
        "outputs": model["outputs"],
        "runtime": {
            "package": runtime.get("package"),
            "required": runtime.get("version"),
            "installed": installed,
            "installed_package": distribution,
            "version_ok": in_range,
            "ok": in_range and distribution in (None, runtime.get("package")),
        },
        "providers": {
            "wanted": wanted,
            "available": available,
            "will_use": usable,
            "preferred_available": wanted[0] in available,
            "strict": bool(runtime.get("strict_providers")),
        },
        "session_options": runtime.get("session_options", {}),
        "files": len(manifest["files"]),
        "models": model_names(manifest),
        "model_name": manifest.get("model_name") or model_names(manifest)[0],
    }


def _ort_distribution(wanted: str | None) -> str | None:
    """Which package installed onnxruntime (onnxruntime, onnxruntime-gpu, ...): the one the profile names if
    installed, else the first found; None when its metadata is not there (a frozen executable)."""
    from importlib import metadata

    for name in dict.fromkeys([wanted or "onnxruntime", "onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"]):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return name
    return None


def _runtime_verdict(runtime: dict) -> str:
    if runtime["ok"]:
        return "ok"
    if runtime["version_ok"]:
        return f"version ok, but the package is {runtime['installed_package']}, not {runtime['package']}"
    return "DOES NOT MATCH"


def cmd_info(args) -> int:
    bundle = Path(args.bundle)
    info = describe(bundle, model_view(read_manifest(bundle, check_seal=False), args.model))
    if args.json:
        return _print_json(info)
    model, runtime, providers = info["model"], info["runtime"], info["providers"]
    style = f", {model['ort_style']} style" if model.get("ort_style") else ""
    installed = runtime["installed"] or "not installed"
    rows = [
        ("bundle", f"{bundle} (target {info['target']})"),
        ("", info["description"]),
        *(
            [("models", f"{', '.join(info['models'])} (this is {info['model_name']}; choose with --model)")]
            if len(info["models"]) > 1
            else []
        ),
        (
            "model",
            f"{model['file']} ({model['format']}{style}, {model['precision']}), IR {model['ir_version']}, "
            f"opsets {', '.join(f'{k} {v}' for k, v in (model['opsets'] or {}).items())}",
        ),
        *[("input", f"{io['name']}: {io['dtype']} {_shape_text(io['shape'] or [])}") for io in info["inputs"]],
        *[("output", f"{io['name']}: {io['dtype']} {_shape_text(io['shape'] or [])}") for io in info["outputs"]],
        (
            "runtime",
            f"needs {runtime['package']}{runtime['required']}; installed "
            f"{runtime['installed_package'] or 'onnxruntime'} {installed} ({_runtime_verdict(runtime)})",
        ),
        ("providers", f"wanted {', '.join(providers['wanted'])}"),
        ("", f"available {', '.join(providers['available']) or '-'}"),
        (
            "",
            f"will use {', '.join(providers['will_use'])}"
            + (
                ""
                if providers["preferred_available"]
                else f" ({providers['wanted'][0]} missing: {'refused' if providers['strict'] else 'fallback'})"
            ),
        ),
        ("files", f"{info['files']} listed in {MANIFEST} (not checked here: run `verify`)"),
    ]
    for label, text in rows:
        print(f"{label:<10} {text}".rstrip())
    return 0


def cmd_verify(args) -> int:
    bundle = Path(args.bundle)
    key = required_key(args.public_key)
    manifest = read_manifest(bundle)
    signer = verify_signature(bundle, manifest, key) if key else None
    report = check_files(bundle, manifest)
    if args.json:
        _print_json({**report.to_dict(), "signed_by": signer})
    elif report.ok:
        signed = (
            f", signed by key {signer}"
            if signer
            else f" ({SIGNATURE} not checked: give --public-key)"
            if (bundle / SIGNATURE).is_file()
            else ""
        )
        print(f"ok: {report.checked} files of {bundle} match {MANIFEST}{signed}")
    if not report.ok:
        raise VerificationError(f"{bundle}: the bundle does not match its manifest: {report.problems()}")
    return 0


def _load_for(args) -> tuple:
    if args.no_verify:
        print(
            "edgepack_shim: warning: --no-verify: checksums are NOT checked; a corrupted or altered model may "
            "load and give wrong outputs (unsafe)",
            file=sys.stderr,
        )
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    started = time.perf_counter()
    model = load(
        Path(args.bundle),
        providers=providers,
        verify=not args.no_verify,
        strict_providers=True if args.strict_providers else None,
        public_key=args.public_key,
        model=args.model,
    )
    seconds = time.perf_counter() - started
    if model.fallback:
        print(
            f"edgepack_shim: warning: running on {model.providers[0]}, not {model.wanted_providers[0]}: "
            f"{model.fallback}",
            file=sys.stderr,
        )
    for warning in model.warnings:
        print(f"edgepack_shim: warning: {warning}", file=sys.stderr)
    return model, seconds


def cmd_run(args) -> int:
    output = output_path(Path(args.output), Path(args.bundle))
    model, load_seconds = _load_for(args)
    feeds = read_inputs(Path(args.inputs), model)
    started = time.perf_counter()
    outputs = model.run(feeds)
    run_seconds = time.perf_counter() - started
    write_outputs(output, outputs)
    if args.json:
        return _print_json(
            {
                "ok": True,
                "output_file": str(output),
                "providers": model.providers,
                "verified": not args.no_verify,
                "seconds": {"load": round(load_seconds, 4), "run": round(run_seconds, 4)},
                "outputs": {name: _summary(value) for name, value in outputs.items()},
            }
        )
    for name, value in outputs.items():
        print(f"{name}: {_described(value)}")
    print(f"wrote {output} ({model.providers[0]}, {run_seconds * 1000:.2f} ms)")
    return 0


def output_path(output: Path, bundle: Path) -> Path:
    """``output`` if a file can be written there, checked before any work: not inside the bundle (whose
    every file is checksummed, so ``verify`` would then fail), not a folder, in a folder that exists."""
    try:
        where = output.resolve()
        if where.is_relative_to(bundle.resolve()):
            raise UsageError(
                f"-o {_shown(str(output))} is inside the bundle {bundle}: the bundle's files are "
                "checksummed, so `verify` would report it; write the outputs elsewhere "
                "(e.g. -o ../outputs.npz)"
            )
        if where.is_dir():
            raise UsageError(
                f"-o {_shown(str(output))} is a folder: name the file to write, e.g. {output / 'outputs.npz'}"
            )
        if not where.parent.is_dir():
            raise UsageError(f"-o {_shown(str(output))}: the folder {_shown(str(output.parent))} does not exist")
    except OSError as exc:
        raise UsageError(f"-o {_shown(str(output))}: {exc.strerror or exc}") from None
    if not os.access(where.parent, os.W_OK):
        raise UsageError(f"-o {_shown(str(output))}: the folder {_shown(str(output.parent))} is not writable")
    return output


def write_outputs(output: Path, outputs: dict) -> None:
    """Write the outputs atomically: a temporary file beside ``output``, renamed over it, removed on failure."""
    temp = output.with_name(f".{output.name}.partial")
    try:
        with open(temp, "wb") as f:
            flat = flat_outputs(outputs)
            if output.suffix == ".npy" and len(flat) == 1:
                np.save(f, next(iter(flat.values())))
            else:
                np.savez(f, **flat)
        os.replace(temp, output)
    except OSError as exc:
        raise UsageError(f"cannot write {_shown(str(output))}: {exc.strerror or exc}") from None
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


def flat_outputs(outputs: dict) -> dict:
    """Outputs as arrays for an .npz: a sequence output ``s`` as ``s.0``, ``s.1``, ...; a map ``m`` as ``m.<key>``
    (an ai.onnx.ml ZipMap's sequence of maps as ``s.0.<key>``, ...)."""
    flat: dict = {}

    def add(name: str, value) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                add(f"{name}.{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                add(f"{name}.{index}", item)
        else:
            flat[name] = np.asarray(value)

    for name, value in outputs.items():
        add(name, value)
    return flat


def json_value(value):
    """An output for JSON: a tensor as dtype, shape and nested lists; a sequence as a list, a map as an object."""
    if isinstance(value, dict):
        return {"type": "map", "data": {str(k): json_value(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"type": "sequence", "data": [json_value(v) for v in value]}
    value = np.asarray(value)
    return {"dtype": str(value.dtype), "shape": list(value.shape), "data": value.tolist()}


def _described(value) -> str:
    if isinstance(value, dict):
        return f"map of {len(value)}"
    if isinstance(value, (list, tuple)):
        return f"sequence of {len(value)}"
    return f"{value.dtype} {tuple(value.shape)}"


def _summary(value) -> dict:
    if isinstance(value, dict):
        return {"type": "map", "length": len(value)}
    if isinstance(value, (list, tuple)):
        return {"type": "sequence", "length": len(value), "items": [_summary(v) for v in value[:16]]}
    value = np.asarray(value)
    summary: dict = {"dtype": str(value.dtype), "shape": list(value.shape)}
    if value.size and value.dtype.kind in "biuf":
        summary.update(min=float(value.min()), max=float(value.max()), mean=float(value.mean(dtype=np.float64)))
    return summary


def cmd_bench(args) -> int:
    if args.runs < 1 or args.warmup < 0:
        raise UsageError("--runs must be at least 1 and --warmup at least 0")
    model, load_seconds = _load_for(args)
    tested = next((s for s in model.manifest.get("stages", []) if s.get("stage") == "self_test"), None)
    feeds = (
        read_inputs(Path(args.inputs), model)
        if args.inputs
        else sample_inputs(model.inputs, _dims(args.dim), tested=tested)
    )
    arrays = check_feeds(model.inputs, feeds)
    started = time.perf_counter()
    model.run(arrays)
    first = time.perf_counter() - started
    for _ in range(args.warmup):
        model.run(arrays)
    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        model.run(arrays)
        times.append(time.perf_counter() - started)
    ms = np.array(times) * 1000
    result = {
        "providers": model.providers,
        "inputs": {name: {"dtype": str(a.dtype), "shape": list(a.shape)} for name, a in arrays.items()},
        "runs": args.runs,
        "warmup": args.warmup,
        "load_s": round(load_seconds, 4),
        "first_run_ms": round(first * 1000, 3),
        "latency_ms": {
            "p50": round(float(np.percentile(ms, 50)), 4),
            "p90": round(float(np.percentile(ms, 90)), 4),
            "p99": round(float(np.percentile(ms, 99)), 4),
            "mean": round(float(ms.mean()), 4),
            "min": round(float(ms.min()), 4),
            "max": round(float(ms.max()), 4),
        },
        "throughput_per_s": round(len(times) / sum(times), 2),
    }
    if args.json:
        return _print_json(result)
    lat = result["latency_ms"]
    shapes = ", ".join(f"{n} {v['dtype']} {tuple(v['shape'])}" for n, v in result["inputs"].items())
    print(f"providers  {', '.join(model.providers)}")
    print(f"inputs     {shapes}")
    print(f"load       {load_seconds:.3f} s (verification and session)")
    print(f"first run  {result['first_run_ms']:.3f} ms")
    print(
        f"latency    p50 {lat['p50']:.3f} ms  p90 {lat['p90']:.3f} ms  p99 {lat['p99']:.3f} ms  "
        f"(mean {lat['mean']:.3f} ms over {args.runs} runs after {args.warmup} warm-up)"
    )
    print(f"throughput {result['throughput_per_s']:.1f} runs/s (one at a time)")
    return 0


def _dims(pairs: list) -> dict:
    dims = {}
    for pair in pairs or []:
        name, _, value = pair.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise UsageError(f"--dim expects NAME=SIZE with a positive size, got {pair!r}")
        dims[name] = int(value)
    return dims


def make_server(model: Model, host: str = "127.0.0.1", port: int = 8080, max_bytes: int = 16 << 20):
    """A minimal JSON endpoint: ``POST /run`` {"inputs": {...}} -> {"outputs": {...}}; ``GET /info``, ``GET /health``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    info = {
        "target": model.manifest.get("target"),
        "inputs": model.inputs,
        "outputs": model.outputs,
        "providers": model.providers,
        "max_request_bytes": max_bytes,
    }

    class Handler(BaseHTTPRequestHandler):
        server_version = "edgepack-shim"
        protocol_version = "HTTP/1.1"
        timeout = SOCKET_TIMEOUT  # a client that stops sending loses its connection instead of holding a thread
        default_request_version = "HTTP/1.0"  # an unparseable request line still gets a status line

        def do_GET(self):
            if self.path == "/health":
                self._reply(200, {"ok": True})
            elif self.path in ("/", "/info"):
                self._reply(200, info)
            else:
                self._reply(
                    404, {"error": f"no such path {_shown(self.path)}: use POST /run, GET /info or GET /health"}
                )

        def do_POST(self):
            if self.path != "/run":
                return self._reply(404, {"error": f"no such path {_shown(self.path)}: use POST /run"})
            length = self.headers.get("Content-Length")
            if length is None:
                return self._reply(411, {"error": "a Content-Length header is required"}, close=True)
            if not (length.isascii() and length.isdigit()) or len(length) > 20:
                return self._reply(400, {"error": "the Content-Length header is not a number of bytes"}, close=True)
            if int(length) > max_bytes:
                self._discard(int(length))
                return self._reply(
                    413,
                    {
                        "error": f"request body of {length} bytes is over the limit of "
                        f"{max_bytes} bytes (serve --max-request-mb)"
                    },
                    close=True,
                )
            raw = self.rfile.read(int(length))
            if _nesting(raw) > MAX_NESTING:
                return self._reply(400, {"error": f"the body nests deeper than {MAX_NESTING} levels"})
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                return self._reply(400, {"error": f"the body is not JSON: {_shown(str(exc))[1:-1]}"})
            try:
                if not isinstance(body, dict) or set(body) != {"inputs"}:
                    raise InputError('the request body must be {"inputs": {"<input name>": [nested lists], ...}}')
                started = time.perf_counter()
                outputs = model.run(from_json(model.inputs, body["inputs"]))
                ms = (time.perf_counter() - started) * 1000
            except InputError as exc:
                return self._reply(400, {"error": str(exc)})
            except ShimError as exc:
                return self._reply(500, {"error": str(exc)})
            self._reply(
                200,
                {
                    "outputs": {name: json_value(v) for name, v in outputs.items()},
                    "ms": round(ms, 3),
                },
            )

        def do_PUT(self):
            self._reply(405, {"error": "use POST /run, GET /info or GET /health"})

        do_DELETE = do_PATCH = do_PUT

        def _discard(self, length: int):
            """Read a refused body in small pieces (so the client sees the answer, not a reset), up to a bound."""
            left = length if length <= 8 * max_bytes else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

        def _reply(self, status: int, payload: dict, close: bool = False):
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:  # the unread body must not be parsed as the next request
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            if verbose.is_set():
                sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    verbose = threading.Event()
    server = bounded_server(ThreadingHTTPServer)((host, port), Handler)
    server.verbose = verbose
    return server


SOCKET_TIMEOUT = 30.0
MAX_CONNECTIONS = 32


def bounded_server(base):
    """``base`` (a ThreadingHTTPServer) with at most MAX_CONNECTIONS threads: a connection over the limit
    gets 503 and is closed. A handler's failure is one line on stderr, never a traceback."""
    import threading

    class Bounded(base):  # type: ignore[valid-type,misc]  # a subclass of a class given at run time
        daemon_threads = True
        name = "edgepack_shim"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

        def process_request(self, request, client_address):
            if not self.slots.acquire(blocking=False):
                try:
                    request.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\nRetry-After: 1\r\n\r\n"
                    )
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request, client_address):
            exc = sys.exc_info()[1]
            if exc is not None and not isinstance(exc, (ConnectionError, TimeoutError)):
                print(
                    f"{self.name}: error: request from {client_address[0]} failed: {type(exc).__name__}: "
                    f"{_shown(_first_line(exc))[1:-1]}",
                    file=sys.stderr,
                )

    return Bounded


def cmd_serve(args) -> int:
    if args.max_request_mb <= 0:
        raise UsageError("--max-request-mb must be positive")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected 0 (any free port) to 65535")
    model, _ = _load_for(args)
    try:
        server = make_server(model, args.host, args.port, int(args.max_request_mb * (1 << 20)))
    except (OSError, OverflowError) as exc:
        raise UsageError(
            f"cannot listen on {_shown(args.host)[1:-1]}:{args.port}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if args.verbose:
        server.verbose.set()
    host, port = server.server_address[:2]
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(
            f"edgepack_shim: warning: listening on {host}: anyone who reaches this address can run the model "
            "(no authentication)",
            file=sys.stderr,
        )
    print(
        f"serving {model.manifest['model']['file']} on http://{host}:{port} with {model.providers[0]} "
        "(POST /run, GET /info, GET /health; Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _print_json(data) -> int:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of this program
        self.exit(2, f"edgepack_shim: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgepack_shim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bundle", default=str(default_bundle()), help="bundle folder (default: the folder of this file)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    loading = _Parser(add_help=False)
    loading.add_argument("--no-verify", action="store_true", help="skip checksum verification (unsafe)")
    loading.add_argument(
        "--strict-providers",
        action="store_true",
        help="refuse to run unless the preferred execution provider is active",
    )
    loading.add_argument("--providers", metavar="A,B", help="execution providers to use instead of the manifest's")
    which = _Parser(add_help=False)
    which.add_argument(
        "--model", metavar="NAME", help="which model of a multi-model bundle (default: the first; `info` lists them)"
    )
    signed = _Parser(add_help=False)
    signed.add_argument(
        "--public-key",
        metavar="PEM",
        help=f"require a signature ({SIGNATURE}) by this P-256 public "
        f"key (a key pinned beside this file as {PINNED_KEY} is required without this flag)",
    )
    loading = _Parser(add_help=False, parents=[loading, signed, which])
    as_json = _Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON on stdout")

    sub.add_parser("info", parents=[as_json, which], help="model I/O, target, providers wanted vs available")
    sub.add_parser(
        "verify",
        parents=[signed, as_json],
        help="check every file's checksum against the manifest (and the signature, with --public-key)",
    )
    run = sub.add_parser(
        "run", parents=[loading, as_json], help="run the model on inputs from an .npz (.npy: one input)"
    )
    run.add_argument("inputs")
    run.add_argument("-o", "--output", default="outputs.npz", help="where to write the outputs (.npz, or .npy for one)")
    bench = sub.add_parser("bench", parents=[loading, as_json], help="first-run time, latency percentiles, throughput")
    bench.add_argument("--runs", type=int, default=100)
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--inputs", help="an .npz/.npy of inputs (default: random inputs of the model's shapes)")
    bench.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a named dynamic dim (repeatable)")
    serve = sub.add_parser("serve", parents=[loading], help="HTTP JSON endpoint (POST /run)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    serve.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    serve.add_argument("--max-request-mb", type=float, default=16.0, help="largest request body accepted")
    serve.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser


COMMANDS = {"info": cmd_info, "verify": cmd_verify, "run": cmd_run, "bench": cmd_bench, "serve": cmd_serve}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ShimError as exc:
        print(f"edgepack_shim: error: {_bounded(' '.join(str(exc).split()))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgepack_shim: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug here or in a library: still one line
        print(
            f"edgepack_shim: error: internal error: {type(exc).__name__}: {_bounded(_first_line(exc))}", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
