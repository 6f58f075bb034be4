"""Engagement tracking end to end (issue 15 part B): a real Postfix, the real milter
rewriting a signed multipart HTML message, `relayctl track` and `relayctl web` as their own
processes, a real SQLite store and a real webhook receiver. The test is the recipient: it
reads the rewritten message at the sink, fetches the pixel and follows a link with httpx.
"""

from __future__ import annotations

import email
import re
import secrets
import subprocess
import sys
import time
from email import policy

import httpx
import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, free_port, port_open, rsa_key, sign, stop_process, wait_for
from relay_milter.tracking.events import Kind
from relay_milter.tracking.store import open_store
from relay_milter.tracking.webhooks import verify_signature
from support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

HTML = (
    '<html><body><p>Hello Alice,</p>\r\n'  # hygiene: not a path (HTML)
    '<p>Read <a href="https://news.example.org/article?id=7&amp;src=mail">the article</a> or '  # hygiene: not a path (HTML)
    "<a href='https://shop.example.org/cart'>your cart</a>.</p>\r\n"  # hygiene: not a path (HTML)
    '<p><a href="mailto:help@acme.example">Write to us</a></p>\r\n'  # hygiene: not a path (HTML)
    "</body></html>\r\n"
)
TEXT = "Hello Alice,\r\nRead the article: https://news.example.org/article?id=7&src=mail\r\n"


@pytest.fixture(scope="module")
def elab():
    receiver = WebhookReceiver().up()
    lab = Lab()
    web_port = free_port()
    base_url = f"http://127.0.0.1:{web_port}"
    lab.webhook_secret = secrets.token_urlsafe(24)
    lab.receiver = receiver
    lab.base_url = base_url
    lab.overrides["engagement"] = {"key_file": str(lab.base / "engagement.key"), "listen": f"127.0.0.1:{web_port}"}
    lab.add_tenant(
        TenantSpec("acme", "acme.relay.test", "hop.acme.test", "s1", rsa_key(2048), ["acme.example"],
                   extra={"webhook": {"url": f"http://127.0.0.1:{receiver.port}/hooks/acme", "timeout": 5},
                          "engagement_tracking": {"base_url": base_url, "opens": True, "clicks": True}}),
        Sink("acme"), tls="none",
    )
    lab.secrets = {"acme": {"webhook_secret": lab.webhook_secret}}
    web = None
    try:
        lab.write_settings()
        lab.relayctl("web", "--create-key")  # the key is made at test time, as the role makes it at install
        lab.start()
        lab.start_tracker()
        cmd = [sys.executable, "-m", "relay_milter.cli", "--tenants", str(lab.tenants_dir), "--settings",
               str(lab.settings_file), "web", "--log-file", str(lab.base / "web.log")]
        web = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(lab.base / "web.stderr", "ab"))
        wait_for(lambda: web.poll() is None and port_open(web_port), 20, what="relayctl web")
        lab.web_log = lab.base / "web.log"
        yield lab
    finally:
        stop_process(web)
        lab.destroy()
        receiver.down()


def multipart(lab: Lab, rcpt: str, subject: str) -> tuple[bytes, str, str]:
    spec = lab.tenants["acme"]
    sender = "news@acme.example"
    mid = f"<{subject.replace(' ', '-')}.{time.time_ns()}@platform.test>"
    to = encode_recipient(rcpt, spec.relay_domain)
    boundary = "=_b0und4ry_" + secrets.token_hex(4)
    html_qp = (HTML.replace("=", "=3D"))  # quoted-printable: '=' is the only character to escape here
    body = (
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
        f"{TEXT}\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        f"{html_qp}\r\n"
        f"--{boundary}--\r\n"
    )
    head = (
        f"From: Acme News <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\nMessage-ID: {mid}\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"{boundary}\"\r\n\r\n"
    )
    signed = sign((head + body).encode(), spec.key, spec.signing_domain, spec.selector)
    return signed, sender, to


def delivered(lab: Lab, subject: str) -> email.message.EmailMessage:
    def find():
        for m in lab.sinks["acme"].messages:
            if subject in " ".join(m.header("Subject")):
                return m
        return None

    got = wait_for(find, 40, interval=0.2, what=f"message {subject!r} at the sink")
    return email.message_from_bytes(got.content, policy=policy.default)


def store_events(lab: Lab, queue_id: str) -> list:
    store = open_store(lab.events_dsn)
    try:
        return store.events(queue_id=queue_id)
    finally:
        store.close()


def wait_kinds(lab: Lab, queue_id: str, want: list[str]) -> list:
    def enough():
        evs = store_events(lab, queue_id)
        got = [e.kind.value for e in evs]
        return evs if all(got.count(k) >= want.count(k) for k in set(want)) else None

    return wait_for(enough, 40, interval=0.2, what=f"{want} for {queue_id}")


def hooks(lab: Lab, queue_id: str, kind: str, count: int) -> list:
    def enough():
        got = [r for r in lab.receiver.requests
               if r.json["notifications"][0]["meta"]["queueId"] == queue_id
               and r.json["notifications"][0]["meta"]["event"]["type"] == kind]
        return got if len(got) >= count else None

    return wait_for(enough, 40, interval=0.2, what=f"{count} {kind} webhook(s) for {queue_id}")


