"""The backend interface: one execution-provider family (CPU, TensorRT, NNAPI, CoreML, WebGPU, XNNPACK).

A backend declares the provider names a profile may list for it, the coverage checker that measures how
much of a model it takes (``measure``, from the two kinds of checker in edgepack/coverage.py), the typed
options each provider accepts, the session config entries its sessions need, and whether its runtime has a
kernel for a ``com.microsoft`` operator a recipe writes (``kernel_gap``: the CPU from onnxruntime's kernel
registry, an accelerator from its operator table). A profile's provider options are read into that type
when the profile loads, and ``check`` applies the rules the device's loader applies later, so a wrong
option fails on the packaging host, not on the device.
The runtime shim keeps its own copy of the rules it needs on the device (runtime_shim/ stands alone).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import onnx

    from ..coverage import CoverageReport
    from ..profiles import Coverage, Profile

__all__ = ["Backend", "ListedBackend"]


class Backend:
    name: ClassVar[str]
    providers: ClassVar[tuple[str, ...]]
    """Execution-provider names as profiles and the manifest write them."""
    checker: ClassVar[str | None] = None
    """The ``coverage.checker`` of profiles that target it; None: nothing to measure (the CPU)."""
    options: ClassVar[dict[str, type]] = {}
    """Provider name -> dataclass of the options it accepts (a provider missing here takes none)."""
    chosen_on_device: ClassVar[dict[str, str]] = {}
    """Provider options the device's loader sets itself -> why a profile may not set them."""

    def check(self, provider: str, options: Any, profile: Profile) -> str | None:
        """What is wrong with ``options`` (already read into their type) beyond their types, for this profile;
        None: nothing."""
        return None

    def measure(self, model: onnx.ModelProto, coverage: Coverage) -> CoverageReport:
        """How much of ``model`` (prepared by ``coverage.prepare``) runs on this backend. Backend modules import
        edgepack.coverage only here: profiles load without onnx."""
        raise NotImplementedError(f"the {self.name} backend has no coverage checker")

    def session_entries(self, model_format: str, ort_style: str | None) -> dict[str, str]:
        """Session config entries a model in this format needs to load as converted, on top of the profile's
        (the shim applies the same rule on the device: ``edgepack_shim.session_options``). Every backend runs
        onnxruntime, which needs them for an .ort model."""
        entries = {}
        if model_format == "ort":
            entries["session.load_model_format"] = "ORT"
        if ort_style == "Runtime":
            # without it onnxruntime silently ignores the saved runtime optimizations
            entries["session.enable_saved_runtime_optimizations"] = "1"
        return entries

    def operator_table(self, profile: Profile) -> tuple[str, frozenset[str]]:
        """The name of the accelerator's operator table for ``profile`` and its ``domain:Op`` entries."""
        raise NotImplementedError(f"the {self.name} backend has no operator table")

    def kernel_gap(self, profile: Profile, op: str, activation: str) -> str | None:
        """Why the runtime of ``profile`` cannot run the ``com.microsoft`` operator ``op`` on ``activation``
        inputs on this backend; None: it can. An accelerator answers from its operator table."""
        from .cpu import first_release

        table, ops = self.operator_table(profile)
        if f"com.microsoft:{op}" in ops:
            return None
        return (
            f"the {self.checker} provider's operator table ({table}) has no com.microsoft {op}; "
            f"onnxruntime's CPU provider has it from {first_release(op)}"
        )


class ListedBackend(Backend):
    """A backend measured by an operator list of edgepack's (edgepack/data, named by ``coverage.op_list``)."""

    def measure(self, model: onnx.ModelProto, coverage: Coverage) -> CoverageReport:
        from ..coverage import list_report

        return list_report(model, coverage)

    def operator_table(self, profile: Profile) -> tuple[str, frozenset[str]]:
        from ..coverage import load_op_list

        return f"edgepack/data/{profile.coverage.op_list}", frozenset(load_op_list(profile.coverage.op_list)[0])


@functools.cache
def mobile_helpers_table(name: str) -> tuple[str, frozenset[str]]:
    """The ``domain:Op`` rows of one of onnxruntime's ``tools/mobile_helpers`` tables."""
    import onnxruntime

    text = (Path(onnxruntime.__file__).parent / "tools" / "mobile_helpers" / name).read_text(encoding="utf-8")
    return name, frozenset(re.findall(r"^\|([\w.]+:\w+)\|", text, flags=re.MULTILINE))
