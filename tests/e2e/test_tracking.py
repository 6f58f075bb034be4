"""Delivery tracking end to end: real Postfix, the real milter, `relayctl track` as its own
process, a real event store (SQLite, and PostgreSQL from Debian's packages) and a real
HTTP webhook receiver.

Every test sends real signed mail and checks that the store and the receiver got exactly
the right events, in order, with valid signatures. The lab runs once per store.
"""

from __future__ import annotations

import collections
import json
import re
import secrets
import signal
import subprocess
import time

import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.tracking.events import Kind
from relay_milter.tracking.store import open_store
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign, wait_for
from relay_milter.tracking.webhooks import verify_signature
from support.lablogs import LogWatch
from support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

TENANTS = ("acme", "globex")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def tlab(request):
    receiver = WebhookReceiver().up()
    lab = Lab()
    if request.param == "postgresql":
        from support.pgcluster import create_database

        lab.events_dsn = create_database(request.getfixturevalue("pg_dsn"), f"tracking_{lab.base.name.replace('-', '_')}")
    lab.webhook_secrets = {t: secrets.token_urlsafe(24) for t in TENANTS}
    lab.receiver = receiver
    lab.add_tenant(
        TenantSpec("acme", "acme.relay.test", "hop.acme.test", "s1", rsa_key(2048), ["acme.example"],
                   extra={"webhook": {"url": f"http://127.0.0.1:{receiver.port}/hooks/acme", "timeout": 5}}),
        Sink("acme", tls=lab.smarthost_cert("mx.acme.test")),
        tls="verify", ca_file=str(lab.ca_file), tls_match="mx.acme.test",
    )
    lab.add_tenant(
        TenantSpec("globex", "globex.relay.test", "hop.globex.test", "s1", rsa_key(2048), ["globex.example"],
                   extra={"webhook": {"url": f"http://127.0.0.1:{receiver.port}/hooks/globex", "timeout": 5}}),
        Sink("globex"), tls="none",
    )
    lab.secrets = {t: {"webhook_secret": s} for t, s in lab.webhook_secrets.items()}
    try:
        lab.start()
        # Retry deferred mail within seconds (the 4xx-then-2xx test flushes anyway).
        subprocess.run(["postconf", "-c", str(lab.config_dir), "-e", "minimal_backoff_time=2s", "maximal_backoff_time=4s", "queue_run_delay=2s"], check=True, capture_output=True)
        subprocess.run(["postfix", "-c", str(lab.config_dir), "reload"], check=True, capture_output=True)
        lab.start_tracker()
        lab.store_kind = request.param
        yield lab
    finally:
        lab.destroy()
        receiver.down()


def send(lab: Lab, tenant: str, rcpts: list[str], subject: str, forge: bool = False) -> str:
    """Send one signed message; returns its Message-ID."""
    spec = lab.tenants[tenant]
    sender = f"news@{spec.sender_domains[0]}"
    mid = f"<{subject.replace(' ', '-')}.{time.time_ns()}@platform.test>"
    encoded = [encode_recipient(r, spec.relay_domain) for r in rcpts]
    msg = make_message(sender, ", ".join(encoded), subject=subject, message_id=mid,
                       extra_headers=(("X-Upstream-ID", f"job-{subject.replace(' ', '-')}"),))
    key = rsa_key(1024 + 1024) if forge else spec.key
    code, text, _ = lab.send(sign(msg, key, spec.signing_domain, spec.selector), sender, encoded)
    if not forge:
        assert code == 250, text
    return mid


def events_of(lab: Lab, message_id: str) -> list:
    store = open_store(lab.events_dsn)
    try:
        return store.trace(message_id)
    finally:
        store.close()


def wait_events(lab: Lab, message_id: str, kinds: list[Kind], timeout: float = 40) -> list:
    """Wait until the store holds (at least) these kinds for the message; return its events."""
    def enough():
        evs = events_of(lab, message_id)
        have = collections.Counter(e.kind for e in evs)
        return evs if all(have[k] >= n for k, n in collections.Counter(kinds).items()) else None

    return wait_for(enough, timeout, interval=0.3, what=f"{[k.value for k in kinds]} for {message_id}")


