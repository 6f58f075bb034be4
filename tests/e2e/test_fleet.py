"""A fleet of two relays sharing one PostgreSQL event store, end to end (issue 18).

Two private relay nodes, ``relay1`` and ``relay2`` (each its own Postfix, milter, dnsmasq
and ``relayctl track`` with its webhook sender), both pointed at one private PostgreSQL
cluster; the tenants' smarthosts (aiosmtpd sinks) and a webhook receiver per tenant are
shared. The test is the platform: it sends round robin to both nodes and goes on to the
other node when one refuses the connection or answers 421, as a platform with two relay
addresses must.

The module runs in order, on one fleet: interleaved traffic, the loss of a tracker and then
of a whole node, a drain under load; the last test counts everything against the
``status=sent`` lines of both nodes' own Postfix logs.
"""

from __future__ import annotations

import collections
import json
import re
import secrets
import signal
import smtplib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign, wait_for
from relay_milter.tracking.events import Kind
from relay_milter.tracking.store import open_store
from support.pgcluster import create_database
from support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

TENANTS = {
    "acme": ("acme.relay.test", "hop.acme.test", "acme.example"),
    "globex": ("globex.relay.test", "hop.globex.test", "globex.example"),
}
# What a platform takes as "this relay does not take mail now: try the other one".
REFUSED = (ConnectionRefusedError, smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected)


class Node(Lab):
    """A relay of the fleet: a lab with its own tracking.node, on the shared store."""

    def __init__(self, name: str, dsn: str):
        super().__init__()
        self.name = name
        self.events_dsn = dsn

    def settings(self) -> dict:
        out = super().settings()
        out["tracking"]["node"] = self.name
        return out


@dataclass
class Sent:
    mid: str
    tenant: str
    node: str  # the node that accepted it
    rcpts: list[str]
    refused_by: list[str] = field(default_factory=list)  # nodes that refused it first


