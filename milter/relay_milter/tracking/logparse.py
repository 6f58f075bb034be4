"""Parsers for the two logs the tracker follows: Postfix's maillog and the milter's logfmt log.

Pure functions, no I/O. Every parser takes one line (without its newline) and returns a
typed record or ``None``; it never raises. Log lines partly carry client-controlled text
(HELO names, addresses, remote replies), so anything that does not have the exact shape
Postfix or the milter writes is ``None`` rather than a guess.

Postfix timestamps come in two forms:

- ``Nov 25 08:19:50`` (Postfix ``maillog_file`` and classic syslog): no year and no zone.
  The zone is the host's local time (``tz=None``) unless a zone is given; the year comes
  from a hint (see :func:`postfix_time`).
- ISO 8601 with a ``T`` (``2026-11-25T08:19:50.123456+00:00``, rsyslog's RFC 3339 format,
  and the milter's own ``2026-11-25T08:19:50+0000``). Without an offset, ``tz`` applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, tzinfo

from relay_milter.defaults import ROUTE_HEADER

__all__ = [
    "PostfixLine",
    "PostfixRecord",
    "Client",
    "MessageId",
    "Route",
    "Queued",
    "Delivery",
    "Expired",
    "Removed",
    "Reject",
    "Tls",
    "BounceNotice",
    "Requeued",
    "MilterRecord",
    "parse_postfix",
    "parse_milter",
    "parse_logfmt",
    "postfix_time",
    "iso_time",
    "response_code",
    "addresses",
]

_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}

# A Postfix line longer than this is not something Postfix wrote (it caps far below).
MAX_LINE = 16384
# The milter's own record keeps every recipient uncut (logs.UNCUT_FIELDS, up to 1,000 of
# them, twice: decoded and as they arrived), so its lines may be far longer. The follower
# reads at most 1 MiB at a time; a line longer than that is skipped there.
MAX_MILTER_LINE = 1 << 20

# Short queue ids are hex; long ones (enable_long_queue_ids) use digits and consonants only,
# so words like "warning" never look like a queue id.
_QID = r"(?:[0-9A-F]{6,16}|[0-9BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz]{10,20})"
_QID_RE = re.compile(rf"^{_QID}$")

_SYSLOG_TS = r"[A-Z][a-z]{2} [ 0-9]?\d \d\d:\d\d:\d\d"
_ISO_TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?"
_POSTFIX_LINE = re.compile(
    rf"^(?P<ts>{_SYSLOG_TS}|{_ISO_TS}) (?P<host>[^\s\[\]]+) "
    r"(?P<service>[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*)(?:\[(?P<pid>\d{1,10})\])?: (?P<msg>.*)$"
)
_QID_PREFIX = re.compile(rf"^(?P<qid>{_QID}|NOQUEUE): (?P<rest>.*)$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")

_CLIENT = re.compile(r"^client=(?P<client>[^\s,]+)(?:, .*)?$")
_MESSAGE_ID = re.compile(r"^message-id=(?P<mid>.*)$")
# pickup: a message an operator requeued (postsuper -r) comes back under a new queue id.
_REQUEUED = re.compile(rf"^uid=\d+ from=<(?P<from>[^<>]*)> orig_id=(?P<orig>{_QID})$")
# The marker is "X-Relay-Route:acme" (no space: the route table is exact-match); releases
# before it wrote "X-Relay-Route: acme", and their log lines still parse.
_ROUTE = re.compile(
    rf"^milter-header-filter: header {re.escape(ROUTE_HEADER)}: ?(?P<tenant>[a-z0-9_]+) from (?P<client>\S+); "
    r"from=<(?P<from>[^<>]*)> to=<(?P<to>[^<>]*)>"
)
_QUEUED = re.compile(r"^from=<(?P<from>[^<>]*)>, size=(?P<size>\d{1,12}), nrcpt=(?P<nrcpt>\d{1,9})(?: \(.*\))?$")
_EXPIRED = re.compile(r"^from=<(?P<from>[^<>]*)>, status=expired, returned to sender$")
_DELIVERY = re.compile(
    r"^to=<(?P<to>[^<>]*)>, (?:orig_to=<(?P<orig>[^<>]*)>, )?relay=(?P<relay>[^\s,]+), "
    r"(?:conn_use=\d+, )?delay=(?P<delay>\d+(?:\.\d+)?), delays=(?P<delays>[\d./]+), dsn=(?P<dsn>[245]\.\d{1,3}\.\d{1,3}), "
    r"status=(?P<status>sent|deferred|bounced|expired)(?: \((?P<text>.*)\))?$"
)
_TLS = re.compile(
    r"^(?P<level>Anonymous|Untrusted|Trusted|Verified) TLS connection established to (?P<peer>\S+): "
    r"(?P<protocol>\S+) with cipher (?P<cipher>\S+)"
)
_NOTICE = re.compile(
    rf"^(?:sender|postmaster) (?:non-delivery|delivery status|delay) notification: (?P<notice>{_QID})$"
)
_CLIENT_ADDR = r"[^\s\[\]]*\[[0-9A-Za-z.:%_\-]*\](?::\d+)?"
_REJECT = re.compile(
    rf"^(?P<milter>milter-)?reject: (?P<stage>[A-Z][A-Z\-]*) from (?P<client>{_CLIENT_ADDR}): (?P<body>.*)$"
)
# Non-greedy text: the first tail with the exact structure wins, so a hostile HELO name
# (last, and absorbed by helo=<...>) cannot inject its own from=/to=.
_REJECT_BODY = re.compile(
    r"^(?P<text>.*?); from=<(?P<from>[^<>]*)>(?: to=<(?P<to>[^<>]*)>)?(?: proto=[A-Z]+)?(?: helo=<.*>)?$"
)
_REJECT_REPLY = re.compile(r"^(?:(?P<code>[245]\d\d) )?(?:(?P<dsn>[245]\.\d{1,3}\.\d{1,3}) )?(?P<text>.*)$")
_SAID = re.compile(r"(?:said|refused to talk to me): (?P<code>[245]\d\d)[ \-]")
_LEADING_CODE = re.compile(r"^(?P<code>[245]\d\d)(?:[ \-]|$)")
_ADDRESS_LIST = re.compile(r"<([^<>]*)>")


@dataclass(frozen=True, kw_only=True)
class PostfixLine:
    """What every meaningful Postfix log line has: when, and which process wrote it."""

    ts: float
    service: str  # syslog name + program, e.g. "postfix/relay_acme/smtp"
    pid: int | None

    @property
    def program(self) -> str:
        """The Postfix program ("smtpd", "smtp", "qmgr"), whatever the service is called."""
        return self.service.rsplit("/", 1)[-1]

    @property
    def process(self) -> str:
        """``service[pid]``: one delivery process (its TLS line and its deliveries)."""
        return f"{self.service}[{self.pid}]"

    @property
    def transport_tenant(self) -> str | None:
        """Tenant of a ``postfix/relay_<tenant>/smtp`` delivery agent (our master.cf naming)."""
        parts = self.service.split("/")
        if len(parts) >= 3 and parts[-2].startswith("relay_") and len(parts[-2]) > 6:
            return parts[-2][6:]
        return None


@dataclass(frozen=True, kw_only=True)
class Client(PostfixLine):
    """smtpd ``<qid>: client=...``: the queue id belongs to mail from an SMTP client."""

    queue_id: str
    client: str


@dataclass(frozen=True, kw_only=True)
class MessageId(PostfixLine):
    """cleanup ``<qid>: message-id=...`` (None when the header was empty)."""

    queue_id: str
    message_id: str | None


@dataclass(frozen=True, kw_only=True)
class Route(PostfixLine):
    """cleanup's log of the route header the milter added (tenant, first recipient)."""

    queue_id: str
    tenant: str
    client: str
    sender: str
    recipient: str


