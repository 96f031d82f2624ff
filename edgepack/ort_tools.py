"""Import onnxruntime's Python tools without the torch import their package performs.

``onnxruntime/tools/__init__.py`` imports torch whenever it is installed, only to offer a helper edgepack
never uses. That costs a second or more per process and starts torch's thread pools. Importing
``onnxruntime.tools`` once through ``load_ort_tools()`` hides torch for that one import; torch stays
importable afterwards for the code that really needs it.
"""

from __future__ import annotations

import sys

__all__ = ["load_ort_tools"]


def load_ort_tools() -> None:
    if "onnxruntime.tools" in sys.modules:
        return
    hide = "torch" not in sys.modules
    if hide:
        # None in sys.modules makes find_spec("torch") answer None (an import of it raises ImportError);
        # typeshed types sys.modules as dict[str, ModuleType], so it cannot express this documented case
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import onnxruntime.tools  # noqa: F401
    finally:
        if hide:
            del sys.modules["torch"]
