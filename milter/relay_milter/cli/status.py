"""`relayctl status`: is this relay healthy? One line per check, Nagios exit codes.

Checks: Postfix running; the milter answering a real milter negotiation on its socket;
the tenant files (valid, applied); the tracker (how far behind the mail log it is, when
it last ran); the event store reachable; the queue per tenant, the oldest deferred message
and mail waiting on a smarthost name that does not resolve; the relay's certificate
expiry; the webhook backlog.

Exit codes: the Nagios plugin convention (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), so a
monitoring system can run it as a check. It is the one relayctl command that does not use
cli/errors.py's table (documented there, next to the table, and in the README).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from relay_milter.cli.formats import human_age

if TYPE_CHECKING:
    from relay_milter.cli.context import Context
    from relay_milter.config import Settings, TenantSet

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3  # Nagios plugin states, which are also the exit codes
NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

# Thresholds (seconds, bytes, counts).
DEFERRED_WARN, DEFERRED_CRIT = 3600, 12 * 3600
TRACKER_STALL_WARN, TRACKER_STALL_CRIT = 120, 900
BACKLOG_WARN = 100


@dataclass
class Check:
    name: str
    state: int
    summary: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "state": NAMES[self.state].lower(), "summary": self.summary, "data": self.data}


def _age(seconds: float | None) -> str:
    return human_age(seconds)


def check_postfix(settings: Settings) -> Check:
    from relay_milter.postfix.render import postfix_running

    if postfix_running(settings):
        return Check("postfix", OK, f"running ({settings.config_directory})")
    return Check("postfix", CRITICAL, f"not running ({settings.config_directory}): nothing is accepted or delivered")


def check_fds(settings: Settings) -> Check | None:
    """The running master's descriptors: open now, needed by the live master.cf, its limit."""
    from relay_milter.postfix import fds

    try:
        master_cf = (settings.config_directory / "master.cf").read_text(encoding="utf-8")
    except OSError:
        return None
    h = fds.headroom(master_cf, settings.queue_directory)
    if h.pid is None:
        return None  # Postfix is not running: the postfix check says so
    data = {"pid": h.pid, "open": h.open, "limit": h.limit, "needed": h.needed}
    if h.limit is None:
        return Check("fds", OK, f"master {h.open} open, no limit", data)
    text = f"master {h.open} open of {h.limit} (headroom {h.limit - (h.open or 0)}); master.cf needs about {h.needed}"
    if h.needed > h.limit or (h.open or 0) > fds.HEADROOM_WARN * h.limit:
        return Check("fds", WARNING, f"{text}: raise LimitNOFILE of Postfix (docs/scale.md)", data)
    return Check("fds", OK, text, data)


def check_milter(settings: Settings) -> Check:
    from relay_milter.milter.negotiate import NegotiationError, negotiate

    try:
        n = negotiate(settings.milter_socket, timeout=5)
    except NegotiationError as exc:
        return Check("milter", CRITICAL, f"{exc}: Postfix answers every client 451 (milter_default_action = tempfail)")
    return Check("milter", OK, f"negotiated protocol {n.version} on {settings.milter_socket} in {n.seconds * 1000:.0f} ms",
                 {"version": n.version, "seconds": round(n.seconds, 4)})


def check_tenants(obj: Context, settings: Settings) -> tuple[Check, TenantSet | None]:
    from relay_milter.config import ConfigError, applied_tenants_path, dump_tenant_set, load_applied_tenants, load_tenants

    applied_path = applied_tenants_path(settings)
    try:
        applied = load_applied_tenants(applied_path)
    except ConfigError:
        applied = None
    try:
        files = load_tenants(obj.tenants_dir)
    except ConfigError as exc:
        first = str(exc).splitlines()[0]
        if applied is None:
            return Check("tenants", CRITICAL, f"tenant files invalid and nothing applied: {first}"), None
        return Check("tenants", WARNING, f"tenant files invalid (the milter keeps the applied set {', '.join(t.id for t in applied)}): {first}",
                     {"error": str(exc)}), applied
    if applied is None:
        return Check("tenants", WARNING, f"{len(files)} valid, never applied (run relayctl apply)"), files
    if dump_tenant_set(files) != dump_tenant_set(applied):
        return Check("tenants", WARNING, f"tenant files changed since the last apply (run relayctl check, then relayctl apply); "
                     f"serving {', '.join(t.id for t in applied)}"), applied
    return Check("tenants", OK, f"{len(applied)} applied ({', '.join(t.id for t in applied)})"), applied


