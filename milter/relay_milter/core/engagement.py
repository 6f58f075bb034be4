"""Engagement tracking (opt-in, issue 15): link tokens and the HTML rewrite of a message.

Pure: the standard library's ``email`` and ``html.parser``, no pymilter, no I/O. The
milter adapter calls :func:`rewrite_message` after the policy accepted a message (the hop
signature was verified on the original body) and replaces the body with the result; the
web service (``relayctl web``) checks tokens with :func:`read_token`.

**Tokens.** ``base64url(body || mac)`` without padding, where ``body`` is

    version (1 byte, 1) | kind (1 byte, "o" open or "c" click) | issued (4 bytes, epoch s)
    | len + tenant id | len + Postfix queue id | len + recipient id (8 bytes, or 0: per message)
    | target URL (UTF-8, the rest; clicks only)

and ``mac`` is the first 16 bytes of HMAC-SHA256 under the engagement key over
``b"relay-engagement\\0" + body``. The recipient id is itself a keyed HMAC of the tenant and
the recipient address (8 bytes): the token binds the recipient without carrying the address
in the URL. A token whose MAC does not verify is unknown: no redirect, ever.

**Rewrite.** Only ``text/html`` leaves are changed, and in them only the values of ``href``
attributes of ``<a>``/``<area>`` that hold absolute http(s) URLs, in place (the document is
not re-serialized), plus one 1x1 ``<img>`` before ``</body>``. Everything else keeps its
bytes: other parts, headers, boundaries, preamble and epilogue. A changed part is encoded
again with its own charset and transfer encoding (a 7bit/8bit part whose lines would pass
998 octets becomes quoted-printable). Never rewritten: anything under multipart/signed,
multipart/encrypted, application/pkcs7-mime (or x-pkcs7-mime), message/* (attached
messages), and HTML attachments. A message the rewriter cannot read (broken MIME) is
passed through untouched with a reason; a part it cannot read (unknown charset,
undecodable, over the size limit, unknown transfer encoding) keeps its bytes, with a reason.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import hmac
import html
import quopri
import re
import struct
from dataclasses import dataclass, field
from email import message_from_bytes
from email import quoprimime
from email.message import Message as EmailMessage
from email.policy import compat32
from html.parser import HTMLParser
from typing import Callable, Sequence
from urllib.parse import urlsplit

TOKEN_VERSION = 1
OPEN = "o"
CLICK = "c"
MAC_BYTES = 16
RCPT_ID_BYTES = 8
KEY_BYTES = 32
MAX_URL = 2048  # longer link targets are left alone (and a token stays a usable URL)
MAX_TOKEN = 4096
# Decoded size of one HTML part above which it is passed through untouched. Mailing HTML is
# far smaller (clients clip at ~100 KB); parsing costs milter time (bench/RESULTS.md).
MAX_PART = 1024 * 1024
MAX_DEPTH = 20
_DOMAIN = b"relay-engagement\0"

# Parts whose content is signed or encrypted as a whole: never looked into.
_OPAQUE = frozenset({
    "multipart/signed", "multipart/encrypted", "application/pkcs7-mime", "application/x-pkcs7-mime",
    "application/pgp-encrypted", "application/pgp-signature",
})
_CTES = frozenset({"7bit", "8bit", "binary", "quoted-printable", "base64"})


# -- tokens -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    kind: str  # OPEN or CLICK
    tenant: str
    queue_id: str
    issued: int  # epoch seconds
    rcpt_id: bytes  # RCPT_ID_BYTES, or b"" for a per-message token (several recipients)
    url: str | None  # the original link target (clicks)


def parse_key(text: str) -> bytes | None:
    """The engagement key file's content: 64 hex digits (256 bits); None if it is not that."""
    text = text.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return None
    return bytes.fromhex(text)


def new_key_text(random: bytes) -> str:
    """The key file's content for ``random`` (32 bytes from os.urandom)."""
    if len(random) != KEY_BYTES:
        raise ValueError("an engagement key is 32 random bytes")
    return random.hex() + "\n"


@functools.lru_cache(maxsize=256)
def recipient_id(key: bytes, tenant: str, recipient: str | None) -> bytes:
    """The keyed pseudonym of a recipient in a token (b"" when there is none)."""
    if not recipient:
        return b""
    msg = b"rcpt\0" + tenant.encode() + b"\0" + recipient.strip().lower().encode("utf-8", "surrogateescape")
    return hmac.new(key, msg, hashlib.sha256).digest()[:RCPT_ID_BYTES]


def _lp(data: bytes) -> bytes:
    if len(data) > 255:
        raise ValueError("token field too long")
    return bytes([len(data)]) + data


