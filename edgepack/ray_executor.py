"""``--executor ray``: each (model, target) pair is a Ray task, on this machine or on a cluster.

Rules:
1. The loaded model travels through Ray's object store, put once per model: a task needs no path of
   this machine for it. Files named by options (calibration, validation, sample inputs, ``--ort-web``)
   are read where the task runs, so on a cluster they must be on a path every node sees.
2. A task builds the bundle in its own temporary folder and returns its files as bytes with its result;
   the bundle is written here, into a staging folder renamed into place (signed first, when signing:
   the private key never leaves this process).
3. Without ``--ray-address`` (or ``$RAY_ADDRESS``) a Ray instance is started on this machine for the
   run, bound to 127.0.0.1, with ``--jobs`` CPUs, no dashboard and no usage statistics, and shut down
   at the end; an existing cluster (or a Ray already initialised by the caller) is joined and left running.
4. Ray's own log lines stay out of edgepack's output (``log_to_driver=False``, ERROR level).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .bundle.signing import sign_checked
from .errors import UsageError
from .execution import Execution
from .fileops import atomic_folder
from .pipeline.job import Options, Source
from .pipeline.result import Result
from .pipeline.run import _package_one
from .profiles import Profile

__all__ = ["RayExecutor"]


class RayExecutor:
    def __init__(self, execution: Execution):
        try:
            import ray
        except ImportError:
            raise UsageError(
                "--executor ray needs Ray, which is not installed", hint="pip install 'edgepack[ray]'"
            ) from None
        self._ray = ray
        self._execution = execution
        self._started = False
        self._remote: Any = None
        self._tasks: dict[Any, tuple] = {}

    def __enter__(self):
        ray = self._ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = self._execution.ray_address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            settings: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
            if address:
                settings["address"] = address
            else:
                # a private instance, reachable from this machine only
                settings.update(
                    address="local",
                    num_cpus=self._execution.jobs,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                )
            try:
                ray.init(**settings)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UsageError(
                    f"cannot start or join the Ray cluster: {exc}",
                    where=address or "local Ray",
                    hint="check --ray-address (ray://HOST:10001 or HOST:6379)",
                ) from None
            self._started = True
        self._remote = ray.remote(num_cpus=1)(_ray_pair)
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            for ref in self._tasks:
                self._ray.cancel(ref, force=True)
        if self._started:
            self._ray.shutdown()
        return False

    def share(self, source: Source):
        folder = source.reference.parent
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self._ray.put(files), source

    def submit(self, tag, shared, profile: Profile, options: Options, workdir: Path, destination: Path, signer) -> None:
        files, source = shared
        elsewhere = dataclasses.replace(options, force=False, freeze=False, onefile=False, execution=Execution())
        ref = self._remote.remote(files, source, profile, elsewhere, destination.name)
        self._tasks[ref] = (tag, destination, options.force, signer)

    def completed(self, progress) -> Iterator[tuple[Any, Result, list[str]]]:
        pending = list(self._tasks)
        while pending:
            ready, pending = self._ray.wait(pending, num_returns=1)
            for ref in ready:
                tag, destination, force, signer = self._tasks[ref]
                result, files, lines = self._ray.get(ref)
                result.bundle = destination
                if result.ok:
                    with atomic_folder(destination, force=force) as staging:
                        for rel, (data, mode) in files.items():
                            path = staging / rel
                            path.parent.mkdir(parents=True, exist_ok=True)
                            path.write_bytes(data)
                            os.chmod(path, mode)
                        if signer:
                            result.signed_by = sign_checked(staging, signer.key, result.manifest, destination.name)
                yield tag, result, lines


def _ray_pair(
    files: dict[str, bytes], source: Source, profile: Profile, options: Options, bundle_name: str
) -> tuple[Result, dict[str, tuple[bytes, int]] | None, list[str]]:
    """The Ray task: rebuild the loaded source from its bytes, package one target, return the bundle's files."""
    with tempfile.TemporaryDirectory(prefix="edgepack-ray-") as scratch:
        folder = Path(scratch) / "source"
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        local = dataclasses.replace(source, reference=folder / source.reference.name)
        workdir = Path(scratch) / "work"
        workdir.mkdir()
        destination = Path(scratch) / "out" / bundle_name
        lines: list[str] = []
        result = _package_one(local, profile, options, workdir, destination, lines.append, None)
        bundle = None
        if result.ok:
            bundle = {
                p.relative_to(destination).as_posix(): (p.read_bytes(), p.stat().st_mode & 0o777)
                for p in sorted(destination.rglob("*"))
                if p.is_file()
            }
        return result, bundle, lines