def hooks_of(lab: Lab, message_id: str, count: int, timeout: float = 40) -> list:
    """The webhook requests about this message, once ``count`` have arrived."""
    def enough():
        got = [r for r in lab.receiver.requests if r.json["notifications"][0]["meta"]["mail"]["id"] == message_id]
        return got if len(got) >= count else None

    return wait_for(enough, timeout, interval=0.3, what=f"{count} webhook(s) for {message_id}")


def check_signed(lab: Lab, tenant: str, request) -> None:
    assert request.path == f"/hooks/{tenant}"
    header = request.headers["X-Relay-Signature"]
    assert verify_signature(lab.webhook_secrets[tenant], header, request.body)
    assert not verify_signature(lab.webhook_secrets["globex" if tenant == "acme" else "acme"], header, request.body)


def kinds(events) -> list[str]:
    return [e.kind.value for e in events]


def tracker_caught_up(lab: Lab, tenant: str, label: str) -> None:
    """Send a later message the same way and wait until the tracker recorded its delivery
    and its webhooks arrived. The tracker reads the maillog in order, so everything Postfix
    logged before it, and every event for an earlier message, has been handled by then."""
    mid = send(lab, tenant, ["marker@example.org"], f"marker after {label}")
    wait_events(lab, mid, [Kind.RECEIVED, Kind.RELAYED])
    hooks_of(lab, mid, 2)


def test_good_delivery_over_tls_is_received_then_relayed(tlab):
    mid = send(tlab, "acme", ["alice@example.org"], "good delivery")
    wait_events(tlab, mid, [Kind.RECEIVED, Kind.RELAYED])
    tracker_caught_up(tlab, "acme", "good delivery")  # nothing more may follow
    evs = events_of(tlab, mid)
    assert kinds(evs) == ["RECEIVED", "RELAYED"]
    received, relayed = evs
    assert received.tenant == relayed.tenant == "acme"
    assert received.recipient == relayed.recipient == "alice@example.org"
    assert received.original_recipient == "alice=example.org@acme.relay.test"
    assert received.upstream_id == "job-good-delivery"
    assert received.sender == "news@acme.example"
    assert relayed.queue_id == received.queue_id
    port = tlab.sinks["acme"].port
    assert relayed.relay == f"127.0.0.1[127.0.0.1]:{port}"
    assert (relayed.response_code, relayed.dsn) == ("250", "2.0.0")
    assert "250 2.0.0 Ok: queued" in relayed.reason
    # TLS as the sink saw it: the same protocol and cipher are recorded.
    [m] = [m for m in tlab.sinks["acme"].messages if mid in " ".join(m.header("Message-ID"))]
    cipher, protocol, _ = m.tls
    assert relayed.tls == {"requested": "verify", "established": True, "level": "Verified", "protocol": protocol, "cipher": cipher}

    hooks = hooks_of(tlab, mid, 2)
    assert [h.json["notifications"][0]["meta"]["event"]["type"] for h in hooks] == ["RECEIVED", "RELAYED"]
    for h in hooks:
        check_signed(tlab, "acme", h)
    note = hooks[1].json["notifications"][0]
    assert note["meta"]["event"]["state"] == "FINISHED"
    assert note["meta"]["mail"]["email"] == "alice@example.org"
    assert note["meta"]["mail"]["upstreamId"] == "job-good-delivery"
    smtp = note["content"]["smtp"]
    assert (smtp["responseCode"], smtp["dsn"], smtp["relay"]) == ("250", "2.0.0", relayed.relay)
    assert smtp["transportEncryption"] == {
        "requested": True, "established": True, "properties": {"protocol": protocol, "cipherSuite": cipher, "level": "Verified"},
    }
    assert hooks[1].headers["X-Relay-Event-Id"] == str(relayed.id)


