"""Bounce tracking (issue 15 A): VERP return paths with HMAC tokens, and DSN/ARF parsing.

A tenant with ``bounce_tracking: {domain: bounces.acme.example}`` gets every message's
envelope sender replaced by a return path under that domain::

    rb1.<queue id>.<recipient tag>.<mac>@bounces.acme.example

- ``rb1``: the format (relay bounce, version 1).
- ``<queue id>``: the relay's Postfix queue id of the message (what the events carry).
- ``<recipient tag>``: ``m`` for a message with several recipients (Postfix has one envelope
  sender per message, and a milter cannot split a message into one envelope per recipient),
  else 10 base32 characters of HMAC-SHA256(key, tenant, queue id, recipient): the report
  must then name that recipient.
- ``<mac>``: 20 base32 characters (100 bits) of HMAC-SHA256(key, tenant, bounce domain,
  queue id, recipient tag).

The key is the relay's (``<config_directory>/relay/requeue/verp.key``: one hex key per line,
the first signs, every line verifies, so a rotated-out key is still accepted while reports
for older messages come in). Nobody without the key can make a local part the relay takes,
so a forged or guessed bounce cannot mark a delivery as failed.

Reports: RFC 3464 delivery status notifications (stdlib ``email``), RFC 5965 feedback
reports (ARF), and, for non-standard bounces, ``flufl.bounce``'s heuristics. Pure functions
but the key file read (cached by modification time).
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

from relay_milter import defaults

PREFIX = "rb1"
TOKEN_RE = re.compile(r"^rb1\.([0-9A-Za-z]{6,32})\.(m|[a-z2-7]{10})\.([a-z2-7]{20})$", re.IGNORECASE)
_MAC_CONTEXT = b"tenant-relay verp v1\0"
_RCPT_CONTEXT = b"tenant-relay verp rcpt v1\0"
# A report is parsed from at most this much of the message (a DSN that returns a large
# original message carries it as its last part; the status part comes first).
MAX_REPORT_BYTES = 2 * 1024 * 1024


# -- keys --------------------------------------------------------------------------------


def new_key_file() -> str:
    return secrets.token_hex(32) + "\n"


def parse_keys(text: str) -> tuple[bytes, ...]:
    """Every key of the file, the signing one first; () if any line is not a 256-bit hex key."""
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            return ()
        if len(key) < 32:
            return ()
        keys.append(key)
    return tuple(keys)


_cache: dict[Path, tuple[float, tuple[bytes, ...]]] = {}


def load_keys(config_directory: Path) -> tuple[bytes, ...]:
    """The keys `relayctl apply` installed; () when there is no valid file. Re-read when the
    file changes (a rotation takes effect without a milter restart)."""
    path = Path(config_directory) / defaults.VERP_KEY_FILE
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return ()
    cached = _cache.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    try:
        keys = parse_keys(path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError):
        return ()
    _cache[path] = (mtime, keys)
    return keys


# -- tokens ------------------------------------------------------------------------------


def _b32(data: bytes, n: int) -> str:
    return base64.b32encode(data).decode("ascii").lower().rstrip("=")[:n]


def _rcpt_tag(key: bytes, tenant: str, queue_id: str, recipient: str) -> str:
    msg = _RCPT_CONTEXT + "\0".join((tenant, queue_id, recipient.lower())).encode("utf-8", "surrogateescape")
    return _b32(hmac.new(key, msg, hashlib.sha256).digest(), 10)


def _mac(key: bytes, tenant: str, domain: str, queue_id: str, tag: str) -> str:
    msg = _MAC_CONTEXT + "\0".join((tenant, domain.lower(), queue_id, tag)).encode("ascii")
    return _b32(hmac.new(key, msg, hashlib.sha256).digest(), 20)


def return_path(key: bytes, tenant: str, domain: str, queue_id: str, recipients: list[str]) -> str:
    """The VERP envelope sender of a message: recipient-bound for one recipient, else per message."""
    tag = _rcpt_tag(key, tenant, queue_id, recipients[0]) if len(recipients) == 1 else "m"
    return f"{PREFIX}.{queue_id}.{tag}.{_mac(key, tenant, domain, queue_id, tag)}@{domain.lower()}"


@dataclass(frozen=True)
class Token:
    """A verified return path: the message (queue id) and the key that signed it."""

    queue_id: str
    tag: str  # "m" (per message) or the recipient tag
    key: bytes

    @property
    def per_message(self) -> bool:
        return self.tag == "m"

    def names(self, tenant: str, recipient: str) -> bool:
        """Does this token belong to ``recipient`` (always, for a per-message token)?"""
        if self.per_message:
            return True
        return hmac.compare_digest(_rcpt_tag(self.key, tenant, self.queue_id, recipient), self.tag)


def verify(local: str, domain: str, tenant: str, keys: tuple[bytes, ...]) -> Token | None:
    """The token of ``local``@``domain`` if a key of ``keys`` made it, else None."""
    m = TOKEN_RE.match(local)
    if not m or not local.startswith(PREFIX):
        return None
    queue_id, tag, mac = m.group(1), m.group(2).lower(), m.group(3).lower()
    for key in keys:
        if hmac.compare_digest(_mac(key, tenant, domain, queue_id, tag), mac):
            return Token(queue_id, tag, key)
    return None


# -- reports -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """One recipient's line of a report."""

    kind: str  # BOUNCED | DELAYED | COMPLAINED
    recipient: str | None  # the final recipient (lower-case address), None when unknown
    status: str | None = None  # RFC 3463 status, e.g. 5.1.1
    action: str | None = None  # failed | delayed (DSN), or the ARF Feedback-Type
    diagnostic: str | None = None  # Diagnostic-Code (the remote MTA's reply), or the ARF text
    code: str | None = None  # the SMTP reply code in the diagnostic (550)
    remote_mta: str | None = None
    reporting_mta: str | None = None
    source: str = "rfc3464"  # rfc3464 | arf | heuristic


