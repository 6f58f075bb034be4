"""relayctl trace | queue | stats | requeue | hold | release | metrics: delivery tracking
and per-tenant queue operations for operators.

Exit codes are those of ``cli.errors.ExitCode`` (``relayctl --help``); each command's help
says which it uses and what code 1 means for it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from relay_milter import defaults
from relay_milter.cli.context import Context, open_store
from relay_milter.cli.errors import ExitCode, fail, warn
from relay_milter.cli.formats import human_age, parse_when, trace_table  # noqa: F401 - re-exported
from relay_milter.postfix import queue as ops
from relay_milter.tracking.events import Kind, iso

if TYPE_CHECKING:
    from relay_milter.config import Settings, TenantSet



# -- helpers (pure, tested in test_queue.py) ------------------------------------------------


def queue_table(rows: list[ops.TenantQueue]) -> list[str]:
    """Counts per queue per tenant, each followed by its top deferral reasons."""
    out = [f"{'TENANT':<16} {'ACTIVE':>6} {'DEFERRED':>8} {'HOLD':>6} {'INCOMING':>8} {'MAILDROP':>8} {'TOTAL':>6}  OLDEST  OLDEST DEFERRED"]
    for r in rows:
        c = r.counts
        out.append(
            f"{r.tenant:<16} {c['active']:>6} {c['deferred']:>8} {c['hold']:>6} {c['incoming']:>8} "
            f"{c['maildrop']:>8} {r.total:>6}  {human_age(r.oldest_age):<6}  {human_age(r.oldest_deferred_age)}"
        )
        for reason, n in r.reasons:
            out.append(f"  {n:>6} x {reason}")
    return out


# -- store and queue access ----------------------------------------------------------------


def _check_tenant(tenants: TenantSet, tenant: str | None) -> None:
    if tenant is None or tenant == ops.UNATTRIBUTED or tenants.by_id(tenant) is not None:
        return
    known = ", ".join(t.id for t in tenants) or "none"
    fail(ExitCode.CONFIG, f"unknown tenant {tenant!r} (configured: {known}; '-' selects unattributed messages)")


def _queue(settings: Settings, tenants: TenantSet) -> list[ops.QueuedMessage]:
    """The attributed queue; the store helps when it is there, and is not required."""
    try:
        messages = ops.read_queue(settings.config_directory)
    except ops.OpsError as exc:
        fail(ExitCode.UNAVAILABLE, str(exc))
    store = open_store(settings, required=False) if messages else None
    try:
        return ops.attribute(messages, tenants, store, settings.node)
    except ops.OpsError as exc:
        warn(f"{exc}; attributing by sender domain")
        return ops.attribute(messages, tenants)
    finally:
        if store is not None:
            store.close()


# -- commands ------------------------------------------------------------------------------


@click.command()
@click.argument("key")
@click.option("--since", default=None, metavar="WHEN", help="Only events at or after WHEN: a duration back (24h, 7d) or an ISO 8601 time.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Match KEY against its most recent LIMIT events only (a busy recipient).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of events (times in ISO 8601 UTC).")
@click.pass_obj
def trace(obj: Context, key: str, since: str | None, limit: int | None, as_json: bool) -> None:
    """Show every recorded event of the messages matching KEY.

    KEY is a Message-ID (with or without <>), a Postfix queue id, a recipient
    address or the platform's upstream id (X-Upstream-ID). Events come from the event store that `relayctl track` fills; one
    line per recipient per attempt, oldest first: time (UTC), tenant, queue id,
    event, recipient, relay, SMTP code and DSN, TLS protocol and cipher, reason.

    \b
    Exit codes: 0 found, 1 nothing recorded for KEY, 3 configuration error,
    4 event store unavailable.
    """
    _, settings = obj.load(last_good=True)
    try:
        t0 = parse_when(since, time.time()) if since is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    store = open_store(settings)
    try:
        events = store.trace(key, since=t0, limit=limit)
    except Exception as exc:
        fail(ExitCode.UNAVAILABLE, f"event store: {exc}")
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([ev.to_json() for ev in events], indent=2))
    else:
        for line in trace_table(events) if events else []:
            click.echo(line)
    if not events:
        fail(ExitCode.FAILED, f"nothing recorded for {key}")


@click.command()
@click.option("--tenant", default=None, metavar="ID", help="Only this tenant ('-': messages no tenant could be attributed to).")
@click.option("--json", "as_json", is_flag=True, help="JSON: one object per tenant with counts, ages and reasons.")
@click.pass_obj
def queue(obj: Context, tenant: str | None, as_json: bool) -> None:
    """Show the Postfix queue per tenant: counts per queue, ages, top deferral reasons.

    Reads `postqueue -c CONFIG_DIRECTORY -j` of this relay's instance. A message
    belongs to the tenant the tracker recorded for its queue id; failing that,
    to the one tenant whose sender domains contain the envelope sender's domain
    (for bounces: the recipients' domain); otherwise to '-'. Reasons are
    Postfix's delay reasons with addresses, ids and long numbers folded, counted
    once per message. Ages are since arrival.

    \b
    Exit codes: 0 ok (also for an empty queue), 3 configuration error or
    unknown tenant, 4 Postfix unavailable.
    """
    tenants, settings = obj.load(last_good=True)
    _check_tenant(tenants, tenant)
    messages = _queue(settings, tenants)
    rows = ops.queue_summary(messages, time.time())
    if tenant is not None:
        rows = [r for r in rows if r.tenant == tenant]
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=2))
        return
    if not rows:
        click.echo("no messages queued" + (f" for tenant {tenant}" if tenant else ""))
        return
    for line in queue_table(rows):
        click.echo(line)


@click.command()
@click.option("--since", default="24h", show_default=True, metavar="WHEN", help="Start: a duration back from now (15m, 24h, 7d) or an ISO 8601 time.")
@click.option("--until", "until_", default="now", show_default=True, metavar="WHEN", help="End, in the same forms as --since.")
@click.option("--tenant", default=None, metavar="ID", help="Only this tenant.")
@click.option("--json", "as_json", is_flag=True, help="JSON: window and per-tenant counts.")
@click.pass_obj
def stats(obj: Context, since: str, until_: str, tenant: str | None, as_json: bool) -> None:
    """Count events per tenant and kind in a time window, with the webhook backlog.

    The window is [--since, --until) by event time. Times without a zone are
    UTC. WEBHOOK BACKLOG is the tenant's notifications not yet delivered now
    (not limited to the window): a growing number means its endpoint fails.

    \b
    Exit codes: 0 ok (also when nothing happened), 2 bad time, 3 configuration
    error or unknown tenant, 4 event store unavailable.
    """
    tenants, settings = obj.load(last_good=True)
    _check_tenant(tenants, tenant)
    now = time.time()
    try:
        t0, t1 = parse_when(since, now), parse_when(until_, now)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if t0 >= t1:
        raise click.BadParameter(f"--since ({iso(t0)}) must be before --until ({iso(t1)})")
    store = open_store(settings)
    try:
        counts = store.stats(t0, t1, tenant)
        backlog = store.outbox_backlog()
    except Exception as exc:
        fail(ExitCode.UNAVAILABLE, f"event store: {exc}")
    finally:
        store.close()
    # Every configured tenant gets a row (0 if quiet) up to defaults.METRICS_ZERO_FILL_TENANTS;
    # past that, only tenants with events or a backlog (10,000 rows of zeros help nobody).
    quiet = {t.id for t in tenants} if len(tenants) <= defaults.METRICS_ZERO_FILL_TENANTS else set()
    busy = {t for t, n in backlog.items() if n} if not quiet else set()
    names = [tenant] if tenant else sorted(quiet | set(counts) | busy)
    table = {
        t: {k.value: int(counts.get(t, {}).get(k.value, 0)) for k in Kind} | {"webhook_backlog": int(backlog.get(t, 0))}
        for t in names
    }
    if as_json:
        click.echo(json.dumps({"since": iso(t0), "until": iso(t1), "tenants": table}, indent=2))
        return
    click.echo(f"events from {iso(t0)} to {iso(t1)}")
    kinds = [k.value for k in Kind]
    click.echo(f"{'TENANT':<16} " + " ".join(f"{k:>9}" for k in kinds) + "  WEBHOOK BACKLOG")
    for t, row in table.items():
        click.echo(f"{t:<16} " + " ".join(f"{row[k]:>9}" for k in kinds) + f"  {row['webhook_backlog']:>15}")


# requeue / hold / release ------------------------------------------------------------------

_DEFAULT_QUEUES = {
    "requeue": ("deferred",),
    "hold": ("incoming", "active", "deferred"),  # postsuper -h's own default
    "release": ("hold",),
}
_PAST = {"requeue": "requeued", "hold": "held", "release": "released"}
PROGRESS_THRESHOLD = 1000  # below that a progress bar is noise


def _change(obj: Context, action: str, tenant: str, queue_name: str | None, yes: bool, dry_run: bool, as_json: bool, reroute: bool = False) -> None:
    tenants, settings = obj.load(last_good=True)
    _check_tenant(tenants, tenant)
    if action == "release" and queue_name not in (None, "hold"):
        raise click.BadParameter("only messages in the hold queue can be released", param_hint="--queue")
    if action == "requeue" and queue_name not in (None, "deferred"):
        raise click.BadParameter(
            "only deferred messages can be retried (release held ones first)", param_hint="--queue"
        )
    queues = (queue_name,) if queue_name else _DEFAULT_QUEUES[action]
    ids = ops.select(_queue(settings, tenants), tenant, queues)
    summary: dict[str, Any] = {
        "action": action, "tenant": tenant, "queues": list(queues), "dry_run": dry_run,
        "selected": len(ids), "changed": 0, "queue_ids": ids,
    }
    where = "/".join(queues)
    if not ids:
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        fail(ExitCode.FAILED, f"no messages of tenant {tenant} in the {where} queue")
    if dry_run:
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        else:
            for qid in ids:
                click.echo(qid)
            click.echo(f"dry run: would have {_PAST[action]} {len(ids)} message(s) of tenant {tenant} ({where})", err=True)
        return
    if not yes and sys.stdin.isatty():
        click.confirm(f"{action} {len(ids)} message(s) of tenant {tenant} ({where})?", abort=True, err=True)
    result = _apply_change(settings, "reroute" if reroute else action, ids, queues)
    summary["changed"] = result.changed
    summary["warnings"] = result.warnings
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        gone = result.requested - result.changed
        note = f" ({gone} had left the {where} queue meanwhile)" if gone else ""
        click.echo(f"{_PAST[action]} {result.changed} message(s) of tenant {tenant}{note}")
    if result.changed == 0:
        sys.exit(int(ExitCode.FAILED))  # the summary above says why


def _apply_change(settings: Settings, action: str, ids: list[str], queues: tuple[str, ...]) -> ops.QueueChange:
    def run(progress: Any) -> ops.QueueChange:
        if action == "reroute":  # postsuper -r: through cleanup_requeue and today's route table
            from relay_milter.postfix.reroute import reroute

            result = reroute(settings.config_directory, ids)
            if progress:
                progress(len(ids))
            return result
        if action == "requeue":
            return ops.schedule_retry(settings.config_directory, ids, progress)
        return ops.apply_postsuper(settings.config_directory, action, ids, progress, queues=queues)

    try:
        if len(ids) < PROGRESS_THRESHOLD:
            return run(None)
        with click.progressbar(length=len(ids), label=action, file=sys.stderr, show_pos=True) as bar:
            return run(bar.update)
    except ops.OpsError as exc:
        fail(ExitCode.UNAVAILABLE, str(exc))


def _change_command(action: str, summary: str, details: str) -> click.Command:
    """requeue, hold and release share options and flow; only the postsuper action differs."""

    @click.command(action, help=f"{summary}\n\n{details}\n\n{_CHANGE_COMMON}")
    @click.option("--tenant", required=True, metavar="ID", help="The tenant whose messages to change ('-': unattributed ones).")
    @click.option(
        "--queue", "queue_name", type=click.Choice(ops.QUEUES), default=None,
        help=f"Only messages in this queue (default: {'/'.join(_DEFAULT_QUEUES[action])}).",
    )
    @click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (asked only on a terminal).")
    @click.option("--dry-run", is_flag=True, help="List the queue ids that would change; change nothing.")
    @click.option("--json", "as_json", is_flag=True, help="JSON summary (with the queue ids) instead of text.")
    @click.pass_obj
    def command(obj: Context, tenant: str, queue_name: str | None, yes: bool, dry_run: bool, as_json: bool, reroute: bool = False) -> None:
        _change(obj, action, tenant, queue_name, yes, dry_run, as_json, reroute)

    if action == "requeue":
        command = click.option(
            "--reroute", is_flag=True,
            help="Route the messages again from today's tenant files (postsuper -r), e.g. after a smarthost change.",
        )(command)
    return command


_CHANGE_COMMON = (
    "Messages are selected the way `relayctl queue` attributes them, then handed "
    "to Postfix (a progress bar shows on a terminal for large selections). Only "
    "messages still in the selected queue are changed. On a terminal you are "
    "asked first unless --yes.\n\n"
    "\b\nExit codes: 0 done, 1 no message matched (or none was changed),\n"
    "2 usage error, 3 configuration error or unknown tenant, 4 Postfix unavailable."
)

requeue = _change_command(
    "requeue",
    "Retry a tenant's deferred messages now.",
    "Runs `postqueue -i QUEUE_ID` for each message (about 5 ms each): the queue "
    "file moves to the incoming queue unchanged, keeping its queue id and its "
    "tenant route. (`postsuper -r` works too: it re-runs cleanup under a new queue id, "
    "and the route marker the milter added routes the message again.)\n\n"
    "The next hop (the tenant's smarthost) is stored in each queue file when the message "
    "is accepted, and a retry keeps it. After a smarthost change use --reroute: it runs "
    "`postsuper -r` on the selected messages, which sends them through cleanup again so "
    "today's route table picks the new smarthost (each message gets a new queue id and "
    "is moved, not copied), then wakes pickup. `relayctl apply` does this by itself for "
    "deferred mail whose stored next hop is out of date.",
)
hold = _change_command(
    "hold",
    "Put a tenant's messages on hold: no delivery attempts until released.",
    "Runs `postsuper -h -` with the queue ids on standard input, in chunks, for "
    "messages in the incoming, active and deferred queues (or --queue). Held mail still expires after maximal_queue_lifetime counted "
    "from arrival; release it before that.",
)
release = _change_command(
    "release",
    "Release a tenant's held messages: they are delivered again.",
    "Runs `postsuper -H -` on messages in the hold queue; they move to the deferred "
    "queue and are retried on the next queue run (`postqueue -f` to hurry).",
)


@click.command()
@click.option(
    "--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
    help="Write this textfile atomically (mode 0644). Default: settings tracking.metrics_file, else standard output. '-': standard output.",
)
@click.pass_obj
def metrics(obj: Context, out: Path | None) -> None:
    """Write the Prometheus metrics once, for node-exporter's textfile collector.

    \b
    relay_events_total{node,tenant,event}        events recorded by this node (counter)
    relay_delivery_delay_seconds{node,tenant}    delay of relayed deliveries (histogram)
    relay_queue_messages{tenant,queue}           messages per Postfix queue
    relay_queue_oldest_deferred_seconds{tenant}  oldest deferred message age
    relay_webhook_backlog{tenant}                undelivered webhook notifications
    relay_smarthost_unresolved_messages{tenant}  deferred: smarthost name does not resolve

    `relayctl track` rewrites the same file every tracking.metrics_interval
    seconds and adds relay_tracker_last_run_timestamp_seconds; this one-shot
    command does not know when the tracker last ran and leaves that series out.
    The file is replaced by rename, so node-exporter never reads half of it.

    \b
    Exit codes: 0 written, 3 configuration error, 4 event store or Postfix
    unavailable, or the file cannot be written (the old file stays).
    """
    from relay_milter.tracking import metrics as prom

    tenants, settings = obj.load(last_good=True)
    messages = _queue(settings, tenants)
    summary = ops.queue_summary(messages, time.time())
    store = open_store(settings)
    try:
        snap = prom.collect([t.id for t in tenants], store, summary, node=settings.node,
                            certificates=[settings.tls_cert_file] if settings.tls_cert_file else ())
    except Exception as exc:
        fail(ExitCode.UNAVAILABLE, f"event store: {exc}")
    finally:
        store.close()
    from relay_milter.postfix.reroute import unresolved_metric

    text = prom.render(snap) + unresolved_metric(messages, [t.id for t in tenants])
    target = out if out is not None else settings.tracking.metrics_file
    if target is None or str(target) == "-":
        click.echo(text, nl=False)
        return
    try:
        prom.write_textfile(target, text)
    except OSError as exc:
        fail(ExitCode.UNAVAILABLE, f"cannot write {target}: {exc}")
    click.echo(f"wrote {target}", err=True)


COMMANDS: tuple[click.Command, ...] = (trace, queue, stats, requeue, hold, release, metrics)
