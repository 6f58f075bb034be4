"""The multi-process milter on a real Postfix: a killed worker loses nothing and is
replaced; a tenant reload reaches every worker, the replacement included.

The lab runs 3 workers (settings milter_workers), whatever the machine's core count.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import threading

import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign, wait_for
from relay_milter.lab.loadgen import Outgoing, send_all
from support.labtenants import live_tenants

pytestmark = pytest.mark.e2e

WORKERS = 3
N = 200
CLIENTS = 8
ACME = dict(relay_domain="acme.relay.test", signing_domain="hop.acme.test", selector="w1", sender_domains=["acme.example"])


@pytest.fixture(scope="module")
def wlab():
    lab = Lab()
    lab.overrides["milter_workers"] = WORKERS
    lab.add_tenant(TenantSpec("acme", key=rsa_key(2048), **ACME), Sink("acme"))
    try:
        lab.start()
        wait_for(lambda: len(lab.milter_workers()) == WORKERS, 20, what=f"{WORKERS} milter workers")
        yield lab
    finally:
        lab.stop() if os.environ.get("RELAY_KEEP_LAB") else lab.destroy()


def log_lines(lab: Lab, mark: int, pattern: str) -> list[re.Match]:
    return list(re.finditer(pattern, lab.milter_log_text()[mark:]))


def sessions(pid: int) -> int:
    """Sockets a worker holds besides the listening one: the Postfix sessions it serves."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    n = 0
    for fd in fds:
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n - 1


def numbered(lab: Lab, scenario: str, n: int) -> list[Outgoing]:
    spec, out = lab.tenants["acme"], []
    for i in range(n):
        raw = make_message(
            "news@acme.example", f"user{i}@example.org", subject=f"{scenario} #{i}",
            message_id=f"<{scenario}.{i}@workers.test>", body=f"Message {i} of {scenario}.\r\n" * 40,
        )
        raw = sign(raw, spec.key, ACME["signing_domain"], ACME["selector"])
        out.append(Outgoing.build(str(i), "news@acme.example", [encode_recipient(f"user{i}@example.org", ACME["relay_domain"])], raw))
    return out


def arrivals(lab: Lab, scenario: str) -> collections.Counter:
    pattern = re.compile(rf"<{re.escape(scenario)}\.(\d+)@workers\.test>")
    sink = lab.sinks["acme"]
    with sink.lock:
        ids = [" ".join(m.header("Message-ID")) for m in sink.messages]
    return collections.Counter(int(m.group(1)) for v in ids for m in [pattern.search(v)] if m)


