"""The build report: ``report.html`` and ``report.md`` beside the bundles of a build folder, comparing them.

``edgepack report BUILD_DIR`` writes it, and ``package`` does after packaging several targets. Both files
are written whole or not at all (a temporary file renamed into place), from the manifests alone, so two
runs over the same bundles give the same bytes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .collect import Bundle, collect

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
    _write_atomic(html_path, render_html(bundles))
    _write_atomic(md_path, render_markdown(bundles))
    return Written(html_path, md_path, bundles)


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
