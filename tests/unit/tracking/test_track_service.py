"""`relayctl track` as a process: one tracker per node name, tenant changes without a restart."""

from __future__ import annotations

import json
import os
import subprocess
from secrets import token_urlsafe
import sys
import threading
from pathlib import Path

import pytest
import yaml

from relay_milter.config import ConfigError
from relay_milter.tracking.events import Event, Kind
from relay_milter.tracking.store import open_store
from relay_milter.tracking.webhooks import record_event
from support.factories import tenant_doc, write_tenants
from support.webhook_receiver import WebhookReceiver

from .test_retention import dsn  # noqa: F401 - fixture (SQLite and PostgreSQL)

RELAYCTL = [sys.executable, "-m", "relay_milter.cli"]


def test_a_node_name_is_claimed_once(dsn):
    with open_store(dsn) as first, open_store(dsn) as second:
        claim = first.claim_node("relay1")
        with pytest.raises(ConfigError, match="node relay1: another tracker is already running for this node name"):
            second.claim_node("relay1")
        other = second.claim_node("relay2")  # another node on the same store is fine
        claim.release()
        again = second.claim_node("relay1")  # released: free again
        again.release()
        other.release()


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, what: str) -> None:
    done = threading.Event()
    for _ in range(3000):  # generous: a loaded machine
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"relayctl track exited ({proc.returncode}) before {what}:\n{path.read_text() if path.exists() else ''}")
        done.wait(0.02)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def env(tmp_path):
    (tmp_path / "maillog").write_text("")
    (tmp_path / "milter.log").write_text("")
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(yaml.safe_dump({}))
    os.chmod(secrets, 0o600)
    settings = tmp_path / "relay.yaml"
    settings.write_text(yaml.safe_dump({
        "maillog_file": str(tmp_path / "maillog"),
        "secrets_file": str(secrets),
        "tracking": {"events_dsn": f"sqlite:///{tmp_path}/events.db", "node": "relay1",
                     "milter_log_file": str(tmp_path / "milter.log"), "poll_interval": 0.1,
                     "webhook_allow_networks": ["127.0.0.0/8"]},  # the receiver is on loopback
        "reputation": {"state_file": str(tmp_path / "reputation.json"), "queue_summary_file": str(tmp_path / "summary.json")},
    }))
    tenants = write_tenants(tmp_path / "tenants", [tenant_doc("acme")])
    return tmp_path, settings, tenants, secrets


