"""Small ONNX models whose weights live in side files, written byte by byte so tests control every
location, offset and length. Shared by test_external_data.py and test_hostile.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

RNG = np.random.default_rng(7)
HIDDEN = 128  # every tensor over onnx-ir's 256-byte threshold, so re-written models keep external data
W1 = RNG.standard_normal((4, HIDDEN)).astype(np.float32)
B1 = RNG.standard_normal(HIDDEN).astype(np.float32)
W2 = (RNG.standard_normal((HIDDEN, 3)) / np.sqrt(HIDDEN)).astype(np.float32)


def expected_output(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ W1 + B1, 0) @ W2


def mlp_graph(initializers: list[TensorProto]) -> onnx.ModelProto:
    """y = Relu(x @ W1 + B1) @ W2, with x [batch, 4]."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "B1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def external_tensor(name: str, array: np.ndarray, location: str, offset: int, length: int | None = None) -> TensorProto:
    tensor = TensorProto(
        name=name,
        data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
        dims=array.shape,
        data_location=TensorProto.EXTERNAL,
    )
    entries = [
        ("location", location),
        ("offset", str(offset)),
        ("length", str(array.nbytes if length is None else length)),
    ]
    for key, value in entries:
        tensor.external_data.add(key=key, value=value)
    return tensor


def write_split_model(folder: Path, name: str = "mlp.onnx") -> Path:
    """W1 and B1 at offsets 64 and 4096+ of ``weights/a.bin``, W2 alone in ``b.bin``: two side files, one in a subfolder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights").mkdir(exist_ok=True)
    a = bytearray(64) + W1.tobytes()
    b1_offset = 4096 + 128
    a += bytes(b1_offset - len(a)) + B1.tobytes() + bytes(100)  # trailing bytes are allowed
    (folder / "weights" / "a.bin").write_bytes(bytes(a))
    (folder / "b.bin").write_bytes(W2.tobytes())
    inits = [
        external_tensor("W1", W1, "weights/a.bin", 64),
        external_tensor("B1", B1, "weights/a.bin", b1_offset),
        external_tensor("W2", W2, "b.bin", 0),
    ]
    path = folder / name
    path.write_bytes(mlp_graph(inits).SerializeToString())
    return path


def write_inline_model(folder: Path, name: str = "mlp.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    inits = [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(B1, "B1"), numpy_helper.from_array(W2, "W2")]
    path = folder / name
    path.write_bytes(mlp_graph(inits).SerializeToString())
    return path


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mode of every file below ``folder`` (links by their target path), to prove nothing changed."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[rel] = ("link:" + str(path.readlink()), 0)
        elif path.is_file():
            found[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return found
