"""Where the tracker may send webhooks: public addresses only, unless an operator allows more.

A tenant's webhook URL is the tenant's to choose, and the tracker POSTs from inside the
relay's network. Without a policy a URL could aim at the cloud metadata service
(169.254.169.254), at loopback services (the event store, Postfix's own ports) or at the
private network. So the tracker connects only to *global unicast* addresses, plus the
networks listed in settings ``tracking.webhook_allow_networks``.

The check is made on the address actually connected to, after resolution, in the same
call that connects (``connect``): a name that resolved to a public address when the URL
was checked and to 127.0.0.1 a moment later (DNS rebinding) is caught, because nothing
resolves the name a second time.

``http_post`` sends one request under a *total* deadline: connection, request, headers and
body together. A server that answers one byte at a time is cut off when the deadline
passes, however short each pause is.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from typing import Iterable, Union
from urllib.parse import urlsplit

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class EgressRefused(OSError):
    """The destination's address is not one the tracker may connect to."""


class DeadlineExceeded(TimeoutError):
    """The whole request took longer than its deadline."""


def _kind(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address, or None if it is."""
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata lives at 169.254.169.254)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a global address"
    return None


def address_problem(ip: IPAddress, allow: Iterable[IPNetwork] = ()) -> str | None:
    """None if the tracker may connect to ``ip``; otherwise why not, for the operator."""
    ip = ipaddress.ip_address(str(ip).split("%", 1)[0])
    allow = tuple(allow)
    if any(ip.version == net.version and ip in net for net in allow):
        return None
    # An IPv4 address wrapped in IPv6 (mapped, 6to4, NAT64) is judged as the IPv4 address.
    inner: IPAddress | None = None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            inner = ip.ipv4_mapped
        elif ip.sixtofour:
            inner = ip.sixtofour
        elif ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if inner is not None:
        if any(net.version == 4 and inner in net for net in allow):
            return None
        why = _kind(inner)
        return f"{ip} wraps {inner}, {why}" if why else None
    why = _kind(ip)
    return f"{ip} is {why}" if why else None


def connect(host: str, port: int, deadline: float, allow: Iterable[IPNetwork] = ()) -> socket.socket:
    """Resolve ``host`` and connect to the first allowed address, by that address (no second
    lookup). Raises EgressRefused when no resolved address is allowed, DeadlineExceeded
    when the deadline (time.monotonic()) passes, OSError otherwise."""
    allow = tuple(allow)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    refused: list[str] = []
    error: OSError | None = None
    for family, socktype, proto, _name, sockaddr in infos:
        problem = address_problem(ipaddress.ip_address(sockaddr[0]), allow)
        if problem:
            refused.append(problem)
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed while connecting")
        sock = socket.socket(family, socktype, proto)
        try:
            sock.settimeout(remaining)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    if error is not None:
        raise error
    raise EgressRefused(
        f"{host} resolves only to addresses the tracker may not connect to ({'; '.join(dict.fromkeys(refused))}); "
        "list the network in tracking.webhook_allow_networks to allow it"
    )


class _GuardedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection that connects through ``connect`` (address policy, deadline)
    and can be aborted from another thread."""

    def __init__(self, host: str, port: int | None, deadline: float, allow: tuple[IPNetwork, ...],
                 tls: ssl.SSLContext | None):
        super().__init__(host, port or (443 if tls else 80), timeout=max(deadline - time.monotonic(), 0.001))
        self._deadline = deadline
        self._allow = allow
        self._tls = tls
        self._raw: socket.socket | None = None
        self._lock = threading.Lock()
        self.aborted = False

    def connect(self) -> None:
        raw = connect(self.host, self.port, self._deadline, self._allow)
        with self._lock:
            self._raw = raw
            if self.aborted:
                raw.close()
                raise DeadlineExceeded("deadline passed")
        raw.settimeout(max(self._deadline - time.monotonic(), 0.001))
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host) if self._tls else raw

    def abort(self) -> None:
        """Cut the connection: a blocked read or write returns at once."""
        with self._lock:
            self.aborted = True
            if self._raw is not None:
                try:
                    self._raw.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def http_post(url: str, body: bytes, headers: dict[str, str], timeout: float,
              allow: Iterable[IPNetwork] = ()) -> int:
    """POST ``body`` to ``url`` and return the HTTP status (the response body is read, up to
    64 KiB, and dropped). Redirects are not followed. Raises EgressRefused,
    DeadlineExceeded (the whole exchange took more than ``timeout`` seconds),
    http.client.HTTPException or OSError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    deadline = time.monotonic() + timeout
    conn = _GuardedConnection(parts.hostname, parts.port, deadline, tuple(allow), tls)
    watchdog = threading.Timer(timeout, conn.abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", target, body=body, headers=headers)
        response = conn.getresponse()
        response.read(65536)
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        if conn.aborted or isinstance(exc, TimeoutError):
            raise DeadlineExceeded(f"no complete answer within {timeout:g}s") from None
        raise
    finally:
        watchdog.cancel()
        conn.close()
    if conn.aborted:  # the deadline passed as the answer completed: still a failure
        raise DeadlineExceeded(f"no complete answer within {timeout:g}s")
    return status
