"""relayctl milter | track | web: the long-running services (foreground; systemd runs them)."""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import click

from relay_milter.cli.context import Context, open_store
from relay_milter.config import Settings, TenantSet

_LOG_FILE = click.option(
    "--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Log here instead of stderr."
)


@click.command("milter")
@_LOG_FILE
@click.option(
    "--workers", type=click.IntRange(1, 256), default=None, metavar="N",
    help="Worker processes serving the socket (default: settings milter_workers, else one per CPU).",
)
@click.pass_obj
def run_milter(obj: Context, log_file: Path | None, workers: int | None) -> None:
    """Run the verifying, rewriting, routing milter (foreground; stop with SIGTERM).

    N worker processes (--workers, settings milter_workers, default one per CPU) serve
    the one milter socket; this process binds it, forks them and supervises: a worker
    that dies is replaced (Postfix tempfails only the sessions it was serving), and
    SIGTERM stops every worker. Log lines name the process (relay.milter[PID]).
    Exits 4 if a worker's exit removed the socket file (a restart recreates it).

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
    from relay_milter.milter.sharedcounters import SharedCounters
    from relay_milter.milter.workers import default_workers
    from relay_milter.core.quota import IngressGate

    settings = obj.load_settings()  # exits 3 on invalid settings
    logs.setup(settings.log_level, str(log_file) if log_file else None)
    # Rate limits are per node: one counter table for every worker.
    gate = IngressGate(counters=SharedCounters())
    source = ReloadingPolicy(obj.tenants_dir, settings, gate=gate)  # a ConfigError exits 3 (cli.errors.reported)
    logging.getLogger("relay.milter").info(
        "NOQUEUE: event=config tenants=%s source=%s", ",".join(t.id for t in source.current().tenants), source.source
    )

    def worker_init() -> None:  # in each worker, after the fork: its own threads
        source.check()  # a replacement worker serves the tenant set applied since the start
        source.watch()
        start_queue_watch(source, settings)  # backpressure: tenant limits.max_queued / max_queue_age

    count = workers or settings.milter_workers or default_workers()
    if not serve(source, settings.libmilter_socket(), settings.milter_socket_group, settings.milter_socket_mode,
                 workers=count, child_init=worker_init):
        from relay_milter.cli.errors import ExitCode, fail

        fail(ExitCode.UNAVAILABLE, f"the milter socket {settings.milter_socket} was removed while the milter ran; start it again")


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
    webhooks through the store's outbox (one worker per tenant). SIGTERM finishes the
    current batch and exits 0.

    While tenants have limits.max_queued or limits.max_queue_age it also writes the
    per-tenant queue summary the milter's backpressure reads
    (reputation.queue_summary_file, every reputation.queue_refresh seconds), and it copies
    the operator events of `relayctl reputation` / `relayctl ip` (reputation.state_file)
    into the event store (`relayctl events --operator`).

    Tenant and secrets file changes are picked up within a second without a restart;
    an invalid change is logged (event=reload_failed) and the last good set stays.
    One tracker per node name and store: a second one exits 3 and names the first.
    With a broken tenant file at start it warns and uses the tenant set `relayctl apply`
    last activated.
    """
    from relay_milter import logs
    from relay_milter.config import load_secrets
    from relay_milter.tracking.service import main_loop

    tenants, settings = obj.load(last_good=True)
    secrets = load_secrets(settings.secrets_file, tenants, webhooks_only=True)  # a ConfigError exits 3
    logs.setup(settings.log_level, str(log_file) if log_file else None)
    log = logging.getLogger("relay.tracker")

    store = open_store(settings, create=True)
    live = _Live(obj, settings, tenants, secrets)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # until main_loop installs its own
        signal.signal(sig, lambda *_: stop.set())
    workers = [live.watch]
    if not no_webhooks:
        workers.append(functools.partial(_webhook_loop, live))
    if settings.tracking.metrics_file:
        workers.append(functools.partial(_metrics_loop, live))
    workers.append(functools.partial(_queue_summary_loop, live))
    workers.append(functools.partial(_operator_events_loop, live))

    def announce() -> None:
        logs.event(log, logging.INFO, None, "track_start", node=settings.node, maillog=settings.maillog_file,
                   milter_log=settings.tracking.milter_log_file, store=store.safe_dsn)

    try:
        main_loop(settings, tenants, store, stop, once=once, from_start=from_start, workers=workers, on_start=announce,
                  on_tracker=live.attach, heartbeat=live.beat)
        if once:
            if not no_webhooks:
                _send_webhooks_once(live)
            _write_metrics(live, store)
            _write_queue_summary(live, store)
            _import_operator_events(live, store)
    finally:  # a ConfigError from main_loop still exits 3 (cli.errors.reported)
        store.close()
        logs.event(log, logging.INFO, None, "track_stop")


