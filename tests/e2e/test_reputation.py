"""Sender reputation on a real Postfix: dedicated source addresses with their HELO names,
FCrDNS and host checks, blocklist monitoring against a DNSBL zone served by dnsmasq on
loopback, and failover of a listed address to a standby, with no message lost.

Its own lab (module scope): acme leaves from 127.0.0.2, globex from 127.0.0.3, and
127.0.0.4 is the standby. The DNS server answers PTR/A for the first two (FCrDNS ok), has
nothing for the standby (FCrDNS mismatch), serves the test blocklist zone bl.test, and
answers globex's address there with the "public resolver refused" code.
"""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
import time

import pytest
import yaml

from conftest import Mailer
from relay_milter.lab import Lab, Sink, TenantSpec, rsa_key, wait_for
from support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

A, B, STANDBY = "127.0.0.2", "127.0.0.3", "127.0.0.4"
HELO = {A: "out-a.relay.test", B: "out-b.relay.test", STANDBY: "out-c.relay.test"}


def spec(tid: str, **extra) -> TenantSpec:
    return TenantSpec(
        id=tid, relay_domain=f"{tid}.relay.test", signing_domain=f"hop.{tid}.test", selector="s1",
        key=rsa_key(2048), sender_domains=[f"{tid}.example"], extra=extra,
    )


class ReputationLab(Lab):
    """The lab with a DNS server that also serves reverse DNS and a blocklist zone."""

    listed: set[str] = set()

    def dns_args(self) -> tuple[str, ...]:
        args = [
            "--local=/bl.test/", "--local=/relay.test/", "--local=/127.in-addr.arpa/",  # hygiene: not a path (dnsmasq /domain/ syntax)
            f"--host-record={HELO[A]},{A}", f"--host-record={HELO[B]},{B}",
            # globex's address: the list refuses to answer (an error, never a listing).
            "--address=/3.0.0.127.bl.test/127.255.255.254",  # hygiene: not a path (dnsmasq /domain/ syntax)
            # A domain blocklist that lists globex's signing domain.
            "--local=/dbl.test/", "--address=/hop.globex.test.dbl.test/127.0.1.2",  # hygiene: not a path (dnsmasq /domain/ syntax)
        ]
        args += [f"--address=/{'.'.join(reversed(ip.split('.')))}.bl.test/127.0.0.2" for ip in sorted(self.listed)]  # hygiene: not a path (dnsmasq /domain/ syntax)
        return tuple(args)

    def relist(self, *addresses: str) -> None:
        """Serve the blocklist with ``addresses`` listed (dnsmasq restarted on the same port)."""
        self.listed = set(addresses)
        self.dns.stop()
        self.start_dns()


@pytest.fixture(scope="module")
def rlab():
    lab = ReputationLab()
    lab.alerts = WebhookReceiver().up()
    lab.ops = Sink("ops").start()  # the operator's mailbox, behind the notice route
    lab.add_tenant(spec("acme", source_address=A), Sink("acme"))
    lab.add_tenant(spec("globex", source_address=B), Sink("globex"))
    lab.overrides = {
        "reputation": {
            "pool": [
                {"address": A, "helo": HELO[A]},
                {"address": B, "helo": HELO[B]},
                {"address": STANDBY, "helo": HELO[STANDBY], "role": "standby"},
            ],
            "dnsbls": [{"zone": "bl.test"}],
            "failover": "auto",
            "state_file": str(lab.base / "reputation.json"),
            "metrics_file": str(lab.base / "reputation.prom"),
            "alert_webhook": lab.alerts.url,
        },
        "notify": {"address": "postmaster@ops.example", "smarthost": {"host": "127.0.0.1", "port": lab.ops.port, "tls": "none"}},
    }
    try:
        lab.start()
        lab.start_tracker()  # copies the operator events into the event store
        yield lab
    finally:
        lab.alerts.down()
        lab.ops.stop()
        lab.destroy()


@pytest.fixture
def lab(rlab):
    for sink in rlab.sinks.values():
        with sink.lock:
            sink.messages.clear()
        sink.reply = "250 2.0.0 Ok: queued"
    return rlab


