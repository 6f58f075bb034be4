"""relayctl: render, check and apply the relay's Postfix configuration; run the milter.

Exit codes (stable, for scripts):
  0  success
  1  unexpected error
  2  usage error
  3  invalid configuration (tenant or settings file)
  4  rendered Postfix configuration failed its checks (nothing was installed);
     for track/trace/queue/stats/requeue/hold/release/metrics: the event store or
     Postfix is unavailable
"""

from __future__ import annotations

import json
import functools
import logging
import signal
import sys
import threading
from pathlib import Path

import click

from relay_milter import __version__
from relay_milter.config import ConfigError, Settings, TenantSet, load_settings, load_tenants

EXIT_CONFIG = 3
EXIT_CHECK = 4

DEFAULT_TENANTS = "/etc/tenant-relay/tenants"
DEFAULT_SETTINGS = "/etc/tenant-relay/relay.yaml"


class Context:
    def __init__(self, tenants_dir: Path, settings_file: Path | None):
        self.tenants_dir = tenants_dir
        self.settings_file = settings_file

    def load_settings(self) -> Settings:
        try:
            return load_settings(self.settings_file)
        except ConfigError as exc:
            click.echo(f"relayctl: invalid configuration:\n{exc}", err=True)
            sys.exit(EXIT_CONFIG)

    def open_store(self, settings: Settings):
        """The event store for the tracker, created if need be; exits 4 if unavailable."""
        from relay_milter.cli.tracking import open_store

        return open_store(settings, create=True)

    def load(self) -> tuple[TenantSet, Settings]:
        try:
            settings = load_settings(self.settings_file)
            tenants = load_tenants(self.tenants_dir)
        except ConfigError as exc:
            click.echo(f"relayctl: invalid configuration:\n{exc}", err=True)
            sys.exit(EXIT_CONFIG)
        return tenants, settings


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="relayctl")
@click.option(
    "--tenants",
    "tenants_dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_TENANTS,
    envvar="RELAY_TENANTS",
    show_default=True,
    help="Directory of tenant YAML files.",
)
@click.option(
    "--settings",
    "settings_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    envvar="RELAY_SETTINGS",
    help=f"Relay settings YAML (default: {DEFAULT_SETTINGS} if it exists, else built-in defaults).",
)
@click.pass_context
def main(ctx: click.Context, tenants_dir: Path, settings_file: Path | None) -> None:
    """Operate the multi-tenant mail relay.

    Typical use: edit a tenant file, then `relayctl check` and `relayctl apply`.
    Exit codes: 0 ok, 1 error (for trace/queue/...: nothing found), 2 usage, 3 invalid
    configuration, 4 Postfix check failed (check/apply) or the event store/Postfix is
    unavailable (tracking commands).
    """
    if settings_file is None and Path(DEFAULT_SETTINGS).is_file():
        settings_file = Path(DEFAULT_SETTINGS)
    ctx.obj = Context(tenants_dir, settings_file)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def tenants(obj: Context, as_json: bool) -> None:
    """Validate the tenant files and list the tenants."""
    ts, _ = obj.load()
    if as_json:
        click.echo(json.dumps([t.model_dump(mode="json") | {"source": str(ts.sources[t.id])} for t in ts], indent=2))
        return
    click.echo(f"{'TENANT':<16} {'RELAY DOMAIN':<32} {'SIGNING':<28} {'SMARTHOST':<28} TLS")
    for t in ts:
        click.echo(
            f"{t.id:<16} {t.relay_domain:<32} {t.signing_domain:<28} {t.smarthost.nexthop:<28} {t.smarthost.tls}"
        )