class _Live:
    """What the tracker's threads share and a tenant change replaces: the tenant set and
    secrets (swapped into the tracker and the webhook sender), and the tracker's heartbeat."""

    def __init__(self, obj: Context, settings: Settings, tenants: TenantSet, secrets: dict):
        self.obj = obj
        self.settings = settings
        self.tenants = tenants
        self.secrets = secrets
        self.tracker: Any = None
        self.sender: Any = None
        self.last_run: float | None = None
        self.summary_failed = False  # the queue summary could not be written (logged once)
        self.operator_mark: tuple | None = None  # the state file as last imported
        self.operator_failed = False  # copying the operator events failed (logged once)

    def attach(self, tracker: Any) -> None:
        self.tracker = tracker

    def beat(self) -> None:
        self.last_run = time.time()

    def _fingerprint(self) -> tuple:
        from relay_milter.milter.reloader import fingerprint

        secrets = self.settings.secrets_file
        try:
            st = secrets.stat() if secrets else None
        except OSError:
            st = None
        return fingerprint(self.obj.tenants_dir), (st.st_mtime_ns, st.st_size) if st else None

    def reload(self) -> bool:
        """Load the tenant and secrets files again; swap them in if they are valid."""
        from relay_milter import logs
        from relay_milter.config import ConfigError, load_secrets, load_tenants

        log = logging.getLogger("relay.tracker")
        try:
            tenants = load_tenants(self.obj.tenants_dir)
            secrets = load_secrets(self.settings.secrets_file, tenants)
        except ConfigError as exc:
            logs.event(log, logging.ERROR, None, "reload_failed", reason=str(exc).replace("\n", "; "),
                       kept=",".join(t.id for t in self.tenants))
            return False
        self.tenants, self.secrets = tenants, secrets
        if self.tracker is not None:
            self.tracker.tenants = tenants
        if self.sender is not None:
            self.sender.update(tenants, secrets)
        logs.event(log, logging.INFO, None, "reload", tenants=",".join(t.id for t in tenants))
        return True

    def watch(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Reload when a tenant file or the secrets file changes (checked every second)."""
        seen = self._fingerprint()
        while not stop.wait(interval):
            try:
                now = self._fingerprint()
                if now != seen:
                    seen = now
                    self.reload()
            except Exception:  # never let the watcher die silently
                logging.getLogger("relay.tracker").exception("NOQUEUE: event=reload_error")


def _webhook_loop(live: _Live, stop: threading.Event) -> None:
    """Webhooks go out from their own threads with their own store connections, so a slow
    endpoint never holds up event recording."""
    from relay_milter.tracking.webhooks import WebhookSender

    store = open_store(live.settings, create=True)
    try:
        live.sender = WebhookSender(store, live.tenants, live.secrets, live.settings.tracking, connector=_connector(live.settings))
        live.sender.run(stop)
    finally:
        live.sender = None
        store.close()


def _connector(settings: Settings):
    """How webhook connections are made (the egress policy hooks in here)."""
    return None


def _send_webhooks_once(live: _Live) -> None:
    from relay_milter.tracking.webhooks import WebhookSender

    store = open_store(live.settings, create=True)
    try:
        with WebhookSender(store, live.tenants, live.secrets, live.settings.tracking, connector=_connector(live.settings)) as sender:
            sender.run_once()
    finally:
        store.close()


def _metrics_loop(live: _Live, stop: threading.Event) -> None:
    store = open_store(live.settings, create=True)
    try:
        while True:
            _write_metrics(live, store)
            if stop.wait(live.settings.tracking.metrics_interval):
                break
    finally:
        store.close()


def _write_metrics(live: _Live, store) -> None:
    """Rewrite the node-exporter textfile: events, queue per tenant, webhook backlog, mail
    waiting on a smarthost name that does not resolve."""
    settings, tenants = live.settings, live.tenants
    if not settings.tracking.metrics_file:
        return
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
        snap = prom.collect([t.id for t in tenants], store, queue, tracker_last_run=live.last_run, node=settings.node,
                            certificates=[settings.tls_cert_file] if settings.tls_cert_file else ())
        extra = unresolved_metric(queued if queue is not None else None, [t.id for t in tenants])
        prom.write_textfile(settings.tracking.metrics_file, prom.render(snap) + extra)
    except Exception:  # metrics must never stop tracking
        log.exception("NOQUEUE: event=metrics_failed")


@click.command("web")
@_LOG_FILE
@click.option("--listen", default=None, metavar="HOST:PORT", help="Listen here (default: settings engagement.listen, 127.0.0.1:8480).")
@click.option("--create-key", is_flag=True, help="Create the engagement key file (settings engagement.key_file) if it is missing, then exit.")
@click.pass_obj
def run_web(obj: Context, log_file: Path | None, listen: str | None, create_key: bool) -> None:
    """Serve engagement tracking: open pixels and tracked links (foreground; SIGTERM stops).

    GET /o/<token> answers a 1x1 GIF and records OPENED; GET /c/<token> answers 302 to the
    link's original target and records CLICKED; GET /healthz answers "ok". A token whose
    HMAC (engagement key, settings engagement.key_file) does not verify gets 404 and no
    redirect. Events go to the event store (tracking.events_dsn or RELAY_EVENTS_DSN) with
    their webhook, which the running tracker sends. Repeats are counted and marked. No IP
    address or user agent is recorded. Plain HTTP: put a TLS reverse proxy in front and
    set the tenants' engagement_tracking.base_url to its https:// address.

    Exit codes: 0 stopped by a signal (or --create-key done), 3 configuration error (no or
    bad key file), 4 event store unavailable.
    """
    import os

    from relay_milter import logs
    from relay_milter.cli.errors import ExitCode, fail
    from relay_milter.core import engagement
    from relay_milter.tracking import web

    tenants, settings = obj.load(last_good=True)
    path = settings.engagement.key_file
    if listen is not None:
        from pydantic import ValidationError

        from relay_milter.config import EngagementSettings

        try:
            listen = EngagementSettings(listen=listen).listen
        except ValidationError:
            fail(ExitCode.USAGE, f"--listen {listen!r}: not host:port")
    if create_key:
        if path.exists():
            click.echo(f"{path}: exists, kept")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(engagement.new_key_text(os.urandom(engagement.KEY_BYTES)))
        click.echo(f"{path}: created")
        return
    try:
        key = engagement.parse_key(path.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError) as exc:
        fail(ExitCode.CONFIG, f"engagement key {path}: {exc} (create it with `relayctl web --create-key`)")
    if key is None:
        fail(ExitCode.CONFIG, f"engagement key {path}: not 64 hex digits")
    logs.setup(settings.log_level, str(log_file) if log_file else None)
    store = open_store(settings, create=True)
    state = {"tenants": tenants, "checked": time.monotonic()}

    def current() -> TenantSet:  # tenant changes (a new webhook) are seen within 5 s
        if time.monotonic() - state["checked"] > 5:
            state["checked"] = time.monotonic()
            try:
                state["tenants"] = obj.load(last_good=True)[0]
            except SystemExit:  # a broken change: keep the last set
                pass
        return state["tenants"]

    app = web.EngagementApp(key, web.Recorder(store, key, settings, current))
    try:
        web.serve(app, listen or settings.engagement.listen)
    finally:
        store.close()


def _queue_summary_loop(live: _Live, stop: threading.Event) -> None:
    store = open_store(live.settings, create=True)
    try:
        while True:
            _write_queue_summary(live, store)
            if stop.wait(live.settings.reputation.queue_refresh):
                break
    finally:
        store.close()


def _write_queue_summary(live: _Live, store) -> None:
    """The milter's backpressure input: ``postqueue -j`` attributed per tenant (the store's
    record of each queue id first, else the sender's domain), written atomically. Only
    while some tenant has a queue limit: a large queue is not listed for nothing."""
    settings, tenants = live.settings, live.tenants
    if not any(t.limits.max_queued is not None or t.limits.max_queue_age is not None for t in tenants):
        return
    from relay_milter import logs
    from relay_milter.core.quota import summary_document
    from relay_milter.postfix import queue as ops
    from relay_milter.tracking.queuesummary import write_summary

    log = logging.getLogger("relay.tracker")
    rep = settings.reputation
    try:
        now = time.time()
        try:
            messages = ops.attribute(ops.read_queue(settings.config_directory), tenants, store, settings.node)
        except ops.OpsError as exc:  # the store lookup failed: attribute by sender domain alone
            if "event store" not in str(exc):
                raise
            messages = ops.attribute(ops.read_queue(settings.config_directory), tenants)
        queues = ops.backpressure_queues(ops.queue_summary(messages, now), now)
        write_summary(rep.queue_summary_file, summary_document(queues, now, settings.node, rep.queue_refresh))
        if live.summary_failed:
            live.summary_failed = False
            logs.event(log, logging.INFO, None, "queue_summary_written", file=str(rep.queue_summary_file))
    except Exception as exc:  # the file ages; the milter warns, then fails open (docs/reputation.md)
        if not live.summary_failed:
            live.summary_failed = True
            logs.event(log, logging.WARNING, None, "queue_summary_failed", file=str(rep.queue_summary_file), reason=str(exc)[:300])


def _operator_events_loop(live: _Live, stop: threading.Event) -> None:
    store = open_store(live.settings, create=True)
    try:
        while True:
            _import_operator_events(live, store)
            if stop.wait(2.0):
                break
    finally:
        store.close()


def _import_operator_events(live: _Live, store) -> None:
    """Copy new operator events from the reputation state file into the store (when the
    file changed since the last look)."""
    from relay_milter import logs
    from relay_milter.tracking.operatorevents import import_events, read_events

    log = logging.getLogger("relay.tracker")
    path = live.settings.reputation.state_file
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        st = None
        reason: str | None = str(exc)
    else:
        reason = None
    mark = (st.st_mtime_ns, st.st_size, st.st_ino) if st else None
    if mark is not None and mark == live.operator_mark:
        return
    try:
        if reason is not None:
            raise OSError(reason)
        n = import_events(store, live.settings.node, read_events(path))
    except Exception as exc:  # tracking goes on; retried every pass, logged once until it works
        if not live.operator_failed:
            live.operator_failed = True
            logs.event(log, logging.WARNING, None, "operator_events_failed", file=str(path), reason=str(exc)[:300])
        return
    live.operator_mark = mark
    live.operator_failed = False
    if n:
        logs.event(log, logging.INFO, None, "operator_events", recorded=n, file=str(path))


COMMANDS: tuple[click.Command, ...] = (run_milter, run_tracker, run_web)
