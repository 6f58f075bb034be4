"""The webhook sender's HTTP client: httpx with pooled keep-alive connections, a connect
hook that sees the resolved peer address, and a total deadline per request.

httpx's timeouts are per phase (connect, each read, each write): a receiver that answers
one byte every few seconds never trips them. Here every socket operation of a request is
bounded by what is left of the request's *total* deadline (``deadline``), so the whole
exchange ends by then, however the receiver paces its answer.

Connections are made by ``connector(host, port, deadline)``, which returns a connected
socket. The default resolves and connects plainly; the sender passes the egress policy's
connector, which checks the address it connects to (not a second lookup of the name).
A kept-alive connection is reused only for the same host and port, so what was checked
at connect time still holds for every request on it.

One ``Client`` per tenant worker: its pool is that tenant's alone, so a receiver that
hangs can neither exhaust nor block another tenant's connections.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import httpcore
import httpx

Connector = Callable[[str, int, float], socket.socket]

_state = threading.local()


class DeadlineExceeded(TimeoutError):
    """The whole request took longer than its deadline."""


def plain_connector(host: str, port: int, deadline: float) -> socket.socket:
    """Resolve and connect, within the deadline (time.monotonic())."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("deadline passed before connecting")
    return socket.create_connection((host, port), timeout=remaining)


@contextmanager
def deadline(seconds: float) -> Iterator[float]:
    """Bound every socket operation of this thread's requests in the block by one total
    deadline ``seconds`` from now. Yields the deadline (time.monotonic())."""
    previous = getattr(_state, "deadline", None)
    _state.deadline = time.monotonic() + seconds
    try:
        yield _state.deadline
    finally:
        _state.deadline = previous


def _remaining(timeout: float | None) -> float | None:
    """The socket timeout for one operation: the phase timeout, cut to the deadline."""
    end = getattr(_state, "deadline", None)
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the request's total deadline passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    """A socket stream whose every read and write respects the thread's deadline."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(_remaining(timeout))
            return self._sock.recv(max_bytes)
        except socket.timeout as exc:
            raise httpcore.ReadTimeout(str(exc) or "read timed out") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from None

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            while buffer:
                self._sock.settimeout(_remaining(timeout))
                n = self._sock.send(buffer)
                buffer = buffer[n:]
        except socket.timeout as exc:
            raise httpcore.WriteTimeout(str(exc) or "write timed out") from None
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from None

    def close(self) -> None:
        self._sock.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        try:
            self._sock.settimeout(_remaining(timeout))
            return _Stream(ssl_context.wrap_socket(self._sock, server_hostname=server_hostname))
        except socket.timeout as exc:
            self.close()
            raise httpcore.ConnectTimeout(str(exc) or "TLS handshake timed out") from None
        except OSError as exc:
            self.close()
            raise httpcore.ConnectError(str(exc)) from None

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object" and isinstance(self._sock, ssl.SSLSocket):
            return self._sock._sslobj  # what httpcore's own stream returns here
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return _readable(self._sock)
        return None


def _readable(sock: socket.socket) -> bool:
    """A kept-alive socket with data (or EOF) waiting was closed by the server: httpcore
    then opens a new connection instead of reusing it."""
    import select

    try:
        r, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(r)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, connector: Connector):
        self.connector = connector

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        end = getattr(_state, "deadline", None)
        limit = time.monotonic() + timeout if timeout is not None else None
        ends = [t for t in (end, limit) if t is not None]
        try:
            sock = self.connector(host, port, min(ends) if ends else time.monotonic() + 3600)
        except socket.timeout as exc:
            raise httpcore.ConnectTimeout(str(exc) or "connect timed out") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Stream(sock)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _Transport(httpx.HTTPTransport):
    """httpx's transport on our network backend. httpx takes no backend argument, so its
    connection pool is rebuilt with the same limits and ours (httpcore's public API)."""

    def __init__(self, connector: Connector, limits: httpx.Limits):
        super().__init__(limits=limits, retries=0)
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl.create_default_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_Backend(connector),
        )


def client(connector: Connector = plain_connector, *, keepalive_expiry: float = 60.0,
           user_agent: str = "tenant-relay-webhooks/1") -> httpx.Client:
    """A pooled HTTP client for one worker: keep-alive, no redirects, no proxies from the
    environment (trust_env=False: a webhook goes straight to its receiver)."""
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=keepalive_expiry)
    return httpx.Client(
        transport=_Transport(connector, limits),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": user_agent},
    )


def post(http: httpx.Client, url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST ``body`` and return the HTTP status; the answer (up to 64 KiB) is read and
    dropped. The whole exchange ends within ``timeout`` seconds or raises
    DeadlineExceeded; other failures raise httpx.HTTPError or OSError."""
    with deadline(timeout):
        try:
            with http.stream("POST", url, content=body, headers=headers, timeout=timeout) as response:
                read = 0
                for chunk in response.iter_raw():
                    read += len(chunk)
                    if read >= 65536:
                        break
                return response.status_code
        except httpx.TimeoutException:
            raise DeadlineExceeded(f"no complete answer within {timeout:g}s") from None
