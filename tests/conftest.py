"""Shared fixtures: a local threaded HTTP server on 127.0.0.1 serving in-memory files."""

import http.server
import re
import threading

import pytest


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        path = self.path
        with srv.lock:
            srv.requests.append((path, self.headers.get("Range")))
            nth = sum(1 for p, _ in srv.requests if p == path)
        if path not in srv.files:
            self.send_error(404)
            return
        body, mode = srv.files[path]
        if mode == "html":
            page = b"<!DOCTYPE html><html><body>Please sign in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and mode in ("ok", "drop"):
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        drop = (mode in ("drop", "drop-norange") and nth == 1) or mode == "always-short"
        if drop:
            # announce the full length, send half, then hang up
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    """``server.files[path] = (body, mode)``; mode ``ok`` (Range supported), ``drop`` (first transfer
    hangs up halfway), ``drop-norange``, ``always-short`` or ``html`` (a login page instead)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files = {}
    srv.requests = []
    srv.lock = threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)
