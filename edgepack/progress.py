"""Progress of long steps (calibration, quantization, ``--tune`` timing, freezing, downloads, hashing).

Code that does a long step says so and reports how far it got; the command line decides how that is
shown. Nothing else imports rich.

    with progress.step("tune: timing 4 candidates", total=60) as step:
        for ...:
            step.advance()

Rules:
1. Nothing is shown unless the caller chose a display with ``shown``: library use stays silent.
2. ``mode_for`` picks the display: ``bars`` (rich, transient, with what is done and the time left) when the
   stream is a terminal, ``plain`` lines when it is not (a log, a pipe), ``off`` for ``-q`` and ``--json``.
3. Plain lines never use carriage returns or escape codes: one line when a step starts, and one at most
   every ``PLAIN_EVERY`` seconds while a step with a known total advances.
4. ``about(label)`` prefixes the steps of one target, as the pipeline's own messages are: ``[rpi-arm64] ...``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Literal, Protocol, TypeVar

__all__ = ["Step", "step", "track", "about", "shown", "mode_for", "Mode"]

Mode = Literal["off", "plain", "bars"]
T = TypeVar("T")

PLAIN_EVERY = 10.0


class Step(Protocol):
    def advance(self, amount: float = 1) -> None: ...


class _Display(Protocol):
    def begin(self, what: str, total: float | None, unit: str) -> Step: ...

    def end(self, step: Step) -> None: ...


class _Silent:
    def advance(self, amount: float = 1) -> None:
        pass


class _Off:
    def begin(self, what: str, total: float | None, unit: str) -> Step:
        return _Silent()

    def end(self, step: Step) -> None:
        pass


class _PlainStep:
    def __init__(self, stream: IO[str], what: str, total: float | None, unit: str):
        self.stream, self.what, self.total, self.unit = stream, what, total, unit
        self.done = 0.0
        self.started = self.printed = time.monotonic()

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        now = time.monotonic()
        if self.total and now - self.printed >= PLAIN_EVERY:
            self.printed = now
            left = (now - self.started) * (self.total - self.done) / self.done if self.done else None
            eta = f", about {left:.0f} s left" if left is not None else ""
            print(
                f"{self.what}: {_amount(self.done, self.unit)} of {_amount(self.total, self.unit)}{eta}",
                file=self.stream,
                flush=True,
            )


class _Plain:
    def __init__(self, stream: IO[str]):
        self.stream = stream

    def begin(self, what: str, total: float | None, unit: str) -> Step:
        size = f" ({_amount(total, unit)})" if total and unit == "bytes" else ""
        print(f"{what}{size} ...", file=self.stream, flush=True)
        return _PlainStep(self.stream, what, total, unit)

    def end(self, step: Step) -> None:
        pass


class _RichStep:
    def __init__(self, bars: _Bars, task_id):
        self.bars, self.task_id = bars, task_id

    def advance(self, amount: float = 1) -> None:
        self.bars.progress.advance(self.task_id, amount)


class _Bars:
    """One rich Progress shared by nested steps: started by the first, stopped when the last ends."""

    def __init__(self, stream: IO[str]):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=stream),
            transient=True,
        )
        self.active = 0

    def begin(self, what: str, total: float | None, unit: str) -> Step:
        # rich gives every task the same columns: byte counts are written into the description instead
        description = what if unit != "bytes" or not total else f"{what} ({_amount(total, unit)})"
        task_id = self.progress.add_task(description, total=total)
        if self.active == 0:
            self.progress.start()
        self.active += 1
        return _RichStep(self, task_id)

    def end(self, step: Step) -> None:
        assert isinstance(step, _RichStep)
        self.progress.remove_task(step.task_id)
        self.active -= 1
        if self.active == 0:
            self.progress.stop()


_display: _Display = _Off()
_label: str = ""


def mode_for(stream: IO[str], *, quiet: bool) -> Mode:
    """Rule 2."""
    if quiet:
        return "off"
    if not stream.isatty():
        return "plain"
    from rich.console import Console

    console = Console(file=stream)
    return "bars" if console.is_terminal and not console.is_dumb_terminal else "plain"


@contextmanager
def shown(mode: Mode, stream: IO[str] | None = None) -> Iterator[None]:
    """Show the steps started inside the block on ``stream`` (default: stderr) as ``mode`` says."""
    global _display
    stream = stream or sys.stderr
    previous = _display
    _display = {"off": _Off, "plain": _Plain, "bars": _Bars}[mode](*(() if mode == "off" else (stream,)))
    try:
        yield
    finally:
        _display = previous


@contextmanager
def about(label: str) -> Iterator[None]:
    """Rule 4: steps started inside the block are shown as ``[label] what``."""
    global _label
    previous = _label
    _label = f"[{label}] "
    try:
        yield
    finally:
        _label = previous


@contextmanager
def step(what: str, *, total: float | None = None, unit: str = "") -> Iterator[Step]:
    """A long step: ``total`` units of work (None: unknown, a spinner); ``unit="bytes"`` for sizes."""
    display = _display
    handle = display.begin(_label + what, total, unit)
    try:
        yield handle
    finally:
        display.end(handle)


def track(items: Iterable[T], what: str, *, total: int | None = None) -> Iterator[T]:
    """Each of ``items``, advancing a step of ``what`` after each one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with step(what, total=total) as handle:
        for item in items:
            yield item
            handle.advance()


def _amount(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 1e6:.1f} MB"
    return f"{value:g}"
