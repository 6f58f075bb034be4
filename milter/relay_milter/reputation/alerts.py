"""Operator alerts for reputation events (``core.reputation.Change``): a JSON POST to
``reputation.alert_webhook``, a notice mail to ``notify.address`` over the operator notice
route (the local Postfix's ``relay_notices_`` transport to ``notify.smarthost``), and the
Prometheus textfile ``reputation.metrics_file``.

Every function returns an error text instead of raising: an alert that cannot be sent is
reported by the caller and never undoes the recorded state."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from relay_milter.config import Settings
from relay_milter.files import replace_file

SENDMAIL = "/usr/sbin/sendmail"


def post_webhook(url: str, node: str, records: list[dict[str, Any]], timeout: float = 10) -> str | None:
    """POST ``{"node": ..., "events": [...]}``; None on a 2xx answer, else why not."""
    body = json.dumps({"node": node, "events": records}).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
    except Exception as exc:  # noqa: BLE001 - any failure is reported, never fatal
        return str(exc)
    return None


def notice_message(settings: Settings, records: list[dict[str, Any]]) -> EmailMessage:
    """The operator notice: one mail per check (or failover) listing its events."""
    assert settings.notify is not None
    kinds = sorted({r["event"] for r in records})
    subjects = sorted({r["subject"] for r in records})
    msg = EmailMessage()
    msg["From"] = f"tenant-relay reputation <MAILER-DAEMON@{settings.myhostname}>"
    msg["To"] = settings.notify.address
    msg["Subject"] = f"[relay {settings.node}] {' '.join(kinds)}: {', '.join(subjects)}"
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid("reputation", domain=settings.myhostname)
    msg["Auto-Submitted"] = "auto-generated"
    lines = [f"Reputation events on relay node {settings.node}:", ""]
    for r in records:
        extra = " ".join(f"{k}={v}" for k, v in r.items() if k not in ("at", "event", "subject", "detail"))
        lines.append(f"{formatdate(r['at'], usegmt=True)}  {r['event']} {r['subject']}: {r['detail']}" + (f" {extra}" if extra else ""))
    lines += ["", "relayctl ip list shows the pool now; docs/reputation.md explains each event."]
    msg.set_content("\n".join(lines) + "\n")
    return msg


def send_notice(settings: Settings, records: list[dict[str, Any]], sendmail: str = SENDMAIL) -> str | None:
    """Hand the notice to the local Postfix (``sendmail -C config_directory``, null envelope
    sender); its transport map sends ``notify.address`` over the operator notice route.
    None when Postfix took it, else why not. No ``notify``: nothing to do."""
    if settings.notify is None or not records:
        return None
    msg = notice_message(settings, records)
    cmd = [sendmail, "-C", str(settings.config_directory), "-oi", "-f", "", "--", settings.notify.address]
    try:
        r = subprocess.run(cmd, input=msg.as_bytes(), capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{sendmail}: {exc}"
    if r.returncode != 0:
        return f"{sendmail} exited {r.returncode}: {r.stderr.decode(errors='replace').strip()[:300]}"
    return None


def metrics_text(settings: Settings, state: dict) -> str:
    """The reputation textfile (pure: settings + state in, exposition text out)."""
    pool = settings.reputation.pool
    lines = [
        "# HELP relay_source_address_listed 1 if the source address is on a blocklist, 0 if not, -1 unknown.",
        "# TYPE relay_source_address_listed gauge",
    ]
    for a in pool:
        s = state["addresses"].get(a.address, {}).get("state", "unknown")
        lines.append(f'relay_source_address_listed{{address="{a.address}",role="{a.role}"}} {1 if s == "listed" else 0 if s == "clean" else -1}')
    lines += ["# HELP relay_source_address_failover 1 while the address's tenants are failed over to another.",
              "# TYPE relay_source_address_failover gauge"]
    for a in pool:
        lines.append(f'relay_source_address_failover{{address="{a.address}"}} {1 if a.address in state["failovers"] else 0}')
    lines += ["# HELP relay_domain_listed 1 if the domain is on a domain blocklist, 0 if not, -1 unknown.",
              "# TYPE relay_domain_listed gauge"]
    for d, e in sorted(state["domains"].items()):
        s = e.get("state", "unknown")
        lines.append(f'relay_domain_listed{{domain="{d}"}} {1 if s == "listed" else 0 if s == "clean" else -1}')
    lines += ["# HELP relay_reputation_events_total Reputation (operator) events recorded, by kind.",
              "# TYPE relay_reputation_events_total counter"]
    lines += [f'relay_reputation_events_total{{event="{k}"}} {v}' for k, v in sorted(state.get("counts", {}).items())]
    return "\n".join(lines) + "\n"


def write_metrics(settings: Settings, state: dict) -> str | None:
    """Replace ``reputation.metrics_file`` atomically (mode 0644); None if done or unset."""
    path = settings.reputation.metrics_file
    if path is None:
        return None
    try:
        replace_file(path, metrics_text(settings, state), 0o644, make_parent=True)
    except OSError as exc:
        return f"cannot write {path}: {exc}"
    return None


__all__ = ["metrics_text", "notice_message", "post_webhook", "send_notice", "write_metrics"]