def test_links_rewritten_open_and_click_recorded_tampered_token_404(elab):
    raw, sender, to = multipart(elab, "alice@example.org", "engagement one")
    code, text, _ = elab.send(raw, sender, [to])
    assert code == 250, text
    msg = delivered(elab, "engagement one")

    # Same MIME tree; the text part is untouched; the HTML part has tracked links and a pixel.
    assert [p.get_content_type() for p in msg.walk()] == ["multipart/alternative", "text/plain", "text/html"]
    plain, html = [p for p in msg.walk() if p.get_content_maintype() == "text"]
    assert plain.get_content().replace("\r\n", "\n").rstrip("\n") == TEXT.replace("\r\n", "\n").rstrip("\n")
    assert html["Content-Transfer-Encoding"] == "quoted-printable"
    body = html.get_content()
    base = re.escape(elab.base_url)
    clicks = re.findall(rf"""href=["']({base}/c/[A-Za-z0-9_-]+)["']""", body)
    pixels = re.findall(rf'<img src="({base}/o/[A-Za-z0-9_-]+)" width="1" height="1"', body)
    assert len(clicks) == 2 and len(pixels) == 1
    assert 'href="mailto:help@acme.example"' in body  # not an http(s) link: left alone
    assert "news.example.org" not in body and "shop.example.org" not in body
    # Apart from the hrefs and the pixel, the HTML is byte for byte what was sent.
    restored = re.sub(r'<img src="[^"]+" width="1" height="1" alt="" border="0">', "", body)
    restored = restored.replace(clicks[0], "https://news.example.org/article?id=7&amp;src=mail")
    restored = restored.replace(clicks[1], "https://shop.example.org/cart")
    assert restored.replace("\r\n", "\n") == HTML.replace("\r\n", "\n")

    received = wait_kinds(elab, _queue_id(elab, "engagement one"), ["RECEIVED", "RELAYED"])
    qid = received[0].queue_id

    with httpx.Client(follow_redirects=False, timeout=10) as http:
        r = http.get(pixels[0])
        assert r.status_code == 200 and r.headers["content-type"] == "image/gif" and r.content.startswith(b"GIF89a")
        assert "no-store" in r.headers["cache-control"]
        r = http.get(clicks[0])
        assert r.status_code == 302
        assert r.headers["location"] == "https://news.example.org/article?id=7&src=mail"
        r = http.get(pixels[0])  # a second open: counted, marked as a repeat
        assert r.status_code == 200
        # Tampered: one character of the token changed, and another tenant's URL spliced in.
        token = clicks[1].rsplit("/", 1)[1]
        flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
        for bad in (f"{elab.base_url}/c/{flipped}", f"{elab.base_url}/c/{token[:-4]}",
                    f"{elab.base_url}/c/{pixels[0].rsplit('/', 1)[1]}",  # an open token on the click route
                    f"{elab.base_url}/c/https%3A%2F%2Fevil.example"):
            r = http.get(bad)
            assert r.status_code == 404 and "location" not in r.headers, bad
        r = http.get(clicks[1])
        assert r.status_code == 302 and r.headers["location"] == "https://shop.example.org/cart"

    evs = wait_kinds(elab, qid, ["RECEIVED", "RELAYED", "OPENED", "OPENED", "CLICKED", "CLICKED"])
    opened = [e for e in evs if e.kind is Kind.OPENED]
    clicked = [e for e in evs if e.kind is Kind.CLICKED]
    assert [e.reason for e in opened] == ["first open", "repeat open #2"]
    assert [e.reason for e in clicked] == ["first click https://news.example.org/article?id=7&src=mail",
                                           "first click https://shop.example.org/cart"]
    for e in opened + clicked:
        assert (e.tenant, e.recipient, e.message_id) == ("acme", "alice@example.org", received[0].message_id)
    assert len(evs) == 6  # the four tampered requests recorded nothing

    # The webhooks: signed, with the engagement detail.
    opens = hooks(elab, qid, "OPENED", 2)
    [first_click] = [h for h in hooks(elab, qid, "CLICKED", 2)
                     if h.json["notifications"][0]["content"]["engagement"]["url"] == "https://news.example.org/article?id=7&src=mail"]
    for h in [*opens, first_click]:
        assert verify_signature(elab.webhook_secret, h.headers["X-Relay-Signature"], h.body)
    assert [h.json["notifications"][0]["content"]["engagement"]["repeat"] for h in opens] == [False, True]
    note = first_click.json["notifications"][0]
    assert note["meta"]["mail"]["email"] == "alice@example.org" and note["meta"]["event"]["state"] == "ENGAGED"

    # relayctl trace shows the whole life of the message.
    out = elab.relayctl("trace", received[0].message_id).stdout
    assert [ln.split()[3] for ln in out.splitlines()[1:] if ln.strip()][:2] == ["RECEIVED", "RELAYED"]
    assert out.count("OPENED") == 2 and out.count("CLICKED") == 2


def _queue_id(lab: Lab, subject: str) -> str:
    """The queue id the milter logged for the message (its accepted record)."""
    def find():
        m = re.findall(r"(\w+): event=accepted .*?message_id=(\S+)", lab.milter_log_text())
        return next((q for q, mid in m if subject.replace(" ", "-") in mid), None)

    return wait_for(find, 20, interval=0.2, what=f"accepted record of {subject!r}")
