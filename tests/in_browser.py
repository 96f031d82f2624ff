"""Shared by the browser tests and benchmarks/browser.py: headless Chromium through Playwright, and a
page-side call of the bundle's loader with inputs from Python."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium(playwright=None, extra_args: list[str] = ()) -> Iterator[Any]:
    """A persistent headless Chromium context in a fresh profile folder (so nothing is cached yet).
    Pass the running ``playwright`` to open a second browser next to a first one."""
    from playwright.sync_api import sync_playwright

    with contextlib.ExitStack() as stack:
        profile = stack.enter_context(tempfile.TemporaryDirectory(prefix="edgepack-chromium-"))
        playwright = playwright or stack.enter_context(sync_playwright())
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=[*CHROMIUM_ARGS, *extra_args]
        )
        stack.callback(context.close)
        yield context


# Load a bundle with edgepack.mjs and run it on feeds sent from Python; errors come back as data.
RUN_JS = """async ({ bundleUrl, feeds, options }) => {
  const { load } = await import(new URL('edgepack.mjs', bundleUrl).href);
  const progress = [];
  let model;
  try {
    model = await load({ ...options, onProgress: (p) => progress.push(p) });
    await model.cached;
  } catch (error) {
    return { error: error.message, name: error.name, file: error.file ?? null, progress };
  }
  const results = [];
  try {
    for (const set of feeds) {
      const outputs = await model.run(set);
      results.push(Object.fromEntries(Object.entries(outputs).map(([name, t]) => [name, { dims: t.dims, type: t.type, data: Array.from(t.data, Number) }])));
    }
  } catch (error) {
    return { error: error.message, name: error.name, progress };
  }
  const info = { outputs: results, backend: model.backend, fallbacks: model.fallbacks, threads: model.threads,
                 crossOriginIsolated: model.crossOriginIsolated, warnings: model.warnings, timings: model.timings,
                 format: model.manifest.model.format, verification: model.verification, sources: model.sources, signedBy: model.signedBy, progress };
  await model.dispose();
  return info;
}"""


def to_js_feeds(feeds: dict[str, np.ndarray]) -> dict[str, dict]:
    return {name: {"data": array.ravel().tolist(), "dims": list(array.shape)} for name, array in feeds.items()}


def run_bundle(page, bundle_url: str, feeds: list[dict[str, np.ndarray]] = (), **options) -> dict:
    """Load the bundle at ``bundle_url`` in ``page`` and run every input set of ``feeds``; outputs as numpy arrays."""
    result = page.evaluate(
        RUN_JS, {"bundleUrl": bundle_url, "feeds": [to_js_feeds(f) for f in feeds], "options": options}
    )
    if "outputs" in result:
        result["outputs"] = [
            {name: np.asarray(o["data"], dtype=np.float64).reshape(o["dims"]) for name, o in r.items()}
            for r in result["outputs"]
        ]
    return result


# A browser without integrity on fetch(): the loader takes its 'hash' path (crypto.subtle).
WITHOUT_FETCH_INTEGRITY = "delete Request.prototype.integrity;"


def fresh_page(context, url: str, init_script: str | None = None):
    """A new page (a new document, so no onnxruntime-web instance is reused) at ``url``, with the loader's Cache API
    cache emptied (else a file verified by an earlier test would be served from it, not from the server);
    ``init_script`` runs before the page's own scripts."""
    page = context.new_page()
    if init_script:
        page.add_init_script(init_script)
    page.goto(url)
    page.evaluate("async () => { if (globalThis.caches) await caches.delete('edgepack'); }")
    return page


def flip_byte(path: Path, position: float = 0.5) -> None:
    """Flip one bit of the byte at ``position`` (fraction of the size), writing a new file (hard links stay intact)."""
    data = bytearray(path.read_bytes())
    index = min(len(data) - 1, int(len(data) * position))
    data[index] ^= 0x01
    path.unlink()
    path.write_bytes(bytes(data))