@pytest.mark.allow_log(r"event=worker_died")
def test_a_killed_worker_loses_nothing_and_is_replaced(wlab):
    lab, scenario = wlab, "kill"
    supervisor = lab.milter_proc.pid
    before = lab.milter_workers()
    assert len(before) == WORKERS
    mark = len(lab.milter_log_text())
    killed: list[int] = []
    errors: list[BaseException] = []

    def fault():
        try:
            wait_for(lambda: sum(arrivals(lab, scenario).values()) >= 30, 60, interval=0.05, what="30 deliveries before the kill")
            # The worker serving the most Postfix sessions right now (at least one).
            victim = None

            def busy():
                nonlocal victim
                load = {pid: sessions(pid) for pid in lab.milter_workers()}
                victim = max(load, key=load.get)
                return load[victim] >= 1

            wait_for(busy, 30, interval=0.01, what="a worker serving a session")
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=fault, name="kill-a-worker")
    t.start()
    try:
        result = send_all(numbered(lab, scenario, N), lab.smtp_port, clients=CLIENTS, per_connection=10,
                          retry=True, retry_delay=0.3, deadline=150, timeout=30, pace=0.02)
    finally:
        t.join(120)
    if errors:
        raise errors[0]
    [victim] = killed

    # Every message was finally accepted; what failed on the way was temporary, and the
    # kill was felt: some client saw a 4xx (or a dropped session) and retried.
    assert not result.unfinished, [(o.key, o.code, o.text) for o in result.unfinished][:5]
    assert not result.refused, [(o.key, o.code, o.text) for o in result.refused][:5]
    failures = [a for o in result.outcomes.values() for a in o.attempts if not (a.stage == "dot" and 200 <= a.code < 300)]
    assert failures, "no client saw the killed worker's sessions fail"
    assert all(a.code == 0 or 400 <= a.code < 500 for a in failures), [a for a in failures if a.code >= 500][:5]

    # Every message arrived, exactly once (twice only where SMTP itself cannot tell: the
    # connection broke after the final dot).
    wait_for(lambda: len(arrivals(lab, scenario)) >= N, 60, interval=0.2, what=f"{N} deliveries")
    wait_for(lambda: lab.queue() == [], 30, interval=0.3, what="an empty queue")
    got = arrivals(lab, scenario)
    print(f"\nkilled worker {victim}: {N} accepted and delivered; {len(failures)} failed attempts "
          f"{collections.Counter(a.code for a in failures)}, {sum(1 for n in got.values() if n > 1)} duplicates")
    for i in range(N):
        allowed = 1 + result.outcomes[str(i)].ambiguous_attempts
        assert 1 <= got[i] <= allowed, f"message {i} arrived {got[i]} times (allowed {allowed})"

    # The supervisor logged the death, replaced the worker and kept running.
    [died] = log_lines(lab, mark, rf"event=worker_died worker={victim} slot=\d+ status=\"?signal SIGKILL")
    assert died
    wait_for(lambda: len(lab.milter_workers()) == WORKERS, 20, what="the replacement worker")
    after = lab.milter_workers()
    assert victim not in after and set(before) - {victim} <= set(after)
    [new] = set(after) - set(before)
    assert log_lines(lab, mark, rf"relay\.milter\[{new}\]: INFO NOQUEUE: event=worker_start worker={new}")
    assert lab.milter_proc.pid == supervisor and lab.milter_proc.poll() is None


@pytest.mark.allow_log(r"event=worker_died")
def test_a_tenant_reload_reaches_every_worker_and_the_replacement(wlab):
    lab = wlab
    workers = lab.milter_workers()
    assert len(workers) == WORKERS
    mark = len(lab.milter_log_text())
    key = rsa_key(2048)
    spec = TenantSpec("initech", "initech.relay.test", "hop.initech.test", "i1", key, ["initech.example"])
    with live_tenants(lab, spec):
        # Each worker swapped in the new tenant set itself (its log line carries its pid).
        def reloaded(pids):
            seen = {int(m.group(1)) for m in log_lines(lab, mark, r"relay\.milter\[(\d+)\]: INFO NOQUEUE: event=reload tenants=acme,initech ")}
            return set(pids) <= seen

        wait_for(lambda: reloaded(workers), 15, what="every worker reloading")

        # A replacement is forked from the supervisor, which still holds the tenant set it
        # started with: it must catch up before it serves.
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(set(lab.milter_workers()) - set(workers)) == 1, 20, what="the replacement worker")
        [new] = set(lab.milter_workers()) - set(workers)
        wait_for(lambda: reloaded([new]), 15, what="the replacement reloading")

        # Mail for the new tenant, on parallel sessions spread over the workers, all goes through.
        msgs = []
        for i in range(3 * WORKERS):
            raw = sign(make_message("hello@initech.example", f"bob{i}@example.net", subject=f"reload #{i}"), key, "hop.initech.test", "i1")
            msgs.append(Outgoing.build(str(i), "hello@initech.example", [encode_recipient(f"bob{i}@example.net", "initech.relay.test")], raw))
        result = send_all(msgs, lab.smtp_port, clients=3 * WORKERS, per_connection=1, retry=False, timeout=30)
        assert len(result.accepted) == len(msgs), [(o.key, o.code, o.text) for o in result.outcomes.values() if not o.accepted]
        lab.sinks["initech"].wait(len(msgs))