def test_smarthost_4xx_then_2xx_is_deferred_then_relayed(tlab):
    sink = tlab.sinks["globex"]
    sink.reply = "451 4.3.0 mailbox busy, try later"
    try:
        mid = send(tlab, "globex", ["bob@example.org"], "deferred then relayed")
        evs = wait_events(tlab, mid, [Kind.RECEIVED, Kind.DEFERRED])
    finally:
        sink.reply = "250 2.0.0 Ok: queued"
    deferred = [e for e in evs if e.kind is Kind.DEFERRED][0]
    assert (deferred.response_code, deferred.dsn) == ("451", "4.3.0")
    assert "mailbox busy" in deferred.reason
    assert deferred.next_retry and deferred.next_retry > deferred.ts
    tlab.flush()
    evs = wait_events(tlab, mid, [Kind.RECEIVED, Kind.DEFERRED, Kind.RELAYED])
    assert kinds(evs)[0] == "RECEIVED" and kinds(evs)[-1] == "RELAYED"
    assert set(kinds(evs)[1:-1]) == {"DEFERRED"}
    hooks = hooks_of(tlab, mid, len(evs))
    assert [h.json["notifications"][0]["meta"]["event"]["type"] for h in hooks] == kinds(evs)
    assert hooks[1].json["notifications"][0]["meta"]["event"]["state"] == "RETRYING"
    assert hooks[1].json["notifications"][0]["content"]["smtp"]["nextRetry"]
    for h in hooks:
        check_signed(tlab, "globex", h)


def test_requeued_by_an_operator_is_still_routed_and_tracked(tlab):
    """`postsuper -r` sends a deferred message back through pickup without the milter: its
    route marker routes it again (master.cf cleanup_requeue) and the tracker follows it
    to its new queue id."""
    sink = tlab.sinks["globex"]
    sink.reply = "451 4.3.0 not yet"
    try:
        mid = send(tlab, "globex", ["gina@example.org"], "requeued by postsuper")
        [received, deferred] = wait_events(tlab, mid, [Kind.RECEIVED, Kind.DEFERRED])[:2]
    finally:
        sink.reply = "250 2.0.0 Ok: queued"
    subprocess.run(["postsuper", "-c", str(tlab.config_dir), "-r", received.queue_id], check=True, capture_output=True)
    subprocess.run(["postkick", "-c", str(tlab.config_dir), "public", "pickup", "W"], check=True, capture_output=True)
    evs = wait_events(tlab, mid, [Kind.RECEIVED, Kind.DEFERRED, Kind.RELAYED])
    relayed = evs[-1]
    assert kinds(evs)[0] == "RECEIVED" and kinds(evs).count("RECEIVED") == 1 and relayed.kind is Kind.RELAYED
    assert relayed.queue_id != received.queue_id
    assert (relayed.tenant, relayed.recipient, relayed.relay) == ("globex", "gina@example.org", f"127.0.0.1[127.0.0.1]:{sink.port}")
    [m] = [m for m in sink.messages if mid in " ".join(m.header("Message-ID"))]
    assert m.rcpt_tos == ["gina@example.org"] and m.header("X-Relay-Route") == []
    assert "deferred transport" not in tlab.maillog_text()


