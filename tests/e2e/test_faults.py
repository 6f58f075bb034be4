"""Fault suite: numbered messages under load while a part of the relay fails; nothing may be lost.

Every scenario sends N distinct, numbered, signed messages for two tenants from
several concurrent clients that behave like an MTA (a 4xx or a broken
connection means "try again"; a 5xx is final). While the load runs, one part of
the relay fails and recovers. Then:

- every message was finally accepted (250), and no attempt was refused with a 5xx;
- every failed attempt was a 4xx or a dropped/refused connection;
- every message arrived exactly once, at its own tenant's smarthost and nowhere
  else (an attempt whose connection broke after the final dot is the one case
  SMTP itself cannot make exactly-once, RFC 1047: such a message may arrive
  twice, never zero times; the suite reports it);
- the Postfix queue is empty at the end;
- and the fault really happened (refusals, deferrals or delays are seen).

The private Postfix instance keeps its queue on a small tmpfs so the
"queue file system nearly full" case is real. Needs root (Postfix, mount).
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, SinkHandler, ed25519_key, make_message, rsa_key, sign, wait_for
from relay_milter.lab.loadgen import Outgoing, send_all
from relay_milter.postfix.runner import run_postfix
from support.factories import unavailable

pytestmark = pytest.mark.e2e

N = 40  # messages per scenario, alternating between the two tenants
CLIENTS = 4
PACE = 0.12  # seconds between a client's transactions: a steady ~30 msg/s
QUEUE_FS_BYTES = 64 * 1024 * 1024
MESSAGE_SIZE_LIMIT = 10 * 1024 * 1024
QUEUE_MINFREE = 16 * 1024 * 1024  # Postfix wants >= 1.5 x message_size_limit

TENANTS = {
    "acme": dict(relay_domain="acme.relay.test", signing_domain="hop.acme.test", selector="f1", sender_domains=["acme.example"]),
    "globex": dict(relay_domain="globex.relay.test", signing_domain="hop.globex.test", selector="f2", sender_domains=["globex.example"]),
}


class _DelayHandler(SinkHandler):
    async def handle_DATA(self, server, session, envelope):
        if self.sink.delay:
            await asyncio.sleep(self.sink.delay)
        return await super().handle_DATA(server, session, envelope)


class DelaySink(Sink):
    """The lab's aiosmtpd sink, able to answer DATA slowly."""

    delay = 0.0

    def start(self) -> "DelaySink":
        from aiosmtpd.controller import Controller

        self._controller = Controller(_DelayHandler(self), hostname="127.0.0.1", port=self.port, ready_timeout=10)
        self._controller.start()
        return self


class FaultLab(Lab):
    """The lab with short milter timeouts, fast retries, and its queue on a small tmpfs."""

    def settings(self) -> dict:
        return super().settings() | {
            "milter_connect_timeout": "2s",
            "milter_command_timeout": "3s",
            "milter_content_timeout": "4s",
            "message_size_limit": MESSAGE_SIZE_LIMIT,
        }

    def postconf(self, *assignments: str) -> None:
        r = run_postfix(["postconf", "-c", str(self.config_dir), "-e", *assignments])
        assert r.returncode == 0, r.stdout

    def start(self) -> "FaultLab":
        self.start_dns()
        self.write_settings()
        self.relayctl("apply", "--no-reload")
        # Retry deferred mail within seconds instead of minutes, and make the
        # "queue file system nearly full" refusal reachable on a 64 MB file system.
        self.postconf(
            "queue_run_delay=1s",
            "minimal_backoff_time=1s",
            "maximal_backoff_time=2s",
            f"queue_minfree={QUEUE_MINFREE}",
        )
        for sink in self.sinks.values():
            sink.start()
        self.start_milter()
        self.start_postfix()
        return self


def _mount_tmpfs(path: Path, size: int) -> str | None:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


@pytest.fixture(scope="module")
def flab():
    lab = FaultLab()
    problem = _mount_tmpfs(lab.queue_dir, QUEUE_FS_BYTES)
    if problem:
        shutil.rmtree(lab.base, ignore_errors=True)
        unavailable(f"cannot mount a tmpfs for the queue: {problem}")
    keys = {"acme": rsa_key(2048), "globex": ed25519_key()}
    for tid, t in TENANTS.items():
        lab.add_tenant(TenantSpec(id=tid, key=keys[tid], pin_key=(tid == "acme"), **t), DelaySink(tid))
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()
        for _ in range(20):
            if subprocess.run(["umount", str(lab.queue_dir)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(lab.queue_dir)], capture_output=True)
        if os.environ.get("RELAY_KEEP_LAB"):
            print(f"\nfault lab kept at {lab.base}")
        else:
            shutil.rmtree(lab.base, ignore_errors=True)


