"""The backend interface: one execution-provider family (CPU, TensorRT, NNAPI, CoreML, WebGPU, XNNPACK).

A backend declares the provider names a profile may list for it, the coverage checker that measures how
much of a model it takes (implemented in edgepack/coverage.py), and the typed options each provider
accepts. A profile's provider options are read into that type when the profile loads, and ``check`` applies
the rules the device's loader applies later, so a wrong option fails on the packaging host, not on the device.
The runtime shim keeps its own copy of the rules it needs on the device (runtime_shim/ stands alone).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["Backend"]


class Backend:
    name: ClassVar[str]
    providers: ClassVar[tuple[str, ...]]
    """Execution-provider names as profiles and the manifest write them."""
    checker: ClassVar[str | None] = None
    """The ``coverage.checker`` of profiles that target it; None: nothing to measure (the CPU)."""
    options: ClassVar[dict[str, type]] = {}
    """Provider name -> dataclass of the options it accepts (a provider missing here takes none)."""

    def check(self, provider: str, options: Any) -> str | None:
        """What is wrong with ``options`` (already read into their type) beyond their types; None: nothing."""
        return None