@dataclass
class Fleet:
    labs: list[Node]
    receivers: dict[str, WebhookReceiver]
    sinks: dict[str, Sink]
    dsn: str
    sent: list[Sent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    turn: int = 0
    takeover: float | None = None

    def node(self, name: str) -> Node:
        return next(n for n in self.labs if n.name == name)

    def send(self, tenant: str, rcpts: list[str], label: str, first: str | None = None) -> Sent:
        """Send one signed message, round robin from ``first`` (else the next in turn),
        on to the other node when one refuses. Fails if no node takes it."""
        relay_domain, signing_domain, sender_domain = TENANTS[tenant]
        sender = f"news@{sender_domain}"
        mid = f"<{label}.{time.time_ns()}@platform.test>"
        encoded = [encode_recipient(r, relay_domain) for r in rcpts]
        spec = self.labs[0].tenants[tenant]
        raw = sign(make_message(sender, ", ".join(encoded), subject=label, message_id=mid), spec.key, signing_domain, spec.selector)
        with self.lock:
            start = self.turn if first is None else [n.name for n in self.labs].index(first)
            self.turn = (start + 1) % len(self.labs)
        refused = []
        for i in range(len(self.labs)):
            node = self.labs[(start + i) % len(self.labs)]
            try:
                code, text, _ = node.send(raw, sender, encoded)
            except REFUSED:
                refused.append(node.name)
                continue
            assert code == 250, f"{node.name} answered {code} {text} for {label}"
            s = Sent(mid, tenant, node.name, rcpts, refused)
            with self.lock:
                self.sent.append(s)
            return s
        raise AssertionError(f"no relay of the fleet took {label}: refused by {refused}")


@pytest.fixture(scope="module")
def fleet(pg_dsn):
    dsn = create_database(pg_dsn, f"fleet_{secrets.token_hex(4)}")
    receivers = {t: WebhookReceiver().up() for t in TENANTS}
    sinks = {t: Sink(t) for t in TENANTS}
    keys = {t: rsa_key(2048) for t in TENANTS}
    webhook_secrets = {t: secrets.token_urlsafe(24) for t in TENANTS}
    labs = [Node("relay1", dsn), Node("relay2", dsn)]
    try:
        for node in labs:
            for t, (relay_domain, signing_domain, sender_domain) in TENANTS.items():
                spec = TenantSpec(t, relay_domain, signing_domain, "s1", keys[t], [sender_domain],
                                  extra={"webhook": {"url": receivers[t].url, "timeout": 5}})
                node.add_tenant(spec, sinks[t], tls="none")
            node.secrets = {t: {"webhook_secret": s} for t, s in webhook_secrets.items()}
            # Deferred mail is retried within seconds (settings, so a re-render keeps it).
            node.overrides = {"postfix_extra": {"minimal_backoff_time": "2s", "maximal_backoff_time": "4s", "queue_run_delay": "2s"}}
        for sink in sinks.values():
            sink.start()
        # Both nodes come up at once (each renders, checks and starts its own instance).
        failed: list[BaseException] = []

        def start(node: Node) -> None:
            try:
                node.start()
                node.start_tracker()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the fixture
                failed.append(exc)

        starters = [threading.Thread(target=start, args=(node,)) for node in labs]
        for t in starters:
            t.start()
        for t in starters:
            t.join(180)
        if failed:
            raise failed[0]
        yield Fleet(labs, receivers, sinks, dsn)
    finally:
        for node in labs:
            node.destroy()
        for r in receivers.values():
            r.down()


# -- reading what happened ------------------------------------------------------------


def store_events(fleet: Fleet) -> list:
    store = open_store(fleet.dsn)
    try:
        return [e for t in TENANTS for e in store.events_after(t, 0, 100000)]
    finally:
        store.close()


def by_message(events) -> dict[str, list]:
    out = collections.defaultdict(list)
    for e in events:
        out[e.message_id].append(e)
    return out


def wait_delivered(fleet: Fleet, sent: list[Sent], timeout: float = 60) -> dict[str, list]:
    """Wait until the store holds a RELAYED event for every recipient of every message."""
    def done():
        msgs = by_message(store_events(fleet))
        ok = all(sorted(e.recipient for e in msgs.get(s.mid, []) if e.kind is Kind.RELAYED) == sorted(s.rcpts) for s in sent)
        return msgs if ok else None

    return wait_for(done, timeout, interval=0.3, what=f"RELAYED for all of {len(sent)} message(s)")


def hooks(fleet: Fleet, tenant: str) -> list[dict]:
    """The tenant's delivered webhooks, in the order they were answered (duplicates kept)."""
    return [r.json["notifications"][0] | {"_node": r.json["meta"]["node"]} for r in fleet.receivers[tenant].delivered()]


def wait_hooks(fleet: Fleet, timeout: float = 60) -> None:
    """Wait until every event in the store reached its tenant's receiver."""
    def done():
        events = store_events(fleet)
        got = {(t, h["meta"]["id"]) for t in TENANTS for h in hooks(fleet, t)}
        return all((e.tenant, e.id) in got for e in events)

    wait_for(done, timeout, interval=0.3, what="a webhook for every stored event")


def check_stream(fleet: Fleet, tenant: str, max_duplicates: int = 0) -> list[dict]:
    """The tenant's webhook stream, first arrivals only: sequence numbers 1, 2, 3, ... with
    no gap and no reordering; a repeat is the same event (same id and seq) sent again."""
    seen: dict[int, int] = {}
    stream = []
    for h in hooks(fleet, tenant):
        seq, event_id = h["meta"]["seq"], h["meta"]["id"]
        if seq in seen:
            assert seen[seq] == event_id, f"{tenant}: seq {seq} was event {seen[seq]}, now {event_id}"
            continue
        seen[seq] = event_id
        stream.append(h)
    assert [h["meta"]["seq"] for h in stream] == list(range(1, len(stream) + 1)), f"{tenant}: gap or reorder"
    duplicates = len(hooks(fleet, tenant)) - len(stream)
    assert duplicates <= max_duplicates, f"{tenant}: {duplicates} duplicate webhooks"
    # Per message and recipient: RECEIVED first, RELAYED last, in the stream's order.
    per = collections.defaultdict(list)
    for h in stream:
        per[(h["meta"]["mail"]["id"], h["meta"]["mail"]["email"])].append(h["meta"]["event"]["type"])
    for key, kinds in per.items():
        if "RECEIVED" in kinds:
            assert kinds[0] == "RECEIVED" and kinds.count("RECEIVED") == 1, (key, kinds)
        if "RELAYED" in kinds:
            assert kinds[-1] == "RELAYED" and kinds.count("RELAYED") == 1, (key, kinds)
    return stream


def status_sent(node: Node) -> collections.Counter:
    """Postfix's own count: ``status=sent`` lines per tenant in the node's log (the tenant of
    a queue id from cleanup's route line: tenants share transport classes)."""
    text = node.maillog_text()
    tenant_of = dict(re.findall(r"\]: (\w+): milter-header-filter: header X-Relay-Route: ?(\w+) from ", text))
    line = re.compile(r"postfix/rc_\w+/smtp\[\d+\]: (\w+): to=.* status=sent ")  # hygiene: not a path (a log line)
    return collections.Counter(tenant_of.get(m.group(1), "?") for m in line.finditer(text))


def sender_pid(receiver: WebhookReceiver, client_port: int) -> int | None:
    """The process on this machine whose TCP connection to ``receiver`` has ``client_port``."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{receiver.port} )"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if re.search(rf"\s127\.0\.0\.1:{client_port}\s", f" {line} "):
            m = re.search(r"pid=(\d+)", line)
            return int(m.group(1)) if m else None
    return None


# -- the tests ------------------------------------------------------------------------


def test_interleaved_traffic_is_tracked_once_per_node_and_ordered_per_tenant(fleet):
    """Four platform threads send round robin to both nodes, both tenants interleaved. Every
    message is recorded once, under the node that took it; each tenant's webhooks carry one
    gapless sequence across both nodes, in order, each event once."""
    def platform(worker: int) -> None:
        for i in range(6):
            tenant = ("acme", "globex")[(worker + i) % 2]
            rcpts = [f"u{worker}{i}@example.org"] + ([f"v{worker}{i}@example.net"] if i % 3 == 0 else [])
            fleet.send(tenant, rcpts, f"mix-{worker}-{i}")

    threads = [threading.Thread(target=platform, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    sent = list(fleet.sent)
    assert len(sent) == 24 and {s.node for s in sent} == {"relay1", "relay2"}
    msgs = wait_delivered(fleet, sent)
    wait_hooks(fleet)
    for s in sent:
        evs = msgs[s.mid]
        assert {e.node for e in evs} == {s.node}, (s, [(e.kind.value, e.node) for e in evs])
        assert sorted((e.kind.value, e.recipient) for e in evs) == sorted(
            [("RECEIVED", r) for r in s.rcpts] + [("RELAYED", r) for r in s.rcpts]), s
        assert len({e.queue_id for e in evs}) == 1
        # The queue id is the accepting node's: its own Postfix delivered it.
        assert re.search(rf"{evs[0].queue_id}: to=.* status=sent ", fleet.node(s.node).maillog_text())
    for tenant in TENANTS:
        stream = check_stream(fleet, tenant)
        nodes = [h["_node"] for h in stream]
        assert set(nodes) == {"relay1", "relay2"}, f"{tenant}: one tenant stream from both nodes' events"
        # Interleaved: the stream switches between the nodes' events, not one block each.
        assert sum(a != b for a, b in zip(nodes, nodes[1:])) >= 2, nodes

    # relayctl on either node sees the whole fleet: each traces a message the other took.
    one = {s.node: s for s in sent}
    for node in fleet.labs:
        s = next(m for name, m in one.items() if name != node.name)
        out = json.loads(node.relayctl("trace", "--json", s.mid).stdout)
        assert sorted(e["kind"] for e in out) == sorted(["RECEIVED", "RELAYED"] * len(s.rcpts))
        assert {e["node"] for e in out} == {s.node}
    stats = [json.loads(n.relayctl("stats", "--json", "--since", "1h").stdout)["tenants"] for n in fleet.labs]
    counts = [{t: {k: v for k, v in row.items() if k != "webhook_backlog"} for t, row in s.items()} for s in stats]
    assert counts[0] == counts[1]
    relayed = sum(len(s.rcpts) for s in sent)
    assert sum(row["RELAYED"] for row in counts[0].values()) == relayed
    assert sum(sum(status_sent(n).values()) for n in fleet.labs) == relayed


def test_node_loss_loses_no_event_and_the_other_sender_takes_over(fleet):
    """acme's receiver hangs while a node's sender is in the middle of a POST (it holds
    acme's lock). That node's tracker is SIGKILLed, then its whole node (Postfix aborted,
    milter killed). The other node's sender takes acme over; mail fails over to the other
    node; the recovered node's tracker reads what its Postfix logged meanwhile from its
    checkpoints."""
    acme = fleet.receivers["acme"]
    arrived = len(acme.arrived)
    acme.hold()
    try:
        fleet.send("acme", ["held@example.org"], "held")
        wait_for(lambda: len(acme.arrived) > arrived, 30, what="a webhook POST to the held receiver")
        held = acme.arrived[arrived]
        pid = wait_for(lambda: sender_pid(acme, held.peer[1]), 10, what="the process of the held POST")
        victim = next(n for n in fleet.labs if n.tracker_proc and n.tracker_proc.pid == pid)
        survivor = next(n for n in fleet.labs if n is not victim)
        killed_at = time.monotonic()
        victim.stop_tracker(signal.SIGKILL)
    finally:
        acme.release()
    # Takeover: the survivor's sender sends acme's next POST (the held event again, as its
    # bookkeeping died with the killer's transaction).
    wait_for(lambda: len(acme.arrived) > arrived + 1, 30, interval=0.02, what="the other node's sender taking acme over")
    fleet.takeover = time.monotonic() - killed_at
    print(f"\ntakeover of tenant acme by {survivor.name}'s sender after {victim.name}'s tracker was killed: {fleet.takeover:.2f}s")
    again = acme.arrived[arrived + 1]
    assert again.event_id == held.event_id
    assert sender_pid(acme, again.peer[1]) in (survivor.tracker_proc.pid, None)

    # The victim's Postfix still relays without its tracker: its log grows, the store does not.
    untracked = [fleet.send(t, [f"untracked{i}@example.org"], f"untracked-{i}", first=victim.name) for i, t in enumerate(["acme", "globex"] * 2)]
    assert {s.node for s in untracked} == {victim.name}
    for s in untracked:
        wait_for(lambda s=s: re.search(rf"(\w+): message-id={re.escape(s.mid)}", victim.maillog_text()), 30, what="queued on the victim")
    wait_for(lambda: sum(status_sent(victim).values()) >= sum(len(s.rcpts) for s in fleet.sent if s.node == victim.name),
             60, interval=0.3, what="the victim's deliveries")

    # The whole node goes: Postfix aborts, the milter is killed. The platform fails over.
    subprocess.run(["postfix", "-c", str(victim.config_dir), "abort"], capture_output=True, check=True)
    victim.postfix_started = False
    victim.stop_milter(signal.SIGKILL)
    failover = [fleet.send(t, [f"failover{i}@example.org"], f"failover-{i}", first=victim.name) for i, t in enumerate(["globex", "acme"] * 2)]
    assert all(s.node == survivor.name and s.refused_by == [victim.name] for s in failover)
    wait_delivered(fleet, failover)
    assert not set(by_message(store_events(fleet))) & {s.mid for s in untracked}, "recorded without the victim's tracker?"

    # Recovery: the node comes back and its tracker catches up from its checkpoints.
    victim.start_milter()
    victim.start_postfix()
    victim.start_tracker()
    msgs = wait_delivered(fleet, untracked)
    for s in untracked:
        assert {e.node for e in msgs[s.mid]} == {victim.name}
        assert sorted(e.kind.value for e in msgs[s.mid]) == ["RECEIVED", "RELAYED"]
    wait_hooks(fleet)
    check_stream(fleet, "acme", max_duplicates=1)  # the held POST, sent again by the survivor
    check_stream(fleet, "globex", max_duplicates=1)  # a POST the kill may have cut
    assert "tracker_error" not in victim.tracker_log_text() + survivor.tracker_log_text()


def test_drain_under_load_loses_nothing(fleet):
    """relay2 is drained while the platform sends and while mail waits in its queue: new
    connections get 421 and go to relay1; the queue is delivered; drain returns once
    relay2's tracker recorded everything (a first drain with no time to wait exits 1 and
    names what is left). apply keeps it drained; undrain reopens it."""
    node, other = fleet.node("relay2"), fleet.node("relay1")
    globex = fleet.sinks["globex"]
    globex.reply = "451 4.3.0 try again later"
    load: list[Sent] = []
    stop = threading.Event()

    def platform() -> None:
        i = 0
        while not stop.is_set() and i < 80:
            load.append(fleet.send(("acme", "globex")[i % 2], [f"load{i}@example.org"], f"load-{i}"))
            i += 1
            time.sleep(0.3)

    sender = threading.Thread(target=platform)
    try:
        waiting = [fleet.send("globex", [f"queued{i}@example.org"], f"queued-{i}", first="relay2") for i in range(3)]
        assert {s.node for s in waiting} == {"relay2"}
        wait_for(lambda: sum(m["queue_name"] == "deferred" for m in node.queue()) >= 3, 30, what="deferred mail on relay2")
        sender.start()
        wait_for(lambda: any(s.node == "relay2" for s in load), 30, what="the platform's load reaching relay2")
        # Drained under load, with no time to wait: drain names what is left and exits 1
        # (sessions still open, or the waiting mail); the node stays drained.
        early = node.relayctl("drain", "--timeout", "0", "--no-tracker", check=False)
        assert early.returncode == 1 and "node relay2 drained" in early.stdout, early.stdout + early.stderr
        left = re.search(r"not ready to stop: (\d+) (message\(s\) still in the queue|SMTP session\(s\) begun before)", early.stderr)
        assert left, early.stderr
        if left.group(2).startswith("message"):
            assert early.stderr.count(" from=news@globex.example") >= 3, early.stderr
        # Running drain again keeps waiting: the queue empties once the smarthost is back.
        drain = subprocess.Popen(
            [sys.executable, "-m", "relay_milter.cli", "--tenants", str(node.tenants_dir), "--settings", str(node.settings_file),
             "drain", "--timeout", "90"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(drain.stdout.readline, "")))
        reader.start()
        wait_for(lambda: any(re.search(r"queue: [1-9]\d* message", ln) for ln in lines), 60, what="drain waiting for the queue")
        globex.reply = "250 2.0.0 Ok: queued"
        drain.wait(120)
        reader.join(10)
        out, err = "".join(lines), drain.stderr.read()
        # drain is done: everything of relay2 is recorded now, without waiting.
        recorded = by_message(store_events(fleet))
    finally:
        globex.reply = "250 2.0.0 Ok: queued"
        stop.set()
        if sender.is_alive():
            sender.join(60)
    print(f"\nrelayctl drain --timeout 0 (exit {early.returncode}): {left.group(0)}")
    print(f"relayctl drain (exit {drain.returncode}):\n{out}{err}")
    assert drain.returncode == 0, out + err
    assert "can be stopped" in out and "queue: 0 message(s)" in out
    assert node.queue() == []
    mine = [s for s in fleet.sent if s.node == "relay2"]
    for s in mine:
        assert sorted(e.kind.value for e in recorded.get(s.mid, []) if e.kind is not Kind.DEFERRED) == \
            sorted(["RECEIVED", "RELAYED"] * len(s.rcpts)), s
    moved = [s for s in load if s.refused_by == ["relay2"]]
    assert moved and all(s.node == "relay1" for s in moved), "mail sent during the drain went to relay1 after the 421"
    wait_delivered(fleet, load + waiting)

    # A re-render keeps the node drained; undrain opens it again.
    node.relayctl("apply")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        node.send(b"Subject: x\r\n\r\nx\r\n", "news@acme.example", ["a=example.org@acme.relay.test"])
    assert refused.value.smtp_code == 421
    assert "undrained" in node.relayctl("undrain").stdout
    back = fleet.send("acme", ["back@example.org"], "back", first="relay2")
    assert back.node == "relay2" and back.refused_by == []
    wait_delivered(fleet, [back])
    wait_hooks(fleet)
    assert other.tracker_proc is not None and node.tracker_proc is not None


def test_everything_counts_against_postfix_status_sent(fleet):
    """The closing count: Postfix's own status=sent lines of both nodes, the RELAYED events
    per node, and each tenant's webhooks (every event once, gapless, in order)."""
    wait_delivered(fleet, fleet.sent)
    wait_hooks(fleet)
    events = store_events(fleet)
    relayed = collections.Counter((e.node, e.tenant) for e in events if e.kind is Kind.RELAYED)
    for node in fleet.labs:
        sent = status_sent(node)
        assert {t: relayed[(node.name, t)] for t in TENANTS} == {t: sent[t] for t in TENANTS}, node.name
    assert sum(relayed.values()) == sum(len(s.rcpts) for s in fleet.sent)
    received = collections.Counter(e.message_id for e in events if e.kind is Kind.RECEIVED)
    assert all(received[s.mid] == len(s.rcpts) for s in fleet.sent)
    lines = []
    for tenant in TENANTS:
        stream = check_stream(fleet, tenant, max_duplicates=1)
        mine = [e for e in events if e.tenant == tenant]
        assert len(stream) == len(mine) and {h["meta"]["id"] for h in stream} == {e.id for e in mine}
        dup = len(hooks(fleet, tenant)) - len(stream)
        lines.append(f"{tenant}: {len(mine)} events, {len(stream)} webhooks (seq 1..{len(stream)}, no gap), {dup} resent")
    per_node = {n.name: sum(status_sent(n).values()) for n in fleet.labs}
    print(f"\nfleet: {len(fleet.sent)} messages; status=sent lines {per_node}; RELAYED events "
          f"{ {n.name: sum(v for (k, _), v in relayed.items() if k == n.name) for n in fleet.labs} }; "
          f"takeover {fleet.takeover if fleet.takeover is None else round(fleet.takeover, 2)}s\n" + "\n".join(lines))