def messages(lab: FaultLab, scenario: str, n: int = N) -> list[Outgoing]:
    out = []
    for i in range(n):
        tid = "acme" if i % 2 == 0 else "globex"
        t, spec = TENANTS[tid], lab.tenants[tid]
        sender = f"news@{t['sender_domains'][0]}"
        raw = make_message(
            sender, f"user{i}@example.org", subject=f"{scenario} #{i}", message_id=f"<{scenario}.{i}@fault.test>",
            body=f"Message {i} of scenario {scenario}.\r\n" * 20,
        )
        raw = sign(raw, spec.key, t["signing_domain"], t["selector"])
        out.append(Outgoing.build(f"{tid}:{i}", sender, [encode_recipient(f"user{i}@example.org", t["relay_domain"])], raw))
    return out


def arrivals(lab: FaultLab, scenario: str) -> dict[str, collections.Counter]:
    """Message numbers of this scenario seen at each sink."""
    pattern = re.compile(rf"<{re.escape(scenario)}\.(\d+)@fault\.test>")
    out = {}
    for tid, sink in lab.sinks.items():
        with sink.lock:
            ids = [m.header("Message-ID") for m in sink.messages]
        out[tid] = collections.Counter(int(m.group(1)) for v in ids for m in [pattern.search(" ".join(v))] if m)
    return out


def delivered_count(lab: FaultLab, scenario: str) -> int:
    return sum(sum(c.values()) for c in arrivals(lab, scenario).values())


def maillog_count(lab: FaultLab, pattern: str) -> int:
    return len(re.findall(pattern, lab.maillog_text()))


def run_scenario(lab: FaultLab, scenario: str, fault, n: int = N, deadline: float = 90.0):
    """Send n messages with retries while ``fault(lab)`` runs in a thread; check that nothing was lost."""
    msgs = messages(lab, scenario, n)
    fault_error: list[BaseException] = []

    def run_fault():
        try:
            fault(lab)
        except BaseException as exc:  # surfaced below
            fault_error.append(exc)

    t = threading.Thread(target=run_fault, name=f"fault-{scenario}")
    t.start()
    try:
        result = send_all(msgs, lab.smtp_port, clients=CLIENTS, per_connection=5, retry=True, retry_delay=0.3, deadline=deadline, timeout=20, pace=PACE)
    finally:
        t.join(120)
    assert not t.is_alive(), "the fault thread did not finish"
    if fault_error:
        raise fault_error[0]

    # 1. Every message finally accepted; refusals were temporary.
    assert not result.unfinished, f"not accepted before the deadline: {[(o.key, o.code, o.text) for o in result.unfinished][:5]}"
    assert not result.refused, f"refused permanently: {[(o.key, o.code, o.text) for o in result.refused][:5]}"
    failures = [a for o in result.outcomes.values() for a in o.attempts if not (a.stage == 'dot' and 200 <= a.code < 300)]
    assert all(a.code == 0 or 400 <= a.code < 500 for a in failures), [a for a in failures if a.code >= 500][:5]

    # 2. Every message arrives exactly once, at its own tenant's sink.
    wait_for(lambda: delivered_count(lab, scenario) >= n, 60, interval=0.2, what=f"{n} deliveries for {scenario}")
    try:
        wait_for(lambda: client_mail_queued(lab) == [], 30, interval=0.3, what="no client mail left in the queue")
    except TimeoutError:
        pytest.fail(f"client mail left in the queue: {client_mail_queued(lab)[:3]}")
    notices = drop_postmaster_notices(lab)
    got = arrivals(lab, scenario)
    ambiguous = {int(o.key.split(":")[1]): o.ambiguous_attempts for o in result.outcomes.values() if o.ambiguous_attempts}
    for i in range(n):
        tid, other = ("acme", "globex") if i % 2 == 0 else ("globex", "acme")
        assert got[other][i] == 0, f"message {i} went to {other}'s smarthost"
        allowed = 1 + ambiguous.get(i, 0)
        assert 1 <= got[tid][i] <= allowed, f"message {i} arrived {got[tid][i]} times at {tid} (allowed {allowed})"
    duplicates = {i: got["acme"][i] + got["globex"][i] for i in range(n) if got["acme"][i] + got["globex"][i] > 1}
    print(
        f"\n{scenario}: {n} sent, {n} accepted, {n} delivered "
        f"({len(failures)} failed attempts: {collections.Counter(a.code for a in failures)}; "
        f"{len(ambiguous)} ambiguous, {len(duplicates)} duplicates; {notices} postmaster notices)"
    )
    return result, failures


