"""A second private Postfix standing in for a remote MTA past the customer's smarthost.

It takes mail over SMTP on a loopback port and relays it by a transport table only (no DNS,
no MX): the final recipient's domain to a sink that refuses, so Postfix's own bounce daemon
writes a real RFC 3464 DSN, and the relay's bounce domain to the relay's port 25 listener,
where that DSN goes. It runs in the lab's mount namespace recipe (the lab's resolv.conf), so
no name is ever asked of the system resolver.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

from relay_milter.lab import Lab, free_port, wait_for
from relay_milter.lab.harness import port_open
from relay_milter.postfix.runner import run_postfix

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class RemoteMta:
    def __init__(self, lab: Lab, routes: dict[str, int], hostname: str = "mx.example.org"):
        """``routes``: domain -> loopback port it is relayed to."""
        self.lab = lab
        self.dir = Path(tempfile.mkdtemp(prefix="relay-remote-", dir=lab.instance.parent))
        os.chmod(self.dir, 0o755)
        self.config, self.queue, self.data = self.dir / "config", self.dir / "queue", self.dir / "data"
        for d in (self.config, self.queue, self.data):
            d.mkdir()
        shutil.chown(self.data, "postfix", "postfix")
        self.maillog = self.dir / "maillog"
        self.port = free_port()
        transport = "".join(f"{domain}\tsmtp:[127.0.0.1]:{port}\n" for domain, port in routes.items())
        (self.config / "transport").write_text(transport)
        (self.config / "main.cf").write_text(
            "\n".join(
                [
                    "compatibility_level = 3.6",
                    f"queue_directory = {self.queue}",
                    f"data_directory = {self.data}",
                    "mail_owner = postfix",
                    "setgid_group = postdrop",
                    f"maillog_file = {self.maillog}",
                    f"myhostname = {hostname}",
                    "inet_interfaces = 127.0.0.1",
                    "inet_protocols = ipv4",
                    "mydestination =",
                    "local_recipient_maps =",
                    "alias_maps =",
                    "alias_database =",
                    "local_transport = error:5.1.1 no local delivery here",
                    "mynetworks = 127.0.0.0/8",
                    "relay_domains =",
                    f"transport_maps = texthash:{self.config}/transport",
                    "default_transport = error:5.4.4 no route in this test MTA",
                    "smtpd_peername_lookup = no",
                    "smtp_tls_security_level = none",
                    "smtpd_tls_security_level = none",
                    "notify_classes =",
                    "maximal_queue_lifetime = 1h",
                    "bounce_queue_lifetime = 1h",
                    "",
                ]
            )
        )
        (self.config / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))

    def start(self) -> "RemoteMta":
        argv = ["postfix", "-c", str(self.config), "start"]
        if Path("/etc/resolv.conf").exists():
            mount = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(self.lab.resolv_conf), *argv]
        r = run_postfix(argv)
        if r.returncode != 0:
            raise RuntimeError(f"remote postfix start failed: {r.stdout}\n{self.log()[-3000:]}")
        wait_for(lambda: port_open(self.port), 20, what="remote MTA smtpd")
        return self

    def send(self, raw: bytes, mail_from: str, rcpts: list[str]) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="smtp.acme.example", timeout=30) as smtp:
            smtp.sendmail(mail_from, rcpts, raw)

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def destroy(self) -> None:
        subprocess.run(["postfix", "-c", str(self.config), "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
