"""core/engagement.py: link tokens and the HTML/MIME rewrite (issue 15 part B).

Golden cases, malformed input (each rewritten correctly or passed through untouched with a
reason) and a property test over generated MIME trees: the same tree of content types,
text parts byte-identical after decoding, HTML parts different only in rewritten hrefs
and the pixel.
"""

from __future__ import annotations

import base64
import email
import os
import re
from email import policy
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_milter.core import engagement as eng

KEY = os.urandom(32)
BASE = "https://t.example.net"
PIXEL_RE = re.compile(r'<img src="https://t\.example\.net/o/[A-Za-z0-9_-]+" width="1" height="1" alt="" border="0">')
LINK_RE = re.compile(r"https://t\.example\.net/c/([A-Za-z0-9_-]+)")


def link(url: str) -> str:
    return f"{BASE}/c/{eng.make_token(KEY, eng.CLICK, 'acme', 'QID1', 'alice@example.org', url, 1700000000)}"


PIXEL = f"{BASE}/o/{eng.make_token(KEY, eng.OPEN, 'acme', 'QID1', 'alice@example.org', None, 1700000000)}"


def split(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Headers as the milter hands them over (name, value after the colon) and the body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    headers: list[tuple[str, str]] = []
    for line in head.decode().split("\r\n"):
        if line[:1] in (" ", "\t"):
            headers[-1] = (headers[-1][0], headers[-1][1] + "\r\n" + line)
        else:
            name, _, value = line.partition(":")
            headers.append((name, value))
    return headers, body


def run(raw: bytes, **kw) -> tuple[eng.Rewrite, bytes]:
    headers, body = split(raw)
    result = eng.rewrite_message(headers, body, link, PIXEL, **kw)
    head = raw.partition(b"\r\n\r\n")[0]
    if result.transfer_encoding:
        head = re.sub(rb"(?im)^content-transfer-encoding:.*$", b"Content-Transfer-Encoding: " + result.transfer_encoding.encode(), head)
    return result, head + b"\r\n\r\n" + (result.body if result.body is not None else body)


def restore(html: str) -> str:
    """The HTML with the pixel removed and every tracked link put back to its target (line
    breaks as LF: a decoded part has the wire's CRLF)."""
    html = PIXEL_RE.sub("", html).replace("\r\n", "\n")

    def back(m: re.Match) -> str:
        token = eng.read_token(KEY, m.group(1), kind=eng.CLICK)
        assert token is not None
        return token.url

    return LINK_RE.sub(back, html)


def message(html: str | None, text: str | None = "Plain words, https://example.org/x\n", charset: str = "utf-8",
            cte: str | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "news@acme.example"
    msg["To"] = "alice@example.org"
    msg["Subject"] = "hello"
    if text is not None:
        msg.set_content(text, charset=charset, cte=cte)
        if html is not None:
            msg.add_alternative(html, subtype="html", charset=charset, cte=cte)
    else:
        msg.set_content(html, subtype="html", charset=charset, cte=cte)
    return msg.as_bytes(policy=policy.SMTP)


# -- tokens ---------------------------------------------------------------------------------


def test_token_round_trip_binds_tenant_message_recipient_and_url():
    tok = eng.make_token(KEY, eng.CLICK, "acme", "4XyZ1", "Alice@Example.org", "https://example.org/a?b=1", 1700000000)
    got = eng.read_token(KEY, tok)
    assert got == eng.Token(eng.CLICK, "acme", "4XyZ1", 1700000000, eng.recipient_id(KEY, "acme", "alice@example.org"),
                            "https://example.org/a?b=1")
    assert "alice" not in base64.urlsafe_b64decode(tok + "==").decode("latin-1").lower()  # no address in the URL
    assert eng.read_token(KEY, tok, kind=eng.OPEN) is None
    assert eng.read_token(os.urandom(32), tok) is None


def test_every_altered_or_truncated_token_is_refused():
    tok = eng.make_token(KEY, eng.CLICK, "acme", "QID", "a@b.example", "https://example.org/", 5)
    for i in range(len(tok)):
        other = "A" if tok[i] != "A" else "B"
        altered = tok[:i] + other + tok[i + 1:]
        got = eng.read_token(KEY, altered)
        assert got is None or got == eng.read_token(KEY, tok)  # the last base64 char may carry unused bits
    for n in range(len(tok)):
        assert eng.read_token(KEY, tok[:n]) is None
    assert eng.read_token(KEY, tok + "A") is None
    assert eng.read_token(KEY, "https://evil.example") is None
    assert eng.read_token(KEY, "") is None


def test_a_token_for_another_url_cannot_be_made_without_the_key():
    tok = eng.make_token(KEY, eng.CLICK, "acme", "QID", None, "https://good.example/", 5)
    raw = base64.urlsafe_b64decode(tok + "=" * (-len(tok) % 4))
    forged = raw.replace(b"https://good.example/", b"https://evil.example/")
    assert eng.read_token(KEY, base64.urlsafe_b64encode(forged).rstrip(b"=").decode()) is None


def test_key_file_text():
    text = eng.new_key_text(b"\x01" * 32)
    assert eng.parse_key(text) == b"\x01" * 32
    assert eng.parse_key("short") is None and eng.parse_key("zz" * 32) is None


# -- golden cases ---------------------------------------------------------------------------------


def test_multipart_alternative_html_links_and_pixel_text_untouched():
    html = ('<html><body><p>Caf\u00e9 <a href="https://example.com/a?x=1&amp;y=2">one</a>\n'  # hygiene: not a path (HTML)
            "<A HREF='http://example.org/b' class=x>two</A> <a href=\"mailto:x@y.example\">m</a> <a href=\"#top\">t</a>"  # hygiene: not a path (HTML)
            "</p></body></html>\n")
    raw = message(html, cte="quoted-printable")
    result, new = run(raw)
    assert (result.links, result.pixels, result.reason, result.skipped) == (2, 1, None, [])
    msg = email.message_from_bytes(new, policy=policy.default)
    old = email.message_from_bytes(raw, policy=policy.default)
    assert [p.get_content_type() for p in msg.walk()] == [p.get_content_type() for p in old.walk()]
    text_old, html_old = [p for p in old.walk() if p.get_content_maintype() == "text"]
    text_new, html_new = [p for p in msg.walk() if p.get_content_maintype() == "text"]
    assert text_new.get_payload(decode=True) == text_old.get_payload(decode=True)
    assert html_new["Content-Transfer-Encoding"] == "quoted-printable"
    body = html_new.get_content()
    assert 'HREF=\'https://t.example.net/c/' in body and 'href="mailto:x@y.example"' in body and 'href="#top"' in body
    assert body.index("<img src=") < body.index("</body>")  # hygiene: not a path (HTML)
    assert html_old.get_content().replace("\r\n", "\n") == html
    assert restore(body) == html.replace("https://example.com/a?x=1&amp;y=2", "https://example.com/a?x=1&y=2")


def test_base64_html_is_reencoded_as_base64_in_76_column_lines():
    html = '<html><body><a href="https://example.com/x">x</a></body></html>\n' * 40  # hygiene: not a path (HTML)
    result, new = run(message(html, text=None, cte="base64"))
    assert result.links == 40 and result.transfer_encoding is None
    body = new.partition(b"\r\n\r\n")[2]
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))
    msg = email.message_from_bytes(new, policy=policy.default)
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert restore(msg.get_content()) == html


