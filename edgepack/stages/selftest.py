"""Stage 8, self-test: load the bundle as the device would and compare it with the FP32 reference.

Rules:
1. The bundle is loaded through its own runtime shim (checksums verified, the manifest's session
   options, the CPU provider), so a converted model that does not load never ships.
2. It runs on the user's ``--sample-inputs`` or on generated inputs; the reference model runs on the same.
   The reference runs first and is released before the bundle is loaded, so a large model is never
   held twice in memory at once.
3. Max abs error and cosine similarity go into the manifest; missing the profile's tolerance is an error.
"""

from __future__ import annotations

import os

import onnx

from ..accuracy import compare
from ..errors import AccuracyError, ConversionError
from ..job import Artifact, Job
from ..modelinfo import describe_io
from ..samples import generate_inputs, load_inputs

__all__ = ["self_test"]

SAMPLE_SETS = 3


def self_test(artifact: Artifact, job: Job) -> tuple[Artifact, dict]:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    from ..runtime_shim import edgepack_shim

    inputs, outputs = describe_io(onnx.load_model(artifact.onnx_path, load_external_data=False))
    if job.options.sample_inputs:
        samples, origin = load_inputs(job.options.sample_inputs, inputs), str(job.options.sample_inputs)
    else:
        samples, origin = generate_inputs(inputs, count=SAMPLE_SETS), "generated"
    output_names = [o["name"] for o in outputs]
    try:
        expected = _run_reference(job, output_names, samples)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"running the FP32 reference model failed: {detail}", where=job.profile.name) from None
    try:
        # the packaging host's onnxruntime stands in for the device's, whatever the bundle's version range
        bundled = edgepack_shim.load(job.staging, providers=["CPUExecutionProvider"], check_runtime=False)
    except Exception as exc:  # onnxruntime raises bare Exception subclasses from C++
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"the packaged model does not load in onnxruntime: {detail}", where=job.profile.name,
                              hint="try another ort_format style in the profile (Fixed/Runtime/none)") from None
    try:
        got = [bundled.run(feeds) for feeds in samples]
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"running the packaged model failed: {detail}", where=job.profile.name) from None
    figures = compare(expected, got)
    tolerance = job.profile.accuracy
    passed = figures["max_abs_error"] <= tolerance.max_abs_error and figures["cosine"] >= tolerance.min_cosine
    report = {
        "stage": "self_test",
        "summary": f"{'passed' if passed else 'FAILED'}: max abs error {figures['max_abs_error']:.3g} "
        f"(<= {tolerance.max_abs_error:g}), cosine {figures['cosine']:.6f} (>= {tolerance.min_cosine:g}) "
        f"on {len(samples)} {origin} input set(s)",
        "passed": passed,
        "inputs": origin,
        "sample_sets": len(samples),
        "providers": bundled.providers,
        "onnxruntime": ort.__version__,
        **figures,
    }
    if not passed:
        raise AccuracyError(
            f"the packaged model's outputs miss the tolerance: max abs error {figures['max_abs_error']:.4g} "
            f"(allowed {tolerance.max_abs_error:g}), cosine {figures['cosine']:.6f} (required {tolerance.min_cosine:g})",
            where=job.profile.name,
            hint="check the model with --sample-inputs of real data, or loosen accuracy in the profile if that is acceptable",
        )
    return artifact, report


def _run_reference(job: Job, output_names: list[str], samples: list[dict]) -> list[dict]:
    """The reference's outputs; its session (the whole model in memory) is gone when this returns."""
    import onnxruntime as ort

    reference = ort.InferenceSession(str(job.source.reference), providers=["CPUExecutionProvider"])
    return [dict(zip(output_names, reference.run(output_names, feeds))) for feeds in samples]
