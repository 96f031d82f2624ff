"""A static file server for trying a web bundle locally: ``edgepack serve BUNDLE``.

It listens on 127.0.0.1 only and sends what onnxruntime-web needs from a server:
1. ``.mjs`` as JavaScript and ``.wasm`` as ``application/wasm`` (browsers refuse modules served as
   anything else, and compile wasm streaming only with the right type);
2. ``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy: require-corp``, which
   make the page ``crossOriginIsolated`` so onnxruntime-web can run several threads;
3. ``Cache-Control: no-cache`` with an ``ETag`` per file version, so a reload revalidates (cheap 304s)
   and a changed file is never served stale from the browser's cache.

Standard library only; for production use your own web server with the headers in the bundle's README.
"""

from __future__ import annotations

import functools
import os
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .bundle.manifest import MANIFEST_NAME
from .errors import UsageError

__all__ = ["HEADERS", "MIME_TYPES", "BundleServer", "make_server", "start_server"]

HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
MIME_TYPES = {
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".ort": "application/octet-stream",
    ".onnx": "application/octet-stream",
    ".data": "application/octet-stream",
    ".config": "text/plain; charset=utf-8",
}


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}
    quiet = True
    _etag: str | None = None

    def send_head(self):
        self._etag = None
        path = Path(self.translate_path(self.path))
        if path.is_file():
            stat = path.stat()
            self._etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
            if self.headers.get("If-None-Match") == self._etag:
                self.send_response(HTTPStatus.NOT_MODIFIED)
                self.end_headers()
                return None
        return super().send_head()

    def list_directory(self, path):
        self.send_error(HTTPStatus.NOT_FOUND, "no directory listings")
        return None

    def end_headers(self):
        for name, value in HEADERS.items():
            self.send_header(name, value)
        if self._etag:
            self.send_header("ETag", self._etag)
        super().end_headers()

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)


class BundleServer(ThreadingHTTPServer):
    daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_server(folder: Path, port: int = 0, *, quiet: bool = True, require_manifest: bool = True) -> BundleServer:
    """A server for ``folder`` on 127.0.0.1:``port`` (0: any free port), bound but not yet serving."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError("not a folder", where=str(folder), hint="pass a bundle folder written by `edgepack package`")
    if require_manifest and not (folder / MANIFEST_NAME).is_file():
        raise UsageError(f"no {MANIFEST_NAME}: this is not an edgepack bundle", where=str(folder))
    handler = functools.partial(type("Handler", (_Handler,), {"quiet": quiet}), directory=os.fspath(folder))
    try:
        return BundleServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise UsageError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}",
                         hint="pick another --port, or 0 for any free port") from None


def start_server(folder: Path, port: int = 0, *, quiet: bool = True, require_manifest: bool = True) -> BundleServer:
    """``make_server`` serving from a background thread; ``server.shutdown()`` stops it."""
    server = make_server(folder, port, quiet=quiet, require_manifest=require_manifest)
    threading.Thread(target=server.serve_forever, name="edgepack-serve", daemon=True).start()
    return server