def test_7bit_part_whose_lines_grow_past_998_becomes_quoted_printable():
    html = "<p>" + " ".join(f'<a href="https://example.com/{i}">{i}</a>' for i in range(14)) + "</p>\n"  # hygiene: not a path (HTML)
    assert max(len(x) for x in html.splitlines()) < 998
    raw = message(html, text=None, cte="7bit")
    result, new = run(raw)
    assert result.transfer_encoding == "quoted-printable"
    msg = email.message_from_bytes(new, policy=policy.default)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert all(len(line) <= 998 for line in new.split(b"\r\n"))
    assert restore(msg.get_content()).replace("\r\n", "\n") == html  # line breaks: CRLF on the wire


def test_latin1_and_utf8_parts_keep_their_charsets():
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@acme.example", "b@example.org", "mix"
    msg.make_mixed()
    for cs, word in (("iso-8859-1", "gr\u00fc\u00dfe"), ("utf-8", "\u4f60\u597d"), ("windows-1252", "\u20ac uro")):
        part = EmailMessage()
        part.set_content(f'<p>{word} <a href="https://example.com/{cs}">go</a></p>\n', subtype="html", charset=cs)  # hygiene: not a path (HTML)
        msg.attach(part)
    raw = msg.as_bytes(policy=policy.SMTP)
    result, new = run(raw)
    assert result.links == 3 and result.pixels == 3 and not result.skipped
    parts = [p for p in email.message_from_bytes(new, policy=policy.default).walk() if p.get_content_type() == "text/html"]
    assert [p.get_content_charset() for p in parts] == ["iso-8859-1", "utf-8", "windows-1252"]
    assert "gr\u00fc\u00dfe" in parts[0].get_content() and "\u20ac uro" in parts[2].get_content()


