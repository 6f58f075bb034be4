"""The milter negotiation `relayctl status` performs, against the real milter process."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest
import yaml

from relay_milter.lab import rsa_key, wait_for
from relay_milter.lab.harness import stop_process
from relay_milter.milter.negotiate import NegotiationError, negotiate
from support.factories import tenant_doc, write_tenants


@pytest.fixture(scope="module")
def milter(tmp_path_factory):
    base = tmp_path_factory.mktemp("milter")
    write_tenants(base / "tenants", [tenant_doc("acme", rsa_key(1024))])
    sock = base / "milter.sock"
    (base / "relay.yaml").write_text(yaml.safe_dump({"config_directory": str(base), "milter_socket": f"unix:{sock}",
                                                      "milter_socket_group": "root"}))
    cmd = [sys.executable, "-m", "relay_milter.cli", "--tenants", str(base / "tenants"), "--settings", str(base / "relay.yaml"),
           "milter", "--log-file", str(base / "milter.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, 30, what="milter socket")
        assert proc.poll() is None, (base / "milter.log").read_text()
        yield f"unix:{sock}", base
    finally:
        stop_process(proc)


def test_the_real_milter_negotiates_protocol_6(milter):
    spec, base = milter
    n = negotiate(spec, timeout=5)
    assert n.version == 6 and n.seconds < 5
    # Before the first apply the milter serves the tenant files, and says so.
    log = (base / "milter.log").read_text()
    assert "event=no_applied_set" in log and f"event=config tenants=acme source={base / 'tenants'}" in log


def test_no_process_behind_the_socket(tmp_path):
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # a socket file, but nobody listens
    try:
        with pytest.raises(NegotiationError, match=r"cannot connect to unix:.*dead.sock: Connection refused"):
            negotiate(f"unix:{path}", timeout=2)
    finally:
        s.close()


def test_a_hung_milter_times_out(tmp_path):
    path = tmp_path / "hung.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    held = []
    t = threading.Thread(target=lambda: held.append(server.accept()), daemon=True)
    t.start()
    try:
        with pytest.raises(NegotiationError, match=r"no answer from unix:.*hung.sock within 1s \(hung\?\)"):
            negotiate(f"unix:{path}", timeout=1)
    finally:
        server.close()
        for conn, _ in held:
            conn.close()