def _store(settings: Settings):
    from relay_milter.tracking import store as eventstore

    dsn = settings.tracking.dsn()
    if dsn.startswith("sqlite:///") and not Path(dsn[len("sqlite:///"):]).exists():
        raise FileNotFoundError(f"{dsn[len('sqlite:///'):]} does not exist (has relayctl track run?)")
    return eventstore.open_store(dsn, migrate=False)


def check_store_and_tracker(settings: Settings, now: float) -> tuple[list[Check], Any]:
    from relay_milter.tracking.store import redact_dsn

    try:
        store = _store(settings)
        with store.transaction() as tx:
            cp = tx.get_checkpoint(settings.node, "maillog")
    except Exception as exc:
        return [Check("event_store", CRITICAL, f"unreachable: {exc}"), Check("tracker", UNKNOWN, "no event store")], None
    checks = [Check("event_store", OK, f"reachable ({redact_dsn(settings.tracking.dsn())})")]
    data: dict[str, Any] = {}
    last_run = _tracker_last_run(settings)
    if last_run is not None:
        data["last_run"] = last_run
    log = Path(settings.maillog_file) if settings.maillog_file else None
    if cp is None:
        checks.append(Check("tracker", WARNING, "no checkpoint for this node: the tracker has never run here", data))
        return checks, store
    try:
        st = log.stat() if log else None
    except OSError:
        st = None
    lag = 0
    if st is not None and int(cp.get("inode") or 0) == st.st_ino:
        lag = max(0, st.st_size - int(cp.get("offset") or 0))
    data |= {"lag_bytes": lag, "offset": cp.get("offset")}
    behind = now - st.st_mtime if (st is not None and lag) else 0.0
    data["behind_seconds"] = round(behind, 1)
    ran = f", last run {_age(now - last_run)} ago" if last_run else ""
    if lag and behind > TRACKER_STALL_CRIT:
        checks.append(Check("tracker", CRITICAL, f"{lag} bytes of the mail log unread for {_age(behind)}{ran}: is relayctl track running?", data))
    elif lag and behind > TRACKER_STALL_WARN:
        checks.append(Check("tracker", WARNING, f"{lag} bytes of the mail log unread for {_age(behind)}{ran}", data))
    else:
        checks.append(Check("tracker", OK, f"lag {lag} bytes{ran}", data))
    return checks, store


def _tracker_last_run(settings: Settings) -> float | None:
    path = settings.tracking.metrics_file
    if not path:
        return None
    try:
        m = re.search(r"^relay_tracker_last_run_timestamp_seconds(?:\{[^}]*\})? (\S+)$", Path(path).read_text(), re.M)
    except OSError:
        return None
    return float(m.group(1)) if m else None


def check_queue(settings: Settings, tenants: TenantSet | None, store: Any, now: float) -> list[Check]:
    from relay_milter.postfix import queue as ops

    try:
        messages = ops.read_queue(settings.config_directory)
    except ops.OpsError as exc:
        return [Check("queue", UNKNOWN, str(exc))]
    if tenants is not None:
        try:
            ops.attribute(messages, tenants, store, settings.node)
        except ops.OpsError:
            ops.attribute(messages, tenants)
    rows = ops.queue_summary(messages, now)
    per = {r.tenant: {"total": r.total, **r.counts, "oldest_deferred_seconds": r.oldest_deferred_age} for r in rows}
    oldest = max((r.oldest_deferred_age for r in rows if r.oldest_deferred_age is not None), default=None)
    total = sum(r.total for r in rows)
    text = ", ".join(f"{r.tenant} {r.total} ({r.counts['deferred']} deferred)" for r in rows) or "empty"
    state = OK
    if oldest is not None and oldest > DEFERRED_CRIT:
        state = CRITICAL
    elif oldest is not None and oldest > DEFERRED_WARN:
        state = WARNING
    checks = [Check("queue", state, f"{total} message(s): {text}; oldest deferred {_age(oldest)}",
                    {"tenants": per, "total": total, "oldest_deferred_seconds": oldest})]
    from relay_milter.postfix.reroute import unresolved_by_tenant

    unresolved = unresolved_by_tenant(messages)
    if unresolved:
        checks.append(Check("smarthosts", WARNING, "mail waiting on a smarthost name that does not resolve: "
                            + ", ".join(f"{t} {n}" for t, n in sorted(unresolved.items()))
                            + " (fix smarthost.host, then relayctl apply)", {"unresolved": unresolved}))
    return checks