def client_mail_queued(lab: FaultLab) -> list[dict]:
    """Queue entries other than Postfix's own notices to the postmaster (notify_classes)."""
    return [q for q in lab.queue() if q.get("sender") != "double-bounce@relay.lab.test"]


def drop_postmaster_notices(lab: FaultLab) -> int:
    """Postfix mails the postmaster about resource problems (e.g. a full queue file system).

    The relay delivers nothing locally, so those notices wait on the deferred
    "unrouted" transport; they are not client mail. Remove them between scenarios.
    """
    ids = [q["queue_id"] for q in lab.queue() if q.get("sender") == "double-bounce@relay.lab.test"]
    for qid in ids:
        subprocess.run(["postsuper", "-c", str(lab.config_dir), "-d", qid], capture_output=True, timeout=30)
    return len(ids)


MILTER_UNREACHABLE = r"connect to Milter service .*(Connection refused|No such file)"


def wait_delivered(lab: FaultLab, scenario: str, count: int) -> None:
    wait_for(lambda: delivered_count(lab, scenario) >= count, 30, interval=0.05, what=f"{count} deliveries before the fault")


# -- scenarios ----------------------------------------------------------------------------


def test_milter_killed_and_restarted_mid_load(flab):
    def fault(lab):
        wait_delivered(lab, "milterkill", 8)
        refused = maillog_count(lab, MILTER_UNREACHABLE)
        lab.milter_proc.kill()
        lab.milter_proc.wait(10)
        # Down until Postfix has failed to reach it at least once (not merely for a while).
        wait_for(lambda: maillog_count(lab, MILTER_UNREACHABLE) > refused, 30, interval=0.1, what="Postfix failing to reach the milter")
        lab.start_milter()

    _, failures = run_scenario(flab, "milterkill", fault)
    assert any(400 <= a.code < 500 for a in failures), "no client saw a 4xx while the milter was down"


def test_milter_hung_past_its_timeout(flab):
    timed_out = r"milter .*(timeout|[Tt]ime out|Connection timed out|read error)"

    def fault(lab):
        wait_delivered(lab, "milterstop", 8)
        lab.signal_milter(signal.SIGSTOP)
        try:
            # Stopped until Postfix has given up on it (milter_command_timeout 3s, milter_content_timeout 4s).
            wait_for(lambda: maillog_count(lab, timed_out) > before, 30, interval=0.1, what="a milter timeout")
        finally:
            lab.signal_milter(signal.SIGCONT)

    before = maillog_count(flab, timed_out)
    _, failures = run_scenario(flab, "milterstop", fault)
    assert any(400 <= a.code < 500 for a in failures), "no client saw a 4xx while the milter hung"
    assert maillog_count(flab, timed_out) > before


def test_smarthost_down_then_back(flab):
    sink = flab.sinks["acme"]

    def fault(lab):
        wait_delivered(lab, "sinkdown", 6)
        sink.stop()
        try:
            wait_for(lambda: maillog_count(lab, deferred_acme) > deferred_before, 30, what="a deferral")
        finally:
            sink.start()

    # A deferral of mail for acme's smarthost (its port is in the line: relay= or the reason).
    deferred_acme = rf"\]:{sink.port}\b.*status=deferred|status=deferred.*\]:{sink.port}\b"
    deferred_before = maillog_count(flab, deferred_acme)
    run_scenario(flab, "sinkdown", fault)
    assert maillog_count(flab, deferred_acme) > deferred_before


def test_smarthost_answers_slowly(flab):
    sink = flab.sinks["acme"]

    def fault(lab):
        wait_delivered(lab, "sinkslow", 4)
        sink.delay = 1.5

    try:
        run_scenario(flab, "sinkslow", fault)
    finally:
        sink.delay = 0.0
    # The slowness was real: some acme deliveries spent >= 1.4 s in transmission (delays=a/b/c/d).
    slow = [float(d) for d in re.findall(rf"/smtp\[\d+\]: \w+: to=<user\d+@example\.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port},.*delays=[\d.]+/[\d.]+/[\d.]+/([\d.]+)", flab.maillog_text())]  # hygiene: not a path (a log line)
    assert any(d >= 1.4 for d in slow), slow[-10:]