def make_token(key: bytes, kind: str, tenant: str, queue_id: str, recipient: str | None, url: str | None = None,
               issued: int = 0) -> str:
    """A signed token for an open (``url`` None) or a click on ``url``."""
    if kind not in (OPEN, CLICK) or (kind == CLICK) != (url is not None):
        raise ValueError("an open token has no URL, a click token has one")
    body = (bytes([TOKEN_VERSION]) + kind.encode() + struct.pack(">I", issued & 0xFFFFFFFF)
            + _lp(tenant.encode()) + _lp(queue_id.encode()) + _lp(recipient_id(key, tenant, recipient))
            + (url or "").encode("utf-8"))
    mac = hmac.new(key, _DOMAIN + body, hashlib.sha256).digest()[:MAC_BYTES]
    return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")


def read_token(key: bytes, token: str, kind: str | None = None) -> Token | None:
    """The token's content if its MAC verifies (and it is of ``kind``), else None."""
    if not token or len(token) > MAX_TOKEN or not re.fullmatch(r"[A-Za-z0-9_-]+", token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) < 2 + 4 + 3 + MAC_BYTES:
        return None
    body, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, _DOMAIN + body, hashlib.sha256).digest()[:MAC_BYTES]):
        return None
    try:
        if body[0] != TOKEN_VERSION:
            return None
        got = chr(body[1])
        (issued,) = struct.unpack(">I", body[2:6])
        pos = 6
        fields_: list[bytes] = []
        for _ in range(3):
            n = body[pos]
            fields_.append(body[pos + 1:pos + 1 + n])
            pos += 1 + n
        if pos > len(body):
            return None
        rest = body[pos:].decode("utf-8")
        tenant, queue_id = fields_[0].decode("ascii"), fields_[1].decode("ascii")
    except (IndexError, UnicodeDecodeError, struct.error):
        return None
    if got not in (OPEN, CLICK) or (kind is not None and got != kind):
        return None
    if len(fields_[2]) not in (0, RCPT_ID_BYTES):
        return None
    if got == CLICK and not _trackable(rest):
        return None
    if got == OPEN and rest:
        return None
    return Token(got, tenant, queue_id, issued, fields_[2], rest if got == CLICK else None)


def _trackable(url: str) -> bool:
    """An absolute http(s) URL of sane length with a host: the only links rewritten."""
    if len(url) > MAX_URL or any(c in url for c in "\r\n\0"):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


# -- HTML: hrefs in place, and the pixel --------------------------------------------------

_TAG_NAME = re.compile(r"<[a-zA-Z][^\t\n\r\f />\x00]*")
_ATTR = re.compile(r"""[\s/]*([^\s/>][^\s/=>]*)(\s*=+\s*('[^']*'|"[^"]*"|(?!['"])[^>\s]*))?""")
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


class _Hrefs(HTMLParser):
    """Collects (offset of the start tag, its raw text, the href value) of <a>/<area>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.found: list[tuple[tuple[int, int], str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ("a", "area"):
            return
        hrefs = [v for n, v in attrs if n == "href"]
        if len(hrefs) == 1 and hrefs[0] is not None:
            self.found.append((self.getpos(), self.get_starttag_text() or "", hrefs[0]))

    handle_startendtag = handle_starttag


def _href_span(tag_text: str, value: str) -> tuple[int, int, str] | None:
    """(start, end, quote) of the one href value in a raw start tag; None unless the value
    there, unescaped, is exactly what the HTML parser reported (then nothing is guessed)."""
    m = _TAG_NAME.match(tag_text)
    if not m:
        return None
    k = m.end()
    spans = []
    while k < len(tag_text):
        a = _ATTR.match(tag_text, k)
        if not a or a.end() == k:
            break
        if a.group(1).lower() == "href" and a.group(3) is not None:
            spans.append(a.span(3))
        k = a.end()
    if len(spans) != 1:
        return None
    start, end = spans[0]
    raw = tag_text[start:end]
    quote = raw[0] if raw[:1] in ("'", '"') else ""
    inner = raw[1:-1] if quote else raw
    if html.unescape(inner) != value:
        return None
    return start, end, quote or '"'


def rewrite_html(text: str, link: Callable[[str], str | None], pixel: str | None) -> tuple[str, int, int]:
    """``text`` with each trackable href replaced by ``link(target)`` (when that is not None)
    and the ``pixel`` image before ``</body>`` (or at the end). Returns (text, links, pixels)."""
    parser = _Hrefs()
    parser.feed(text)
    parser.close()
    starts = [0]
    for m in re.finditer("\n", text):
        starts.append(m.end())
    edits: list[tuple[int, int, str]] = []
    for (line, col), tag_text, value in parser.found:
        target = value.strip()
        if not _trackable(target) or line - 1 >= len(starts):
            continue
        offset = starts[line - 1] + col
        if text[offset:offset + len(tag_text)] != tag_text:
            continue
        span = _href_span(tag_text, value)
        if span is None:
            continue
        new = link(target)
        if new is None:
            continue
        start, end, quote = span
        edits.append((offset + start, offset + end, f"{quote}{new}{quote}"))
    pieces, at = [], 0
    for start, end, new in sorted(edits):
        pieces += [text[at:start], new]
        at = end
    pieces.append(text[at:])
    out = "".join(pieces)
    pixels = 0
    if pixel is not None:
        img = f'<img src="{pixel}" width="1" height="1" alt="" border="0">'
        ends = list(_BODY_END.finditer(out))
        at = ends[-1].start() if ends else len(out.rstrip("\r\n"))
        out = out[:at] + img + out[at:]
        pixels = 1
    return out, len(edits), pixels


# -- MIME: find the HTML leaves in the raw bytes, splice new encodings in ---------------------


class BrokenMime(Exception):
    """The message's structure cannot be followed: it is passed through untouched."""


