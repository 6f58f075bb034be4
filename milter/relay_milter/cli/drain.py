"""relayctl drain | undrain: take a node out of service with zero loss, and put it back."""

from __future__ import annotations

import time
from pathlib import Path

import click

from relay_milter.cli.context import Context, open_store
from relay_milter.cli.errors import ExitCode, fail, warn


def _say(message: str) -> None:
    click.echo(f"{time.strftime('%H:%M:%S')} {message}")


def _rerender(obj: Context, templates: Path | None, force: bool) -> float | None:
    """Render with the node's drain state, check, install and reload, as `relayctl apply`
    does (without its DNS preflight: a drain must not wait for a smarthost's name).
    Returns when Postfix was reloaded (None: nothing changed, or Postfix is not running)."""
    from relay_milter.postfix import handedit
    from relay_milter.postfix.render import install, postfix_running, reload_postfix, render_and_check

    ts, settings = obj.load(last_good=True)
    edits = handedit.hand_edits(settings)
    if edits and not force:
        for name, diff in edits.items():
            click.echo(f"refusing: {settings.config_directory / name} was edited by hand since the last apply:", err=True)
            click.echo(diff.rstrip("\n"), err=True)
        raise _Refused("nothing was installed: main.cf/master.cf were edited by hand (--force overwrites the edits)")
    files, result = render_and_check(ts, settings, templates)
    if not result.ok:
        raise _Refused("check failed, nothing was installed", result.problems)
    changed = install(files, settings)
    handedit.record(settings)
    if not postfix_running(settings):
        warn("Postfix is not running; the configuration is installed for its next start")
        return None
    if [n for n in changed if n.startswith(("main.cf", "master.cf", "relay/drain"))]:
        from relay_milter.postfix.drain import wait_for_reload

        maillog = Path(settings.maillog_file) if settings.maillog_file else None
        try:
            offset = maillog.stat().st_size if maillog else 0
        except OSError:
            maillog, offset = None, 0
        reload_postfix(settings)
        at = wait_for_reload(maillog, offset)
        _say("postfix reloaded")
        return at
    return None


class _Refused(Exception):
    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.details = details or []


_TEMPLATES = click.option("--templates", type=click.Path(path_type=Path, file_okay=False), default=None, help="Template directory.")


@click.command()
@click.option("--timeout", type=click.FloatRange(min=0), default=600, show_default=True,
              help="Seconds to wait for the queue to empty and the tracker to catch up.")