def test_postfix_stopped_and_started_mid_load(flab):
    def fault(lab):
        wait_delivered(lab, "postfixrestart", 8)
        lab.stop_postfix()
        time.sleep(1.5)
        lab.start_postfix()

    _, failures = run_scenario(flab, "postfixrestart", fault)
    assert failures, "no client noticed that Postfix was down"


def test_tracker_killed_mid_load(flab):
    """The tracker is SIGKILLed and later SIGTERMed while mail flows: after it catches up,
    the event store holds exactly one RECEIVED and one RELAYED per delivered message, the
    same set Postfix's own log shows as sent: nothing lost, nothing twice."""
    from relay_milter.tracking.store import open_store
    from relay_milter.tracking.events import Kind

    scenario = "trackerkill"
    flab.start_tracker()
    kills: list[int | None] = []

    def fault(lab):
        wait_delivered(lab, scenario, 8)
        kills.append(lab.stop_tracker(signal.SIGKILL))
        # Down while mail flows: more messages are delivered before it is back.
        wait_delivered(lab, scenario, 12)
        lab.start_tracker()
        wait_delivered(lab, scenario, 24)
        kills.append(lab.stop_tracker(signal.SIGTERM))
        lab.start_tracker()

    try:
        run_scenario(flab, scenario, fault)
        # Ground truth: the queue ids and recipients Postfix logged as sent for this scenario.
        qids = dict(re.findall(rf"(\w+): message-id=<{scenario}\.(\d+)@fault\.test>", flab.maillog_text()))
        sent = {
            (qid, rcpt)
            for qid, rcpt in re.findall(r"(\w+): to=<([^>]+)>, relay=127\.0\.0\.1.*status=sent", flab.maillog_text())
            if qid in qids
        }
        assert len(sent) >= N
        store = open_store(flab.events_dsn)
        try:
            def relayed():
                evs = [e for e in store.events() if e.queue_id in qids]
                done = {(e.queue_id, e.recipient) for e in evs if e.kind is Kind.RELAYED}
                return evs if done >= sent else None

            events = wait_for(relayed, 60, interval=0.5, what="the tracker to catch up")
        finally:
            store.close()
        counts = collections.Counter((e.queue_id, e.recipient, e.kind) for e in events)
        for qid, rcpt in sent:
            assert counts[(qid, rcpt, Kind.RECEIVED)] == 1, (qid, rcpt, "RECEIVED", counts[(qid, rcpt, Kind.RECEIVED)])
            assert counts[(qid, rcpt, Kind.RELAYED)] == 1, (qid, rcpt, "RELAYED", counts[(qid, rcpt, Kind.RELAYED)])
        assert {(e.queue_id, e.recipient) for e in events} == sent, "events for deliveries Postfix never logged"
        assert kills == [-signal.SIGKILL, 0], kills  # killed outright, then a clean stop
        print(f"\n{scenario}: {len(sent)} deliveries, {len(events)} events, tracker killed once and stopped once")
    finally:
        flab.stop_tracker()


def test_queue_file_system_nearly_full(flab):
    ballast = flab.queue_dir / "ballast.fill"
    refusals_before = maillog_count(flab, r"452 4\.3\.1 Insufficient system storage")

    def fault(lab):
        wait_delivered(lab, "diskfull", 8)
        st = os.statvfs(lab.queue_dir)
        free = st.f_bavail * st.f_frsize
        fill = free - QUEUE_MINFREE // 2  # leave less than queue_minfree, more than enough for the queue's own files
        with open(ballast, "wb") as f:
            f.truncate(0)
            chunk = b"\0" * (1 << 20)
            for _ in range(fill // len(chunk)):
                f.write(chunk)
        try:
            wait_for(lambda: maillog_count(lab, r"452 4\.3\.1 Insufficient system storage") > refusals_before, 30, what="a 452 refusal")
        finally:
            ballast.unlink()

    try:
        _, failures = run_scenario(flab, "diskfull", fault)
    finally:
        ballast.unlink(missing_ok=True)
    assert any(a.code == 452 and "4.3.1" in a.text for a in failures), collections.Counter((a.code, a.text) for a in failures)