def test_smarthost_5xx_is_bounced_and_the_bounce_notice_is_no_tenant_event(tlab):
    sink = tlab.sinks["globex"]
    sink.reply = "550 5.1.1 no such user here"
    try:
        mid = send(tlab, "globex", ["carol@example.org"], "hard bounce")
        evs = wait_events(tlab, mid, [Kind.RECEIVED, Kind.BOUNCED])
        qid = evs[0].queue_id
        # Postfix sends the sender a non-delivery notice (to globex's smarthost, which refuses it too).
        notice = wait_for(lambda: re.search(rf"{qid}: sender non-delivery notification: (\w+)", tlab.maillog_text()), 20, what="bounce notice")
        wait_for(lambda: re.search(rf"{notice.group(1)}: removed", tlab.maillog_text()), 20, what="notice done")
    finally:
        sink.reply = "250 2.0.0 Ok: queued"
    tracker_caught_up(tlab, "globex", "hard bounce")  # the notice's log lines are handled too
    evs = events_of(tlab, mid)
    assert kinds(evs) == ["RECEIVED", "BOUNCED"]
    bounced = evs[1]
    assert (bounced.response_code, bounced.dsn, bounced.tenant) == ("550", "5.1.1", "globex")
    assert "no such user here" in bounced.reason
    store = open_store(tlab.events_dsn)
    try:
        assert store.events(queue_id=notice.group(1)) == []
    finally:
        store.close()
    hooks = hooks_of(tlab, mid, 2)
    assert hooks[1].json["notifications"][0]["meta"]["event"]["type"] == "BOUNCED"


def test_forged_signature_is_rejected_with_the_reason(tlab):
    mid = send(tlab, "acme", ["dave@example.org"], "forged", forge=True)
    [ev] = wait_events(tlab, mid, [Kind.REJECTED])
    assert ev.tenant == "acme"
    assert (ev.response_code, ev.dsn) == ("550", "5.7.20")
    assert "DKIM" in ev.reason
    assert (ev.recipient, ev.original_recipient) == ("dave@example.org", "dave=example.org@acme.relay.test")
    [hook] = hooks_of(tlab, mid, 1)
    assert hook.json["notifications"][0]["meta"]["event"]["type"] == "REJECTED"
    check_signed(tlab, "acme", hook)


def test_bad_recipient_encoding_is_rejected_at_rcpt(tlab):
    spec = tlab.tenants["globex"]
    bad = "no-separator@globex.relay.test"
    code, _, _ = tlab.send(make_message("news@globex.example", bad), "news@globex.example", [bad])
    assert code == 550

    def rejected():
        store = open_store(tlab.events_dsn)
        try:
            return [e for e in store.events(recipient=bad) if e.kind is Kind.REJECTED]
        finally:
            store.close()

    [ev] = wait_for(rejected, 30, interval=0.3, what="REJECTED for the bad encoding")
    assert (ev.tenant, ev.response_code, ev.dsn, ev.queue_id) == ("globex", "550", "5.1.3", None)
    assert spec.relay_domain in ev.recipient


def test_multi_recipient_message_gives_one_row_per_recipient(tlab):
    rcpts = ["r1@example.org", "r2@example.net", "r3@example.com"]
    mid = send(tlab, "acme", rcpts, "three recipients")
    evs = wait_events(tlab, mid, [Kind.RECEIVED] * 3 + [Kind.RELAYED] * 3)
    by = collections.Counter((e.kind.value, e.recipient) for e in evs)
    assert by == collections.Counter({(k, r): 1 for k in ("RECEIVED", "RELAYED") for r in rcpts})


def test_trace_shows_the_whole_history(tlab):
    mid = send(tlab, "acme", ["erin@example.org"], "trace me")
    evs = wait_events(tlab, mid, [Kind.RECEIVED, Kind.RELAYED])
    for key in (mid, mid.strip("<>"), evs[0].queue_id, "erin@example.org"):
        r = tlab.relayctl("trace", key)
        assert "RECEIVED" in r.stdout and "RELAYED" in r.stdout, (key, r.stdout)
        assert evs[0].queue_id in r.stdout
    out = json.loads(tlab.relayctl("trace", "--json", mid).stdout)
    assert [e["kind"] for e in out] == ["RECEIVED", "RELAYED"]
    assert tlab.relayctl("trace", "<nothing@nowhere.test>", check=False).returncode == 1


