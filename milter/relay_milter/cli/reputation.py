"""relayctl ip list | failover | restore, relayctl reputation check | watch: the source
address pool, its blocklist monitoring, and failover to standby addresses.

A failover (or restore) changes which address the tenants' transports bind to: the
configuration is re-rendered, checked and installed, and Postfix reloaded, like any
change. Nothing is recorded as done until that succeeded.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from relay_milter import logs
from relay_milter.cli.context import Context
from relay_milter.cli.errors import ExitCode, fail, warn
from relay_milter.config import ConfigError, Settings, TenantSet
from relay_milter.core import reputation as rep
from relay_milter.reputation import alerts
from relay_milter.reputation.monitor import check_once
from relay_milter.reputation.state import load_state, save_state

log = logging.getLogger("relay.reputation")


def _save(settings: Settings, state: dict) -> None:
    try:
        save_state(settings.reputation.state_file, state)
    except OSError as exc:
        fail(ExitCode.UNAVAILABLE, f"cannot write the reputation state {settings.reputation.state_file}: {exc}")


def _state(settings: Settings) -> dict:
    try:
        return load_state(settings.reputation.state_file)
    except ConfigError as exc:
        fail(ExitCode.CONFIG, str(exc))


def _reconfigure(ts: TenantSet, settings: Settings, state: dict) -> list[str]:
    """Render with ``state``'s failovers, check, install, reload. Exit 4 if Postfix refuses."""
    from relay_milter.postfix.render import install, postfix_running, reload_postfix, render_and_check

    files, result = render_and_check(ts, settings, reputation_state=state)
    if not result.ok:
        fail(ExitCode.CHECK_FAILED, "check failed, nothing was installed and no failover recorded", result.problems)
    changed = install(files, settings)
    if changed and postfix_running(settings):
        try:
            reload_postfix(settings)
        except ConfigError as exc:
            fail(ExitCode.CHECK_FAILED, f"configuration installed, but {exc}")
        logs.event(log, logging.WARNING, None, "postfix_reloaded", reason="source address change", files=",".join(changed))
    return changed


def _announce(changes: list[rep.Change], settings: Settings, now: float) -> None:
    """Alert, once the changes are recorded in the state file (the tracker copies them into
    the event store from there): a log line (WARNING) and a line on stdout per change, a
    POST to reputation.alert_webhook and a notice mail to notify.address when set. A
    failed alert is a warning and an event=alert_failed log line; the state is kept."""
    if not changes:
        return
    for c in changes:
        logs.event(log, logging.WARNING, None, c.event, subject=c.subject, detail=c.detail, **c.fields)
        click.echo(f"{c.event} {c.subject}: {c.detail}" + "".join(f" {k}={v}" for k, v in c.fields.items()))
    records = [c.record(now) for c in changes]
    url = settings.reputation.alert_webhook
    if url and (error := alerts.post_webhook(url, settings.node, records)):
        logs.event(log, logging.ERROR, None, "alert_failed", route="webhook", url=url, reason=error)
        warn(f"alert webhook {url} failed: {error}")
    if settings.notify is not None:
        if error := alerts.send_notice(settings, records):
            logs.event(log, logging.ERROR, None, "alert_failed", route="notice", to=settings.notify.address, reason=error)
            warn(f"operator notice to {settings.notify.address} failed: {error}")
        else:
            logs.event(log, logging.INFO, None, "alert_sent", route="notice", to=settings.notify.address,
                       events=",".join(c.event for c in changes))


def _metrics(settings: Settings, state: dict) -> None:
    if error := alerts.write_metrics(settings, state):
        warn(error)


