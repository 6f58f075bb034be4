"""The role's firewall, applied for real inside a network namespace this test creates.

The role's firewall tasks (template validated with `nft -c`, handler `nft -f`)
run under `ip netns exec` in a "relay" namespace, so the ruleset never reaches
the machine's own network stack. A second "client" namespace, joined by a veth
pair, then probes: the SMTP ports and SSH connect, any other port is dropped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from support.factories import unavailable
from support.paths import REPO

pytestmark = pytest.mark.e2e


BIN = Path(sys.executable).parent


def _need(tool: str) -> str:
    path = shutil.which(tool) or (str(BIN / tool) if (BIN / tool).exists() else None) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path:
        return path
    unavailable(f"{tool} not installed (deps/apt/ansible.txt, deps/pip/ansible.txt)")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespaces():
    _need("nft")
    _need("ip")
    tag = f"{os.getpid() % 100000}"
    srv, cli = f"rfw{tag}s", f"rfw{tag}c"
    octet = 1 + os.getpid() % 250
    srv_ip, cli_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"
    _ip("netns", "add", srv)
    _ip("netns", "add", cli)
    try:
        _ip("link", "add", f"v{tag}s", "type", "veth", "peer", "name", f"v{tag}c")
        _ip("link", "set", f"v{tag}s", "netns", srv)
        _ip("link", "set", f"v{tag}c", "netns", cli)
        for ns, dev, addr in ((srv, f"v{tag}s", srv_ip), (cli, f"v{tag}c", cli_ip)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield srv, cli, srv_ip
    finally:
        subprocess.run(["ip", "netns", "del", srv], capture_output=True)
        subprocess.run(["ip", "netns", "del", cli], capture_output=True)


PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("open")
except OSError as exc:
    print(type(exc).__name__)
"""


def _probe(cli: str, host: str, port: int) -> str:
    r = subprocess.run(["ip", "netns", "exec", cli, sys.executable, "-c", PROBE, host, str(port)], capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def test_firewall_admits_only_ssh_and_smtp(namespaces):
    srv, cli, srv_ip = namespaces
    work = Path(tempfile.mkdtemp(prefix="relay-fw-", dir="/var/tmp"))
    listeners = []
    try:
        ruleset = work / "nftables.conf"
        play = [
            {
                "name": "Firewall only",
                "hosts": "localhost",
                "connection": "local",
                "gather_facts": False,
                "vars": {
                    "ansible_python_interpreter": "/usr/bin/python3",
                    "relay_firewall_config": str(ruleset),
                    "relay_manage_packages": False,
                    "relay_service_manager": "direct",
                    "relay_firewall_allow_tcp": [2222],
                    "relay_settings": {"smtpd_listen": ["25", "127.0.0.1:2587"]},
                },
                "tasks": [{"name": "Firewall", "ansible.builtin.include_role": {"name": "relay", "tasks_from": "firewall.yml"}}],
            }
        ]
        (work / "ansible.cfg").write_text("[defaults]\nretry_files_enabled = false\n")
        (work / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
        env = os.environ | {
            "ANSIBLE_ROLES_PATH": str(REPO / "ansible" / "roles"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCAL_TEMP": str(work / "tmp"),
            "ANSIBLE_CONFIG": str(work / "ansible.cfg"),
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin",
        }
        r = subprocess.run(
            ["ip", "netns", "exec", srv, _need("ansible-playbook"), "-i", "localhost,", str(work / "play.yml")],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert "RUNNING HANDLER [relay : Reload the firewall]" in r.stdout
        listed = subprocess.run(["ip", "netns", "exec", srv, "nft", "list", "ruleset"], capture_output=True, text=True, timeout=30).stdout
        assert "policy drop" in listed
        for port in (25, 2587, 2222, 8080):
            listeners.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", srv, sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )
        # every listener answers inside the server's namespace (no firewall on its loopback)
        # before anything is probed through the firewall
        for port in (25, 2587, 2222, 8080):
            deadline = time.monotonic() + 60
            while _probe(srv, "127.0.0.1", port) != "open":
                assert time.monotonic() < deadline, f"listener on port {port} never started"
                time.sleep(0.2)
        results = {port: _probe(cli, srv_ip, port) for port in (25, 2587, 2222, 8080)}
        assert results[25] == "open" and results[2587] == "open" and results[2222] == "open", results
        assert results[8080] in ("TimeoutError", "timeout"), results  # dropped, not refused
    finally:
        for p in listeners:
            p.terminate()
            p.wait(10)
        shutil.rmtree(work, ignore_errors=True)