def mailer(lab, tid: str) -> Mailer:
    t = lab.tenants[tid]
    doc = dict(id=t.id, relay_domain=t.relay_domain, signing_domain=t.signing_domain, selector=t.selector, sender_domains=t.sender_domains)
    return Mailer(lab, doc, t.key)


def deliver(lab, tid: str, subject: str):
    """Send one message for the tenant and wait for it at its sink; returns what arrived."""
    m = mailer(lab, tid)
    code, text, _ = m.send(m.signed(subject=subject))
    assert code == 250, (code, text)
    sink = lab.sinks[tid]
    wait_for(lambda: any(subject in r.header("Subject")[0] for r in sink.messages), 60, what=f"{subject} at {tid}")
    return next(r for r in sink.messages if subject in r.header("Subject")[0])


def operator_events(lab) -> list[dict]:
    r = lab.relayctl("events", "--operator", "--json", check=False)
    return [json.loads(line) for line in r.stdout.splitlines()]


def source(received) -> str:
    return received.peer.strip("()").split(",")[0].strip("' ")


def test_each_tenant_leaves_from_its_address_with_its_helo_name(lab):
    a = deliver(lab, "acme", "from-a")
    b = deliver(lab, "globex", "from-b")
    assert (source(a), a.helo) == (A, HELO[A])
    assert (source(b), b.helo) == (B, HELO[B])
    master = (lab.config_dir / "master.cf").read_text()
    assert f"-o smtp_bind_address={A}" in master and f"-o smtp_helo_name={HELO[B]}" in master


