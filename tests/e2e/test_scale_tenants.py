"""Issue 17: 2,000 tenants on one real Postfix. Mail to the first, the middle and the last
tenant goes to that tenant's own smarthost, routed by the exact-match route table.

Tenants share transport classes (postfix/classes.py): the 1,997 others have a smarthost
name of their own each (o<id>.others.test, which the lab's DNS answers with one sink's
address) and the same settings, so they are one master.cf transport; every tenant has its
own route in relay/route, its own seal in relay/requeue/route and its own pinned key (one
ed25519 key, generated here, shared by all: key generation is not what this test
measures). The first, middle and last tenant each have a smarthost of their own; the
others' sink must receive nothing. Then one more tenant is added with ``relayctl apply``
(hash: tables and relay_domains change, not master.cf) and its smarthost is moved (tables
only, no reload).
"""

from __future__ import annotations

import os
import re
import time

import pytest
import yaml

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, ed25519_key, make_message, sign, wait_for
from support.factories import tenant_doc

pytestmark = pytest.mark.e2e

COUNT = 2000
IDS = [f"t{i:05d}" for i in range(COUNT)]
WATCHED = (IDS[0], IDS[COUNT // 2], IDS[-1])


class ScaleLab(Lab):
    def dns_args(self) -> tuple[str, ...]:
        # The lab's DNS answers for .test itself: a name it has no record for is NXDOMAIN at
        # once, as a real zone answers (check asks for every tenant's key record).
        zone = "test"
        # "answer this domain yourself"; every name under others.test is the loopback address.
        return (f"--local=/{zone}/", "--address=/others.test/127.0.0.1")  # hygiene: not a path (dnsmasq syntax)


@pytest.fixture(scope="module")
def scale_lab():
    lab = ScaleLab()
    key = ed25519_key()
    lab.key = key
    others = Sink("others")
    for tid in IDS:
        if tid in WATCHED:
            lab.add_tenant(TenantSpec(tid, f"{tid}.relay.test", f"hop.{tid}.test", "s1", key, [f"{tid}.example"]), Sink(tid))
        else:
            doc = tenant_doc(tid, key, smarthost={"host": f"o{tid}.others.test", "port": others.port, "tls": "none"}, allow_bcc=True)
            (lab.tenants_dir / f"{tid}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    lab.sinks["others"] = others  # started and stopped with the lab's sinks
    lab.relayctl_timeout = 600
    try:
        yield lab.start()
    finally:
        lab.stop() if os.environ.get("RELAY_KEEP_LAB") else lab.destroy()


def send(lab: Lab, tid: str, to: str = "alice@example.org"):
    raw = sign(make_message(f"news@{tid}.example", to, subject=f"for {tid}"), lab.key, f"hop.{tid}.test", "s1")
    return lab.send(raw, f"news@{tid}.example", [encode_recipient(to, f"{tid}.relay.test")])


def test_route_tables_hold_every_tenant_once(scale_lab):
    lab = scale_lab
    route = (lab.config_dir / "relay" / "route").read_text()
    keys = [line.split("\t", 1)[0] for line in route.splitlines() if line and not line.startswith("#")]
    assert keys == [f"X-Relay-Route:{tid}" for tid in IDS]
    master = (lab.config_dir / "master.cf").read_text()
    services = re.findall(r"^(rc_\w+) unix ", master, re.M)
    used = {m.group(1) for m in re.finditer(r"\tFILTER (rc_\w+):", route)}
    # The others share one class; the watched tenants (same settings, each its own sink) too.
    assert len(services) == len(used) == 1, services


def test_first_middle_and_last_tenant_reach_their_own_smarthost(scale_lab):
    lab = scale_lab
    mark = len(lab.maillog_text())
    for n, tid in enumerate(WATCHED):
        code, text, _ = send(lab, tid, to=f"user{n}@example.org")
        assert code == 250, (tid, text)
    for n, tid in enumerate(WATCHED):
        [got] = lab.sinks[tid].wait(1, timeout=60)
        assert got.rcpt_tos == [f"user{n}@example.org"]
        assert got.header("X-Relay-Route") == [] and got.header("X-Relay-Route-Seal") == []
    log = lab.maillog_text()[mark:]
    # Cleanup routed each message by one exact-match lookup of the marker the milter added.
    for tid in WATCHED:
        assert re.search(rf"milter-header-filter: header X-Relay-Route:{tid} from .*: rc_\w+:\[127\.0\.0\.1\]:{lab.sinks[tid].port}$", log, re.M), tid
    # A later message to the middle tenant, delivered: nothing else is still on its way.
    assert send(lab, WATCHED[1], to="later@example.org")[0] == 250
    wait_for(lambda: len(lab.sinks[WATCHED[1]].messages) == 2, 60, what="the later message")
    assert lab.sinks["others"].messages == []
    assert [len(lab.sinks[tid].messages) for tid in WATCHED] == [1, 2, 1]


def test_an_unknown_relay_domain_is_refused(scale_lab):
    code, text, _ = send(scale_lab, "t99999")
    assert code == 554 and "Relay access denied" in text


def test_a_new_tenant_then_a_smarthost_move_without_a_reload(scale_lab):
    """Issue 17: adding one tenant to 2,000 changes hash: tables and relay_domains only (its
    settings match a class): master.cf stays, Postfix reloads for relay_domains, and its
    mail is accepted and delivered. Moving its smarthost then changes tables only: no
    reload, and Postfix's daemons pick the new tables up by themselves."""
    lab = scale_lab
    tid = "t02000"
    mark = len(lab.maillog_text())
    lab.add_tenant(TenantSpec(tid, f"{tid}.relay.test", f"hop.{tid}.test", "s1", lab.key, [f"{tid}.example"]), Sink(tid).start())
    started = time.monotonic()
    r = lab.relayctl("apply")
    assert "postfix reloaded" in r.stdout and "master.cf" not in r.stdout and "main.cf" not in r.stdout, r.stdout
    assert f"installed {lab.config_dir}/relay/relay_domains" in r.stdout, r.stdout

    def accepted(to: str):
        code, text, _ = send(lab, tid, to=to)
        assert code in (250, 451, 554), text  # 451 (milter) or 554 (relay_domains) until both have it
        return code == 250

    wait_for(lambda: accepted("new@example.org"), 60, interval=0.5, what="mail for the new tenant accepted")
    print(f"\nnew tenant: apply and first accepted message {time.monotonic() - started:.1f} s")
    [got] = lab.sinks[tid].wait(1, timeout=60)
    assert got.rcpt_tos == ["new@example.org"]
    # Its smarthost moves to another port: route and class tables change, nothing else.
    moved = Sink(f"{tid}-moved").start()
    lab.sinks[f"{tid}-moved"] = moved
    doc = yaml.safe_load((lab.tenants_dir / f"{tid}.yaml").read_text())
    doc["smarthost"]["port"] = moved.port
    (lab.tenants_dir / f"{tid}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    reloads = lab.maillog_text().count("reload -- version")
    r = lab.relayctl("apply")
    assert "postfix reloaded" not in r.stdout and "no reload needed" in r.stdout, r.stdout
    assert "relay_domains" not in r.stdout and "master.cf" not in r.stdout, r.stdout
    wait_for(lambda: accepted("moved@example.org"), 60, interval=0.5, what="mail after the move accepted")
    [got] = moved.wait(1, timeout=60)
    assert got.rcpt_tos == ["moved@example.org"]
    log = lab.maillog_text()
    assert log.count("reload -- version") == reloads  # the master was not told to reload
    # Cleanup saw the new route table and restarted by itself.
    assert re.search(r"cleanup\[\d+\]: table hash:\S+/relay/route\(\S*\) has changed -- restarting", log[mark:]), log[-3000:]  # hygiene: not a path (a log line)
    assert len(lab.sinks[tid].messages) == 1
    assert lab.sinks["others"].messages == []
