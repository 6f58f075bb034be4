"""tracking/web.py: the engagement service as an ASGI app, against a real SQLite store.

Requests go through httpx's ASGI transport (the same app uvicorn serves in `relayctl web`;
tests/e2e/test_engagement.py runs the real process). Checked: the pixel and the redirect,
OPENED/CLICKED with repeats counted, the webhook row, and 404 without a Location for every
token that does not verify.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time

import httpx
import pytest

from relay_milter.config import EngagementTracking, Settings
from relay_milter.core import engagement as eng
from relay_milter.tracking import web
from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.store import open_store
from support.factories import tenant, tenant_set

KEY = os.urandom(32)
BASE = "http://testserver"


@pytest.fixture
def service(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/events.db")
    now = time.time()
    with store.transaction() as tx:
        for rcpt in ("alice@example.org", "bob@example.org"):
            tx.add_event(Event(Kind.RECEIVED, now, "relay1", tenant="acme", queue_id="QID1", message_id="<m1@platform.test>",
                               sender="news@acme.example", recipient=rcpt, original_recipient=rcpt.replace("@", "=") + "@acme.relay.test"))
    tenants = tenant_set(tenant("acme", webhook={"url": "https://hooks.acme.example/x"}))
    recorder = web.Recorder(store, KEY, Settings(), lambda: tenants)
    app = web.EngagementApp(KEY, recorder)
    yield app, store, int(now)
    app.pool.shutdown()
    store.close()


def get(app, path: str, method: str = "GET") -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
            return await client.request(method, path)

    return asyncio.run(go())


def token(kind: str, issued: int, recipient: str | None = "alice@example.org", url: str | None = None, key: bytes = KEY) -> str:
    return eng.make_token(key, kind, "acme", "QID1", recipient, url, issued)


def db_path(store) -> str:
    return store.safe_dsn[len("sqlite:///"):]


def engagement_events(store) -> list[Event]:
    return store.events(kinds=[Kind.OPENED, Kind.CLICKED])


def test_open_returns_a_gif_and_records_opened_then_a_repeat(service):
    app, store, issued = service
    for _ in range(2):
        r = get(app, f"/o/{token(eng.OPEN, issued)}")  # hygiene: not a path (URL path)
        assert r.status_code == 200 and r.headers["content-type"] == "image/gif" and r.content == web.PIXEL
        assert "no-store" in r.headers["cache-control"]
    first, second = engagement_events(store)
    assert (first.kind, first.recipient, first.message_id, first.sender) == (Kind.OPENED, "alice@example.org", "<m1@platform.test>", "news@acme.example")
    assert (first.reason, second.reason) == ("first open", "repeat open #2")
    assert first.seq is not None and second.seq == first.seq + 1
    with sqlite3.connect(db_path(store)) as db:  # the webhook rows, in order
        rows = db.execute("SELECT payload FROM outbox ORDER BY id").fetchall()
    notes = [json.loads(payload)["notifications"][0] for (payload,) in rows]
    assert [n["content"]["engagement"] for n in notes] == [{"repeat": False, "count": 1, "url": None},
                                                           {"repeat": True, "count": 2, "url": None}]
    assert notes[0]["meta"]["event"] == {**notes[0]["meta"]["event"], "type": "OPENED", "state": "ENGAGED"}


def test_click_redirects_to_the_original_link_counted_per_link_and_recipient(service):
    app, store, issued = service
    a, b = "https://news.example.org/a?x=1&y=2", "https://shop.example.org/"
    for url, rcpt in ((a, "alice@example.org"), (a, "alice@example.org"), (b, "alice@example.org"), (a, "bob@example.org")):
        r = get(app, f"/c/{token(eng.CLICK, issued, rcpt, url)}")  # hygiene: not a path (URL path)
        assert r.status_code == 302 and r.headers["location"] == url
    evs = engagement_events(store)
    assert [(e.recipient, e.reason) for e in evs] == [
        ("alice@example.org", f"first click {a}"), ("alice@example.org", f"repeat click #2 {a}"),
        ("alice@example.org", f"first click {b}"), ("bob@example.org", f"first click {a}"),
    ]


def test_per_message_token_records_without_a_recipient(service):
    app, store, issued = service
    assert get(app, f"/o/{token(eng.OPEN, issued, recipient=None)}").status_code == 200  # hygiene: not a path (URL path)
    [ev] = engagement_events(store)
    assert ev.recipient is None and ev.message_id == "<m1@platform.test>"


def test_forged_altered_or_misrouted_tokens_get_404_without_location_and_record_nothing(service):
    app, store, issued = service
    good = token(eng.CLICK, issued, url="https://news.example.org/")
    bad = [
        f"/c/{token(eng.CLICK, issued, url='https://evil.example/', key=os.urandom(32))}",  # another key  # hygiene: not a path (URL path)
        f"/c/{good[:-1]}{'A' if good[-1] != 'A' else 'B'}",  # hygiene: not a path (URL path)
        f"/c/{good[:20]}",  # hygiene: not a path (URL path)
        f"/c/{token(eng.OPEN, issued)}",  # an open token on the click route  # hygiene: not a path (URL path)
        f"/o/{good}",  # a click token on the open route  # hygiene: not a path (URL path)
        "/c/https://evil.example/",  # hygiene: not a path (URL path)
        "/c/",  # hygiene: not a path (URL path)
        "/x/" + good,  # hygiene: not a path (URL path)
    ]
    for path in bad:
        r = get(app, path)
        assert r.status_code == 404 and "location" not in r.headers, path
    assert engagement_events(store) == []
    assert get(app, f"/c/{good}", method="POST").status_code == 405  # hygiene: not a path (URL path)
    r = get(app, f"/c/{good}", method="HEAD")  # answered, not counted  # hygiene: not a path (URL path)
    assert r.status_code == 302 and engagement_events(store) == []
    assert get(app, "/healthz").text == "ok\n"  # hygiene: not a path (URL path)


def test_store_failure_still_serves_the_recipient(service):
    app, store, issued = service
    store.close()
    r = get(app, f"/c/{token(eng.CLICK, issued, url='https://news.example.org/')}")  # hygiene: not a path (URL path)
    assert r.status_code == 302 and r.headers["location"] == "https://news.example.org/"


def test_base_url_is_https_except_for_loopback():
    assert EngagementTracking(base_url="https://t.example.net/").base_url == "https://t.example.net"
    assert EngagementTracking(base_url="http://127.0.0.1:8480").base_url == "http://127.0.0.1:8480"
    for bad in ("http://t.example.net", "https://t.example.net/?a=1", "https://t.example.net/#x", "ftp://t.example.net",
                'https://t.example.net/"onload', "https://user@t.example.net", "t.example.net"):
        with pytest.raises(ValueError):
            EngagementTracking(base_url=bad)
    with pytest.raises(ValueError):
        EngagementTracking(base_url="https://t.example.net", opens=False, clicks=False)
