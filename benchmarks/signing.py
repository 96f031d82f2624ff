"""What signing costs: sign and verify time against bundle size, and the shim's cold start with and
without the signature check, side by side.

Bundles: the example CNN packaged for this host, plus copies grown to each --sizes value (MB) by a file
of random bytes listed in the manifest (write_manifest hashes it, as the pipeline would). For each size:

- edgepack verify:     every file hashed once against the manifest (the hashing signing must not repeat)
- sign (pipeline):     sign_bundle with the manifest just written: reuses its digests, hashes only manifest.json
- sign (existing):     `edgepack sign`'s path: verify every file against the manifest once, then sign
- model_signing sign:  the upstream library's own signer on the same folder (hashes every file itself)
- shim: signature only / verify without key / verify with key: the device side (pure-Python ECDSA P-256)

Cold start: fresh processes of ``python edgepack_shim.py run`` with and without ``--public-key``,
interleaved, on the smallest and largest bundle; medians and ratios.

    .venv/bin/python benchmarks/signing.py [--sizes 1,16,64] [--repeats 5] [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cold_start import package_cnn, timed  # noqa: E402


def best_of(repeats: int, action) -> float:
    """Median seconds of ``repeats`` calls of ``action``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def grown(bundle: Path, folder: Path, megabytes: int) -> tuple[Path, dict]:

    copy = Path(shutil.copytree(bundle, folder / f"{megabytes}MB" / bundle.name))
    (copy / "model.sig").unlink(missing_ok=True)
    if megabytes:
        with open(copy / "model" / "padding.bin", "wb") as f:
            rng = np.random.default_rng(megabytes)
            for _ in range(megabytes):
                f.write(rng.bytes(1 << 20))
    manifest = json.loads((copy / "manifest.json").read_text())
    content = {k: v for k, v in manifest.items() if k not in ("schema", "files", "manifest_sha256")}
    return copy, content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,16,64", help="extra MB per bundle, comma-separated (default 1,16,64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per step (median; default 5)")
    parser.add_argument("--runs", type=int, default=10, help="cold-start runs per variant (default 10)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from model_signing import signing as upstream_signing

    from edgepack.bundle.manifest import verify_bundle, write_manifest
    from edgepack.bundle.signing import generate_key, load_private_key, sign_bundle
    from edgepack.runtime_shim import edgepack_shim as shim

    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="edgepack-signing-") as scratch:
        scratch = Path(scratch)
        generate_key(scratch / "key.priv", scratch / "key.pub", None)
        key = load_private_key(scratch / "key.priv")
        device_key = shim.read_public_key(scratch / "key.pub")
        base = package_cnn(scratch)
        rows, bundles = [], {}
        for megabytes in [0, *sizes]:
            bundle, content = grown(base, scratch, megabytes)
            written = write_manifest(bundle, content)
            t_hash = best_of(args.repeats, lambda bundle=bundle: verify_bundle(bundle))
            total = sum(e["size"] for e in written["files"].values()) + (bundle / "manifest.json").stat().st_size
            t_sign = best_of(
                args.repeats, lambda bundle=bundle, written=written: sign_bundle(bundle, key, manifest=written)
            )
            t_sign_existing = best_of(args.repeats, lambda bundle=bundle: sign_bundle(bundle, key))
            upstream = upstream_signing.Config().use_elliptic_key_signer(private_key=scratch / "key.priv")
            t_upstream = best_of(
                args.repeats, lambda bundle=bundle, upstream=upstream: upstream.sign(bundle, scratch / "upstream.sig")
            )
            sign_bundle(bundle, key, manifest=written)
            manifest = shim.read_manifest(bundle)
            t_sig_only = best_of(
                args.repeats,
                lambda bundle=bundle, manifest=manifest: shim.verify_signature(bundle, manifest, device_key),
            )
            t_verify = best_of(args.repeats, lambda bundle=bundle: shim.verify_bundle(bundle))
            t_verify_key = best_of(args.repeats, lambda bundle=bundle: shim.verify_bundle(bundle, device_key))
            assert verify_bundle(bundle).ok
            rows.append((total, t_hash, t_sign, t_sign_existing, t_upstream, t_sig_only, t_verify, t_verify_key))
            bundles[megabytes] = bundle

        print(f"signing cost vs bundle size; median of {args.repeats} each, ms (one process, warm file cache)")
        head = (
            "bundle MB",
            "edgepack verify",
            "sign(pipeline)",
            "sign(existing)",
            "model_signing sign",
            "shim sig only",
            "shim verify",
            "shim verify+sig",
        )
        print("  " + "  ".join(f"{h:>18}" for h in head))
        for total, *times in rows:
            print("  " + f"{total / 1e6:>18.2f}  " + "  ".join(f"{t * 1e3:>18.1f}" for t in times))

        inputs = scratch / "inputs.npz"
        np.savez(inputs, image=np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
        out = str(scratch / "out.npz")
        variants = {}
        for megabytes in (0, sizes[-1]):
            bundle = bundles[megabytes]
            command = [sys.executable, str(bundle / "edgepack_shim.py"), "run", str(inputs), "-o", out]
            label = f"+{megabytes} MB" if megabytes else "cnn"
            variants[f"{label}: run (checksums)"] = command
            variants[f"{label}: run --public-key (checksums + signature)"] = command + [
                "--public-key",
                str(scratch / "key.pub"),
            ]
        names = list(variants)
        for name in names:  # once each, untimed: file caches warm for everyone
            timed(variants[name], env)
        samples = {name: [] for name in names}
        for i in range(args.runs):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                samples[name].append(timed(variants[name], env)[0])
    medians = {name: statistics.median(s) for name, s in samples.items()}
    print(f"\nshim cold start, process start -> first result; median of {args.runs} interleaved runs each")
    width = max(map(len, names))
    for name in names:
        print(f"  {name:<{width}}  {medians[name]:.3f} s")
    for plain, signed in zip(names[::2], names[1::2]):
        print(
            f"  {signed.split(':')[0]}: with / without signature = {medians[signed] / medians[plain]:.3f}x "
            f"(+{(medians[signed] - medians[plain]) * 1e3:.1f} ms)"
        )


if __name__ == "__main__":
    main()
