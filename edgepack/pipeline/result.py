"""What packaging returns for each target, and where each target's bundle goes.

Apart from ``run`` (which imports every stage, onnx and onnxruntime), so that restoring bundles from
the cache and reporting them needs none of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..destination import check_destination
from ..errors import EdgepackError, UsageError
from ..profiles import Profile
from .job import Options

__all__ = ["Result", "bundle_path", "refuse_existing_output"]


@dataclass
class Result:
    target: str
    bundle: Path
    ok: bool
    manifest: dict[str, Any] | None = None
    error: EdgepackError | None = None
    seconds: float = 0.0
    frozen: dict[str, Any] | None = None
    """With --freeze: where the frozen executable is and how big (edgepack/bundle/freeze.py)."""
    signed_by: str | None = None
    """With a signing key: its fingerprint, as recorded in the bundle's model.sig."""
    cache: str | None = None
    """With the bundle cache (edgepack/cache.py): "hit" when restored from it, "stored" when built and added."""

    @property
    def notices(self) -> list[str]:
        """What the user must know about this bundle (fallbacks taken), from the stage reports."""
        return [f"{r['stage']}: {r['notice']}" for r in (self.manifest or {}).get("stages", []) if r.get("notice")]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "target": self.target,
            "bundle": str(self.bundle),
            "ok": self.ok,
            "seconds": round(self.seconds, 2),
        }
        if self.manifest:
            data["bytes"] = sum(f["size"] for f in self.manifest["files"].values())
            data["model"] = self.manifest["model"]["file"]
            if self.manifest.get("models"):
                data["models"] = {name: entry["file"] for name, entry in self.manifest["models"].items()}
            data["self_test"] = next(r for r in self.manifest["stages"] if r["stage"] == "self_test")["summary"]
            data["notices"] = self.notices
        if self.frozen:
            data["frozen"] = self.frozen
        if self.signed_by:
            data["signed_by"] = self.signed_by
        if self.cache:
            data["cache"] = self.cache
        if self.error:
            data["error"] = {
                "type": type(self.error).__name__,
                "message": str(self.error),
                "exit_code": self.error.exit_code,
                "stage": self.error.stage,
            }
        return data


def bundle_path(output: Path, model_name: str, profile: Profile) -> Path:
    return output / f"{model_name}-{profile.name}"


def refuse_existing_output(
    name: str, profiles: list[Profile], options: Options, inputs: tuple[Path, ...] = ()
) -> dict[str, Path]:
    """Each target's bundle folder; a UsageError before any work when one (or its frozen executable)
    exists and ``options.force`` is not set, or may not be written or replaced (edgepack/destination.py)."""
    destinations = {p.name: bundle_path(options.output, name, p) for p in profiles}
    existing = [str(d) for d in destinations.values() if os.path.lexists(d)]
    if options.freeze:
        from ..bundle.freeze import frozen_path

        existing += [
            str(frozen_path(destinations[p.name]))
            for p in profiles
            if p.bundle.kind == "python" and os.path.lexists(frozen_path(destinations[p.name]))
        ]
    if existing and not options.force:
        raise UsageError(f"output already exists: {', '.join(existing)}", hint="pass --force to replace it")
    for profile in profiles:
        check_destination(destinations[profile.name], force=options.force, inputs=inputs)
        if options.freeze and profile.bundle.kind == "python":
            from ..bundle.freeze import frozen_path, not_frozen

            check_destination(frozen_path(destinations[profile.name]), force=options.force, recognise=not_frozen)
    return destinations