@dataclass(frozen=True, kw_only=True)
class Queued(PostfixLine):
    """qmgr ``<qid>: from=<...>, size=..., nrcpt=...``: the message is in the active queue."""

    queue_id: str
    sender: str
    size: int
    nrcpt: int


@dataclass(frozen=True, kw_only=True)
class Delivery(PostfixLine):
    """A delivery agent's ``<qid>: to=<...>, relay=..., status=...`` line."""

    queue_id: str
    recipient: str
    orig_recipient: str | None
    relay: str
    delay: float
    delays: str  # a/b/c/d: before qmgr, in qmgr, connection setup, transmission
    dsn: str
    status: str  # sent | deferred | bounced | expired
    reason: str  # status and Postfix's text, e.g. "sent (250 2.0.0 Ok)"
    response_code: str | None  # the remote reply code, when there was one


@dataclass(frozen=True, kw_only=True)
class Expired(PostfixLine):
    """qmgr ``<qid>: from=<...>, status=expired, returned to sender``."""

    queue_id: str
    sender: str


@dataclass(frozen=True, kw_only=True)
class Removed(PostfixLine):
    """qmgr ``<qid>: removed``: the queue file is gone."""

    queue_id: str


@dataclass(frozen=True, kw_only=True)
class Reject(PostfixLine):
    """``reject:`` / ``milter-reject:`` at ingress; ``queue_id`` is None for NOQUEUE."""

    queue_id: str | None
    stage: str  # RCPT, DATA, END-OF-MESSAGE, ...
    milter: bool
    client: str
    response_code: str | None
    dsn: str | None
    text: str
    sender: str
    recipient: str | None


