"""relayctl events | webhooks replay | prune | backup: the event store's history, from a
cursor, re-sent, trimmed and saved.

Exit codes are those of ``cli.errors.ExitCode`` (``relayctl --help``).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click

from relay_milter.cli.context import Context, open_store
from relay_milter.cli.errors import ExitCode, fail
from relay_milter.cli.formats import parse_when, trace_table


@click.command()
@click.option("--tenant", default=None, metavar="ID", help="The tenant whose events to print.")
@click.option("--operator", is_flag=True,
              help="Print the operator events instead (IP_LISTED, IP_DELISTED, DOMAIN_LISTED, DOMAIN_DELISTED, IP_FAILOVER, IP_RESTORED).")
@click.option("--after", default=0, show_default=True, type=click.IntRange(min=0), metavar="SEQ",
              help="Print events with a sequence number above SEQ (0: from the first).")
@click.option("--since", default=None, metavar="WHEN", help="--operator: events at or after WHEN (ISO time, or an age like 24h).")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(min=1, max=100_000), help="At most this many events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (JSON Lines), with seq, for scripts.")
@click.pass_obj
def events(obj: Context, tenant: str | None, operator: bool, after: int, since: str | None, limit: int, as_json: bool) -> None:
    """Print a tenant's events from a cursor, in sequence order (--tenant), or the
    operator events (--operator).

    Every event of a tenant has a sequence number (seq), 1, 2, 3, ... in the order
    the tracker recorded them, on every node sharing the store. A receiver that was
    down pulls what it missed with --after set to the last seq it processed, then
    repeats with the last seq printed until nothing comes back.

    Operator events are the reputation state changes of every node sharing the store
    (`relayctl reputation check`, `relayctl ip failover|restore`), oldest first, the
    last --limit of them: time (UTC), node, event, subject, detail and fields such as
    tenants= and to= (who moved where). The tracker copies them from the reputation
    state file within seconds.

    \b
    Exit codes: 0 events printed, 1 none, 2 neither or both of --tenant and --operator,
    3 configuration error, 4 event store unavailable.
    """
    if (tenant is None) == (not operator):
        raise click.UsageError("give either --tenant ID or --operator")
    _, settings = obj.load()
    if operator:
        _operator_events(settings, since, limit, as_json)
        return
    if since is not None:
        raise click.UsageError("--since goes with --operator (tenant events: --after SEQ)")
    store = open_store(settings)
    try:
        found = store.events_after(tenant, after, limit)
    except Exception as exc:
        fail(ExitCode.UNAVAILABLE, f"event store: {exc}")
    finally:
        store.close()
    if as_json:
        for ev in found:
            click.echo(json.dumps(ev.to_json(), separators=(",", ":"), ensure_ascii=False))
    else:
        for seq, line in zip(["SEQ", *(str(e.seq) for e in found)], trace_table(found) if found else []):
            click.echo(f"{seq:>8}  {line}")
    if not found:
        fail(ExitCode.FAILED, f"no events of tenant {tenant} after seq {after}")


def _operator_events(settings, since: str | None, limit: int, as_json: bool) -> None:
    try:
        start = parse_when(since, time.time()) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    store = open_store(settings)
    try:
        found = store.operator_events(since=start, limit=limit)
    except Exception as exc:
        fail(ExitCode.UNAVAILABLE, f"event store: {exc}")
    finally:
        store.close()
    if as_json:
        for e in found:
            click.echo(json.dumps(e, separators=(",", ":"), ensure_ascii=False))
    else:
        for e in found:
            extra = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("id", "at", "node", "event", "subject", "detail"))
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["at"]))
            click.echo(f"{when}  {e['node']:<16} {e['event']:<15} {e['subject']}: {e['detail']}" + (f"  {extra}" if extra else ""))
    if not found:
        fail(ExitCode.FAILED, "no operator events" + (f" since {since}" if since else ""))


@click.group()
def webhooks() -> None:
    """Webhook operations (replay)."""


@webhooks.command("replay")
@click.option("--tenant", required=True, metavar="ID", help="The tenant whose events to send again.")
@click.option("--from", "start", required=True, metavar="SEQ|WHEN",
              help="A sequence number (events from it on), or a time: a duration back (24h, 7d) or ISO 8601.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (asked only on a terminal).")
@click.pass_obj
def replay(obj: Context, tenant: str, start: str, yes: bool) -> None:
    """Send a tenant's events again, from a sequence number or a time.

    The events are queued in the webhook outbox behind the tenant's pending rows and
    sent by `relayctl track` like any other, in order and signed as usual. Each is
    marked as a replay: "replay": true in the body's meta and the header
    X-Relay-Replay: 1. X-Relay-Event-Id is the event's own id (a receiver that
    deduplicates on it drops what it already has); webhook-id is new.

    \b
    Exit codes: 0 queued, 1 no event to replay, 2 bad --from, 3 configuration
    error or unknown tenant, 4 event store unavailable.
    """
    tenants, settings = obj.load()
    if tenants.by_id(tenant) is None:
        fail(ExitCode.CONFIG, f"no tenant {tenant!r} in {obj.tenants_dir}")
    from relay_milter.tracking import webhooks as wh

    store = open_store(settings)
    try:
        if start.isdigit():
            after = max(int(start) - 1, 0)
        else:
            try:
                since = parse_when(start, time.time())
            except ValueError as exc:
                fail(ExitCode.USAGE, f"--from: {exc}")
            first = store.first_seq_since(tenant, since)
            if first is None:
                fail(ExitCode.FAILED, f"no events of tenant {tenant} since {start}")
            after = first - 1
        pending = store.events_after(tenant, after, 1)
        if not pending:
            fail(ExitCode.FAILED, f"no events of tenant {tenant} from seq {after + 1}")
        if not yes and click.get_text_stream("stdin").isatty():
            click.confirm(f"replay tenant {tenant}'s events from seq {after + 1}?", abort=True, err=True)
        queued = wh.replay(store, tenant, after)
    except SystemExit:
        raise
    except click.exceptions.Abort:
        raise
    except Exception as exc:
        fail(ExitCode.UNAVAILABLE, f"event store: {exc}")
    finally:
        store.close()
    click.echo(f"queued {queued} event(s) of tenant {tenant} for replay, from seq {after + 1}")


@click.command()
@click.option("--older-than", "older_than", default=None, metavar="AGE",
              help="Remove what is older than AGE (90d, 12w, 720h). Default: settings tracking.retention (90d).")
@click.option("--batch", default=5000, show_default=True, type=click.IntRange(min=1, max=1_000_000), help="Rows per transaction.")
@click.option("--dry-run", is_flag=True, help="Say what the cut-off is; delete nothing.")
@click.pass_obj
def prune(obj: Context, older_than: str | None, batch: int, dry_run: bool) -> None:
    """Remove old events and delivered webhook rows from the event store.

    Deletes, in batches of --batch rows per transaction (the tracker keeps running):
    webhook outbox rows delivered before the cut-off, then events recorded before
    it. Never removed: an undelivered webhook row or its event, the tracker's state,
    and any event of a message still in the queue. The counters behind
    relay_events_total are separate rows and never go down. The Ansible role runs
    this daily (relay-prune.timer).

    \b
    Exit codes: 0 done (also when nothing was old enough), 2 bad --older-than,
    3 configuration error, 4 event store unavailable.
    """
    _, settings = obj.load()
    age = older_than or settings.tracking.retention
    if not _AGE.match(age):
        fail(ExitCode.USAGE, f"--older-than: {age!r} is not an age like 90d, 12w or 720h")
    cutoff = parse_when(age, time.time())
    from relay_milter.tracking.events import iso

    if dry_run:
        click.echo(f"dry run: would remove events and delivered webhook rows from before {iso(cutoff)}")
        return
    store = open_store(settings)
    try:
        events_n, outbox_n = store.prune(cutoff, batch)
    except Exception as exc:
        fail(ExitCode.UNAVAILABLE, f"event store: {exc}")
    finally:
        store.close()
    click.echo(f"removed {events_n} event(s) and {outbox_n} delivered webhook row(s) from before {iso(cutoff)}")


_AGE = re.compile(r"^[1-9]\d*[hdw]$")


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@click.pass_obj
def backup(obj: Context, file: Path, force: bool) -> None:
    """Copy the SQLite event store to FILE, consistently, while the tracker runs.

    Uses SQLite's online backup API (a plain `cp` of a database in WAL mode can
    miss committed data or be corrupt), then checks the copy with PRAGMA
    integrity_check. FILE is a self-contained database: restore it by stopping
    `relayctl track`, moving FILE to the events_dsn path (and removing any
    -wal/-shm files next to it), and starting the tracker again.

    A PostgreSQL store is backed up with pg_dump (docs/tracking.md, "Backup").

    \b
    Exit codes: 0 written, 1 FILE exists (use --force), 3 the store is PostgreSQL
    or configuration error, 4 event store unavailable or FILE cannot be written.
    """
    _, settings = obj.load()
    if file.exists() and not force:
        fail(ExitCode.FAILED, f"{file} exists; use --force to replace it")
    store = open_store(settings)
    try:
        if store.dialect != "sqlite":
            fail(ExitCode.CONFIG, f"{store.safe_dsn}: relayctl backup copies an SQLite store; back up PostgreSQL with pg_dump (docs/tracking.md)")
        tmp = file.with_name(f".{file.name}.partial")
        tmp.unlink(missing_ok=True)
        try:
            store.backup(tmp)
            tmp.replace(file)
        except Exception as exc:
            fail(ExitCode.UNAVAILABLE, f"backup to {file} failed: {exc}")
    finally:
        store.close()
    click.echo(f"wrote {file}")


COMMANDS: tuple[click.Command, ...] = (events, webhooks, prune, backup)
