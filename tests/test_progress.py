"""Progress of long steps: bars on a terminal, plain lines in a pipe or log, nothing with --json or -q."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

from edgepack import progress

# static quantization calibrates: a step with a known total (one per sample), inside a step without one
COMMAND = ["package", "--example", "cnn", "--target", "linux-x64", "--quantize", "static", "--calibration", "random"]


def test_nothing_is_shown_unless_a_display_is_chosen(capsys):
    with progress.step("work", total=3) as step:
        step.advance()
    assert capsys.readouterr() == ("", "")


def test_plain_lines_name_the_step_and_its_target_once():
    stream = io.StringIO()
    with progress.shown("plain", stream), progress.about("rpi-arm64"):
        for _ in progress.track(range(5), "calibrating"):
            pass
        with progress.step("downloading", total=3_000_000, unit="bytes") as step:
            step.advance(1_000_000)
    assert stream.getvalue() == "[rpi-arm64] calibrating ...\n[rpi-arm64] downloading (3.0 MB) ...\n"


def test_plain_lines_report_a_long_step_now_and_then(monkeypatch):
    stream = io.StringIO()
    clock = iter([0.0, 4.0, 11.0, 15.0, 25.0])  # start, then one reading per advance
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.shown("plain", stream):
        with progress.step("timing", total=4) as step:
            for _ in range(4):
                step.advance()
    assert stream.getvalue().splitlines() == [
        "timing ...",
        "timing: 2 of 4, about 11 s left",
        "timing: 4 of 4, about 0 s left",
    ]


def test_off_shows_nothing():
    stream = io.StringIO()
    with progress.shown("off", stream), progress.step("work", total=2) as step:
        step.advance(2)
    assert stream.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    assert progress.mode_for(io.StringIO(), quiet=False) == "plain"
    assert progress.mode_for(io.StringIO(), quiet=True) == "off"
    assert progress.mode_for(_Terminal(), quiet=False) == "bars"
    assert progress.mode_for(_Terminal(), quiet=True) == "off"
    monkeypatch.setenv("TERM", "dumb")  # no cursor movement: a bar could not be redrawn in place
    assert progress.mode_for(_Terminal(), quiet=False) == "plain"


def test_json_output_has_no_progress(cli, tmp_path):
    done = cli(*COMMAND, "-o", tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert json.loads(done.stdout)["ok"] is True


def test_quiet_has_no_progress(cli, tmp_path):
    done = cli(*COMMAND, "-o", tmp_path, "-q")
    assert done.returncode == 0 and done.stderr == ""


def test_piped_output_is_plain_lines(cli, tmp_path):
    done = cli(*COMMAND, "-o", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr and "━" not in done.stderr
    lines = done.stderr.splitlines()
    assert "[linux-x64] static quantization ..." in lines
    assert "[linux-x64] calibrating (minmax) on 32 sample(s) ..." in lines
    assert not any("ETA" in line for line in lines)


def test_a_terminal_shows_progress_bars(tmp_path):
    """The same command with stderr on a pseudo-terminal (120x24): rich draws bars with the time left."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepack", *COMMAND, "-o", str(tmp_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    stdout = proc.communicate(timeout=60)[0]
    os.close(leader)
    assert proc.returncode == 0, seen.decode(errors="replace")
    text = seen.decode("utf-8", errors="replace")
    assert "\x1b[" in text and "━" in text  # a drawn bar
    assert "[linux-x64] calibrating (minmax) on 32 sample(s)" in text and "ETA" in text
    assert b"ok      linux-x64" in stdout and b"\x1b" not in stdout  # results stay plain on stdout