@dataclass(frozen=True, kw_only=True)
class Tls(PostfixLine):
    """smtp ``<level> TLS connection established to <peer>: <protocol> with cipher <cipher>``."""

    level: str
    protocol: str
    cipher: str
    peer: str


@dataclass(frozen=True, kw_only=True)
class BounceNotice(PostfixLine):
    """bounce ``<qid>: sender non-delivery notification: <notice_id>``."""

    queue_id: str
    notice_id: str  # the queue id of the notification


@dataclass(frozen=True, kw_only=True)
class Requeued(PostfixLine):
    """pickup ``<qid>: uid=... from=<...> orig_id=<old>``: ``postsuper -r`` gave the message
    a new queue id."""

    queue_id: str
    sender: str
    orig_queue_id: str


# One meaningful Postfix log line: exactly one of these.
PostfixRecord = Client | MessageId | Route | Queued | Delivery | Expired | Removed | Reject | Tls | BounceNotice | Requeued


@dataclass(frozen=True)
class MilterRecord:
    """One structured line of the milter's log (``logs.event``)."""

    ts: float
    level: str
    queue_id: str | None  # None for NOQUEUE
    event: str
    fields: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> str | None:
        value = self.fields.get(key)
        return value if value else None

    @property
    def rcpts(self) -> list[str]:
        """Decoded recipients, in the order the milter saw them."""
        return addresses(self.fields.get("rcpts", ""))

    @property
    def orig_rcpts(self) -> list[str]:
        """The recipients as they arrived (encoded relay addresses), same order as ``rcpts``."""
        return addresses(self.fields.get("orig_rcpts", ""))

    @property
    def truncated(self) -> bool:
        """logs.logfmt_value cuts values at 512 characters and marks the cut with '...'."""
        return any(self.fields.get(k, "").endswith("...") for k in ("rcpts", "orig_rcpts"))


# -- time ------------------------------------------------------------------------


def postfix_time(text: str, year_hint: int | datetime | float, tz: tzinfo | None = None) -> float | None:
    """Epoch seconds of a Postfix timestamp, or None.

    ``Nov 25 08:19:50`` has no year. An ``int`` hint is taken as the year. A ``datetime``
    or epoch ``float`` hint is "now": the year is the hint's, unless that puts the line
    more than a week in the future, in which case it is the year before. That handles a
    December line read in January, and also replaying last year's rotated logs.
    """
    if text[:4].isdigit():
        return iso_time(text, tz)
    try:
        month = _MONTHS[text[:3]]
        day = int(text[4:6])
        hour, minute, second = (int(p) for p in text[7:].split(":"))
        if isinstance(year_hint, int) and not isinstance(year_hint, bool):
            return _epoch(year_hint, month, day, hour, minute, second, tz)
        now = year_hint.timestamp() if isinstance(year_hint, datetime) else float(year_hint)
        year = datetime.fromtimestamp(now, tz).year
        ts = _epoch(year, month, day, hour, minute, second, tz)
        if ts is not None and ts > now + 7 * 86400:
            ts = _epoch(year - 1, month, day, hour, minute, second, tz)
        return ts
    except (KeyError, ValueError, OverflowError, OSError, TypeError):
        return None