def test_webhook_outage_loses_nothing_and_keeps_order(tlab):
    """The receiver is down while mail flows; once it is back, every event arrives once, in order."""
    failed_before = tlab.tracker_log_text().count("webhook_failed tenant=globex")
    tlab.receiver.down()
    mids = [send(tlab, "globex", [f"outage{i}@example.org"], f"outage {i}") for i in range(3)]
    for mid in mids:
        wait_events(tlab, mid, [Kind.RECEIVED, Kind.RELAYED])
    # The tracker has tried and failed (not merely: some time has passed).
    wait_for(lambda: tlab.tracker_log_text().count("webhook_failed tenant=globex") > failed_before, 30, what="a failed webhook")
    tlab.receiver.up()
    for mid in mids:
        hooks_of(tlab, mid, 2, timeout=60)
    globex = [r for r in tlab.receiver.requests if r.path == "/hooks/globex"]
    ids = [int(r.headers["X-Relay-Event-Id"]) for r in globex]
    assert ids == sorted(ids), "per-tenant order"
    mine = [r for r in globex if r.json["notifications"][0]["meta"]["mail"]["id"] in mids]
    assert len(mine) == 6 and len({r.headers["X-Relay-Event-Id"] for r in mine}) == 6


def test_tracker_restart_mid_run_loses_and_duplicates_nothing(tlab):
    """SIGKILL and SIGTERM the tracker while messages flow; afterwards every message has
    exactly one RECEIVED and one RELAYED, and every event reached the webhook."""
    mids = []
    for i in range(12):
        mids.append(send(tlab, "acme" if i % 2 else "globex", [f"restart{i}@example.org"], f"restart {i}"))
        if i == 3:
            tlab.stop_tracker(signal.SIGKILL)
        if i == 5:
            tlab.start_tracker()
        if i == 8:
            assert tlab.stop_tracker(signal.SIGTERM) == 0
            tlab.start_tracker()
    for mid in mids:
        evs = wait_events(tlab, mid, [Kind.RECEIVED, Kind.RELAYED])
        assert kinds(evs) == ["RECEIVED", "RELAYED"], (mid, kinds(evs))
    tracker_caught_up(tlab, "acme", "the restarts")  # no duplicate may follow
    for mid in mids:
        assert kinds(events_of(tlab, mid)) == ["RECEIVED", "RELAYED"]
        hooks = hooks_of(tlab, mid, 2)
        # A kill between a POST and its bookkeeping may resend an event (same event id:
        # receivers deduplicate on X-Relay-Event-Id); none may be missing.
        assert {h.json["notifications"][0]["meta"]["event"]["type"] for h in hooks} == {"RECEIVED", "RELAYED"}


def test_expired_after_the_queue_lifetime_is_bounced():
    """maximal_queue_lifetime (48 h by default) is a setting; at 0 Postfix tries once, then
    returns the message: DEFERRED, then BOUNCED 'expired' carrying the last attempt's reply."""
    lab = Lab()
    lab.overrides = {"maximal_queue_lifetime": "0"}
    lab.add_tenant(TenantSpec("acme", "acme.relay.test", "hop.acme.test", "s1", rsa_key(2048), ["acme.example"]), Sink("acme"), tls="none")
    try:
        lab.start()
        lab.start_tracker()
        lab.sinks["acme"].reply = "451 4.2.0 mailbox busy"
        mid = send(lab, "acme", ["hana@example.org"], "expires")
        evs = wait_events(lab, mid, [Kind.RECEIVED, Kind.DEFERRED, Kind.BOUNCED])
        assert kinds(evs) == ["RECEIVED", "DEFERRED", "BOUNCED"]
        bounced = evs[-1]
        assert bounced.reason.startswith("expired, returned to sender") and "451 4.2.0 mailbox busy" in bounced.reason
        assert (bounced.tenant, bounced.recipient, bounced.dsn) == ("acme", "hana@example.org", "4.2.0")
        assert lab.sinks["acme"].messages == []
        # This lab is the test's own, not a fixture's: check its logs here (see tests/conftest.py).
        assert LogWatch(lab, fresh=True).problems() == []
    finally:
        lab.destroy()