def check_cert(settings: Settings) -> Check | None:
    from relay_milter.postfix.preflight import CERT_CRIT_DAYS, CERT_WARN_DAYS, cert_days_left

    if settings.tls_cert_file is None:
        return None
    days = cert_days_left(settings.tls_cert_file)
    if days is None:
        return Check("certificate", CRITICAL, f"{settings.tls_cert_file} missing or unreadable: no STARTTLS")
    state = CRITICAL if days < CERT_CRIT_DAYS else WARNING if days < CERT_WARN_DAYS else OK
    return Check("certificate", state, f"{settings.tls_cert_file} expires in {days} day(s)", {"days_left": days})


def check_webhooks(store: Any, tenants: TenantSet | None) -> Check | None:
    if store is None or tenants is None or not any(t.webhook for t in tenants):
        return None
    try:
        backlog = {t: int(n) for t, n in store.outbox_backlog().items() if n}
    except Exception as exc:
        return Check("webhooks", UNKNOWN, f"event store: {exc}")
    total = sum(backlog.values())
    text = ", ".join(f"{t} {n}" for t, n in sorted(backlog.items())) or "none"
    return Check("webhooks", WARNING if total >= BACKLOG_WARN else OK, f"backlog {total} ({text})", {"backlog": backlog})


def collect(obj: Context) -> list[Check]:
    settings = obj.load_settings()
    now = time.time()
    checks = [check_postfix(settings), check_milter(settings)]
    checks += [c for c in (check_fds(settings),) if c is not None]
    tenant_check, tenants = check_tenants(obj, settings)
    checks.append(tenant_check)
    store_checks, store = check_store_and_tracker(settings, now)
    checks += store_checks
    try:
        checks += check_queue(settings, tenants, store, now)
        checks += [c for c in (check_cert(settings), check_webhooks(store, tenants)) if c is not None]
    finally:
        if store is not None:
            store.close()
    return checks


def overall(checks: list[Check]) -> int:
    states = {c.state for c in checks}
    for s in (CRITICAL, WARNING, UNKNOWN):
        if s in states:
            return s
    return OK


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object: overall state and every check with its data.")
@click.pass_obj
def status(obj: Context, as_json: bool) -> None:
    """Health of this relay, for people and for Nagios/Icinga.

    \b
    postfix      the instance runs (postfix status)
    milter       the socket answers a real milter negotiation (SMFIC_OPTNEG)
    fds          the Postfix master's open file descriptors against its limit, and what
                 master.cf needs (about 3 per service; warning above 80 % or when it will not fit)
    tenants      the tenant files are valid and applied (which set the milter serves)
    event_store  reachable
    tracker      bytes of the mail log not yet recorded, and for how long; last run
                 (from tracking.metrics_file)
    queue        messages per tenant, oldest deferred (warning > 1h, critical > 12h)
    smarthosts   mail waiting on a smarthost name that does not resolve
    certificate  days until the relay's certificate expires (warning < 21, critical < 7)
    webhooks     undelivered notifications (warning >= 100)

    The first line is the overall state (Nagios plugin format), then one line per check.

    \b
    Exit codes (Nagios): 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (a check could not run,
    or invalid settings).
    """
    try:
        checks = collect(obj)
    except Exception as exc:  # noqa: BLE001 -- a monitoring check reports UNKNOWN, not a traceback
        click.echo(f"RELAY UNKNOWN - status could not run: {type(exc).__name__}: {exc}")
        sys.exit(UNKNOWN)
    state = overall(checks)
    if as_json:
        click.echo(json.dumps({"state": NAMES[state].lower(), "exit_code": state, "checks": [c.to_json() for c in checks]}, indent=2))
    else:
        bad = [c for c in checks if c.state != OK]
        head = "; ".join(f"{c.name}: {c.summary}" for c in bad) if bad else f"{len(checks)} checks passed"
        click.echo(f"RELAY {NAMES[state]} - {head}")
        for c in checks:
            click.echo(f"{NAMES[c.state]:<8}  {c.name:<12} {c.summary}")
    sys.exit(state)  # Nagios codes, not cli.errors.ExitCode (see the module docstring)


COMMANDS: tuple[click.Command, ...] = (status,)
