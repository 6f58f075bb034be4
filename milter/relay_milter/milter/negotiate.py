"""A real milter negotiation, as Postfix opens every connection: is the milter answering?

`relayctl status` connects to the milter socket, sends SMFIC_OPTNEG (protocol version 6,
all actions, all protocol steps offered), reads the milter's SMFIC_OPTNEG answer, and says
SMFIC_QUIT. A socket file that exists but has no process behind it, or a process that is
hung, fails here the same way it would fail Postfix (which then tempfails its clients).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
MILTER_VERSION = 6
ALL_ACTIONS = 0x1FF
ALL_PROTOCOL = 0x1FFFFF


class NegotiationError(Exception):
    pass


@dataclass(frozen=True)
class Negotiated:
    version: int
    actions: int
    protocol: int
    seconds: float


def _connect(spec: str, timeout: float) -> socket.socket:
    """``spec`` in Postfix syntax: unix:/path, inet:host:port, inet6:[addr]:port."""
    family, _, rest = spec.partition(":")
    if family == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: object = rest
    else:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if family == "inet6" or ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        address = (host, int(port))
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise NegotiationError("the milter closed the connection during negotiation")
        data += chunk
    return data


def negotiate(spec: str, timeout: float = 5.0) -> Negotiated:
    """Negotiate with the milter at ``spec``; NegotiationError (phrased for the operator) if not."""
    start = time.monotonic()
    try:
        sock = _connect(spec, timeout)
    except OSError as exc:
        raise NegotiationError(f"cannot connect to {spec}: {exc.strerror or exc}") from None
    try:
        body = SMFIC_OPTNEG + struct.pack("!III", MILTER_VERSION, ALL_ACTIONS, ALL_PROTOCOL)
        sock.sendall(struct.pack("!I", len(body)) + body)
        (length,) = struct.unpack("!I", _recv_exact(sock, 4))
        if not 13 <= length <= 65536:
            raise NegotiationError(f"unexpected reply length {length}")
        reply = _recv_exact(sock, length)
        if reply[:1] != SMFIC_OPTNEG:
            raise NegotiationError(f"unexpected reply command {reply[:1]!r} (expected 'O')")
        version, actions, protocol = struct.unpack("!III", reply[1:13])
        try:
            sock.sendall(struct.pack("!I", 1) + SMFIC_QUIT)
        except OSError:
            pass
        return Negotiated(version, actions, protocol, time.monotonic() - start)
    except socket.timeout:
        raise NegotiationError(f"no answer from {spec} within {timeout:g}s (hung?)") from None
    except OSError as exc:
        raise NegotiationError(f"{spec}: {exc.strerror or exc}") from None
    finally:
        sock.close()