def test_no_links_gets_only_the_pixel_and_opens_off_means_no_pixel():
    raw = message("<html><body><p>No links here.</p></body></html>\n", text=None)  # hygiene: not a path (HTML)
    result, new = run(raw)
    assert (result.links, result.pixels) == (0, 1)
    headers, body = split(raw)
    nothing = eng.rewrite_message(headers, body, lambda url: None, None)
    assert nothing.body is None and nothing.reason is None


def test_signed_and_encrypted_parts_are_never_rewritten():
    html_part = ('Content-Type: text/html; charset=us-ascii\r\n\r\n'
                 '<a href="https://example.com/">x</a>\r\n')
    for outer in ('multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256',  # hygiene: not a path (HTML)
                  'multipart/encrypted; protocol="application/pgp-encrypted"'):
        raw = (f"From: a@acme.example\r\nTo: b@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
               f'Content-Type: {outer}; boundary="sig"\r\n\r\n'
               f"--sig\r\n{html_part}--sig\r\nContent-Type: application/octet-stream\r\n\r\nAAAA\r\n--sig--\r\n").encode()
        result, new = run(raw)
        assert result.body is None and new == raw and "never rewritten" in result.skipped[0]
    raw = (b"From: a@acme.example\r\nTo: b@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\nContent-Transfer-Encoding: base64\r\n\r\nMIAGCSqG\r\n")
    assert run(raw)[0].body is None


def test_html_attachment_and_attached_message_are_left_alone():
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@acme.example", "b@example.org", "att"
    msg.set_content("see attachment\n")
    msg.add_attachment('<a href="https://example.com/">x</a>\n', subtype="html", filename="page.html")  # hygiene: not a path (HTML)
    inner = EmailMessage()
    inner["Subject"] = "inner"
    inner.set_content('<a href="https://example.com/inner">x</a>\n', subtype="html")  # hygiene: not a path (HTML)
    msg.add_attachment(inner)
    result, new = run(msg.as_bytes(policy=policy.SMTP))
    assert result.body is None and "attachment" in result.skipped[0]


def test_only_the_bytes_of_the_html_part_change():
    raw = message('<p><a href="https://example.com/">x</a></p>\n', text="text stays\n", cte="quoted-printable")  # hygiene: not a path (HTML)
    result, new = run(raw)
    boundary = re.search(rb'boundary="([^"]+)"', raw).group(1)
    old_parts, new_parts = raw.split(b"--" + boundary), new.split(b"--" + boundary)
    assert len(old_parts) == len(new_parts) == 4
    assert old_parts[0] == new_parts[0] and old_parts[1] == new_parts[1] and old_parts[3] == new_parts[3]
    assert old_parts[2] != new_parts[2]


# -- malformed input: rewritten correctly, or untouched with a reason ------------------------


