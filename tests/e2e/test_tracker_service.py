"""The tracker on the lab's real logs: a real Postfix and the real milter write them."""

from __future__ import annotations

import re
import time

import pytest

from relay_milter.config import load_settings, load_tenants
from relay_milter.tracking.store import open_store
from relay_milter.tracking.events import Kind
from relay_milter.lab import wait_for
from relay_milter.tracking.tracker import Tracker

pytestmark = pytest.mark.e2e


def test_real_logs_give_received_and_relayed_per_recipient(acme, lab, tmp_path):
    rcpts = ["alice@example.org", "bob@example.net"]
    mid = f"<tracker-{time.time_ns()}@platform.example>"
    raw = acme.signed(extra_headers=(("X-Upstream-ID", "job-4711"),), message_id=mid)
    code, text, _ = lab.send(raw, "news@acme.example", [acme.rcpt(r) for r in rcpts])
    assert code == 250, text
    found = wait_for(lambda: re.search(rf"(\w+): message-id={re.escape(mid)}", lab.maillog_text()), 30, what="the message in the maillog")
    qid = found.group(1)
    lab.sinks["acme"].wait(1)
    wait_for(lambda: f"{qid}: removed" in lab.maillog_text(), 30, what=f"{qid} removed from the queue")

    settings = load_settings(lab.settings_file)
    settings = settings.model_copy(update={"tracking": settings.tracking.model_copy(update={"milter_log_file": lab.milter_log, "node": "lab"})})
    tenants = load_tenants(lab.tenants_dir)
    store = open_store(f"sqlite:///{tmp_path}/events.db")
    try:
        tracker = Tracker(settings, tenants, store, from_start=True)
        tracker.run_once()
        tracker.close()
        events = store.events(queue_id=qid)
    finally:
        store.close()
    assert sorted((e.kind.value, e.recipient) for e in events) == sorted(
        [("RECEIVED", r) for r in rcpts] + [("RELAYED", r) for r in rcpts]
    )
    assert [e.kind for e in events[:2]] == [Kind.RECEIVED, Kind.RECEIVED]
    for ev in events:
        assert ev.tenant == "acme" and ev.upstream_id == "job-4711" and ev.sender == "news@acme.example"
        assert ev.original_recipient == acme.rcpt(ev.recipient)
        assert ev.client and ev.client.endswith("[127.0.0.1]") and ev.message_id
    relayed = [e for e in events if e.kind is Kind.RELAYED]
    assert all(e.response_code == "250" and e.dsn == "2.0.0" for e in relayed)
    requested = tenants.by_id("acme").smarthost.tls
    assert all(e.tls["requested"] == requested for e in relayed)
    if requested in ("encrypt", "verify"):
        assert all(e.tls["established"] and e.tls["protocol"].startswith("TLS") for e in relayed)
