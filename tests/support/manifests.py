"""The smallest manifest content every reader accepts (the shim's ``manifest_problem`` rules)."""

from __future__ import annotations

from typing import Any


def minimal_content(model_file: str, external_data: list[str] | None = None) -> dict[str, Any]:
    return {
        "target": "t",
        "model": {
            "file": model_file,
            "external_data": list(external_data or []),
            "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}],
        },
        "runtime": {
            "execution_providers": [{"name": "CPUExecutionProvider", "options": {}}],
            "session_options": {"intra_op_num_threads": 0, "graph_optimization_level": "all", "config_entries": {}},
        },
    }
