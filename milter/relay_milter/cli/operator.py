"""Helpers of `relayctl check` and `relayctl apply`: what the configuration points to, and
queued mail that still carries an old next hop (see postfix/preflight.py, postfix/reroute.py)."""

from __future__ import annotations

import click

from relay_milter.cli.errors import warn
from relay_milter.config import Settings, TenantSet
from relay_milter.postfix import preflight


def run_preflight(
    tenants: TenantSet, settings: Settings, strict: bool = False, dns_for: set[str] | None = None
) -> preflight.Preflight:
    """Run the checks and print every finding that is not plain ok (warnings and errors on stderr).
    ``dns_for``: DNS lookups for these tenants only (preflight.run)."""
    pf = preflight.run(tenants, settings, strict=strict, dns_for=dns_for)
    for f in pf.findings:
        if f.level == "ok":
            click.echo(f"ok: {f.subject}: {f.text}")
        else:
            click.echo(f"{'check failed' if f.level == 'error' else 'warning'}: {f.subject}: {f.text}", err=True)
    return pf


def reroute_after_apply(settings: Settings, tenants: TenantSet, do_reroute: bool) -> None:
    """Report queued messages whose stored next hop is not their tenant's route any more,
    and re-route the deferred ones (postsuper -r), or print the one command that does."""
    from relay_milter.postfix import queue as ops
    from relay_milter.postfix import reroute

    try:
        messages = ops.read_queue(settings.config_directory)
        found = reroute.scan(settings.config_directory, messages, tenants)
    except ops.OpsError as exc:
        warn(f"could not look for queued mail with an old next hop: {exc}")
        return
    if not found.stale:
        return
    for tenant, rows in sorted(found.by_tenant().items()):
        olds = sorted({r.stored.partition(":")[2] for r in rows})
        now = rows[0].current.partition(":")[2] if rows[0].current else None
        where = ", ".join(f"{sum(1 for r in rows if r.queue == q)} {q}" for q in ("deferred", "active", "hold", "incoming") if any(r.queue == q for r in rows))
        if now is None:
            click.echo(f"queued: {len(rows)} message(s) ({where}) of tenant {tenant}, which no longer exists; "
                       f"they wait until the tenant returns or an operator removes them (postsuper -d)", err=True)
            continue
        click.echo(f"queued: {len(rows)} message(s) of tenant {tenant} ({where}) still carry the old next hop "
                   f"{', '.join(olds)} (now {now})")
        if not do_reroute:
            click.echo(f"  to re-route them: relayctl requeue --reroute --tenant {tenant} --yes")
    if not do_reroute:
        return
    ids = found.reroutable()
    if ids:
        try:
            result = reroute.reroute(settings.config_directory, ids)
        except ops.OpsError as exc:
            warn(f"re-routing failed: {exc}")
            return
        click.echo(f"re-routed {result.changed} deferred message(s) through the new routes (postsuper -r)")
        for w in result.warnings:
            warn(w)
    busy = [s for s in found.stale if s.queue != "deferred" and s.current]
    if busy:
        warn(f"{len(busy)} message(s) in the active, hold or incoming queue were left alone; "
             "if they end up deferred: relayctl requeue --reroute --tenant TENANT")


def check_rendered(settings: Settings, files: dict[str, str]) -> bool:
    """Checks that need the rendered main.cf (postfix_extra); prints errors; True if none."""
    from relay_milter.postfix.render import EXTRA_MARKER

    pf = preflight.Preflight()
    preflight.check_postfix_extra(settings, files["main.cf"], EXTRA_MARKER, pf)
    for f in pf.errors:
        click.echo(f"check failed: {f.subject}: {f.text}", err=True)
    return not pf.errors
