"""Structural limits on a message, checked before anything parses it.

Pure functions, no pymilter, no recursion: hostile input (huge or endless
header blocks, raw 8-bit header bytes, MIME nested thousands deep or thousands
wide) is measured with flat loops and C-level searches and refused with a
precise reply.

Why the milter must check what Postfix already limits: Postfix cuts an
over-long header field and passes the message on silently (in the lab a 1 MB
line reached the milter as 60,000 octets, a folded 1 MB field as ~58 KiB; the
documented bound is ``header_size_limit``, 102400), and ``mime_nesting_limit``
only stops Postfix's own MIME processing. Neither refuses the message. The
limits here are below what Postfix cuts to, so a cut field is always refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple


class Refusal(NamedTuple):
    code: str
    dsn: str
    reason: str


@dataclass(frozen=True)
class Limits:
    max_header_fields: int = 1000
    max_line_octets: int = 998  # RFC 5322 section 2.1.1, without the CRLF
    # One field, folded or not. Postfix cuts a field it finds too long (seen at ~58 KiB
    # for a folded one) and passes the rest on: a cut field is always over this.
    max_field_octets: int = 32 * 1024
    max_header_octets: int = 64 * 1024  # whole header block; Postfix's header_size_limit is 102400
    max_mime_depth: int = 20  # containers around the innermost part; the top level is 0
    max_mime_parts: int = 1000


DEFAULT = Limits()

_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))', re.I)
_TYPE = re.compile(rb"^\s*([a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+)", re.I)


def _octets(text: str) -> bytes:
    """The bytes as they were on the wire (the adapter keeps undecodable bytes as surrogates)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def check_headers(headers: Iterable[tuple[str, str]], limits: Limits = DEFAULT) -> Refusal | None:
    fields = list(headers)
    if len(fields) > limits.max_header_fields:
        return Refusal(
            "552", "5.3.4", f"message has {len(fields)} header fields, more than the {limits.max_header_fields} accepted"
        )
    total = 0
    for name, value in fields:
        raw = _octets(f"{name}:{value}")
        total += len(raw) + 2
        longest = max(len(line.rstrip(b"\r")) for line in raw.split(b"\n"))
        if longest > limits.max_line_octets:
            return Refusal(
                "550", "5.6.0",
                f"header field {name[:40]} has a line of {longest} octets, more than {limits.max_line_octets} (RFC 5322 2.1.1)",
            )
        if len(raw) > limits.max_field_octets:
            return Refusal(
                "552", "5.3.4", f"header field {name[:40]} has {len(raw)} octets, more than {limits.max_field_octets}"
            )
        if not raw.isascii():
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return Refusal("550", "5.6.0", f"header field {name[:40]} contains bytes that are not valid UTF-8")
            return Refusal(
                "550", "5.6.0",
                f"header field {name[:40]} contains raw non-ASCII text; encode it as RFC 2047 encoded-words",
            )
        if "\x00" in value:
            return Refusal("550", "5.6.0", f"header field {name[:40]} contains a NUL character")
        if total > limits.max_header_octets:
            return Refusal(
                "552", "5.3.4", f"message header is larger than {limits.max_header_octets} octets"
            )
    return None


_CONTENT_TYPE = re.compile(rb"^content-type[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)", re.I | re.M)
_BLANK_LINE = re.compile(rb"\n\r?\n")
_MESSAGE = (b"message/rfc822", b"message/global")


def _media(value: bytes) -> tuple[bytes, bytes | None]:
    m = _TYPE.match(value)
    media = m.group(1).lower() if m else b"text/plain"
    b = _BOUNDARY.search(value) if media.startswith(b"multipart/") else None
    return media, (b.group(1) or b.group(2)) if b else None


def _entity(body: bytes, start: int) -> tuple[bytes, bytes | None, int]:
    """(media type, boundary, where the content starts) of the entity whose header starts at ``start``."""
    if body.startswith(b"\n", start) or body.startswith(b"\r\n", start):
        return b"text/plain", None, body.index(b"\n", start) + 1  # no header fields
    blank = _BLANK_LINE.search(body, start)
    end = blank.start() + 1 if blank else len(body)
    field = _CONTENT_TYPE.search(body, start, end)
    return (*_media(field.group(1) if field else b""), blank.end() if blank else len(body))


def _delimiters(open_parts: list[tuple[bytes, int]]) -> re.Pattern[bytes]:
    names = b"|".join(re.escape(b) for b, _ in reversed(open_parts))
    return re.compile(rb"^--(" + names + rb")(--)?[ \t]*\r?$", re.M)


def mime_scan(content_type: str, body: bytes, max_depth: int, max_parts: int) -> tuple[int, int]:
    """(deepest nesting, number of parts) of the MIME tree; 0 and 0 for a single part.

    No recursion and no per-line Python loop: the body is searched (in C) for
    the delimiter lines of the multiparts open at that point, kept on an
    explicit stack. Stops as soon as either number passes its limit.
    """
    media, boundary = _media(_octets(content_type))
    open_parts: list[tuple[bytes, int]] = []  # (boundary, depth of the multipart entity)
    depth = deepest = parts = pos = 0
    while True:
        # The content of an entity at ``depth`` starts at ``pos``.
        if media in _MESSAGE:  # its content is a message: a header block one level deeper
            depth += 1
            deepest = max(deepest, depth)
            if deepest > max_depth:
                return deepest, parts
            media, boundary, pos = _entity(body, pos)
            continue
        if media.startswith(b"multipart/") and boundary:
            open_parts.append((boundary, depth))
        while open_parts:
            m = _delimiters(open_parts).search(body, pos)
            if m is None:
                return deepest, parts
            pos = min(m.end() + 1, len(body))
            level = max(i for i, (b, _) in enumerate(open_parts) if b == m.group(1))
            if m.group(2):  # close delimiter
                del open_parts[level:]
                continue
            del open_parts[level + 1 :]
            depth, parts = open_parts[level][1] + 1, parts + 1
            deepest = max(deepest, depth)
            if deepest > max_depth or parts > max_parts:
                return deepest, parts
            media, boundary, pos = _entity(body, pos)
            break
        else:
            return deepest, parts


def check_message(headers: tuple[tuple[str, str], ...], body: bytes, limits: Limits = DEFAULT) -> Refusal | None:
    """The first structural limit the message breaks, or None."""
    refusal = check_headers(headers, limits)
    if refusal:
        return refusal
    content_type = next((v for n, v in headers if n.lower() == "content-type"), "text/plain")
    depth, parts = mime_scan(content_type, body, limits.max_mime_depth, limits.max_mime_parts)
    if depth > limits.max_mime_depth:
        return Refusal("550", "5.6.0", f"MIME parts are nested more than {limits.max_mime_depth} deep")
    if parts > limits.max_mime_parts:
        return Refusal("552", "5.3.4", f"message has more than {limits.max_mime_parts} MIME parts")
    return None
