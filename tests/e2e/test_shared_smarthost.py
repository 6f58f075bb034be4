"""Issue 17: tenants share transport classes, never a login or a cached connection.

Two tenants that log in to **one** smarthost host and port with different credentials
(verified TLS, SASL), and two that send in plaintext to another shared smarthost. Their
settings are the same, so without the isolation rule they would be one transport class;
the relay gives the second tenant on each smarthost the class's sibling (postfix/classes.py).
Mail of both tenants is sent at once, in a backlog (the case where Postfix reuses
connections); the smarthost records, per message, the login of its session and the
client connection it came over.
"""

from __future__ import annotations

import collections
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, ed25519_key, make_message, sign
from support.classes import entry

pytestmark = pytest.mark.e2e

PER_TENANT = 12


def spec(tid: str, key) -> TenantSpec:
    return TenantSpec(tid, f"{tid}.relay.test", f"hop.{tid}.test", "s1", key, [f"{tid}.example"])


@pytest.fixture(scope="module")
def slab():
    lab = Lab()
    key = ed25519_key()
    lab.key = key
    lab.logins = {t: (f"relay-{t}", secrets.token_urlsafe(18)) for t in ("acme", "globex")}
    # acme and globex: one smarthost (mx.shared.test on one port), each with its own login.
    shared = Sink("shared", tls=lab.smarthost_cert("mx.shared.test"), auth=dict(lab.logins.values()))
    for tid in ("acme", "globex"):
        lab.add_tenant(spec(tid, key), shared, tls="verify", ca_file=str(lab.ca_file), tls_match="mx.shared.test",
                       auth={"username": lab.logins[tid][0]})
    # hooli and initech: one plaintext smarthost, no login.
    plain = Sink("plain")
    for tid in ("hooli", "initech"):
        lab.add_tenant(spec(tid, key), plain)
    lab.secrets = {t: {"smarthost_password": lab.logins[t][1]} for t in ("acme", "globex")}
    try:
        yield lab.start()
    finally:
        lab.destroy()


def route_of(lab: Lab, tid: str) -> str:
    return re.search(rf"^X-Relay-Route:{tid}\tFILTER (rc_\w+):", (lab.config_dir / "relay" / "route").read_text(), re.M).group(1)


def send_batch(lab: Lab, tenants: tuple[str, ...]) -> None:
    """PER_TENANT messages per tenant, the tenants' messages sent at the same time."""
    def one_tenant(tid: str) -> None:
        for i in range(PER_TENANT):
            raw = sign(make_message(f"news@{tid}.example", f"u{i}@example.org", subject=f"{tid} {i}"), lab.key, f"hop.{tid}.test", "s1")
            code, text, _ = lab.send(raw, f"news@{tid}.example", [encode_recipient(f"u{i}@example.org", f"{tid}.relay.test")])
            assert code == 250, (tid, text)

    with ThreadPoolExecutor(len(tenants)) as pool:
        for done in [pool.submit(one_tenant, t) for t in tenants]:
            done.result(timeout=180)  # re-raises a failed send


def tenant_of(message) -> str:
    return message.mail_from.rpartition("@")[2].split(".")[0]


def test_two_tenants_on_one_smarthost_get_sibling_classes(slab):
    lab = slab
    acme, globex = route_of(lab, "acme"), route_of(lab, "globex")
    assert globex == acme + "_1"
    hooli, initech = route_of(lab, "hooli"), route_of(lab, "initech")
    assert initech == hooli + "_1"
    master = (lab.config_dir / "master.cf").read_text()
    for name in (acme, globex):
        e = entry(master, name)  # class names hash the settings (the lab's CA path): any order
        assert f"smtp_sasl_password_maps=hash:{lab.config_dir}/relay/smtp_auth/{name}\n" in e
        assert "smtp_connection_cache_on_demand=no" in e
    tables = {name: (lab.config_dir / "relay" / "smtp_auth" / name).read_text() for name in (acme, globex)}
    assert lab.logins["acme"][1] in tables[acme] and lab.logins["globex"][1] not in tables[acme]
    assert lab.logins["globex"][1] in tables[globex] and lab.logins["acme"][1] not in tables[globex]


def test_each_message_reaches_the_shared_smarthost_under_its_own_tenants_login(slab):
    lab = slab
    sink = lab.sinks["acme"]
    send_batch(lab, ("acme", "globex"))
    got = sink.wait(2 * PER_TENANT, timeout=120)
    assert collections.Counter(tenant_of(m) for m in got) == {"acme": PER_TENANT, "globex": PER_TENANT}
    for m in got:
        assert m.tls, "delivered without TLS"
        assert m.login == lab.logins[tenant_of(m)][0], (tenant_of(m), m.login)
    # No client connection carried mail of both tenants.
    by_connection = collections.defaultdict(set)
    for m in got:
        by_connection[m.peer].add(tenant_of(m))
    assert all(len(t) == 1 for t in by_connection.values()), dict(by_connection)


def test_plaintext_tenants_on_one_smarthost_never_share_a_connection(slab):
    """Without logins Postfix caches connections under a backlog; the cache is per
    transport and next hop, so each connection carries one tenant's mail only."""
    lab = slab
    sink = lab.sinks["hooli"]
    mark = len(lab.maillog_text())
    send_batch(lab, ("hooli", "initech"))
    got = sink.wait(2 * PER_TENANT, timeout=120)
    assert collections.Counter(tenant_of(m) for m in got) == {"hooli": PER_TENANT, "initech": PER_TENANT}
    by_connection = collections.defaultdict(list)
    for m in got:
        by_connection[m.peer].append(tenant_of(m))
    assert all(len(set(t)) == 1 for t in by_connection.values()), dict(by_connection)
    reused = sum(len(t) - 1 for t in by_connection.values())
    print(f"\n{len(got)} messages over {len(by_connection)} connections ({reused} deliveries on a reused connection)")
    # Postfix logged each delivery under the tenant's own class.
    log = lab.maillog_text()[mark:]
    assert len(re.findall(rf"postfix/{route_of(lab, 'initech')}/smtp\[\d+\]: \w+: to=<u\d+@example\.org>.* status=sent", log)) == PER_TENANT  # hygiene: not a path (a log line)
