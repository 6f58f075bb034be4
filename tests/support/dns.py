"""A DNS server on loopback for tests that run `relayctl check`/`apply` (or anything else
that resolves names) on tenants whose smarthosts and keys live under made-up or real
names: the lookup must reach this server, never the system resolver.

``LoopbackDns`` is a real dnsmasq (the lab's ``DnsServer``) that knows only the names it
is given and answers NXDOMAIN for every other name, so a lookup fails at once and the
command reports it (a warning of `check`, an error of `check --strict`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from relay_milter.lab import DnsServer

# Names the server knows (A records), for tests of names that do resolve.
HOSTS = {"mx.acme.test": "127.0.0.1"}


class LoopbackDns:
    def __init__(self, workdir: Path):
        self.server = DnsServer(workdir, {}, hosts=HOSTS, local=("#",)).start()

    @property
    def settings(self) -> dict:
        """The settings ``dns`` section that points at this server."""
        return {"nameservers": [self.server.address], "port": self.server.port, "timeout": 2}

    def yaml(self) -> str:
        """The same as a settings-file fragment (``dns:`` block)."""
        return yaml.safe_dump({"dns": self.settings}, sort_keys=False)

    def stop(self) -> None:
        self.server.stop()
