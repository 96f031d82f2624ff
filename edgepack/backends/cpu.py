"""The CPU: onnxruntime's default provider, every target's fallback; nothing to measure.

Its kernels are onnxruntime's kernel registry (``get_all_opkernel_def``); the ``com.microsoft`` ones edgepack
writes came in later releases (``FIRST_RELEASE``), so a profile that admits an older runtime lacks them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .base import Backend

if TYPE_CHECKING:
    from ..profiles import Profile

__all__ = ["Cpu", "FIRST_RELEASE", "first_release"]

FIRST_RELEASE = {"MatMulNBits": (1, 17), "GatherBlockQuantized": (1, 20)}
"""The first onnxruntime release whose CPU provider has each kernel: MatMulNBits came with
microsoft/onnxruntime#17890 (Oct 2023, released in 1.17), GatherBlockQuantized with #21630 (Aug 2024, 1.20)."""


def first_release(op: str) -> str:
    major, minor = FIRST_RELEASE[op]
    return f"{major}.{minor}"


class Cpu(Backend):
    name = "cpu"
    providers = ("CPUExecutionProvider",)

    def kernel_gap(self, profile: Profile, op: str, activation: str) -> str | None:
        import onnxruntime
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        if activation not in _kernel_types().get(op, ()):
            return (
                f"onnxruntime {onnxruntime.__version__}'s CPU provider has no {op} kernel for {activation} activations"
            )
        major, minor = FIRST_RELEASE[op]
        spec = SpecifierSet(profile.runtime.version)
        older = [f"{major}.{m}.0" for m in range(8, minor) if spec.contains(Version(f"{major}.{m}.0"))]
        if older:
            return (
                f"the profile admits {profile.runtime.package} {older[0]} ({profile.runtime.version}), whose CPU "
                f"provider has no {op}: it is in onnxruntime from {first_release(op)}"
            )
        return None


@functools.cache
def _kernel_types() -> dict[str, frozenset[str]]:
    """{op: activation types} of the CPU provider's com.microsoft kernels of ``FIRST_RELEASE``."""
    from ..onnxio.kernels import kernel_defs

    activation_input = {"MatMulNBits": "T1", "GatherBlockQuantized": "T2"}
    found: dict[str, set[str]] = {}
    for kernel in kernel_defs():
        if (
            kernel.domain == "com.microsoft"
            and kernel.op_name in activation_input
            and kernel.provider == "CPUExecutionProvider"
        ):
            types = kernel.type_constraints.get(activation_input[kernel.op_name], [])
            found.setdefault(kernel.op_name, set()).update(t.removeprefix("tensor(").rstrip(")") for t in types)
    return {op: frozenset(types) for op, types in found.items()}
