"""A small milter-protocol client: the MTA side of the conversation, as Postfix 3.7 speaks it.

For the milter-only microbench (bench/microbench.py): it drives the milter socket directly,
with no Postfix, so that the milter's capacity is measured alone. Postfix's defaults are
followed: protocol version 6, every action and protocol step offered; the steps the
milter asks to skip (``SMFIP_NO*``) are not sent and the replies it says it will not send
(``SMFIP_NR_*``) are not awaited; headers are sent with or without their leading space
(``SMFIP_HDR_LEADSPC``); the body goes in chunks of at most 65,535 bytes; the macros are
those of Postfix's ``milter_*_macros`` defaults that have a value for an unauthenticated
client without TLS (``i`` from RCPT on: Postfix assigns the queue id at the first valid
recipient).

Why not a library: ``miltertest`` (PyPI) does the same conversation, but it decodes every
packet through a generic codec and sends each command on its own; here a message's
packets are encoded once up front and the commands that expect no reply go out with the
next one in a single write, so that on a 2-core machine the client takes as little CPU
as possible from the workers it measures.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

VERSION = 6
ALL_ACTIONS = 0x1FF
ALL_STEPS = 0x1FFFFF  # everything Postfix 3.7 offers (no SMFIP_MDS_*)

# protocol step flags
NOCONNECT, NOHELO, NOMAIL, NORCPT, NOBODY, NOHDRS, NOEOH = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40
NR_HDR, NOUNKNOWN, NODATA, SKIP, RCPT_REJ = 0x80, 0x100, 0x200, 0x400, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA, NR_UNKN, NR_EOH, NR_BODY = (
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000)
HDR_LEADSPC = 0x100000
CHUNK = 65535

# replies that end a command; every other reply at end of message is an edit
FINAL = {b"c": "continue", b"a": "accept", b"r": "reject", b"t": "tempfail", b"y": "replycode", b"d": "discard", b"s": "skip"}
PROGRESS = b"p"


class MilterProtocolError(Exception):
    pass


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


def _z(*items: str | bytes) -> bytes:
    return b"".join((i.encode("utf-8", "surrogateescape") if isinstance(i, str) else i) + b"\0" for i in items)


def macros(stage: bytes, values: dict[str, str]) -> bytes:
    """SMFIC_MACRO for ``stage`` (the command letter it belongs to); empty if no value."""
    pairs = [x for k, v in values.items() if v for x in (k, v)]
    return packet(b"D", stage + _z(*pairs)) if pairs else b""


def split_message(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Header fields (name, value as after the colon, folded lines kept) and the body."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, body = raw, b""
    fields: list[tuple[str, str]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + "\r\n" + line.decode("utf-8", "surrogateescape"))
        elif line:
            name, _, value = line.decode("utf-8", "surrogateescape").partition(":")
            fields.append((name, value))
    return fields, body


@dataclass
class Result:
    """What the milter answered at the end (or earlier, if it refused)."""

    stage: str
    reply: str  # continue, accept, reject, tempfail, replycode, discard
    text: str = ""  # the SMTP reply of replycode
    edits: list[tuple[str, bytes]] = field(default_factory=list)  # (reply letter, data)

    @property
    def accepted(self) -> bool:
        return self.stage == "eom" and self.reply in ("continue", "accept")

    def added_headers(self) -> dict[str, str]:
        """Headers added or inserted at end of message, by name."""
        out = {}
        for cmd, data in self.edits:
            if cmd == "h":
                name, value = data.split(b"\0")[:2]
            elif cmd == "i":
                name, value = data[4:].split(b"\0")[:2]
            else:
                continue
            out[name.decode()] = value.decode("utf-8", "replace")
        return out


@dataclass
class Envelope:
    mail_from: str
    rcpts: list[str]
    raw: bytes  # the message as the MTA received it (CRLF, not dot-stuffed)


class MilterClient:
    """One milter session over a connected stream socket (blocking)."""

    def __init__(self, sock: socket.socket, client_ip: str = "127.0.0.1", client_name: str = "localhost",
                 helo: str = "bench.example", queue_ids=None):
        self.sock = sock
        self._buf = b""
        self.client_ip, self.client_name, self.helo = client_ip, client_name, helo
        self._qids = queue_ids or _queue_ids()
        self.actions = self.protocol = 0

    @classmethod
    def connect(cls, path: str, timeout: float = 60.0, **kw) -> "MilterClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock, **kw)

    # -- wire ------------------------------------------------------------------------

    def _read(self) -> tuple[bytes, bytes]:
        while True:
            if len(self._buf) >= 4:
                (n,) = struct.unpack_from("!I", self._buf)
                if n < 1 or n > 1 << 24:
                    raise MilterProtocolError(f"bad packet length {n}")
                if len(self._buf) >= 4 + n:
                    cmd, data = self._buf[4:5], self._buf[5 : 4 + n]
                    self._buf = self._buf[4 + n :]
                    return cmd, data
            chunk = self.sock.recv(65536)
            if not chunk:
                raise MilterProtocolError("the milter closed the connection")
            self._buf += chunk

    def _reply(self) -> tuple[bytes, bytes]:
        while True:
            cmd, data = self._read()
            if cmd != PROGRESS:
                return cmd, data

    def _exchange(self, pending: bytearray, wire: bytes, no_reply: bool, stage: str) -> Result | None:
        """Queue ``wire``; if a reply is due, send what is queued and read it. A result if
        the milter did anything but continue."""
        pending += wire
        if no_reply:
            return None
        self.sock.sendall(pending)
        pending.clear()
        cmd, data = self._reply()
        if cmd == b"c":
            return None
        return self._final(stage, cmd, data)

    @staticmethod
    def _final(stage: str, cmd: bytes, data: bytes) -> Result:
        if cmd not in FINAL:
            raise MilterProtocolError(f"unexpected reply {cmd!r} at {stage}")
        return Result(stage, FINAL[cmd], data.rstrip(b"\0").decode("utf-8", "replace") if cmd == b"y" else "")

    # -- the conversation ------------------------------------------------------------

    def open(self) -> None:
        """Option negotiation, then the connect and HELO steps."""
        self.sock.sendall(packet(b"O", struct.pack("!III", VERSION, ALL_ACTIONS, ALL_STEPS)))
        cmd, data = self._read()
        if cmd != b"O" or len(data) < 12:
            raise MilterProtocolError(f"bad option negotiation reply {cmd!r}")
        version, self.actions, self.protocol = struct.unpack_from("!III", data)
        if version < 2 or self.protocol & ~ALL_STEPS:
            raise MilterProtocolError(f"milter asks for version {version}, steps {self.protocol:#x}")
        p, pending = self.protocol, bytearray()
        r = None
        if not p & NOCONNECT:
            wire = macros(b"C", {"j": "relay.bench.example", "{daemon_name}": "smtpd", "{daemon_addr}": "127.0.0.1", "v": "Postfix 3.7"})
            wire += packet(b"C", _z(self.client_name) + b"4" + struct.pack("!H", 40000) + _z(self.client_ip))
            r = self._exchange(pending, wire, bool(p & NR_CONN), "connect")
        if r is None and not p & NOHELO:
            r = self._exchange(pending, packet(b"H", _z(self.helo)), bool(p & NR_HELO), "helo")
        if pending:
            self.sock.sendall(pending)
        if r is not None:
            raise MilterProtocolError(f"milter refused the session at {r.stage}: {r.reply} {r.text}")

    def message(self, env: Envelope) -> Result:
        """One transaction, MAIL to end of message; the milter's decision and edits."""
        p, pending = self.protocol, bytearray()
        qid = next(self._qids)
        steps = []
        if not p & NOMAIL:
            host = env.mail_from.rpartition("@")[2].rstrip(">")
            wire = macros(b"M", {"{mail_addr}": env.mail_from.strip("<>"), "{mail_host}": host, "{mail_mailer}": "smtp"})
            steps.append(("mail", wire + packet(b"M", _z(f"<{env.mail_from.strip('<>')}>")), p & NR_MAIL))
        if not p & NORCPT:
            for rcpt in env.rcpts:
                addr = rcpt.strip("<>")
                wire = macros(b"R", {"i": qid, "{rcpt_addr}": addr, "{rcpt_host}": addr.rpartition("@")[2], "{rcpt_mailer}": "relay"})
                steps.append(("rcpt", wire + packet(b"R", _z(f"<{addr}>")), p & NR_RCPT))
        if not p & NODATA:
            steps.append(("data", macros(b"T", {"i": qid}) + packet(b"T"), p & NR_DATA))
        fields, body = split_message(env.raw)
        if not p & NOHDRS:
            for name, value in fields:
                if not p & HDR_LEADSPC and value.startswith(" "):
                    value = value[1:]
                steps.append(("header", packet(b"L", _z(name, value)), p & NR_HDR))
        if not p & NOEOH:
            steps.append(("eoh", macros(b"N", {"i": qid}) + packet(b"N"), p & NR_EOH))
        if not p & NOBODY:
            for i in range(0, len(body), CHUNK):
                steps.append(("body", packet(b"B", body[i : i + CHUNK]), p & NR_BODY))
        for stage, wire, no_reply in steps:
            r = self._exchange(pending, wire, bool(no_reply), stage)
            if r is not None:  # refused before the end: the MTA aborts the transaction
                if pending:
                    self.sock.sendall(pending)
                self.sock.sendall(packet(b"A"))
                return r
        pending += macros(b"E", {"i": qid}) + packet(b"E")
        self.sock.sendall(pending)
        edits = []
        while True:
            cmd, data = self._reply()
            if cmd in FINAL:
                r = self._final("eom", cmd, data)
                r.edits = edits
                return r
            edits.append((cmd.decode(), data))

    def close(self) -> None:
        try:
            self.sock.sendall(packet(b"Q"))
        except OSError:
            pass
        self.sock.close()


def _queue_ids():
    n = 0
    while True:
        n += 1
        yield f"4B{n:012X}"
