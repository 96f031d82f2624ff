"""Values of the shape flags (``--input-shape``, ``--self-test-shape``, ``--fix-dim``) read into the form ``Options`` holds."""

from __future__ import annotations

from .errors import UsageError

__all__ = ["parse_input_shapes", "parse_fixed_dims"]


def parse_input_shapes(values: list[str] | None, flag: str = "--input-shape") -> dict[str, tuple[int, ...]]:
    """``["image=1,3,224,224", ...]`` (the --input-shape or --self-test-shape flags) -> ``{"image": (1, 3, 224, 224)}``;
    ``scalar`` for a rank-0 input."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values or []:
        name, dims = _split_flag(flag, value, "NAME=1,3,224,224")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(",")) if dims != "scalar" else ()
        except ValueError:
            raise UsageError(
                f"{flag} {value}: sizes must be integers separated by commas (or 'scalar')",
                hint=f"e.g. {flag} {name}=1,3,224,224",
            ) from None
    return shapes


def parse_fixed_dims(values: list[str] | None) -> dict[str, int]:
    """``["batch=1", ...]`` (the --fix-dim flags) -> ``{"batch": 1}``."""
    dims: dict[str, int] = {}
    for value in values or []:
        name, size = _split_flag("--fix-dim", value, "NAME=VALUE")
        try:
            dims[name] = int(size)
        except ValueError:
            raise UsageError(
                f"--fix-dim {value}: the size must be an integer", hint=f"e.g. --fix-dim {name}=1"
            ) from None
    return dims


def _split_flag(flag: str, value: str, form: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise UsageError(f"{flag} {value!r}: expected {form}")
    return name.strip(), rest.strip()