def run_check(obj: Context, as_json: bool) -> int:
    ts, settings = obj.load()
    if not settings.reputation.pool and not settings.reputation.domain_lists:
        fail(ExitCode.CONFIG, "nothing to check: settings reputation.pool and reputation.domain_lists are empty")
    state = _state(settings)
    now = time.time()
    changes, errors = check_once(ts, settings, state, now)
    # Listing changes are recorded and alerted before any failover is tried.
    rep.log_events(state, changes, now)
    _save(settings, state)
    _announce(changes, settings, now)
    stuck: list[str] = []
    if settings.reputation.failover == "auto":
        moves, stuck = rep.auto_failovers(state, settings.reputation, ts, now)
        if moves:
            _reconfigure(ts, settings, state)  # exits 4, recording no failover, if Postfix refuses
            moved_at = time.time()
            rep.log_events(state, moves, moved_at)
            _save(settings, state)
            _announce(moves, settings, moved_at)
            changes += moves
    for line in stuck:
        logs.event(log, logging.ERROR, None, "failover_impossible", detail=line)
        warn(f"failover impossible: {line}")
    for line in errors:
        logs.event(log, logging.WARNING, None, "reputation_lookup_error", detail=line)
        warn(f"lookup error (listing state kept): {line}")
    _metrics(settings, state)
    rows = _rows(ts, settings, state)
    if as_json:
        click.echo(json.dumps({"addresses": rows, "domains": state["domains"], "changes": [c.record(now) for c in changes], "errors": errors}, indent=2))
    else:
        _print_rows(rows)
        for d, e in sorted(state["domains"].items()):
            click.echo(f"domain {d}: {e['state']} ({e.get('detail', '')})")
    listed = any(r["listing"] == "listed" for r in rows) or any(e["state"] == "listed" for e in state["domains"].values())
    return 1 if listed else 0


def _rows(ts: TenantSet, settings: Settings, state: dict) -> list[dict]:
    cfg = settings.reputation
    rows = []
    for a in cfg.pool:
        s = state["addresses"].get(a.address, {})
        f = state["failovers"].get(a.address)
        rows.append({
            "address": a.address,
            "helo": a.helo,
            "role": a.role,
            "tenants": rep.users_of(a.address, ts, cfg, state),
            "dedicated_to": sorted({t.id for t in ts if (c := rep.configured_address(t, cfg)) and c.address == a.address}),
            "listing": s.get("state", "unknown"),
            "lists": s.get("lists", []),
            "checked": s.get("checked"),
            "fcrdns": s.get("fcrdns", "unknown"),
            "fcrdns_detail": s.get("fcrdns_detail"),
            "failed_over_to": f["to"] if f else None,
        })
    return rows


def _print_rows(rows: list[dict]) -> None:
    click.echo(f"{'ADDRESS':<26} {'ROLE':<8} {'HELO':<28} {'LISTING':<18} {'FCRDNS':<9} TENANTS")
    for r in rows:
        tenants = ",".join(r["tenants"]) or "-"
        if r["failed_over_to"]:
            tenants = f"-> {r['failed_over_to']} (was {','.join(r['dedicated_to']) or '-'})"
        listing = r["listing"] + (f" ({','.join(r['lists'])})" if r["lists"] else "")
        click.echo(f"{r['address']:<26} {r['role']:<8} {r['helo']:<28} {listing:<18} {r['fcrdns']:<9} {tenants}")


@click.group()
def ip() -> None:
    """The outbound source address pool (settings reputation.pool)."""


@ip.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def ip_list(obj: Context, as_json: bool) -> None:
    """Each pool address with its role, HELO name, the tenants leaving from it, its listing
    state and its FCrDNS state (as of the last `relayctl reputation check`)."""
    ts, settings = obj.load()
    state = _state(settings)
    rep.assignments(ts, settings.reputation, state)  # a pool mismatch exits 3
    rows = _rows(ts, settings, state)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo("no source addresses (settings reputation.pool is empty): tenants leave from the host's default address")
    else:
        _print_rows(rows)


