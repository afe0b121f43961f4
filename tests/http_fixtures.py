"""A file server on 127.0.0.1 for download tests: Range support, request and byte counts."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@dataclass
class FileServer:
    """Serves ``files`` (URL path -> bytes); counts requests and body bytes sent."""

    files: dict[str, bytes]
    honour_range: bool = True
    cut_after: int | None = None  # send at most this many body bytes, then hang up
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    bytes_served: int = 0
    base_url: str = ""

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


def _handler_for(server: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            range_header = self.headers.get("Range")
            server.requests.append((self.path, range_header))
            body = server.files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
            if match and server.honour_range:
                start = int(match.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if server.cut_after is not None:
                payload = payload[: server.cut_after]
                self.close_connection = True
            self.wfile.write(payload)
            server.bytes_served += len(payload)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture()
def serve() -> Iterator:
    """``serve(files, **options)`` starts a FileServer on an ephemeral loopback port."""
    running = []

    def start(files: dict[str, bytes], **options) -> FileServer:
        state = FileServer(files, **options)
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
        state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
        thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        thread.start()
        running.append((httpd, thread))
        return state

    yield start
    for httpd, thread in running:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
