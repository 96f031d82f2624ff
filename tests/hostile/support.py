"""Builders shared by the hostile-input tests: small real models, a real bundle, resealed manifests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION, OPSET = 9, 17
SHIM = "edgepack_shim.py"


def relu_model(path: Path, shape=(1, 4), opset: int = OPSET) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def unmergeable_dims_model(path: Path) -> Path:
    """MatMul then Add of two inputs whose first dims have different names: onnxruntime's symbolic shape
    inference stops ("Incomplete") and saves sym_shape_infer_temp.onnx + <uuid>.data in the current folder."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "z"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["m", 64]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def reseal(bundle: Path, manifest: dict) -> None:
    """Write ``manifest`` with a valid seal, as an attacker who read manifest.py would."""
    manifest = {**manifest, "manifest_sha256": "0" * 64}
    data = (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    seal = hashlib.sha256(data).hexdigest()
    blank = b'"manifest_sha256": "' + b"0" * 64 + b'"'
    (bundle / "manifest.json").write_bytes(data.replace(blank, b'"manifest_sha256": "' + seal.encode() + b'"'))


def run_shim(bundle: Path, *args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(bundle / SHIM), *map(str, args)],
        cwd=cwd or bundle.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"},
    )


def tree(folder: Path) -> dict[str, bytes]:
    """Every path below ``folder`` (links as their target text) with its bytes: to compare before and after."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames + dirnames:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                found[rel] = b"-> " + os.readlink(path).encode()
            elif path.is_file():
                found[rel] = path.read_bytes()
            else:
                found[rel] = b"<dir>"
    return found
