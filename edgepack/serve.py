"""A static file server for trying a web bundle locally: ``edgepack serve BUNDLE``.

It listens on 127.0.0.1 only and sends what onnxruntime-web needs from a server:
1. ``.mjs`` as JavaScript and ``.wasm`` as ``application/wasm`` (browsers refuse modules served as
   anything else, and compile wasm streaming only with the right type);
2. ``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy: require-corp``, which
   make the page ``crossOriginIsolated`` so onnxruntime-web can run several threads;
3. ``Cache-Control: no-cache`` with an ``ETag`` per file version, so a reload revalidates (cheap 304s)
   and a changed file is never served stale from the browser's cache.
4. Only regular files inside the folder, reached through no symbolic link (the shim's
   ``open_in_bundle``): a link to a file outside is 404, never its bytes. Every request gets a status
   (404 for a name that cannot be a file here, 414 for a path over ``MAX_PATH`` characters), sockets
   time out, and threads are bounded (the shim's ``bounded_server``).

Standard library only; for production use your own web server with the headers in the bundle's README.
"""

from __future__ import annotations

import functools
import os
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .bundle.manifest import MANIFEST_NAME
from .errors import UsageError
from .runtime_shim.edgepack_shim import SOCKET_TIMEOUT, bounded_server, open_in_bundle

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


MAX_PATH = 2048


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}
    quiet = True
    timeout = SOCKET_TIMEOUT
    default_request_version = "HTTP/1.0"  # an unparseable request line still gets a status line
    _etag: str | None = None

    def send_head(self):
        self._etag = None
        if len(self.path) > MAX_PATH:
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, f"paths are at most {MAX_PATH} characters")
            return None
        rel = _relative(self.path)
        try:
            f = open_in_bundle(Path(self.directory), rel) if rel else None
        except (OSError, ValueError):
            f = None
        if rel is None or f is None:
            self.send_error(HTTPStatus.NOT_FOUND, "no such file in this bundle")
            return None
        stat = os.fstat(f.fileno())
        self._etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
        if self.headers.get("If-None-Match") == self._etag:
            f.close()
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.end_headers()
            return None
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", self.guess_type(rel))
        self.send_header("Content-Length", str(stat.st_size))
        self.send_header("Last-Modified", self.date_time_string(stat.st_mtime))
        self.end_headers()
        return f

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


def _relative(url_path: str) -> str | None:
    """The bundle-relative file a request path names ("/" is index.html), or None when it cannot name one."""
    try:
        path = unquote(urlsplit(url_path).path, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    if "\x00" in path or "\\" in path:
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    if path.endswith("/") or not parts:
        parts.append("index.html")
    return "/".join(parts)


if TYPE_CHECKING:
    # bounded_server returns a subclass made at run time, which mypy cannot follow; to it, it is the base class
    _BoundedServer = ThreadingHTTPServer
else:
    _BoundedServer = bounded_server(ThreadingHTTPServer)


class BundleServer(_BoundedServer):
    name = "edgepack serve"

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # typeshed allows bytes for any socket family; an AF_INET(6) host is str
        return f"http://{host}:{port}/"


def make_server(folder: Path, port: int = 0, *, quiet: bool = True, require_manifest: bool = True) -> BundleServer:
    """A server for ``folder`` on 127.0.0.1:``port`` (0: any free port), bound but not yet serving."""
    folder = Path(folder)
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: expected 0 (any free port) to 65535")
    if not folder.is_dir():
        raise UsageError("not a folder", where=str(folder), hint="pass a bundle folder written by `edgepack package`")
    if require_manifest and not (folder / MANIFEST_NAME).is_file():
        raise UsageError(f"no {MANIFEST_NAME}: this is not an edgepack bundle", where=str(folder))
    handler = functools.partial(type("Handler", (_Handler,), {"quiet": quiet}), directory=os.fspath(folder))
    try:
        return BundleServer(("127.0.0.1", port), handler)
    except (OSError, OverflowError) as exc:
        raise UsageError(
            f"cannot listen on 127.0.0.1:{port}: {getattr(exc, 'strerror', None) or exc}",
            hint="pick another --port, or 0 for any free port",
        ) from None


def start_server(folder: Path, port: int = 0, *, quiet: bool = True, require_manifest: bool = True) -> BundleServer:
    """``make_server`` serving from a background thread; ``server.shutdown()`` stops it."""
    server = make_server(folder, port, quiet=quiet, require_manifest=require_manifest)
    threading.Thread(target=server.serve_forever, name="edgepack-serve", daemon=True).start()
    return server
