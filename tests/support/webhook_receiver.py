"""A real webhook receiver for the tests: an HTTP server on 127.0.0.1 in a thread.

It records every request (path, headers, raw body, parsed JSON) and answers from a
programmable status sequence (then ``default_status``). ``down()`` really stops the
listener and cuts the kept-alive connections (it speaks HTTP/1.1), so a client gets
"connection refused" as during an outage; ``up()`` listens again on the same port.
``hold()`` makes requests hang unanswered until ``release()`` (a stuck receiver).
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from relay_milter.lab import free_port  # one port registry for every test server


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered (0: not yet)
    peer: tuple = ()  # the client's (address, port): one per TCP connection

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def event_id(self) -> int:
        return int(self.headers["X-Relay-Event-Id"])


class WebhookReceiver:
    def __init__(self, default_status: int = 200):
        self.port = free_port()
        self.default_status = default_status
        # While set, requests are held (not answered) until ``release()`` or the client gives up.
        self.gate = threading.Event()
        self.gate.set()
        self.arrived: list[Request] = []  # every request, recorded when it arrives (before any hold)
        self.statuses: list[int] = []
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self._connections: set[socket.socket] = set()  # open (kept-alive) client connections
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/relay"

    def respond(self, *statuses: int) -> None:
        """Answer the next requests with these statuses, in order."""
        with self.lock:
            self.statuses.extend(statuses)

    def _next_status(self) -> int:
        with self.lock:
            return self.statuses.pop(0) if self.statuses else self.default_status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a pooling client reuses its connection

            def setup(self) -> None:
                super().setup()
                with receiver.lock:
                    receiver._connections.add(self.connection)

            def finish(self) -> None:
                with receiver.lock:
                    receiver._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.arrived.append(Request(self.path, dict(self.headers.items()), body, 0, self.client_address))
                receiver.gate.wait(60)
                status = receiver._next_status()
                with receiver.lock:
                    receiver.requests.append(Request(self.path, dict(self.headers.items()), body, status, self.client_address))
                reply = b'{"ok": true}' if status < 300 else b'{"error": "receiver says no"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                try:
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):  # the client died (a killed tracker)
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

        return Handler

    def up(self) -> "WebhookReceiver":
        if self._server is not None:
            return self
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def hold(self) -> None:
        """Stop answering: requests hang (like a stuck receiver) until ``release()``."""
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def down(self) -> None:
        """Stop listening: connections are refused until ``up()``."""
        server, self._server = self._server, None
        self.gate.set()
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self.lock:  # an outage also cuts the kept-alive connections
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def delivered(self) -> list[Request]:
        """Requests answered with 2xx, in arrival order."""
        with self.lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def __enter__(self) -> "WebhookReceiver":
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        self.down()
