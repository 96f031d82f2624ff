"""edgepack: turn one trained model into verified deployment bundles for edge and browser targets."""

import os

# before onnxruntime is imported anywhere: with telemetry on, it leaves a `.ses` file in $TMPDIR and a
# database in ~/.cache on every run
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

__all__ = ["package"]


def __getattr__(name: str):
    # `import edgepack` stays light: the pipeline (onnx, onnxruntime) loads on first use of the API
    if name == "package":
        from .api import package

        return package
    raise AttributeError(f"module 'edgepack' has no attribute {name!r}")