def _epoch(year: int, month: int, day: int, hour: int, minute: int, second: int, tz: tzinfo | None) -> float | None:
    try:
        return datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp()
    except ValueError:  # Feb 29 in the wrong year, hour 25, ...
        return None


def iso_time(text: str, tz: tzinfo | None = None) -> float | None:
    """Epoch seconds of ``2026-11-25T08:19:50[.ffffff][Z|+0000|+00:00]``, or None.
    Without an offset the time is in ``tz`` (None: the host's local time)."""
    try:
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        elif len(text) >= 5 and text[-5] in "+-" and text[-4:].isdigit():
            text = text[:-2] + ":" + text[-2:]
        main, dot, rest = text.partition(".")
        if dot:  # Python's fromisoformat wants at most 6 fraction digits (3.10)
            digits = len(rest) - len(rest.lstrip("0123456789"))
            frac = rest[:digits][:6].ljust(6, "0")
            text = f"{main}.{frac}{rest[digits:]}"
        value = datetime.fromisoformat(text)
        if value.tzinfo is None and tz is not None:
            value = value.replace(tzinfo=tz)
        return value.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


# -- helpers ---------------------------------------------------------------------


def response_code(status: str | None, text: str | None) -> str | None:
    """The SMTP reply code in a delivery status text.

    ``host X said: 451 4.3.0 try later (...)`` gives 451; ``sent (250 2.0.0 Ok)`` gives 250.
    Local problems (``connect to ...: Connection refused``) carry no code: None.
    """
    if not text:
        return None
    said = _SAID.search(text)
    if said:
        return said.group("code")
    lead = _LEADING_CODE.match(text)
    if lead:
        return lead.group("code")
    return None


def addresses(value: str) -> list[str]:
    """``<a@x>,<b@y>`` -> ``["a@x", "b@y"]``; an unclosed (truncated) last entry is dropped."""
    return [a for a in _ADDRESS_LIST.findall(value or "")]


def _clean(line: str, limit: int = MAX_LINE) -> str | None:
    if not isinstance(line, str) or len(line) > limit:
        return None
    line = line.rstrip("\r\n")
    if not line or _CONTROL.search(line.replace("\t", " ")):
        return None
    return line


def _qid(token: str) -> str | None:
    return None if token == "NOQUEUE" else token


# -- Postfix ---------------------------------------------------------------------


def parse_postfix(line: str, year_hint: int | datetime | float, tz: tzinfo | None = None) -> PostfixRecord | None:
    """Parse one maillog line; None for anything the tracker does not use or cannot trust."""
    try:
        return _parse_postfix(line, year_hint, tz)
    except Exception:  # a parser bug must never stop the tracker on one odd line
        return None


def _parse_postfix(line: str, year_hint: int | datetime | float, tz: tzinfo | None) -> PostfixRecord | None:
    clean = _clean(line)
    if clean is None:
        return None
    m = _POSTFIX_LINE.match(clean)
    if not m or not m.group("service").startswith("postfix"):
        return None
    ts = postfix_time(m.group("ts"), year_hint, tz)
    if ts is None:
        return None
    service = m.group("service")
    pid = int(m.group("pid")) if m.group("pid") else None
    msg = m.group("msg")
    base = dict(ts=ts, service=service, pid=pid)
    tls = _TLS.match(msg)
    if tls:
        return Tls(
            level=tls.group("level"),
            protocol=tls.group("protocol"),
            cipher=tls.group("cipher"),
            peer=tls.group("peer"),
            **base,
        )
    q = _QID_PREFIX.match(msg)
    if not q:
        return None
    qid, rest = _qid(q.group("qid")), q.group("rest")
    program = service.rsplit("/", 1)[-1]
    reject = _REJECT.match(rest)
    if reject:
        return _reject(reject, qid, base)
    if qid is None:
        return None
    return _queue_line(program, qid, rest, base)


