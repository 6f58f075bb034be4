"""The load generator used by the benchmark and the fault suite: framing, retries, counting."""

from __future__ import annotations

import threading

from aiosmtpd.controller import Controller

from relay_milter.lab import free_port
from relay_milter.lab.loadgen import MaillogCounter, Outgoing, dot_stuff, percentile, send_all


def test_dot_stuffing_and_line_ends():
    assert dot_stuff(b".a\nb\r\n.c") == b"..a\r\nb\r\n..c\r\n"
    assert dot_stuff(b"x\r\n") == b"x\r\n"


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7], 99) == 7
    assert percentile([], 50) is None


def test_maillog_counter_counts_only_new_complete_lines(tmp_path):
    log = tmp_path / "maillog"
    log.write_bytes(b"old: status=sent (250)\n")
    c = MaillogCounter(log)
    assert c.poll() == 0
    with open(log, "ab") as f:
        f.write(b"a: to=<x>, status=sent (250 ok)\nb: to=<y>, status=deferred (x)\nc: to=<z>, status=se")
    assert c.poll() == 1
    with open(log, "ab") as f:
        f.write(b"nt (250)\n")
    assert c.poll() == 2


class _Flaky:
    """Answers 451 to the first DATA of every message, 550 to messages marked 'reject', else 250."""

    def __init__(self):
        self.seen: dict[bytes, int] = {}
        self.accepted: list[bytes] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        body = envelope.content
        key = body.split(b"\r\n", 1)[0]
        with self.lock:
            n = self.seen[key] = self.seen.get(key, 0) + 1
            if b"reject" in key:
                return "550 5.7.1 no"
            if n == 1:
                return "451 4.3.0 try again"
            self.accepted.append(key)
        return "250 2.0.0 ok"


def test_retry_mode_retries_4xx_and_stops_at_5xx():
    handler = _Flaky()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        msgs = [Outgoing.build(str(i), "a@b.example", ["c@d.example"], f"Subject: m{i}\r\n\r\nbody\r\n".encode()) for i in range(10)]
        msgs.append(Outgoing.build("r", "a@b.example", ["c@d.example"], b"Subject: reject\r\n\r\nbody\r\n"))
        res = send_all(msgs, port, clients=3, per_connection=2, retry=True, retry_delay=0.05, deadline=30, timeout=10)
    finally:
        ctl.stop()
    assert sorted(o.key for o in res.accepted) == sorted(str(i) for i in range(10))
    assert [o.key for o in res.refused] == ["r"] and res.outcomes["r"].code == 550
    assert not res.unfinished
    for i in range(10):
        o = res.outcomes[str(i)]
        assert [a.code for a in o.attempts] == [451, 250]
        assert o.latency is not None and o.latency > 0
    assert len(handler.accepted) == 10  # each accepted exactly once


def test_without_retry_a_4xx_is_final_and_a_dead_port_is_reported():
    port = free_port()  # nothing listens here
    msgs = [Outgoing.build("1", "a@b.example", ["c@d.example"], b"Subject: x\r\n\r\ny\r\n")]
    res = send_all(msgs, port, clients=1, retry=False, timeout=5)
    o = res.outcomes["1"]
    assert not o.accepted and not o.refused and o.attempts[0].stage == "connect"
    assert res.unfinished == [o]


def test_process_cpu_and_memory_count_the_children_too():
    """proc_cpu_seconds / proc_memory_kib of a supervisor include its workers, live or
    reaped (bench.py and the microbench measure the multi-process milter that way)."""
    import os
    import signal
    import time

    from relay_milter.lab.loadgen import proc_cpu_seconds, proc_memory_kib, proc_tree

    me = os.getpid()
    before = proc_cpu_seconds(me)
    pid = os.fork()
    if pid == 0:  # burn half a second of CPU, then wait to be killed
        end = time.process_time() + 0.5
        while time.process_time() < end:
            pass
        signal.pause()
        os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while proc_cpu_seconds(pid) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid in proc_tree(me)
        assert proc_cpu_seconds(me) - before >= 0.5  # a live child's time
        assert proc_memory_kib(me)["VmRSS"] > proc_memory_kib(pid)["VmRSS"] > 0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert pid not in proc_tree(me)
    assert proc_cpu_seconds(me) - before >= 0.5  # a reaped child's time (cutime)
