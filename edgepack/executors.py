"""Running (model, target) pairs: in this process, in worker processes, or as Ray tasks; with the bundle cache.

Rules:
1. A model is loaded once, in this process, whatever the number of its targets; the workers get the
   loaded source (its files through the local disk, or through Ray's object store), never the user's path.
2. Every pair runs the same stages on the same inputs wherever it runs, so its bundle's bytes do not
   depend on the executor or on ``--jobs`` (tests/test_fleet.py compares them file for file).
3. A pair whose bundle is in the cache is restored before anything is loaded: an unchanged fleet
   costs hashing its inputs and copying its bundles. A model none of whose pairs missed is never loaded.
4. A failing pair is reported in its result; the other pairs go on.
5. Worker processes start from a fork server that has imported the pipeline once (importing it took
   2.8 s in a fresh interpreter at load 10 on 2 cores), not by forking this process: numpy's and
   onnxruntime's threads are already running here. No more workers start than
   there are pairs to build. Workers get the signing key as bytes, so nothing reads the passphrase
   twice. Ray tasks never see the signing key: the bundle comes back as bytes, is signed here and
   renamed into place here.
6. A worker that dies (a native crash in onnxruntime or a helper library) breaks the pool: the pairs it
   took with it run again, each alone in a fresh worker, so the one that crashes fails by itself ("the
   worker packaging this target died") with its half-written folder removed, and the others complete.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ConversionError, EdgepackError, UsageError
from .execution import Execution
from .fileops import remove_staging
from .pipeline.job import Options, Source
from .pipeline.result import Result
from .profiles import Profile
from .progress import about

__all__ = ["ModelWork", "package_models"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelWork:
    """One model and the targets to package it for."""

    model: Path
    name: str
    profiles: list[Profile]
    options: Options
    destinations: dict[str, Path]
    """Each target's bundle folder (pipeline.refuse_existing_output)."""
    origin: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class _Signer:
    key: Any
    fingerprint: str
    der: bytes
    """The key as unencrypted PKCS#8 DER, for worker processes on this machine."""


def package_models(works: list[ModelWork], progress: Progress, *, keep_going: bool = False) -> list[list[Result]]:
    """Package every work's model for its targets; one list of results per work, in target order.

    A model that cannot be loaded raises, unless ``keep_going``: then its pairs fail and the others go on.
    """
    from .cache import BundleCache, bundle_key, options_digest

    if not works:
        return []
    execution = works[0].options.execution
    cache = BundleCache(execution.cache, execution.cache_max_mb) if execution.cache else None
    # a wrong key or passphrase stops everything before any work; each key is read and unlocked once
    keys_used = dict.fromkeys((w.options.sign_key, w.options.sign_passphrase_env) for w in works)
    loaded = {used: _signer(*used) for used in keys_used}
    signers = [loaded[w.options.sign_key, w.options.sign_passphrase_env] for w in works]
    results: dict[tuple[int, str], Result] = {}
    keys: dict[tuple[int, str], str] = {}
    for index, work in enumerate(works):
        signer = signers[index]
        model_files = cache.model_files(work.model) if cache is not None else None
        if cache is None or not model_files:
            continue
        options_part = options_digest(work.options)
        for profile in work.profiles:
            destination = work.destinations[profile.name]
            key = bundle_key(
                model_files,
                destination.name,
                profile,
                options_part,
                signer=signer.fingerprint if signer else None,
                origin=work.origin,
            )
            keys[index, profile.name] = key
            started = time.perf_counter()
            manifest, problem = cache.restore(
                key, destination, force=work.options.force, public_key=signer.key.public_key() if signer else None
            )
            if problem:
                progress(f"[{profile.name}] cache: entry {key[:12]} was corrupt ({problem}): removed, rebuilding")
            if manifest:
                progress(f"[{profile.name}] cache: restored {destination} (entry {key[:12]}, verified)")
                results[index, profile.name] = Result(
                    profile.name,
                    destination,
                    True,
                    manifest=manifest,
                    seconds=time.perf_counter() - started,
                    signed_by=signer.fingerprint if signer else None,
                    cache="hit",
                )
    misses = sum(len(w.profiles) for w in works) - len(results)
    with _executor(execution, misses) as executor, tempfile.TemporaryDirectory(prefix="edgepack-") as scratch:
        for index, work in enumerate(works):
            pending = [p for p in work.profiles if (index, p.name) not in results]
            if not pending:
                continue
            try:
                source = _load(work, Path(scratch) / str(index), progress)
            except EdgepackError as exc:
                if not keep_going:
                    raise
                progress(f"FAILED  load {work.model}: {exc}")
                for profile in pending:
                    results[index, profile.name] = Result(
                        profile.name, work.destinations[profile.name], False, error=exc
                    )
                continue
            shared = executor.share(source)
            for profile in pending:
                workdir = Path(scratch) / str(index) / profile.name
                workdir.mkdir()
                executor.submit(
                    (index, profile.name),
                    shared,
                    profile,
                    work.options,
                    workdir,
                    work.destinations[profile.name],
                    signers[index],
                )
        for tag, result, lines in executor.completed(progress):
            for line in lines:
                progress(line)
            stored_key = keys.get(tag)
            if result.ok and stored_key and cache is not None:
                cache.store(stored_key, result.bundle)
                result.cache = "stored"
            results[tag] = result
    out = []
    for index, work in enumerate(works):
        done = [results[index, p.name] for p in work.profiles]
        if work.options.freeze:
            from .bundle.freeze import freeze_result

            done = [
                freeze_result(r, p, onefile=work.options.onefile, force=work.options.force, progress=progress)
                for r, p in zip(done, work.profiles, strict=True)
            ]
        out.append(done)
    return out