def _queue_line(program: str, qid: str, rest: str, base: dict) -> PostfixRecord | None:
    if rest == "removed":
        return Removed(queue_id=qid, **base)
    if program == "smtpd":
        m = _CLIENT.match(rest)
        return Client(queue_id=qid, client=m.group("client"), **base) if m else None
    if program == "pickup":
        m = _REQUEUED.match(rest)
        return Requeued(queue_id=qid, sender=m.group("from"), orig_queue_id=m.group("orig"), **base) if m else None
    if program == "cleanup":
        m = _MESSAGE_ID.match(rest)
        if m:
            return MessageId(queue_id=qid, message_id=m.group("mid") or None, **base)
        m = _ROUTE.match(rest)
        if m:
            return Route(
                queue_id=qid,
                tenant=m.group("tenant"),
                client=m.group("client"),
                sender=m.group("from"),
                recipient=m.group("to"),
                **base,
            )
        return None
    if program == "qmgr":
        m = _QUEUED.match(rest)
        if m:
            return Queued(
                queue_id=qid,
                sender=m.group("from"),
                size=int(m.group("size")),
                nrcpt=int(m.group("nrcpt")),
                **base,
            )
        m = _EXPIRED.match(rest)
        if m:
            return Expired(queue_id=qid, sender=m.group("from"), **base)
        return None
    if program == "bounce":
        m = _NOTICE.match(rest)
        return BounceNotice(queue_id=qid, notice_id=m.group("notice"), **base) if m else None
    m = _DELIVERY.match(rest)
    if m:
        status, text = m.group("status"), m.group("text")
        return Delivery(
            queue_id=qid,
            recipient=m.group("to"),
            orig_recipient=m.group("orig"),
            relay=m.group("relay"),
            delay=float(m.group("delay")),
            delays=m.group("delays"),
            dsn=m.group("dsn"),
            status=status,
            reason=f"{status} ({text})" if text is not None else status,
            response_code=response_code(status, text),
            **base,
        )
    return None


def _reject(m: re.Match, qid: str | None, base: dict) -> Reject | None:
    body = _REJECT_BODY.match(m.group("body"))
    if not body:
        return None
    reply = _REJECT_REPLY.match(body.group("text"))
    if not reply:
        return None
    return Reject(
        queue_id=qid,
        stage=m.group("stage"),
        milter=bool(m.group("milter")),
        client=m.group("client"),
        response_code=reply.group("code"),
        dsn=reply.group("dsn"),
        text=reply.group("text"),
        sender=body.group("from"),
        recipient=body.group("to"),
        **base,
    )


# -- milter ----------------------------------------------------------------------

_MILTER_LINE = re.compile(
    rf"^(?P<ts>{_ISO_TS}) (?P<logger>[A-Za-z0-9_.\-]+)\[(?P<pid>\d{{1,10}})\]: (?P<level>[A-Z]+) "
    rf"(?P<qid>{_QID}|NOQUEUE): (?P<fields>event=.*)$"
)
_LOGFMT_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?: |$)')
_ESCAPE = re.compile(r"\\(.)")


def parse_logfmt(text: str) -> dict[str, str] | None:
    """``a=1 b="x \\"y\\""`` -> ``{"a": "1", "b": 'x "y"'}``; None unless the whole text is
    well-formed pairs with distinct keys (logs.logfmt_value never produces anything else).
    Backslash sequences other than \\\\ and \\" were written literally by the milter
    (e.g. ``\\n`` for a newline in client text) and are kept as they are."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LOGFMT_PAIR.match(text, pos)
        if not m or m.end() == pos:
            return None
        key, raw = m.group(1), m.group(2)
        if key in out:
            return None
        if raw.startswith('"'):
            raw = _ESCAPE.sub(lambda e: e.group(1) if e.group(1) in '\\"' else e.group(0), raw[1:-1])
        out[key] = raw
        pos = m.end()
    return out if not text.endswith(" ") else None


def parse_milter(line: str) -> MilterRecord | None:
    """Parse one structured milter line (``event=...``); None for anything else
    (tracebacks, foreign lines, garbage)."""
    try:
        clean = _clean(line, MAX_MILTER_LINE)
        if clean is None:
            return None
        m = _MILTER_LINE.match(clean)
        if not m:
            return None
        ts = iso_time(m.group("ts"))
        fields = parse_logfmt(m.group("fields"))
        if ts is None or fields is None or not fields.get("event"):
            return None
        return MilterRecord(ts=ts, level=m.group("level"), queue_id=_qid(m.group("qid")), event=fields.pop("event"), fields=fields)
    except Exception:
        return None
