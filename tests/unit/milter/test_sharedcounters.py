"""Rate counters shared by the milter's worker processes (milter/sharedcounters.py)."""

from __future__ import annotations

import os
import threading

import pytest

from relay_milter.core.quota import IngressGate, LocalCounters
from relay_milter.milter.sharedcounters import SharedCounters, TableFull
from support.factories import tenant


@pytest.mark.parametrize("make", [SharedCounters, LocalCounters])
def test_windows_roll_and_tenants_are_counted_apart(make):
    c = make()
    assert c.window("acme", 10, 1) == (0, 0)
    assert c.window("acme", 10, 1, add=1) == (1, 1)
    assert c.window("acme", 10, 1, add=1) == (2, 2)
    assert c.window("globex", 10, 1, add=1) == (1, 1)
    assert c.window("acme", 11, 1) == (0, 2)  # a new minute, the same day
    assert c.window("acme", 11, 2, add=1) == (1, 1)  # a new day


def test_counts_made_in_other_processes_are_seen_and_none_are_lost():
    c = SharedCounters()
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # a worker: 200 messages from 4 threads at once
            try:
                threads = [threading.Thread(target=lambda: [c.window("acme", 5, 7, add=1) for _ in range(50)]) for _ in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    assert c.window("acme", 5, 7) == (600, 600)


def test_a_gate_over_shared_counters_enforces_one_limit_for_all_processes():
    gate = IngressGate(clock=lambda: 1_700_000_000.0, counters=SharedCounters())
    t = tenant("acme", limits={"messages_per_minute": 2})
    pid = os.fork()
    if pid == 0:
        gate.accepted(t)
        gate.accepted(t)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert "limit messages_per_minute (2)" in gate.rate(t)[2]


def test_a_full_table_says_so():
    c = SharedCounters(slots=2)
    c.window("a", 1, 1, add=1)
    c.window("b", 1, 1, add=1)
    assert c.window("a", 1, 1) == (1, 1)
    with pytest.raises(TableFull):
        c.window("c", 1, 1)


def test_the_default_table_holds_ten_thousand_rate_limited_tenants():
    """Issue 17: every tenant with a rate limit takes a slot, and 10,000 such tenants fit."""
    c = SharedCounters()
    for n in range(10_000):
        c.window(f"t{n:05d}", 1, 1, add=1)
    assert c.window("t09999", 1, 1) == (1, 1) and c.window("t00000", 1, 1) == (1, 1)