def test_second_tracker_refused_and_tenant_changes_reach_the_running_one(env):
    tmp_path, settings, tenants, secrets = env
    base = [*RELAYCTL, "--tenants", str(tenants), "--settings", str(settings)]
    log = tmp_path / "track.log"
    proc = subprocess.Popen([*base, "track", "--log-file", str(log)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_text(log, "event=track_start", proc, "the tracker to start")
        second = subprocess.run([*base, "track", "--once"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 3, second.stderr
        assert "node relay1: another tracker is already running for this node name" in second.stderr
        assert f"pid {proc.pid}" in second.stderr

        # acme has a notification waiting but no webhook yet; then its tenant file gets one.
        with open_store(f"sqlite:///{tmp_path}/events.db") as s, s.transaction() as tx:
            eid = record_event(tx, Event(Kind.RECEIVED, 1_795_000_000.0, "relay1", tenant="acme", queue_id="Q1"), webhook=True)
        with WebhookReceiver() as rx:
            key = token_urlsafe(24)  # generated: no secret in the repository
            secrets.write_text(yaml.safe_dump({"acme": {"webhook_secret": key}}))
            write_tenants(tenants, [tenant_doc("acme", webhook={"url": rx.url, "timeout": 5})])
            wait_for_text(log, "event=reload tenants=acme", proc, "the tenant reload")
            for _ in range(3000):
                if rx.delivered():
                    break
                threading.Event().wait(0.02)
            assert [r.event_id for r in rx.delivered()] == [eid]
            # An invalid change is refused and the last good set stays.
            (tenants / "acme.yaml").write_text("id: acme\nbogus: [\n")
            wait_for_text(log, "event=reload_failed", proc, "the refused reload")
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0
    again = subprocess.run([*base, "track", "--once"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 3  # the tenant file is still invalid: the configuration error, not the claim
    assert "another tracker" not in again.stderr


def test_a_tracker_killed_mid_post_resends_only_that_event_with_the_same_ids(env):
    """SIGKILL while a POST is in flight (the receiver holds it): after a restart that one
    event is sent again, with the same X-Relay-Event-Id and webhook-id, then the rest in
    order, each once."""
    import signal

    tmp_path, settings, tenants, secrets = env
    base = [*RELAYCTL, "--tenants", str(tenants), "--settings", str(settings)]
    with WebhookReceiver() as rx:
        secrets.write_text(yaml.safe_dump({"acme": {"webhook_secret": token_urlsafe(24)}}))
        write_tenants(tenants, [tenant_doc("acme", webhook={"url": rx.url, "timeout": 60})])
        with open_store(f"sqlite:///{tmp_path}/events.db") as s, s.transaction() as tx:
            eids = [record_event(tx, Event(Kind.RECEIVED, 1_795_000_000.0 + i, "relay1", tenant="acme", queue_id=f"Q{i}"),
                                 webhook=True) for i in range(3)]
        rx.hold()
        log = tmp_path / "track.log"
        proc = subprocess.Popen([*base, "track", "--log-file", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(3000):
                if rx.arrived:
                    break
                threading.Event().wait(0.02)
            assert [r.event_id for r in rx.arrived] == [eids[0]]
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        rx.release()
        log2 = tmp_path / "track2.log"
        again = subprocess.Popen([*base, "track", "--log-file", str(log2)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(3000):
                if len(rx.arrived) >= 4 and len(rx.delivered()) >= 4:
                    break
                threading.Event().wait(0.02)
        finally:
            again.terminate()
            again.wait(30)
        assert again.returncode == 0
        got = [(r.event_id, r.headers["webhook-id"]) for r in rx.arrived]
    assert [e for e, _ in got] == [eids[0], eids[0], eids[1], eids[2]]
    assert got[0] == got[1]  # the in-flight one again: same event id, same webhook-id
    assert len({w for _, w in got[1:]}) == 3
    with open_store(f"sqlite:///{tmp_path}/events.db") as s:
        assert s.outbox_backlog() == {}


def test_track_once_copies_operator_events_and_writes_the_queue_summary(env):
    """`track --once` copies the reputation state file's events into the store (shown by
    `events --operator`), once. (The queue summary needs Postfix: a missing queue directory
    is logged as event=queue_summary_failed and the file is not written.)"""
    tmp_path, settings, tenants, _ = env
    doc = yaml.safe_load(settings.read_text())
    doc["config_directory"] = str(tmp_path / "no-postfix")
    settings.write_text(yaml.safe_dump(doc))
    write_tenants(tenants, [tenant_doc("acme", limits={"max_queued": 5})])
    (tmp_path / "reputation.json").write_text(json.dumps({"events": [
        {"at": 1796148175.0, "event": "IP_LISTED", "subject": "127.0.0.2", "detail": "bl.test: listed (127.0.0.2)", "tenants": "acme"},
        {"at": 1796148181.0, "event": "IP_FAILOVER", "subject": "127.0.0.2", "detail": "127.0.0.2 -> 127.0.0.4", "to": "127.0.0.4", "tenants": "acme"},
    ]}))
    base = [*RELAYCTL, "--tenants", str(tenants), "--settings", str(settings)]
    log = tmp_path / "track.log"
    for _ in range(2):
        r = subprocess.run([*base, "track", "--once", "--log-file", str(log)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert log.read_text().count("event=operator_events recorded=2") == 1
    assert "event=queue_summary_failed" in log.read_text() and not (tmp_path / "summary.json").exists()
    r = subprocess.run([*base, "events", "--operator", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(e["event"], e["node"], e["tenants"]) for e in rows] == [("IP_LISTED", "relay1", "acme"), ("IP_FAILOVER", "relay1", "acme")]
    assert rows[1]["to"] == "127.0.0.4"
    r = subprocess.run([*base, "events", "--operator", "--since", "2026-12-01T18:03:00"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "2026-12-01T18:03:01Z  relay1           IP_FAILOVER     127.0.0.2: 127.0.0.2 -> 127.0.0.4  tenants=acme to=127.0.0.4"]
    r = subprocess.run([*base, "events"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "give either --tenant ID or --operator" in r.stderr