@click.option("--reason", default="", help="Why (kept in the drain state, shown by undrain).")
@click.option("--no-tracker", is_flag=True, help="This node runs no tracker: do not wait for it.")
@click.option("--wait-webhooks", is_flag=True, help="Also wait until no webhook is left undelivered in the store.")
@click.option("--force", is_flag=True, help="Overwrite a main.cf/master.cf edited by hand since the last apply.")
@_TEMPLATES
@click.pass_obj
def drain(obj: Context, timeout: float, reason: str, no_tracker: bool, wait_webhooks: bool, force: bool,
          templates: Path | None) -> None:
    """Stop accepting mail on this node, deliver its queue, wait for its tracker; then say
    that the node can be stopped.

    \b
    1. Every smtpd listener (ingress and submission) answers new connections with
       `421 4.3.2 ... draining` instead of its greeting and hangs up, so the platform
       sends to another relay; sessions in progress finish. The state is kept in
       <config_directory>/relay/drain.json: `relayctl apply` (and an Ansible play)
       keep a drained node drained until `relayctl undrain`.
    2. Waits for the SMTP sessions begun before the drain to end (they may still queue
       a message); then `postqueue -f`, and waits until the queue is empty (messages on
       hold count: release or delete them first). Progress is printed as it changes.
    3. Waits until this node's tracker has committed both logs to their end
       (tracking.node's checkpoints in the event store); --no-tracker skips this.
    4. With --wait-webhooks, until the store has no undelivered webhook.

    Exit 0: the node can be stopped, nothing of it is left to deliver or record.
    Exit 1: not ready after --timeout (what is left is listed); the node stays drained,
    run drain again to keep waiting. Exit 4: the drained configuration failed its check
    (nothing changed), Postfix did not reload, or the event store is unavailable.
    """
    from relay_milter.postfix import drain as pdrain
    from relay_milter.postfix.queue import OpsError, read_queue

    settings = obj.load_settings()
    cfg = settings.config_directory
    before = pdrain.load_state(cfg)
    state = before or pdrain.save_state(cfg, reason)
    try:
        reloaded = _rerender(obj, templates, force)
    except _Refused as exc:
        if before is None:
            pdrain.clear_state(cfg)
        fail(ExitCode.CHECK_FAILED, str(exc), exc.details)
    except Exception as exc:  # the reload failed: the files are installed, still drained
        fail(ExitCode.CHECK_FAILED, f"drained configuration installed, but {exc}")
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.get("since") or time.time()))
    _say(f"node {settings.node} drained (since {since}): new connections get '{pdrain.REPLY}'")

    deadline = time.monotonic() + timeout
    # -- sessions in progress: they finish under the old configuration and may queue mail --
    cutoff = reloaded or state.get("since") or time.time()
    shown_sessions = None
    while pids := pdrain.sessions_begun_before(settings.queue_directory, cutoff):
        if len(pids) != shown_sessions:
            shown_sessions = len(pids)
            _say(f"sessions: {len(pids)} SMTP session(s) begun before the drain still open (smtpd pid {', '.join(map(str, pids))})")
        if time.monotonic() >= deadline:
            fail(ExitCode.FAILED, f"not ready to stop: {len(pids)} SMTP session(s) begun before the drain still open after "
                 f"{timeout:g}s; the node stays drained, run drain again to keep waiting")
        time.sleep(0.3)
    if shown_sessions:
        _say("sessions: none left from before the drain")
    # -- the queue --
    shown = None
    last_flush = 0.0
    while True:
        try:
            messages = read_queue(cfg)
        except OpsError as exc:
            fail(ExitCode.UNAVAILABLE, f"cannot read the queue: {exc}")
        count = pdrain.count_queue(messages)
        if (count.total, count.deferred, count.hold) != shown:
            shown = (count.total, count.deferred, count.hold)
            _say(f"queue: {count.total} message(s) ({count.deferred} deferred, {count.hold} on hold)")
        if count.total == 0:
            break
        if time.monotonic() >= deadline:
            details = [
                f"{m.queue_id} {m.queue} from={m.sender or '<>'} "
                + "; ".join(sorted(set(m.delay_reasons)))[:200]
                for m in messages[:20]
            ]
            if count.total > 20:
                details.append(f"... and {count.total - 20} more (relayctl queue)")
            fail(ExitCode.FAILED, f"not ready to stop: {count.total} message(s) still in the queue of node "
                 f"{settings.node} after {timeout:g}s (it stays drained; release or delete held mail, "
                 "fix the smarthost, or run drain again to keep waiting)", details)
        if count.deliverable and time.monotonic() - last_flush >= 10:
            try:
                pdrain.flush(cfg)
            except RuntimeError as exc:
                warn(str(exc))
            last_flush = time.monotonic()
        time.sleep(0.5)

    # -- the tracker --
    if no_tracker:
        _say("tracker: not waited for (--no-tracker)")
    else:
        from relay_milter.tracking import catchup

        store = open_store(settings)
        try:
            shown_lag = None
            while True:
                lags = catchup.lag(store, settings)
                now = tuple((x.offset, x.size) for x in lags)
                if now != shown_lag:
                    shown_lag = now
                    _say("tracker: " + "; ".join(x.describe() for x in lags))
                if catchup.caught_up(lags):
                    break
                if time.monotonic() >= deadline:
                    fail(ExitCode.FAILED, f"not ready to stop: the tracker of node {settings.node} has not caught up after "
                         f"{timeout:g}s (is relay-tracker running?); the node stays drained",
                         [x.describe() for x in lags])
                time.sleep(0.3)
            _say(f"tracker: caught up; following {store.state_count(settings.node)} queue id(s)")
            while True:
                backlog = sum(store.outbox_backlog().values())
                if not wait_webhooks or backlog == 0:
                    break
                if time.monotonic() >= deadline:
                    fail(ExitCode.FAILED, f"not ready to stop: {backlog} webhook(s) undelivered after {timeout:g}s")
                time.sleep(0.5)
            _say(f"webhooks: {backlog} undelivered in the store"
                 + ("" if backlog == 0 else " (any tracker on this store sends them; on SQLite, this node's when it runs again)"))
        finally:
            store.close()
    _say(f"node {settings.node} can be stopped: it accepts no mail, its queue is empty"
         + ("" if no_tracker else " and its tracker has recorded everything"))


@click.command()
@click.option("--force", is_flag=True, help="Overwrite a main.cf/master.cf edited by hand since the last apply.")
@_TEMPLATES
@click.pass_obj
def undrain(obj: Context, force: bool, templates: Path | None) -> None:
    """Put a drained node back in service: its listeners greet and accept mail again.

    Exit 0 also when the node was not drained (nothing to do). Exit 4: the configuration
    could not be installed or Postfix reloaded; the node stays drained.
    """
    from relay_milter.postfix import drain as pdrain

    settings = obj.load_settings()
    cfg = settings.config_directory
    state = pdrain.load_state(cfg)
    if state is None:
        _say(f"node {settings.node} is not drained")
        return
    pdrain.clear_state(cfg)
    try:
        _rerender(obj, templates, force)
    except Exception as exc:  # keep the node drained: the live configuration still is
        pdrain.save_state(cfg, state.get("reason", ""), state.get("since"))
        details = exc.details if isinstance(exc, _Refused) else []
        fail(ExitCode.CHECK_FAILED, f"still drained: {exc}", details)
    _say(f"node {settings.node} undrained: its listeners accept mail again"
         + (f" (drained since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(state['since']))})" if state.get("since") else ""))


COMMANDS: tuple[click.Command, ...] = (drain, undrain)
