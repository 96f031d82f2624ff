"""Facts of the machine the tests run on."""

from __future__ import annotations

import platform
from pathlib import Path


def saturates_u8s8() -> bool:
    """x86-64 without VNNI: onnxruntime's U8S8 kernels add products in 16 bits there (backends.EXACT_INT8)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8").split()
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)