@dataclass
class Rewrite:
    """What :func:`rewrite_message` did. ``body`` is None when nothing changed."""

    body: bytes | None = None
    # New top-level Content-Transfer-Encoding (a single-part 7bit/8bit HTML message whose
    # lines would grow past 998 octets becomes quoted-printable); None: unchanged.
    transfer_encoding: str | None = None
    links: int = 0
    pixels: int = 0
    # Why the message (``reason``) or some parts (``skipped``) were passed through untouched.
    reason: str | None = None
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Ctx:
    link: Callable[[str], str | None]
    pixel: str | None
    max_part: int
    result: Rewrite


def _eol(data: bytes) -> bytes:
    return b"\r\n" if b"\r\n" in data else b"\n"


def _head_of(header_bytes: bytes) -> EmailMessage:
    return message_from_bytes(header_bytes + b"\n", policy=compat32)


def rewrite_message(headers: Sequence[tuple[str, str]], body: bytes, link: Callable[[str], str | None],
                    pixel: str | None, max_part: int = MAX_PART) -> Rewrite:
    """Rewrite the HTML parts of a message (``headers`` as (name, value-after-colon) pairs,
    ``body`` the raw body). ``link(url)`` gives the replacement of a link target (None:
    leave it), ``pixel`` the open pixel's URL (None: no pixel)."""
    result = Rewrite()
    head_bytes = b"".join(
        f"{n}:{v}".encode("utf-8", "surrogateescape").replace(b"\r\n", b"\n") + b"\n" for n, v in headers
    )
    ctx = _Ctx(link, pixel, max_part, result)
    try:
        new_body, cte = _entity(_head_of(head_bytes), body, ctx, 0, top=True)
    except BrokenMime as exc:
        return Rewrite(reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - whatever the input does to the parsers: untouched, never half-done
        return Rewrite(reason=f"rewriter error {type(exc).__name__}: {exc}")
    if new_body is None or new_body == body:
        result.body = None
        result.transfer_encoding = None
        return result
    result.body = new_body
    result.transfer_encoding = cte
    return result


def _entity(head: EmailMessage, body: bytes, ctx: _Ctx, depth: int, top: bool = False) -> tuple[bytes | None, str | None]:
    """The new body of one entity (None: unchanged) and, for a leaf whose transfer encoding
    had to change, the new encoding."""
    if depth > MAX_DEPTH:
        raise BrokenMime("MIME nesting too deep")
    ctype = head.get_content_type()
    if ctype in _OPAQUE:
        ctx.result.skipped.append(f"{ctype}: signed or encrypted, never rewritten")
        return None, None
    if head.get_content_maintype() == "multipart":
        boundary = head.get_boundary()
        if not boundary:
            raise BrokenMime(f"{ctype} without a boundary")
        return _multipart(boundary, body, ctx, depth), None
    if ctype != "text/html":
        return None, None
    disposition = (head.get("content-disposition") or "").split(";")[0].strip().lower()
    if disposition == "attachment":
        ctx.result.skipped.append("text/html attachment: not rewritten")
        return None, None
    return _html_leaf(head, body, ctx)


def _multipart(boundary: str, body: bytes, ctx: _Ctx, depth: int) -> bytes | None:
    delim = re.compile(rb"(?m)^--" + re.escape(boundary.encode("utf-8", "surrogateescape")) + rb"(--)?[ \t]*\r?$")
    matches = list(delim.finditer(body))
    closes = [m for m in matches if m.group(1)]
    if not matches or matches[0].group(1):
        raise BrokenMime(f"multipart boundary {boundary!r} not found")
    if not closes:
        raise BrokenMime(f"multipart boundary {boundary!r} is never closed")
    end = closes[0]
    parts = [m for m in matches if m.start() < end.start() and not m.group(1)]
    edits: list[tuple[int, int, bytes]] = []
    for i, m in enumerate(parts):
        start = m.end() + (2 if body[m.end():m.end() + 2] == b"\r\n" else 1)
        stop = (parts[i + 1] if i + 1 < len(parts) else end).start()
        # The line break before a delimiter belongs to the delimiter (RFC 2046 5.1.1).
        if body[max(start, stop - 2):stop] == b"\r\n":
            stop -= 2
        elif body[max(start, stop - 1):stop] == b"\n":
            stop -= 1
        if stop < start:
            raise BrokenMime("empty MIME part")
        new = _part(body[start:stop], ctx, depth + 1)
        if new is not None:
            edits.append((start, stop, new))
    if not edits:
        return None
    pieces, at = [], 0
    for start, stop, new in edits:
        pieces += [body[at:start], new]
        at = stop
    pieces.append(body[at:])
    return b"".join(pieces)


def _part(raw: bytes, ctx: _Ctx, depth: int) -> bytes | None:
    """One body part (its headers and content); the new bytes or None."""
    m = re.search(rb"\r?\n\r?\n", raw)
    if raw.startswith((b"\r\n", b"\n")):  # no header fields: text/plain, us-ascii
        return None
    if m is None:
        return None  # headers only, no content
    head_bytes, content = raw[:m.start()], raw[m.end():]
    head = _head_of(head_bytes.replace(b"\r\n", b"\n"))
    new, cte = _entity(head, content, ctx, depth)
    if new is None:
        return None
    if cte is not None:
        head_bytes = _set_cte(head_bytes, cte)
    return head_bytes + raw[m.start():m.end()] + new


def _set_cte(head_bytes: bytes, cte: str) -> bytes:
    eol = _eol(head_bytes)
    line = b"Content-Transfer-Encoding: " + cte.encode()
    pattern = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*")
    if pattern.search(head_bytes):
        return pattern.sub(lambda _: line, head_bytes, count=1)
    return head_bytes + eol + line


def _html_leaf(head: EmailMessage, content: bytes, ctx: _Ctx) -> tuple[bytes | None, str | None]:
    cte = (head.get("content-transfer-encoding") or "7bit").strip().lower()
    if cte not in _CTES:
        ctx.result.skipped.append(f"text/html: unknown transfer encoding {cte!r}")
        return None, None
    eol = _eol(content)
    if cte == "base64":
        try:
            data = base64.b64decode(re.sub(rb"\s+", b"", content), validate=True)
        except (binascii.Error, ValueError):
            ctx.result.skipped.append("text/html: invalid base64")
            return None, None
    elif cte == "quoted-printable":
        data = quopri.decodestring(content)
    else:
        data = content
    if len(data) > ctx.max_part:
        ctx.result.skipped.append(f"text/html: part of {len(data)} bytes is over the {ctx.max_part}-byte limit")
        return None, None
    charset = head.get_content_charset() or "us-ascii"
    try:
        codecs.lookup(charset)
    except LookupError:
        ctx.result.skipped.append(f"text/html: unknown charset {charset!r}")
        return None, None
    try:
        text = data.decode(charset)
        if text.encode(charset) != data:
            ctx.result.skipped.append(f"text/html: charset {charset} does not round-trip")
            return None, None
    except UnicodeError:
        ctx.result.skipped.append(f"text/html: not valid {charset}")
        return None, None
    new_text, links, pixels = rewrite_html(text, ctx.link, ctx.pixel)
    if new_text == text:
        return None, None
    try:
        new_data = new_text.encode(charset)
    except UnicodeError:
        ctx.result.skipped.append(f"text/html: cannot encode the rewritten part in {charset}")
        return None, None
    new_cte = None
    if cte == "base64":
        encoded = _b64(new_data, eol, content)
    elif cte == "quoted-printable":
        encoded = _qp(new_data, eol, content)
    elif max((len(line) for line in new_data.split(b"\n")), default=0) > 998:
        encoded, new_cte = _qp(new_data, eol, content), "quoted-printable"
    else:
        encoded = new_data
    ctx.result.links += links
    ctx.result.pixels += pixels
    return encoded, new_cte


def _b64(data: bytes, eol: bytes, original: bytes) -> bytes:
    text = base64.b64encode(data)
    lines = [text[i:i + 76] for i in range(0, len(text), 76)]
    out = eol.join(lines)
    return out + eol if original.endswith(b"\n") else out


def _qp(data: bytes, eol: bytes, original: bytes) -> bytes:
    text = data.decode("latin-1").replace("\r\n", "\n")
    out = quoprimime.body_encode(text, maxlinelen=76, eol=eol.decode()).encode("latin-1")
    if original.endswith(b"\n") and not out.endswith(eol):
        out += eol
    elif not original.endswith(b"\n") and out.endswith(eol):
        out = out[: -len(eol)]
    return out