@dataclass
class Parsed:
    reports: list[Report] = field(default_factory=list)
    kind: str = "none"  # rfc3464 | arf | heuristic | none
    message_id: str | None = None  # Message-ID of the original message, when the report includes it


def _addr(value: str | None) -> str | None:
    """``rfc822; Alice@Example.org`` -> ``alice@example.org``."""
    if not value:
        return None
    value = re.sub(r"\s+", "", str(value))
    if ";" in value:
        value = value.split(";", 1)[1]
    value = value.strip("<>")
    return value.lower() if "@" in value else None


def _typed(value: str | None) -> str | None:
    """``dns; mx.example.org`` -> ``mx.example.org``; ``smtp; 550 ...`` -> ``550 ...``."""
    if not value:
        return None
    text = re.sub(r"\s+", " ", str(value)).strip()
    return text.split(";", 1)[1].strip() if ";" in text else text


def _blocks(part: Message) -> list[Message]:
    """The field blocks of a message/delivery-status part (the email package parses it into
    sub-messages; an unparsed payload is split at blank lines)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    text = payload if isinstance(payload, str) else ""
    return [email.message_from_string(b.strip() + "\n") for b in re.split(r"\r?\n\s*\r?\n", text) if b.strip()]


def _original_message_id(msg: Message) -> str | None:
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/rfc822-headers", "text/rfc822-headers", "message/global-headers"):
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if inner is None and isinstance(payload, str):
                inner = email.message_from_string(payload)
            if isinstance(inner, Message) and inner.get("Message-ID"):
                return str(inner.get("Message-ID")).strip()
    return None


def _dsn(part: Message) -> list[Report]:
    blocks = _blocks(part)
    if not blocks:
        return []
    per_message, per_rcpt = blocks[0], blocks[1:]
    if per_message.get("Final-Recipient") or per_message.get("Action"):  # no per-message block
        per_message, per_rcpt = Message(), blocks
    reporting = _typed(per_message.get("Reporting-MTA"))
    out = []
    for b in per_rcpt:
        action = (b.get("Action") or "").strip().lower()
        if action not in ("failed", "delayed"):
            continue  # delivered, relayed, expanded: nothing to track
        diagnostic = _typed(b.get("Diagnostic-Code"))
        code = re.match(r"^([245]\d\d)\b", diagnostic or "")
        status = (b.get("Status") or "").strip() or None
        out.append(
            Report(
                kind="BOUNCED" if action == "failed" else "DELAYED",
                recipient=_addr(b.get("Final-Recipient")) or _addr(b.get("Original-Recipient")),
                status=status.split()[0] if status else None,
                action=action,
                diagnostic=diagnostic,
                code=code.group(1) if code else None,
                remote_mta=_typed(b.get("Remote-MTA")),
                reporting_mta=reporting,
            )
        )
    return out


def _arf(part: Message, msg: Message) -> list[Report]:
    blocks = _blocks(part)
    fields = blocks[0] if blocks else Message()
    feedback = (fields.get("Feedback-Type") or "abuse").strip().lower()
    rcpts = [_addr(v) for v in fields.get_all("Original-Rcpt-To") or []]
    text = None
    for p in msg.walk():
        if p.get_content_type() == "text/plain" and not p.is_multipart():
            text = re.sub(r"\s+", " ", p.get_payload(decode=True).decode("utf-8", "replace")).strip()[:300] or None
            break
    reporting = _typed(fields.get("Reporting-MTA"))
    return [
        Report("COMPLAINED", r, action=feedback, diagnostic=text, reporting_mta=reporting, source="arf")
        for r in (rcpts or [None])
    ]


def parse_report(raw: bytes) -> Parsed:
    """What a message sent to a bounce address reports. Never raises on bad input: an
    unreadable message gives ``kind="none"`` and no reports."""
    try:
        msg = email.message_from_bytes(raw[:MAX_REPORT_BYTES], policy=email.policy.compat32)
    except Exception:  # the email package is lenient; belt and braces
        return Parsed()
    out = Parsed(message_id=_original_message_id(msg))
    if msg.get_content_type() == "multipart/report":
        report_type = (msg.get_param("report-type") or "").lower()
        for part in msg.walk():
            ctype = part.get_content_type()
            if ctype in ("message/delivery-status", "message/global-delivery-status") and report_type != "feedback-report":
                out.reports += _dsn(part)
                out.kind = "rfc3464"
            elif ctype == "message/feedback-report":
                out.reports += _arf(part, msg)
                out.kind = "arf"
        if out.kind != "none":
            return out
    return _heuristic(msg, out)


def _heuristic(msg: Message, out: Parsed) -> Parsed:
    """flufl.bounce for the bounces that are no RFC 3464 report (old qmail, Exchange, ...)."""
    try:
        from flufl.bounce import all_failures

        temporary, permanent = all_failures(msg)
    except Exception:
        return out
    for kind, found in (("BOUNCED", permanent), ("DELAYED", temporary)):
        for addr in sorted(found):
            text = addr.decode("utf-8", "replace") if isinstance(addr, bytes) else str(addr)
            out.reports.append(Report(kind, _addr(text), action="failed" if kind == "BOUNCED" else "delayed", source="heuristic"))
    if out.reports:
        out.kind = "heuristic"
    return out
