"""Weights of a large model left in their side files while onnxruntime's quantizers read them.

Rules:
1. Over ``LARGE_MODEL`` bytes (model and side files) a weight-quantizing recipe loads the model without the
   external data of tensors over ``KEPT_IN_INFERENCE`` bytes: the small ones (shapes, axes, biases) are read
   in, as shape inference and the quantizers read their values; the large ones still name their side file.
2. While ``weights_read_from(folder)`` is active, ``onnx.numpy_helper.to_array``, which onnxruntime's
   quantizers call without a folder and which reads external data without keeping it in the tensor, reads
   side files from ``folder``: each weight is read when it is quantized, so FP32 and quantized weights are
   never held at once.
   (int4 gets the same from running its quantizer in ``folder``: it reads weights with onnx-ir, which
   looks for side files in the working folder.)
3. Before the quantized model is written, what was left in float is read in (``load_remaining``): a tensor
   left naming the input's side file would not be found beside the output. onnxruntime's own save
   (``ONNXModel.save_model_to_file``, inside ``quantize_dynamic``) is covered by rule 2's context too.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["LARGE_MODEL", "KEPT_IN_INFERENCE", "load_small_tensors", "load_remaining", "nbytes", "weights_read_from"]

LARGE_MODEL = 2 << 30
"""Rules apply over this many bytes of model and side files: protobuf's limit, where weights must be external."""

KEPT_IN_INFERENCE = 1 << 20
"""Initializers up to this size are held in memory (Reshape's shape, Slice's starts: values inference reads)."""


def load_small_tensors(path: Path):
    """Rule 1: the model at ``path``, the external data of its tensors up to ``KEPT_IN_INFERENCE`` read in."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_tensor, uses_external_data

    model = onnx.load_model(path, load_external_data=False)
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor) and nbytes(tensor) <= KEPT_IN_INFERENCE:
            load_external_data_for_tensor(tensor, str(path.parent))
    return model


def load_remaining(model, folder: Path) -> None:
    """Rule 3: read in every tensor of ``model`` still in a side file of ``folder``."""
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(folder))


@contextlib.contextmanager
def weights_read_from(folder: Path):
    """Rules 2 and 3 while active: side files are read from ``folder``, and onnxruntime's save reads in what
    is left there first."""
    import onnx.external_data_helper as external
    import onnx.numpy_helper as numpy_helper

    to_array, convert = numpy_helper.to_array, external.convert_model_to_external_data

    def read(tensor, base_dir: str = ""):
        return to_array(tensor, base_dir or str(folder))

    def read_in_then_convert(model, *args, **kwargs):
        load_remaining(model, folder)
        return convert(model, *args, **kwargs)

    numpy_helper.to_array, external.convert_model_to_external_data = read, read_in_then_convert
    try:
        yield
    finally:
        numpy_helper.to_array, external.convert_model_to_external_data = to_array, convert


def nbytes(tensor) -> int:
    """The size of ``tensor``'s values from its type and dims (none read)."""
    import numpy as np
    from onnx import helper

    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize if tensor.data_type else 0