def _load(work: ModelWork, folder: Path, progress: Progress) -> Source:
    from .stages.load import load

    progress(f"load {work.model}")
    (folder / "source").mkdir(parents=True)
    source = load(work.model, folder / "source", work.name)
    return dataclasses.replace(source, origin=list(work.origin)) if work.origin else source


def _signer(sign_key: Path | None, passphrase_env: str | None) -> _Signer | None:
    if not sign_key:
        return None
    from cryptography.hazmat.primitives import serialization

    from .bundle.signing import fingerprint, load_private_key

    key = load_private_key(sign_key, passphrase_env)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return _Signer(key, fingerprint(key.public_key()), der)


def _executor(execution: Execution, pairs: int):
    """Worker processes only when two pairs or more can run at once: starting them costs an interpreter."""
    if execution.jobs < 1:
        raise UsageError(f"--jobs {execution.jobs}: expected 1 or more")
    if execution.executor == "ray" and pairs:
        from .ray_executor import RayExecutor

        return RayExecutor(execution)
    jobs = min(execution.jobs, pairs)
    return ProcessExecutor(jobs) if jobs > 1 else InlineExecutor()


class _LocalExecutor:
    """What the executors on this machine share: nothing to start, and workers read the loaded model where it is."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def share(self, source: Source) -> Source:
        return source


class InlineExecutor(_LocalExecutor):
    """Pairs one after the other in this process, progress as it happens."""

    def __init__(self):
        self._pending: list[tuple] = []

    def submit(
        self,
        tag,
        source: Source,
        profile: Profile,
        options: Options,
        workdir: Path,
        destination: Path,
        signer: _Signer | None,
    ) -> None:
        self._pending.append((tag, source, profile, options, workdir, destination, signer))

    def completed(self, progress: Progress) -> Iterator[tuple[Any, Result, list[str]]]:
        for tag, source, profile, options, workdir, destination, signer in self._pending:
            # not before: a build whose bundles all come from the cache needs none of the pipeline
            from .pipeline.run import _package_one

            with about(profile.name):
                result = _package_one(
                    source, profile, options, workdir, destination, progress, signer.key if signer else None
                )
            yield tag, result, []


class ProcessExecutor(_LocalExecutor):
    """Pairs in worker processes on this machine; each pair's progress is shown when it ends."""

    def __init__(self, jobs: int):
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["edgepack.pipeline.run"])
        self._pool = ProcessPoolExecutor(max_workers=jobs, mp_context=self._context)
        self._futures: dict[Any, Any] = {}
        self._work: dict[Any, tuple] = {}

    def __exit__(self, *exc):
        self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
        return False

    def submit(
        self,
        tag,
        source: Source,
        profile: Profile,
        options: Options,
        workdir: Path,
        destination: Path,
        signer: _Signer | None,
    ) -> None:
        work = (source, profile, options, workdir, destination, signer.der if signer else None)
        self._futures[self._pool.submit(_work, *work)] = tag
        self._work[tag] = work

    def completed(self, progress: Progress) -> Iterator[tuple[Any, Result, list[str]]]:
        pending = set(self._futures)
        lost = []
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    result, lines = future.result()
                except BrokenProcessPool:  # rule 6
                    lost.append(self._futures[future])
                    continue
                yield self._futures[future], result, lines
        for tag in lost:
            yield (tag, *self._alone(tag))

    def _alone(self, tag) -> tuple[Result, list[str]]:
        """A pair a dead worker took with it, again in a worker of its own (rule 6)."""
        source, profile, options, workdir, destination, key_der = self._work[tag]
        remove_staging(destination)
        with ProcessPoolExecutor(max_workers=1, mp_context=self._context) as pool:
            try:
                return pool.submit(_work, source, profile, options, workdir / "again", destination, key_der).result()
            except BrokenProcessPool:
                remove_staging(destination)
        error = ConversionError(
            "the worker process packaging this target died (a native crash in onnxruntime or a library it "
            "calls); the other targets were not affected",
            where=profile.name,
            hint="rerun this target alone with --jobs 1 --debug to see the last step; try another --quantize",
        )
        return Result(profile.name, destination, False, error=error), []


def _work(
    source: Source, profile: Profile, options: Options, workdir: Path, destination: Path, key_der: bytes | None
) -> tuple[Result, list[str]]:
    """Worker-process entry: one pair, its progress lines returned with its result."""
    from .pipeline.run import _package_one

    lines: list[str] = []
    result = _package_one(
        source, profile, options, workdir, destination, lines.append, _private_key(key_der) if key_der else None
    )
    return result, lines


@lru_cache(maxsize=4)
def _private_key(der: bytes):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_der_private_key(der, password=None)
