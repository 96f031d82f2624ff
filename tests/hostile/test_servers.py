"""Hostile HTTP clients against both servers (``edgepack serve`` and the shim's ``serve``): every request
gets a status, nothing outside the served folder is sent, idle connections time out, threads are
bounded, and nothing reaches stderr as a traceback."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

import edgepack.serve as serve_module
from edgepack.runtime_shim import edgepack_shim
from edgepack.serve import start_server
from tests.hostile.support import relu_model, run_shim

TARGET = "linux-x64"
SECRET = b"the secret outside the bundle"


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` as is and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def get(port: int, path: str) -> bytes:
    return raw(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))


@pytest.fixture
def web_folder(tmp_path) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "index.html").write_text("<p>hello</p>")
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "secret").write_bytes(SECRET)
    (folder / "leak.bin").symlink_to(tmp_path / "secret")
    (folder / "linked").symlink_to(tmp_path / "private")
    os.mkfifo(folder / "pipe.wasm")
    return folder


@pytest.fixture
def web_server(web_folder):
    server = start_server(web_folder, require_manifest=False)
    yield server
    server.shutdown()
    server.server_close()


WEB_CASES = [
    ("/index.html", 200),
    ("/", 200),
    ("/leak.bin", 404),
    ("/linked/secret", 404),
    ("/linked/", 404),
    ("/pipe.wasm", 404),
    ("/%00", 404),
    ("/index.html%00.js", 404),
    ("/%ff%fe", 404),
    ("/" + "n" * 300, 404),
    ("/../secret", 404),
    ("/%2e%2e/secret", 404),
    ("/..%2fsecret", 404),
    ("/a\\..\\secret", 404),
    ("/" + "p" * 3000, 414),
]
WEB_RAW = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    b"GET\r\n\r\n",
    b"BREW /pot HTTP/1.1\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
]


@pytest.mark.parametrize("path, code", WEB_CASES, ids=[p[:24] for p, _ in WEB_CASES])
def test_edgepack_serve_answers_every_request_and_sends_nothing_from_outside(web_server, capfd, path, code):
    reply = get(web_server.server_address[1], path)
    assert status(reply) == code
    assert SECRET not in reply
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("request_bytes", WEB_RAW, ids=["tls", "no_path", "unknown_method", "http_9", "200_headers"])
def test_edgepack_serve_answers_garbage_with_a_status(web_server, capfd, request_bytes):
    assert 400 <= status(raw(web_server.server_address[1], request_bytes)) < 600
    assert "Traceback" not in capfd.readouterr().err


@pytest.fixture(scope="module")
def model(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("served")
    done = cli("package", relu_model(root / "m.onnx"), "-t", TARGET, "--quantize", "none", "-o", root / "out", "-q")
    assert done.returncode == 0, done.stderr
    return edgepack_shim.load(root / "out" / f"m-{TARGET}")


@pytest.fixture
def shim_server(model):
    server = edgepack_shim.make_server(model, port=0, max_bytes=1 << 20)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def post(port: int, body: bytes, length: str | None = None) -> bytes:
    head = "POST /run HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return raw(port, head.encode("utf-8") + b"\r\n" + body)


GOOD = json.dumps({"inputs": {"x": [[1.0, -2.0, 3.0, -4.0]]}}).encode()

SHIM_CASES = [
    ("good", lambda p: post(p, GOOD, str(len(GOOD))), 200),
    ("superscript_length", lambda p: post(p, GOOD, "²"), 400),
    ("negative_length", lambda p: post(p, GOOD, "-5"), 400),
    ("no_length", lambda p: post(p, GOOD), 411),
    ("over_limit", lambda p: post(p, b"", str(1 << 30)), 413),
    ("deep_json", lambda p: post(p, b"[" * 100_000, "100000"), 400),
    (
        "deep_inputs",
        lambda p: post(
            p, b'{"inputs": {"x": ' + b"[" * 200 + b"]" * 200 + b"}}", str(len(b'{"inputs": {"x": }}') + 400)
        ),
        400,
    ),
    ("not_json", lambda p: post(p, b"\xff\xfe", "2"), 400),
    ("not_an_object", lambda p: post(p, b"[1]", "3"), 400),
    ("nul_path", lambda p: get(p, "/%00"), 404),
    ("long_name", lambda p: get(p, "/" + "n" * 300), 404),
    ("huge_request_line", lambda p: get(p, "/" + "n" * 70_000), 414),
    ("garbage_request", lambda p: raw(p, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"), 400),
]


@pytest.mark.parametrize("send, code", [c[1:] for c in SHIM_CASES], ids=[c[0] for c in SHIM_CASES])
def test_shim_server_answers_every_request_with_a_status(shim_server, capfd, send, code):
    reply = send(shim_server.server_address[1])
    assert status(reply) == code, reply[:300]
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("which", ["edgepack serve", "shim serve"])
def test_idle_connections_time_out_and_threads_are_bounded(which, web_folder, model, monkeypatch, capfd):
    monkeypatch.setattr(edgepack_shim, "MAX_CONNECTIONS", 2)
    if which == "edgepack serve":
        monkeypatch.setattr(serve_module._Handler, "timeout", 1.0)
        server = start_server(web_folder, require_manifest=False)
    else:
        handler_timeout = 1.0
        server = edgepack_shim.make_server(model, port=0)
        monkeypatch.setattr(server.RequestHandlerClass, "timeout", handler_timeout)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.3)  # both are being handled, each holding a thread
        assert status(get(port, "/health" if which == "shim serve" else "/index.html")) == 503
        started = time.perf_counter()
        for sock in idle:  # the server drops a client that sends nothing
            sock.settimeout(10)
            assert sock.recv(100) == b""
            sock.close()
        assert time.perf_counter() - started < 5
        assert status(get(port, "/health" if which == "shim serve" else "/index.html")) == 200
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in capfd.readouterr().err


def test_port_out_of_range_is_a_usage_error_for_both_servers(model, cli, web_folder):
    done = cli("serve", web_folder, "--port", "99999")
    assert done.returncode == 2 and "expected 0 (any free port) to 65535" in done.stderr, done.stderr
    done = run_shim(model.bundle, "serve", "--port", "99999")
    assert done.returncode == 2 and "expected 0 (any free port) to 65535" in done.stderr, done.stderr
