"""Lab ports and DNS addresses in a multi-process run (pytest-xdist workers): each process
takes only its own residue class, so two processes never hand out the same one."""

from __future__ import annotations

import socket

import pytest

from relay_milter.lab import harness


@pytest.mark.parametrize("slot", ["0/4", "1/4", "2/4", "3/4", "1/3"])
def test_every_slot_gets_ports_of_its_own_class(monkeypatch, slot):
    # bind(port 0) prefers even ports: a class of the kernel's choices could be empty
    monkeypatch.setenv("RELAY_LAB_SLOT", slot)
    index, count = harness.lab_slot()
    assert (index, count) == tuple(int(x) for x in slot.split("/"))
    ports = [harness.free_port() for _ in range(30)]
    assert len(set(ports)) == 30
    assert all(p % count == index and p in harness.LAB_PORTS for p in ports)
    with socket.socket() as s:  # and it is really free
        s.bind(("127.0.0.1", ports[-1]))


@pytest.mark.parametrize("raw", ["", "x", "4/4", "-1/4", "1/0"])
def test_a_missing_or_bad_slot_means_one_process(monkeypatch, raw):
    monkeypatch.setenv("RELAY_LAB_SLOT", raw)
    assert harness.lab_slot() == (0, 1)


def test_loopback_addresses_follow_the_slot(monkeypatch):
    monkeypatch.setenv("RELAY_LAB_SLOT", "3/4")
    addr = harness.free_loopback_address(port=harness.free_port())
    assert addr.startswith("127.") and addr != "127.0.0.1" and int(addr.split(".")[2]) % 4 == 3