@main.command()
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Output directory.")
@click.option("--templates", type=click.Path(path_type=Path, file_okay=False), default=None, help="Template directory.")
@click.pass_obj
def render(obj: Context, out: Path, templates: Path | None) -> None:
    """Render main.cf, master.cf and the lookup tables into OUT (no checks, no install)."""
    from relay_milter.postfix.render import render_files, write_files

    ts, settings = obj.load()
    try:
        for path in write_files(render_files(ts, settings, templates), out):
            click.echo(str(path))
    except ConfigError as exc:
        click.echo(f"relayctl: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@main.command()
@click.option("--templates", type=click.Path(path_type=Path, file_okay=False), default=None, help="Template directory.")
@click.pass_obj
def check(obj: Context, templates: Path | None) -> None:
    """Validate tenants and settings, render into a staging directory and check it with Postfix.

    Runs `postconf -n` (any warning fails), `postconf -M`, a lookup of every
    tenant's route, and `postfix check`. Nothing live is touched.
    """
    from relay_milter.postfix.render import render_and_check

    ts, settings = obj.load()
    click.echo(f"tenants: {len(ts)} valid ({', '.join(t.id for t in ts)})")
    try:
        _, result = render_and_check(ts, settings, templates)
    except ConfigError as exc:
        click.echo(f"relayctl: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if not result.ok:
        for p in result.problems:
            click.echo(f"check failed: {p}", err=True)
        sys.exit(EXIT_CHECK)
    click.echo("postfix: staged configuration passed postconf, route lookups and postfix check")


@main.command()
@click.option("--templates", type=click.Path(path_type=Path, file_okay=False), default=None, help="Template directory.")
@click.option("--reload/--no-reload", default=True, show_default=True, help="Reload Postfix if it is running.")
@click.pass_obj
def apply(obj: Context, templates: Path | None, reload: bool) -> None:
    """Check the configuration in staging, then install it into the config directory and reload.

    If any check fails, nothing live changes (exit 4). Queued mail is kept:
    `postfix reload` re-reads the configuration without dropping the queue.
    """
    from relay_milter.postfix.render import install, postfix_running, reload_postfix, render_and_check

    ts, settings = obj.load()
    try:
        files, result = render_and_check(ts, settings, templates)
    except ConfigError as exc:
        click.echo(f"relayctl: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if not result.ok:
        for p in result.problems:
            click.echo(f"check failed: {p}", err=True)
        click.echo("nothing was installed", err=True)
        sys.exit(EXIT_CHECK)
    changed = install(files, settings)
    for name in changed:
        if name.endswith(" (removed)"):
            click.echo(f"removed {settings.config_directory / name.removesuffix(' (removed)')}")
        else:
            click.echo(f"installed {settings.config_directory / name}")
    if not changed:
        click.echo("configuration unchanged")
    elif reload and postfix_running(settings):
        reload_postfix(settings)
        click.echo("postfix reloaded")


@main.command("milter")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Log here instead of stderr.")
@click.pass_obj
def run_milter(obj: Context, log_file: Path | None) -> None:
    """Run the verifying, rewriting, routing milter (foreground; stop with SIGTERM).

    Tenant file changes are picked up within a second without a restart; an
    invalid change is logged (event=reload_failed) and the last good set stays.
    """
    from relay_milter import logs
    from relay_milter.milter.adapter import serve
    from relay_milter.milter.reloader import ReloadingPolicy

    ts, settings = obj.load()  # exits 3 on an invalid configuration
    logs.setup(settings.log_level, str(log_file) if log_file else None)
    logging.getLogger("relay.milter").info("NOQUEUE: event=config tenants=%s", ",".join(t.id for t in ts))
    source = ReloadingPolicy(obj.tenants_dir, settings)
    source.watch()
    serve(source, settings.libmilter_socket(), settings.milter_socket_group, settings.milter_socket_mode)


@main.command("track")
@click.option("--once", is_flag=True, help="Process what the logs hold now, then exit (cron, tests).")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Log here instead of stderr.")
@click.option("--from-start", is_flag=True, help="Without a checkpoint, read the logs from their start (default: from their end).")
@click.option("--no-webhooks", is_flag=True, help="Record events but do not send webhooks from this process.")
@click.pass_obj
def run_tracker(obj: Context, once: bool, log_file: Path | None, from_start: bool, no_webhooks: bool) -> None:
    """Follow the Postfix and milter logs and record delivery events (foreground).

    Reads settings maillog_file and tracking.milter_log_file, resumes from the checkpoint
    in the event store (tracking.events_dsn, or RELAY_EVENTS_DSN), writes RECEIVED,
    RELAYED, DEFERRED, BOUNCED and REJECTED events, and pushes them to the tenants'
    webhooks through the store's outbox. SIGTERM finishes the current batch and exits 0.
    Tenant changes need a restart (the Ansible role does it).
    """
    from relay_milter import logs
    from relay_milter.config import load_secrets

    tenants, settings = obj.load()
    try:
        secrets = load_secrets(settings.secrets_file, tenants, webhooks_only=True)
    except ConfigError as exc:
        click.echo(f"relayctl: invalid configuration:\n{exc}", err=True)
        sys.exit(EXIT_CONFIG)
    logs.setup(settings.log_level, str(log_file) if log_file else None)
    log = logging.getLogger("relay.tracker")
    from relay_milter.tracking.tracker import main_loop

    store = obj.open_store(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # until main_loop installs its own
        signal.signal(sig, lambda *_: stop.set())
    webhooks = not no_webhooks and any(t.webhook for t in tenants)
    workers = []
    if webhooks:
        workers.append(functools.partial(_webhook_loop, obj, settings, tenants, secrets))
    if settings.tracking.metrics_file:
        workers.append(functools.partial(_metrics_loop, obj, settings, tenants))

    def announce() -> None:
        logs.event(log, logging.INFO, None, "track_start", node=settings.node, maillog=settings.maillog_file,
                   milter_log=settings.tracking.milter_log_file, store=store.safe_dsn)

    try:
        main_loop(settings, tenants, store, stop, once=once, from_start=from_start, workers=workers, on_start=announce)
        if once:
            _send_webhooks_once(obj, settings, tenants, secrets, not webhooks)
            _write_metrics(settings, tenants, store)
    except ConfigError as exc:
        click.echo(f"relayctl: invalid configuration:\n{exc}", err=True)
        sys.exit(EXIT_CONFIG)
    finally:
        store.close()
        logs.event(log, logging.INFO, None, "track_stop")


def _webhook_loop(obj: Context, settings: Settings, tenants: TenantSet, secrets, stop: threading.Event) -> None:
    """Webhooks go out from their own thread with their own store connection, so a slow
    endpoint never holds up event recording."""
    from relay_milter.tracking.webhooks import WebhookSender

    store = obj.open_store(settings)
    try:
        WebhookSender(store, tenants, secrets, settings.tracking).run(stop)
    finally:
        store.close()


def _send_webhooks_once(obj: Context, settings: Settings, tenants: TenantSet, secrets, disabled: bool) -> None:
    if disabled:
        return
    from relay_milter.tracking.webhooks import WebhookSender

    store = obj.open_store(settings)
    try:
        WebhookSender(store, tenants, secrets, settings.tracking).run_once()
    finally:
        store.close()


def _metrics_loop(obj: Context, settings: Settings, tenants: TenantSet, stop: threading.Event) -> None:
    store = obj.open_store(settings)
    try:
        while True:
            _write_metrics(settings, tenants, store)
            if stop.wait(settings.tracking.metrics_interval):
                break
    finally:
        store.close()


def _write_metrics(settings: Settings, tenants: TenantSet, store) -> None:
    """Rewrite the node-exporter textfile: events, queue per tenant, webhook backlog."""
    if not settings.tracking.metrics_file:
        return
    import time

    from relay_milter import logs
    from relay_milter.postfix import queue as ops
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
        prom.write_textfile(settings.tracking.metrics_file, prom.render(snap))
    except Exception:  # metrics must never stop tracking
        log.exception("NOQUEUE: event=metrics_failed")


@main.group()
def user() -> None:
    """Manage submission users (SMTP AUTH on the submission listeners).

    A user must first be listed in one tenant's `submission_users`; its password
    lives in the Cyrus sasldb (settings `sasl_database`). Passwords are read from
    standard input or a prompt, never from the command line, and never logged.
    """


@user.command("add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password (one line) from standard input.")
@click.option("--generate", is_flag=True, help="Generate a random password and print it once.")
@click.pass_obj
def user_add(obj: Context, name: str, password_stdin: bool, generate: bool) -> None:
    """Create user NAME, or set a new password for it."""
    import secrets

    from relay_milter.postfix.users import UserError, set_password

    ts, settings = obj.load()
    if password_stdin and generate:
        raise click.UsageError("--password-stdin and --generate exclude each other")
    if generate:
        password = secrets.token_urlsafe(24)
    elif password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        tenant = set_password(settings, ts, name, password)
    except ConfigError as exc:
        click.echo(f"relayctl: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except UserError as exc:
        click.echo(f"relayctl: {exc}", err=True)
        sys.exit(1)
    click.echo(f"user {name} (tenant {tenant}) can now log in", err=generate)
    if generate:
        click.echo(password)


@user.command("remove")
@click.argument("name")
@click.pass_obj
def user_remove(obj: Context, name: str) -> None:
    """Delete user NAME's password: it can no longer log in."""
    from relay_milter.postfix.users import UserError, delete

    _, settings = obj.load()
    try:
        delete(settings, name)
    except UserError as exc:
        click.echo(f"relayctl: {exc}", err=True)
        sys.exit(1)
    click.echo(f"user {name} removed")


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def user_list(obj: Context, as_json: bool) -> None:
    """List users with their tenant and state (active, no-password, orphaned)."""
    from relay_milter.postfix.users import UserError, status

    ts, settings = obj.load()
    try:
        rows = status(settings, ts)
    except UserError as exc:
        click.echo(f"relayctl: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps([{"user": r.user, "tenant": r.tenant, "state": r.state} for r in rows], indent=2))
        return
    click.echo(f"{'USER':<24} {'TENANT':<16} STATE")
    for r in rows:
        click.echo(f"{r.user:<24} {r.tenant or '-':<16} {r.state}")


@main.group()
def cert() -> None:
    """Certificates for the relay's own STARTTLS."""


@cert.command("selfsigned")
@click.option("--name", "names", multiple=True, help="DNS name or IP (repeatable; default: myhostname).")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--cert", "cert_path", type=click.Path(path_type=Path, dir_okay=False), help="Default: settings tls_cert_file.")
@click.option("--key", "key_path", type=click.Path(path_type=Path, dir_okay=False), help="Default: settings tls_key_file.")
@click.option("--force", is_flag=True, help="Replace existing files.")
@click.pass_obj
def cert_selfsigned(obj: Context, names: tuple[str, ...], days: int, cert_path: Path | None, key_path: Path | None, force: bool) -> None:
    """Write a self-signed certificate and key (key mode 0600) for the relay's STARTTLS.

    For a first start or a lab. Clients cannot verify it: replace it with one
    from your CA and run `postfix reload`.
    """
    from relay_milter.postfix.certs import make_cert

    settings = obj.load_settings()
    cert_path, key_path = cert_path or settings.tls_cert_file, key_path or settings.tls_key_file
    if cert_path is None or key_path is None:
        click.echo("relayctl: give --cert and --key, or set tls_cert_file and tls_key_file in the settings", err=True)
        sys.exit(EXIT_CONFIG)
    if not force and (cert_path.exists() or key_path.exists()):
        click.echo(f"relayctl: {cert_path} or {key_path} exists (use --force to replace it)", err=True)
        sys.exit(1)
    make_cert(list(names) or [settings.myhostname], days=days).write(cert_path, key_path)
    click.echo(f"wrote {cert_path} and {key_path} (key mode 0600)")


@main.command()
@click.option("--keep", is_flag=True, help="Leave the lab running until Ctrl-C (inspect it with postqueue -c).")
def demo(keep: bool) -> None:
    """Provision a private relay on loopback, send signed mail, show where it landed.

    Starts a private Postfix instance (its own config and queue under /var/tmp),
    the milter, a loopback DNS server and two customer smarthosts, then sends
    one good message per tenant and a few that must be refused.
    """
    from relay_milter.lab.demo import run_demo

    sys.exit(run_demo(keep=keep))


from relay_milter.cli.tracking import register as _register_tracking  # noqa: E402  (trace, queue, stats, ...)

_register_tracking(main)