def test_broken_mime_passes_through_untouched_with_a_reason():
    cases = {
        "no boundary parameter": b"Content-Type: multipart/alternative\r\n",
        "boundary never found": b'Content-Type: multipart/alternative; boundary="nothere"\r\n',
    }
    for what, ctype in cases.items():
        raw = b"From: a@acme.example\r\nSubject: s\r\n" + ctype + b"\r\n--other\r\nContent-Type: text/html\r\n\r\n<a href=\"https://e.example/\">x</a>\r\n"
        result, new = run(raw)
        assert result.body is None and new == raw and result.reason, what
    unclosed = (b'From: a@acme.example\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
                b'--b\r\nContent-Type: text/html\r\n\r\n<a href="https://e.example/">x</a>\r\n')
    result, new = run(unclosed)
    assert result.body is None and "never closed" in result.reason


def test_unknown_charset_bad_base64_and_unknown_encoding_keep_the_part():
    for ctype, cte, content, why in (
        ("text/html; charset=x-no-such-charset", "8bit", b'<a href="https://e.example/">x</a>', "unknown charset"),
        ("text/html; charset=utf-8", "base64", b"!!!! not base64 ****", "invalid base64"),
        ("text/html; charset=utf-8", "x-uuencode", b"begin 644 x", "unknown transfer encoding"),
        ("text/html; charset=us-ascii", "8bit", b'<a href="https://e.example/">caf\xe9</a>', "not valid us-ascii"),
    ):
        raw = (b"From: a@acme.example\r\nContent-Type: " + ctype.encode() + b"\r\nContent-Transfer-Encoding: " + cte.encode()
               + b"\r\n\r\n" + content + b"\r\n")
        result, new = run(raw)
        assert result.body is None and new == raw, why
        assert any(why in s for s in result.skipped), (why, result.skipped)


def test_a_5mb_html_part_passes_through_untouched_with_a_reason():
    html = "<html><body>" + '<p>filler <a href="https://example.com/big">big</a></p>\n' * 100_000 + "</body></html>\n"  # hygiene: not a path (HTML)
    assert len(html) > 5_000_000
    raw = message(html, text="text\n", cte="quoted-printable")
    result, new = run(raw)
    assert result.body is None and new == raw
    assert result.skipped == [f"text/html: part of {len(html) + html.count(chr(10))} bytes is over the {eng.MAX_PART}-byte limit"]


def test_a_large_html_part_under_the_limit_is_rewritten():
    para = "<p>" + "lorem ipsum dolor sit amet " * 300 + "</p>\n"  # hygiene: not a path (HTML)
    html = "<html><body>" + "".join(f'{para}<a href="https://example.com/{i}">{i}</a>\n' for i in range(100)) + "</body></html>\n"  # hygiene: not a path (HTML)
    assert 800_000 < len(html) < eng.MAX_PART
    raw = message(html, text="text\n", cte="base64")
    result, new = run(raw)
    assert (result.links, result.pixels) == (100, 1)
    html_new = [p for p in email.message_from_bytes(new, policy=policy.default).walk() if p.get_content_type() == "text/html"][0]
    assert restore(html_new.get_content()) == html


def test_tags_inside_comments_scripts_and_odd_attributes_are_not_touched():
    html = ('<!-- <a href="https://in.comment/">c</a> -->'  # hygiene: not a path (HTML)
            '<script>var s = \'<a href="https://in.script/">\';</script>'
            '<a data-href="https://data.example/" title=\'href="https://title.example/"\'>no href</a>'
            '<a href="https://twice.example/" href="https://second.example/">dup</a>'
            '<a href = https://unquoted.example/x>u</a>\n')
    raw = message(html, text=None, cte="quoted-printable")
    result, new = run(raw)
    body = email.message_from_bytes(new, policy=policy.default).get_content()
    for kept in ("in.comment", "in.script", "data.example", "title.example", "twice.example"):
        assert kept in body, kept
    assert "unquoted.example" not in body and result.links == 1
    assert restore(body) == html.replace("href = https://unquoted.example/x", 'href = "https://unquoted.example/x"')


