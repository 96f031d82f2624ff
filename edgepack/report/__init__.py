"""The build report: ``report.html`` and ``report.md`` beside the bundles of a build folder, comparing them.

``edgepack report BUILD_DIR`` writes it, and ``package`` does after packaging several targets. Both files
are written whole or not at all (a temporary file renamed into place), from the manifests alone, so two
runs over the same bundles give the same bytes. A report whose inputs (what collect found: every manifest,
integrity check and gzip size) and files are those of the last report written from the same inputs is not
rendered again: on an unchanged fleet, rendering 40 bundles' charts was most of a warm rebuild.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .collect import Bundle, collect, load_memory, save_memory

__all__ = ["write_report", "Written", "HTML_NAME", "MARKDOWN_NAME"]

HTML_NAME = "report.html"
MARKDOWN_NAME = "report.md"


@dataclass(frozen=True)
class Written:
    html: Path
    markdown: Path
    bundles: list[Bundle]

    def to_dict(self) -> dict:
        return {
            "html": str(self.html),
            "markdown": str(self.markdown),
            "bundles": [{"folder": b.folder, "target": b.target, "readable": b.error is None} for b in self.bundles],
        }


def write_report(build_dir: Path, fresh: frozenset[str] = frozenset()) -> Written:
    """Write the report of every bundle in ``build_dir``; a UsageError when there is none. ``fresh``: folder
    names of the bundles this run wrote or restored, verified then (collect's rule 3)."""
    from .page import render_html, render_markdown

    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise UsageError(
            "not a folder", where=str(build_dir), hint="give the folder package wrote to (default: build/)"
        )
    bundles = collect(build_dir, fresh)
    if not bundles:
        raise UsageError(
            "no edgepack bundle here (no sub-folder with a manifest.json)",
            where=str(build_dir),
            hint="package a model first: edgepack package MODEL --target all -o FOLDER",
        )
    html_path, md_path = build_dir / HTML_NAME, build_dir / MARKDOWN_NAME
    rendered = _Rendered.load()
    key = _inputs_key(bundles)
    if rendered.holds(key, html_path, md_path):
        return Written(html_path, md_path, bundles)
    html, markdown = render_html(bundles), render_markdown(bundles)
    _write_atomic(html_path, html)
    _write_atomic(md_path, markdown)
    rendered.remember(key, html, markdown)
    return Written(html_path, md_path, bundles)


def _inputs_key(bundles: list[Bundle]) -> str:
    """SHA-256 of everything the pages are rendered from, and of what renders them (this package's source, the
    chart library's version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        plots = version("matplotlib")
    except PackageNotFoundError:
        plots = None
    renderer = [_sha256(p.read_bytes()) for p in sorted(Path(__file__).parent.glob("*.py"))]
    data = [renderer, plots, [dataclasses.asdict(b) for b in bundles]]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Rendered:
    """SHA-256 of the pages last rendered from each inputs key, in ``report-keys.json`` of the user cache (the
    newest ``KEEP``); a damaged or missing file is an empty memory."""

    KEEP = 256

    def __init__(self, path: Path, known: dict[str, list[str]]):
        self.path, self.known = path, known

    @classmethod
    def load(cls) -> _Rendered:
        return cls(*load_memory("report-keys.json", lambda v: isinstance(v, list) and len(v) == 2))

    def holds(self, key: str, html: Path, markdown: Path) -> bool:
        """Whether both files are, byte for byte, the pages last rendered from ``key``."""
        wanted = self.known.get(key)
        try:
            return wanted is not None and wanted == [_sha256(html.read_bytes()), _sha256(markdown.read_bytes())]
        except OSError:
            return False

    def remember(self, key: str, html: str, markdown: str) -> None:
        self.known.pop(key, None)
        self.known[key] = [_sha256(html.encode("utf-8")), _sha256(markdown.encode("utf-8"))]
        save_memory(self.path, dict(list(self.known.items())[-self.KEEP :]))  # lost: the next one is rendered


def _write_atomic(path: Path, text: str) -> None:
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
