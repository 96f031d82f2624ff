"""Shared test helpers: run the CLI for real, build the example models once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# every test builds what it packages (tests of the cache name theirs with --cache-dir); inherited by the CLI runs
os.environ["EDGEPACK_BUNDLE_CACHE"] = "off"

from edgepack.examples import write_example  # noqa: E402


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m edgepack ARGS`` in a fresh process, as a user would run it."""
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def assert_clean_failure(done: subprocess.CompletedProcess, *needles: str) -> None:
    """A refusal as users must see it: non-zero exit, one clear message, no traceback."""
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "edgepack: error:" in done.stderr, done.stderr
    for needle in needles:
        assert needle in done.stderr, f"{needle!r} not in: {done.stderr}"


@pytest.fixture(scope="session")
def cli():
    """The CLI runner, as a fixture so tests need no import of this file."""
    return run_cli


@pytest.fixture(scope="session")
def clean_failure():
    return assert_clean_failure


@pytest.fixture(scope="session")
def examples(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("examples")
    return {name: write_example(name, folder) for name in ("cnn", "transformer")}
