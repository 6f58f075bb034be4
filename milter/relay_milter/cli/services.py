"""relayctl milter | track: the two long-running services (foreground; systemd runs them)."""

from __future__ import annotations

import functools
import logging
import signal
import threading
from pathlib import Path

import click

from relay_milter.cli.context import Context, open_store
from relay_milter.config import Settings, TenantSet

_LOG_FILE = click.option(
    "--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Log here instead of stderr."
)


@click.command("milter")
@_LOG_FILE
@click.pass_obj
def run_milter(obj: Context, log_file: Path | None) -> None:
    """Run the verifying, rewriting, routing milter (foreground; stop with SIGTERM).

    Serves the tenant set `relayctl apply` last checked and activated
    (<config_directory>/relay/tenants.applied.json), and switches to a newly applied
    set within a second, without a restart. Editing a tenant file alone changes
    nothing live: the edit is logged (event=reload_pending, or event=reload_failed
    when invalid) until `relayctl apply` has checked it. Before the first apply it
    serves the tenant files.
    """
    from relay_milter import logs
    from relay_milter.milter.adapter import serve
    from relay_milter.milter.backpressure import start_queue_watch
    from relay_milter.milter.reloader import ReloadingPolicy

    settings = obj.load_settings()  # exits 3 on invalid settings
    logs.setup(settings.log_level, str(log_file) if log_file else None)
    source = ReloadingPolicy(obj.tenants_dir, settings)  # a ConfigError exits 3 (cli.errors.reported)
    logging.getLogger("relay.milter").info(
        "NOQUEUE: event=config tenants=%s source=%s", ",".join(t.id for t in source.current().tenants), source.source
    )
    source.watch()
    start_queue_watch(source, settings)  # backpressure: tenant limits.max_queued / max_queue_age
    serve(source, settings.libmilter_socket(), settings.milter_socket_group, settings.milter_socket_mode)


@click.command("track")
@click.option("--once", is_flag=True, help="Process what the logs hold now, then exit (cron, tests).")
@_LOG_FILE
@click.option("--from-start", is_flag=True, help="Without a checkpoint, read the logs from their start (default: from their end).")
@click.option("--no-webhooks", is_flag=True, help="Record events but do not send webhooks from this process.")
@click.pass_obj
def run_tracker(obj: Context, once: bool, log_file: Path | None, from_start: bool, no_webhooks: bool) -> None:
    """Follow the Postfix and milter logs and record delivery events (foreground).

    Reads settings maillog_file and tracking.milter_log_file, resumes from the checkpoint
    in the event store (tracking.events_dsn, or RELAY_EVENTS_DSN), writes RECEIVED,
    RELAYED, DEFERRED, BOUNCED and REJECTED events, and pushes them to the tenants'
    webhooks through the store's outbox. SIGTERM finishes the current batch and exits 0.
    Tenant changes need a restart (the Ansible role does it). With a broken tenant file
    it warns and uses the tenant set `relayctl apply` last activated.
    """
    from relay_milter import logs
    from relay_milter.config import load_secrets
    from relay_milter.tracking.service import main_loop

    tenants, settings = obj.load(last_good=True)
    secrets = load_secrets(settings.secrets_file, tenants, webhooks_only=True)  # a ConfigError exits 3
    logs.setup(settings.log_level, str(log_file) if log_file else None)
    log = logging.getLogger("relay.tracker")

    store = open_store(settings, create=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # until main_loop installs its own
        signal.signal(sig, lambda *_: stop.set())
    webhooks = not no_webhooks and any(t.webhook for t in tenants)
    workers = []
    if webhooks:
        workers.append(functools.partial(_webhook_loop, settings, tenants, secrets))
    if settings.tracking.metrics_file:
        workers.append(functools.partial(_metrics_loop, settings, tenants))

    def announce() -> None:
        logs.event(log, logging.INFO, None, "track_start", node=settings.node, maillog=settings.maillog_file,
                   milter_log=settings.tracking.milter_log_file, store=store.safe_dsn)

    try:
        main_loop(settings, tenants, store, stop, once=once, from_start=from_start, workers=workers, on_start=announce)
        if once:
            if webhooks:
                _send_webhooks_once(settings, tenants, secrets)
            _write_metrics(settings, tenants, store)
    finally:  # a ConfigError from main_loop still exits 3 (cli.errors.reported)
        store.close()
        logs.event(log, logging.INFO, None, "track_stop")


def _webhook_loop(settings: Settings, tenants: TenantSet, secrets, stop: threading.Event) -> None:
    """Webhooks go out from their own thread with their own store connection, so a slow
    endpoint never holds up event recording."""
    from relay_milter.tracking.webhooks import WebhookSender

    store = open_store(settings, create=True)
    try:
        WebhookSender(store, tenants, secrets, settings.tracking).run(stop)
    finally:
        store.close()


def _send_webhooks_once(settings: Settings, tenants: TenantSet, secrets) -> None:
    from relay_milter.tracking.webhooks import WebhookSender

    store = open_store(settings, create=True)
    try:
        WebhookSender(store, tenants, secrets, settings.tracking).run_once()
    finally:
        store.close()


def _metrics_loop(settings: Settings, tenants: TenantSet, stop: threading.Event) -> None:
    store = open_store(settings, create=True)
    try:
        while True:
            _write_metrics(settings, tenants, store)
            if stop.wait(settings.tracking.metrics_interval):
                break
    finally:
        store.close()


def _write_metrics(settings: Settings, tenants: TenantSet, store) -> None:
    """Rewrite the node-exporter textfile: events, queue per tenant, webhook backlog, mail
    waiting on a smarthost name that does not resolve."""
    if not settings.tracking.metrics_file:
        return
    import time

    from relay_milter import logs
    from relay_milter.postfix import queue as ops
    from relay_milter.postfix.reroute import unresolved_metric
    from relay_milter.tracking import metrics as prom

    log = logging.getLogger("relay.tracker")
    try:
        try:
            queued = ops.attribute(ops.read_queue(settings.config_directory), tenants, store, settings.node)
            queue = ops.queue_summary(queued, time.time())
        except ops.OpsError as exc:  # Postfix down: the other series are still worth writing
            logs.event(log, logging.WARNING, None, "metrics_queue_unavailable", error=str(exc))
            queue = None
        snap = prom.collect([t.id for t in tenants], store, queue, tracker_last_run=time.time())
        extra = unresolved_metric(queued if queue is not None else None, [t.id for t in tenants])
        prom.write_textfile(settings.tracking.metrics_file, prom.render(snap) + extra)
    except Exception:  # metrics must never stop tracking
        log.exception("NOQUEUE: event=metrics_failed")


COMMANDS: tuple[click.Command, ...] = (run_milter, run_tracker)
