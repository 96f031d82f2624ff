"""Python bundles (Jetson, Raspberry Pi, x86 boxes): the model plus ``edgepack_shim.py``, which needs
only numpy and onnxruntime on the device."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..fileops import copy_file
from ..pipeline.job import Artifact, Job

SHIM = "edgepack_shim.py"


class PythonBundler:
    def write(self, model: Artifact, job: Job) -> dict:
        copy_file(resources.files("edgepack.runtime_shim") / SHIM, job.staging / SHIM)
        runtime = job.profile.runtime
        b = job.destination.name
        (job.staging / "README.md").write_text(
            f"# {job.source.name} for {job.profile.name}\n\n{job.profile.description}.\n\n"
            f"On the device, with Python 3.9+ and `pip install numpy '{runtime.package}{runtime.version}'`:\n\n"
            f"From the folder that holds this bundle (inputs and outputs stay outside it):\n\n"
            f"```\npython {b}/edgepack_shim.py info                       # model inputs/outputs, providers wanted vs available\n"
            f"python {b}/edgepack_shim.py verify                     # every file's checksum against manifest.json\n"
            f"python {b}/edgepack_shim.py run inputs.npz -o out.npz  # run the model (.npy for one input; --json)\n"
            f"python {b}/edgepack_shim.py bench --runs 200           # first-run time, p50/p90/p99 latency, throughput\n"
            f"python {b}/edgepack_shim.py serve --port 8080          # HTTP JSON endpoint on 127.0.0.1 (POST /run)\n```\n\n"
            "Every command checks the bundle's files before loading the model. Keep other files out of this folder: "
            "an extra file is refused like a changed one, and `run` refuses to write its outputs here. A signed "
            "bundle (model.sig) is checked against its signer's key with `--public-key signer.pub` (verify, run, "
            "bench, serve); a key pinned beside the shim (edgepack_signing.pub) is required without that flag.\n\n"
            "From Python: `import edgepack_shim; m = edgepack_shim.load('.'); out = m.run({...})`.\n",
            encoding="utf-8",
        )
        if job.options.pin_key:
            return {"shim": SHIM, **_pin_key(job, job.options.pin_key)}
        return {"shim": SHIM}


def _pin_key(job: Job, pin_key: Path) -> dict:
    """Pin the signer's public key beside the shim: the shim then refuses any bundle not signed with it.
    The key is part of the bundle, so its fingerprint is in the manifest and REPORT.md (the bundle stage's summary)."""
    from .signing import PINNED_KEY_NAME, fingerprint, load_public_key, public_pem

    key = load_public_key(pin_key)
    (job.staging / PINNED_KEY_NAME).write_bytes(public_pem(key))
    # "summary" replaces the bundle stage's own, so REPORT.md names the pinned key
    return {
        "pinned_key": {"file": PINNED_KEY_NAME, "fingerprint": fingerprint(key)},
        "summary": f"python bundle, signing key pinned beside the shim ({PINNED_KEY_NAME}, fingerprint "
        f"{fingerprint(key)})",
    }