# -- property: MIME structure round-trips ---------------------------------------------------------------

_words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=0, max_size=30)
_url = st.builds(lambda host, path: f"https://{host}.example/{path}",
                 st.from_regex(r"[a-z]{1,10}", fullmatch=True), st.from_regex(r"[a-z0-9/?=&._-]{0,30}", fullmatch=True))


@st.composite
def _html(draw) -> str:
    pieces = []
    for _ in range(draw(st.integers(0, 5))):
        words = draw(_words).replace("<", " ").replace("&", " ")
        if draw(st.booleans()):
            quote = draw(st.sampled_from(['"', "'"]))
            url = draw(_url).replace("&", "&amp;")
            pieces.append(f"<a href={quote}{url}{quote}>{words}</a>")  # hygiene: not a path (HTML)
        else:
            pieces.append(f"<p>{words}</p>")  # hygiene: not a path (HTML)
    sep = draw(st.sampled_from(["", "\n"]))
    body = sep.join(pieces)
    return f"<html><body>{body}</body></html>\n" if draw(st.booleans()) else body + "\n"  # hygiene: not a path (HTML)


@st.composite
def _leaf(draw) -> EmailMessage:
    part = EmailMessage()
    cs = draw(st.sampled_from(["utf-8", "iso-8859-1"]))
    cte = draw(st.sampled_from(["quoted-printable", "base64", None]))
    if draw(st.booleans()):
        content = draw(_html())
        subtype = "html"
    else:
        content = draw(_words) + " https://plain.example/x\n"
        subtype = "plain"
    if cs == "iso-8859-1":
        content = content.encode("latin-1", "replace").decode("latin-1")
    part.set_content(content, subtype=subtype, charset=cs, cte=cte)
    return part


@st.composite
def _tree(draw, depth: int = 0) -> EmailMessage:
    if depth >= 2 or draw(st.booleans()):
        return draw(_leaf())
    node = EmailMessage()
    node.set_type(draw(st.sampled_from(["multipart/alternative", "multipart/mixed", "multipart/related"])))
    node.set_boundary(f"b{depth}_{draw(st.integers(0, 999))}")
    for _ in range(draw(st.integers(1, 3))):
        node.attach(draw(_tree(depth + 1)))
    return node


def _leaves(msg: email.message.Message) -> list[tuple[str, bytes]]:
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in msg.walk() if not p.is_multipart()]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_tree())
def test_property_structure_round_trips(tree):
    tree["From"], tree["To"], tree["Subject"] = "a@acme.example", "b@example.org", "p"
    if "MIME-Version" not in tree:
        tree["MIME-Version"] = "1.0"
    raw = tree.as_bytes(policy=policy.SMTP)
    result, new = run(raw)
    assert result.reason is None
    old_msg = email.message_from_bytes(raw, policy=policy.compat32)
    new_msg = email.message_from_bytes(new, policy=policy.compat32)
    assert [p.get_content_type() for p in new_msg.walk()] == [p.get_content_type() for p in old_msg.walk()]
    html_count = 0
    for (ctype, before), (_, after), part in zip(_leaves(old_msg), _leaves(new_msg), [p for p in old_msg.walk() if not p.is_multipart()]):
        if ctype != "text/html":
            assert after == before
            continue
        html_count += 1
        cs = part.get_content_charset()
        assert restore(after.decode(cs)) == before.decode(cs).replace("\r\n", "\n").replace("&amp;", "&")
        assert len(PIXEL_RE.findall(after.decode(cs))) == 1
    assert result.pixels == html_count


def test_an_error_inside_the_rewriter_leaves_the_message_untouched():
    raw = message('<p><a href="https://example.com/">x</a></p>\n', text=None)  # hygiene: not a path (HTML)
    headers, body = split(raw)

    def broken(url: str) -> str:
        raise KeyError(url)

    result = eng.rewrite_message(headers, body, broken, PIXEL)
    assert result.body is None and result.reason == "rewriter error KeyError: 'https://example.com/'"