def test_check_warns_on_fcrdns_and_refuses_an_address_the_host_lacks(lab, tmp_path):
    r = lab.relayctl("check")
    assert f"source address {STANDBY}: FCrDNS mismatch: no PTR record for {STANDBY}" in r.stderr
    assert f"source address {A}:" not in r.stderr and f"source address {B}:" not in r.stderr
    settings = yaml.safe_load(lab.settings_file.read_text())
    settings["reputation"]["pool"].append({"address": "192.0.2.77", "helo": "out-x.relay.test", "role": "standby"})
    other = tmp_path / "relay.yaml"
    other.write_text(yaml.safe_dump(settings))
    r = subprocess.run(
        [sys.executable, "-m", "relay_milter.cli", "--tenants", str(lab.tenants_dir), "--settings", str(other), "check"],
        capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 4, r.stderr
    assert "source address 192.0.2.77: not configured on this host" in r.stderr


def test_clean_check_and_ip_list(lab):
    r = lab.relayctl("reputation", "check", "--json")
    out = json.loads(r.stdout)
    rows = {row["address"]: row for row in out["addresses"]}
    assert rows[A]["listing"] == "clean" and rows[A]["tenants"] == ["acme"] and rows[A]["fcrdns"] == "ok"
    # The list refused to answer for B: an error, reported, and not a listing.
    assert rows[B]["listing"] == "unknown" and any(B in e and "refused" in e for e in out["errors"])
    assert rows[STANDBY]["fcrdns"] == "mismatch" and rows[STANDBY]["tenants"] == []
    listing = json.loads(lab.relayctl("ip", "list", "--json").stdout)
    assert [(r["address"], r["role"], r["tenants"], r["listing"], r["fcrdns"]) for r in listing] == [
        (A, "active", ["acme"], "clean", "ok"),
        (B, "active", ["globex"], "unknown", "ok"),
        (STANDBY, "standby", [], "clean", "mismatch"),
    ]
    text = lab.relayctl("ip", "list").stdout
    assert text.splitlines()[0].split() == ["ADDRESS", "ROLE", "HELO", "LISTING", "FCRDNS", "TENANTS"]


def test_listing_fails_over_to_standby_and_delisting_is_detected(lab):
    acme, globex = lab.sinks["acme"], lab.sinks["globex"]
    lab.relayctl("reputation", "check")  # the known state before: clean
    # A message for acme waits in the queue while its smarthost says "try later".
    acme.reply = "451 4.3.0 try again later"
    m = mailer(lab, "acme")
    code, _, _ = m.send(m.signed(subject="queued-before-failover"))
    assert code == 250
    wait_for(lambda: any(r.get("delay_reason") for q in lab.queue() for r in q.get("recipients", [])), 60, what="a deferred message")

    lab.relist(A)
    started = time.time()
    r = lab.relayctl("reputation", "check", check=False)
    checked = time.time()
    assert r.returncode == 1, r.stderr
    assert f"IP_LISTED {A}: bl.test: listed (127.0.0.2)" in r.stdout
    assert f"IP_FAILOVER {A}: {A} -> {STANDBY} to={STANDBY} helo={HELO[STANDBY]} tenants=acme" in r.stdout
    master = (lab.config_dir / "master.cf").read_text()
    assert f"-o smtp_bind_address={STANDBY}" in master and f"-o smtp_bind_address={A}" not in master

    # The queued message and the next one leave from the standby; globex is untouched.
    acme.reply = "250 2.0.0 Ok: queued"
    lab.flush()
    queued = wait_for(lambda: next((x for x in acme.messages if "queued-before-failover" in x.header("Subject")[0]), None), 60, what="the queued message")
    assert (source(queued), queued.helo) == (STANDBY, HELO[STANDBY])
    after = deliver(lab, "acme", "after-failover")
    assert (source(after), after.helo) == (STANDBY, HELO[STANDBY])
    # The failover timeline (docs/reputation.md), printed for the record (-s shows it).
    # Log lines have whole seconds; the deliveries are the sink's own clock.
    wall = lambda at: time.time() - (time.monotonic() - at)  # noqa: E731
    logged = {ev: next((ln.split()[0] for ln in r.stderr.splitlines() if f"event={ev} " in ln), "?")
              for ev in ("IP_LISTED", "postfix_reloaded", "IP_FAILOVER")}
    print(f"\nfailover timeline: check started {started:.2f}, listing detected (IP_LISTED) {logged['IP_LISTED']}, "
          f"Postfix reloaded {logged['postfix_reloaded']}, failover recorded {logged['IP_FAILOVER']}, check done {checked:.2f} "
          f"(+{checked - started:.2f}s); first delivery from {STANDBY}: the queued message {wall(queued.at):.2f} "
          f"(+{wall(queued.at) - started:.2f}s, after the test's flush), the next one {wall(after.at):.2f} (+{wall(after.at) - started:.2f}s)")
    assert source(deliver(lab, "globex", "globex-unmoved")) == B
    rows = {row["address"]: row for row in json.loads(lab.relayctl("ip", "list", "--json").stdout)}
    assert rows[A]["listing"] == "listed" and rows[A]["failed_over_to"] == STANDBY and rows[A]["tenants"] == []
    assert rows[STANDBY]["tenants"] == ["acme"]
    metrics = (lab.base / "reputation.prom").read_text()
    assert f'relay_source_address_listed{{address="{A}",role="active"}} 1' in metrics
    assert f'relay_source_address_failover{{address="{A}"}} 1' in metrics

    # Delisted: detected and recorded; the tenants stay on the standby until restored.
    lab.relist()
    r = lab.relayctl("reputation", "check")
    assert f"IP_DELISTED {A}" in r.stdout
    assert source(deliver(lab, "acme", "still-on-standby")) == STANDBY
    r = lab.relayctl("ip", "restore", A)
    assert f"IP_RESTORED {A}: {STANDBY} -> {A}" in r.stdout
    back = deliver(lab, "acme", "restored")
    assert (source(back), back.helo) == (A, HELO[A])
    events = [e["event"] for e in json.loads((lab.base / "reputation.json").read_text())["events"]]
    assert events == ["IP_LISTED", "IP_FAILOVER", "IP_DELISTED", "IP_RESTORED"]
    # The same events reached the operator's alert webhook, in order, with who moved where.
    alerted = [e for r in lab.alerts.delivered() for e in r.json["events"]]
    assert [e["event"] for e in alerted] == events
    assert alerted[1] | {"at": 0} == {"at": 0, "event": "IP_FAILOVER", "subject": A, "detail": f"{A} -> {STANDBY}", "to": STANDBY, "helo": HELO[STANDBY], "tenants": "acme"}
    # ... and the operator's mailbox, one notice per step, over the notice route (Postfix's
    # relay_notices_ transport to notify.smarthost).
    notices = lab.ops.wait(4, timeout=60)
    assert all(m.rcpt_tos == ["postmaster@ops.example"] for m in notices)
    subjects = [m.header("Subject")[0] for m in notices]
    for kind in events:
        assert any(f"{kind}: {A}" in x for x in subjects), (kind, subjects)
    failover_notice = next(m for m in notices if "IP_FAILOVER" in m.header("Subject")[0])
    body = email.message_from_bytes(failover_notice.content, policy=email.policy.default).get_body().get_content()
    assert f"{A} -> {STANDBY} to={STANDBY} helo={HELO[STANDBY]} tenants=acme" in body
    # ... and the event store, through the tracker: `relayctl events --operator`.
    def recorded():
        rows = operator_events(lab)[-4:]
        return rows if [e["event"] for e in rows] == events else None

    stored = wait_for(recorded, 30, what="the operator events in the store")
    assert stored[1] | {"at": 0, "id": 0} == alerted[1] | {"at": 0, "id": 0, "node": "relay.lab.test"}
    text = lab.relayctl("events", "--operator").stdout
    assert f"IP_FAILOVER     {A}: {A} -> {STANDBY}  helo={HELO[STANDBY]} tenants=acme to={STANDBY}" in text
    # Nothing lost: every message sent to acme in this test arrived, none is left queued.
    subjects = sorted(x.header("Subject")[0] for x in acme.messages)
    assert subjects == ["after-failover", "queued-before-failover", "restored", "still-on-standby"]
    wait_for(lambda: not lab.queue(), 30, what="an empty queue")


def test_manual_failover_without_healthy_standby_exits_1(lab):
    lab.relayctl("ip", "failover", B)
    rows = {row["address"]: row for row in json.loads(lab.relayctl("ip", "list", "--json").stdout)}
    assert rows[STANDBY]["tenants"] == ["globex"]
    assert source(deliver(lab, "globex", "globex-manual")) == STANDBY
    r = lab.relayctl("ip", "failover", STANDBY, check=False)
    assert r.returncode == 1 and "no healthy standby IPv4 address" in r.stderr
    lab.relayctl("ip", "restore", B)
    assert source(deliver(lab, "globex", "globex-back")) == B


def test_domain_lists_and_the_watch_service(lab, tmp_path):
    """A domain list run by `reputation watch` (twice, then it stops): globex's signing
    domain is listed, once (no second event for the same state); nothing else is."""
    settings = yaml.safe_load(lab.settings_file.read_text())
    settings["reputation"] |= {
        "domain_lists": [{"zone": "dbl.test", "listed": ["127.0.1.2"]}], "dnsbls": [], "failover": "manual",
        "state_file": str(tmp_path / "state.json"), "metrics_file": str(tmp_path / "m.prom"),
    }
    del settings["reputation"]["alert_webhook"]
    other = tmp_path / "relay.yaml"
    other.write_text(yaml.safe_dump(settings))
    r = subprocess.run(
        [sys.executable, "-m", "relay_milter.cli", "--tenants", str(lab.tenants_dir), "--settings", str(other),
         "reputation", "watch", "--interval", "1", "--count", "2"],
        capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("DOMAIN_LISTED hop.globex.test: dbl.test: listed (127.0.1.2) lists=dbl.test") == 1
    state = json.loads((tmp_path / "state.json").read_text())
    assert {d: e["state"] for d, e in state["domains"].items()} == {
        "acme.relay.test": "clean", "hop.acme.test": "clean", "globex.relay.test": "clean", "hop.globex.test": "listed",
        HELO[A]: "clean", HELO[B]: "clean", HELO[STANDBY]: "clean",
    }
    assert 'relay_domain_listed{domain="hop.globex.test"} 1' in (tmp_path / "m.prom").read_text()
