"""The one family of errors edgepack raises on purpose.

Each error carries what went wrong, where (a file, a key, an input name) and what to do about it.
The CLI prints them as one message with an exit code; only ``--debug`` shows a traceback.
"""

from __future__ import annotations

__all__ = [
    "EdgepackError",
    "UsageError",
    "ProfileError",
    "ModelError",
    "CompatibilityError",
    "ConversionError",
    "AccuracyError",
    "BudgetError",
    "VerificationError",
    "DownloadError",
]


class EdgepackError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.stage: str | None = None
        """The pipeline stage that raised it, set by the pipeline."""
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class UsageError(EdgepackError):
    """The command line or API call is wrong (unknown target, missing file, bad flag value)."""

    exit_code = 2


class ProfileError(EdgepackError):
    """A target profile YAML is invalid."""

    exit_code = 2


class ModelError(EdgepackError):
    """The model file cannot be read, is not ONNX, or is malformed."""

    exit_code = 3


class CompatibilityError(EdgepackError):
    """The model needs more than the target's runtime offers (opset, IR version, kernels)."""

    exit_code = 4


class ConversionError(EdgepackError):
    """A packaging step (optimize, quantize, ORT conversion) failed."""

    exit_code = 5


class AccuracyError(EdgepackError):
    """The packaged model's outputs are too far from the FP32 reference."""

    exit_code = 6


class BudgetError(EdgepackError):
    """The bundle is larger than the profile allows."""

    exit_code = 6


class VerificationError(EdgepackError):
    """A bundle's files do not match its manifest."""

    exit_code = 7


class DownloadError(EdgepackError):
    """Something edgepack must download (a runtime for a bundle) cannot be fetched."""

    exit_code = 9


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception text (onnxruntime's run to pages), at most 500 characters."""
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__