@ip.command("failover")
@click.argument("address")
@click.pass_obj
def ip_failover(obj: Context, address: str) -> None:
    """Move the tenants leaving from ADDRESS to a healthy standby address now.

    Re-renders, checks, installs and reloads; queued mail leaves from the new address.
    Exit 1 if there is nothing to do or no healthy standby."""
    ts, settings = obj.load()
    logs.setup(settings.log_level, None)
    state = _state(settings)
    entry = settings.reputation.entry(address)
    if entry is None:
        fail(ExitCode.USAGE, f"{address} is not in settings reputation.pool")
    now = time.time()
    try:
        change = rep.fail_over(state, settings.reputation, ts, entry.address, now)
    except ValueError as exc:
        fail(ExitCode.FAILED, f"cannot fail over: {exc}")
    _reconfigure(ts, settings, state)
    now = time.time()
    rep.log_events(state, [change], now)
    _save(settings, state)
    _announce([change], settings, now)
    _metrics(settings, state)


@ip.command("restore")
@click.argument("address")
@click.pass_obj
def ip_restore(obj: Context, address: str) -> None:
    """Undo a failover: the tenants of ADDRESS leave from it again (after a delisting).

    Exit 1 if ADDRESS has no failover in force."""
    ts, settings = obj.load()
    logs.setup(settings.log_level, None)
    state = _state(settings)
    entry = settings.reputation.entry(address)
    if entry is None:
        fail(ExitCode.USAGE, f"{address} is not in settings reputation.pool")
    now = time.time()
    try:
        change = rep.restore(state, entry.address, now)
    except ValueError as exc:
        fail(ExitCode.FAILED, f"cannot restore: {exc}")
    if rep.is_listed(state, entry.address):
        warn(f"{entry.address} is still listed at the last check")
    _reconfigure(ts, settings, state)
    now = time.time()
    rep.log_events(state, [change], now)
    _save(settings, state)
    _announce([change], settings, now)
    _metrics(settings, state)


@click.group()
def reputation() -> None:
    """Blocklist monitoring of the source addresses and domains."""


@reputation.command("check")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the log lines here instead of standard error.")
@click.pass_obj
def reputation_check(obj: Context, as_json: bool, log_file: Path | None) -> None:
    """Look up every pool address in the DNSBLs (settings reputation.dnsbls) and every relay,
    signing and HELO domain in the domain lists, record the state, and with
    `failover: auto` move the tenants of a listed active address to a standby.

    State changes (IP_LISTED, IP_DELISTED, DOMAIN_LISTED, DOMAIN_DELISTED, IP_FAILOVER) are
    logged, printed, kept in the state file (the tracker copies them into the event store:
    `relayctl events --operator`), counted in the metrics file, POSTed to
    reputation.alert_webhook and mailed to notify.address if set. A lookup that
    fails or that the list refuses is a warning and keeps the last known state.
    Exit 1 if anything is listed now."""
    logs.setup(obj.load_settings().log_level, str(log_file) if log_file else None)
    code = run_check(obj, as_json)
    if code:
        raise SystemExit(int(ExitCode.FAILED))


@reputation.command("watch")
@click.option("--interval", type=click.FloatRange(min=1), default=None, help="Seconds between checks (default: settings reputation.interval).")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many checks.")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Log here instead of stderr.")
@click.pass_obj
def reputation_watch(obj: Context, interval: float | None, count: int | None, log_file: Path | None) -> None:
    """`reputation check` every --interval seconds, in the foreground (systemd unit
    relay-reputation). A listing is not an error here; SIGTERM stops it."""
    import signal

    settings = obj.load_settings()
    logs.setup(settings.log_level, str(log_file) if log_file else None)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    wait = interval or settings.reputation.interval
    n = 0
    while not stop["now"]:
        run_check(obj, as_json=False)
        n += 1
        if count is not None and n >= count:
            break
        deadline = time.monotonic() + wait
        while not stop["now"] and time.monotonic() < deadline:
            time.sleep(min(0.5, wait))


COMMANDS: tuple[click.Command, ...] = (ip, reputation)
