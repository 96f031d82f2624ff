"""Import ``onnxruntime.tools`` without PyTorch.

The package's ``__init__`` imports torch whenever torch is installed, only to offer a PyTorch-export
helper (``infer_input_info``) that edgepack never uses: 1 to 7 s of every ONNX packaging run on a
machine with the torch extra. Registering the package without running its ``__init__`` keeps its
submodules (the ORT-format converter, model utils) importable as usual.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["without_torch_helper"]


def without_torch_helper() -> None:
    """Call before the first ``import onnxruntime.tools.<module>``; a no-op once the package is imported."""
    if "onnxruntime.tools" in sys.modules:
        return
    import onnxruntime  # noqa: F401  the parent package must be imported first

    spec = importlib.util.find_spec("onnxruntime.tools")
    if spec is None:
        return
    package = importlib.util.module_from_spec(spec)
    sys.modules["onnxruntime.tools"] = package
    onnxruntime.tools = package
