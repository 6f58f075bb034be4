"""relayctl tenants | render | check | apply: validate the tenant files, render the Postfix
configuration, check it in a staging directory, install it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from relay_milter.cli.context import Context
from relay_milter.cli.errors import ExitCode, fail, warn
from relay_milter.config import ConfigError

_TEMPLATES = click.option(
    "--templates", type=click.Path(path_type=Path, file_okay=False), default=None, help="Template directory."
)


@click.command()
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


@click.command()
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Output directory.")
@_TEMPLATES
@click.pass_obj
def render(obj: Context, out: Path, templates: Path | None) -> None:
    """Render main.cf, master.cf and the lookup tables into OUT (no checks, no install).

    OUT must be new or empty, and owned by you (root) without group or other write
    permission: the smarthost password tables are written there."""
    from relay_milter.postfix.render import UnsafeDirectory, render_files, write_files
    from relay_milter.reputation.state import state_for

    ts, settings = obj.load()
    files = render_files(ts, settings, templates, reputation_state=state_for(settings))
    try:
        written = write_files(files, out, require_empty=True)
    except UnsafeDirectory as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    except OSError as exc:
        fail(ExitCode.UNAVAILABLE, f"cannot write into {out}: {exc}")
    for path in written:
        click.echo(str(path))


@click.command()
@_TEMPLATES
@click.option("--strict", is_flag=True, help="A smarthost name that does not resolve is an error, not a warning.")
@click.option("--probe", is_flag=True, help="Also connect to every smarthost: banner, STARTTLS, certificate under the tenant's TLS policy, AUTH.")
@click.pass_obj
def check(obj: Context, templates: Path | None, strict: bool, probe: bool) -> None:
    """Validate tenants and settings, everything they point to, and the rendered Postfix config.

    Checks the relay's TLS certificate and key (exist, readable, belong together,
    not expired), each smarthost.ca_file, each pinned key (type and size; and that
    it agrees with the key published in DNS, a warning), that every smarthost name
    resolves (a warning; an error with --strict), then renders into a staging
    directory and runs `postconf -n` (any warning fails), `postconf -M`, a lookup of
    every tenant's route, and `postfix check`. Nothing live is touched.
    With --probe, also connects to each smarthost (nothing is sent).

    DNS lookups (smarthost names, published keys) ask the resolver in settings `dns`
    (default: /etc/resolv.conf, as Postfix does).
    """
    from relay_milter.cli.operator import check_rendered, run_preflight
    from relay_milter.postfix.render import render_and_check
    from relay_milter.reputation.monitor import fcrdns_warnings
    from relay_milter.reputation.state import state_for

    ts, settings = obj.load()
    click.echo(f"tenants: {len(ts)} valid ({', '.join(t.id for t in ts)})")
    pf = run_preflight(ts, settings, strict=strict)
    files, result = render_and_check(ts, settings, templates, reputation_state=state_for(settings))
    for line in result.warnings + fcrdns_warnings(settings):
        warn(line)
    failed = bool(pf.errors) or not check_rendered(settings, files)
    if result.ok:
        click.echo("postfix: staged configuration passed postconf, route lookups and postfix check")
    if probe:
        from relay_milter.cli.probe import probe_all

        failed = not probe_all(ts, settings) or failed
    if not result.ok:
        fail(ExitCode.CHECK_FAILED, "check failed: the staged configuration failed Postfix's checks", result.problems)
    if failed:
        fail(ExitCode.CHECK_FAILED, "check failed (see above); nothing live was touched")


@click.command()
@_TEMPLATES
@click.option("--reload/--no-reload", default=True, show_default=True, help="Reload Postfix if it is running.")
@click.option("--reroute/--no-reroute", default=True, show_default=True,
              help="Re-route deferred mail that still carries a tenant's old smarthost (postsuper -r); "
                   "with --no-reroute, only report it and print the command.")
@click.option("--force", is_flag=True, help="Overwrite a live main.cf/master.cf that was edited by hand since the last apply.")
@click.option("--recheck", is_flag=True, help="Look up every tenant's smarthost name and DNS key, not only those of the "
              "tenants changed since the last apply.")
@click.pass_obj
def apply(obj: Context, templates: Path | None, reload: bool, reroute: bool, force: bool, recheck: bool) -> None:
    """Run every `relayctl check`, then install the configuration, reload, and activate it.

    If any check fails, nothing live changes (exit 4): not Postfix, and not the
    milter, which serves only the tenant set apply last activated
    (<config_directory>/relay/tenants.applied.json). Queued mail is kept:
    `postfix reload` re-reads the configuration without dropping the queue. Then
    apply counts queued messages that still carry a tenant's old next hop (Postfix
    stores it in the queue file) and re-routes the deferred ones.

    A live main.cf or master.cf edited by hand since the last apply is shown as a
    diff and not overwritten (exit 4) unless --force; keep extra main.cf parameters
    in settings postfix_extra instead.
    """
    from relay_milter.cli.operator import check_rendered, reroute_after_apply, run_preflight
    from relay_milter.config import APPLIED_TENANTS, applied_tenants_path, changed_since_applied
    from relay_milter.postfix import handedit
    from relay_milter.postfix.render import activate, install, needs_reload, postfix_running, reload_postfix, render_and_check
    from relay_milter.reputation.state import state_for

    ts, settings = obj.load()
    # DNS lookups (smarthost names, keys in DNS: warnings only) for the tenants that changed
    # since the last apply; the others' were done then (`relayctl check` looks up all).
    changed_ids = changed_since_applied(ts, applied_tenants_path(settings)) if not recheck else None
    if changed_ids is not None and len(changed_ids) < len(ts.tenants):
        click.echo(f"preflight: DNS lookups for the {len(changed_ids)} tenant(s) changed since the last apply "
                   "(relayctl check, or apply --recheck, looks up every tenant)")
    pf = run_preflight(ts, settings, dns_for=changed_ids)
    # The failovers in force are kept: the tenants of a listed address stay on its standby.
    files, result = render_and_check(ts, settings, templates, reputation_state=state_for(settings))
    if not check_rendered(settings, files) or not result.ok or pf.errors:
        fail(ExitCode.CHECK_FAILED, "check failed, nothing was installed", result.problems)
    edits = handedit.hand_edits(settings)
    for name, diff in edits.items():
        click.echo(f"{'warning' if force else 'refusing'}: {settings.config_directory / name} was edited by hand since the last apply:", err=True)
        click.echo(diff.rstrip("\n"), err=True)
    if edits and not force:
        fail(ExitCode.CHECK_FAILED, "nothing was installed: keep main.cf parameters in settings postfix_extra, then apply "
             "(or apply --force to overwrite the hand edits)")
    # The milter's tenant set is written after Postfix has reloaded (when it must): the
    # milter accepts mail for a new tenant only once Postfix has that tenant's transport.
    changed = install(files, settings, hold=(APPLIED_TENANTS,))
    handedit.record(settings)
    for name in changed:
        if name.endswith(" (removed)"):
            click.echo(f"removed {settings.config_directory / name.removesuffix(' (removed)')}")
        else:
            click.echo(f"installed {settings.config_directory / name}")
    if not changed:
        click.echo("configuration unchanged")
    running = reload and postfix_running(settings)
    # Postfix reloads only when it must: hash: tables (routes, relay domains, TLS policies,
    # logins) are picked up by its daemons without one; main.cf, master.cf and the other
    # files are not (render.needs_reload).
    if running and needs_reload(changed):
        try:
            reload_postfix(settings)
        except ConfigError as exc:  # the files are installed; Postfix did not take them
            activate(files, settings, [n for n in changed if n == APPLIED_TENANTS])
            fail(ExitCode.CHECK_FAILED, f"configuration installed, but {exc}")
        click.echo("postfix reloaded")
    elif running and [n for n in changed if n != APPLIED_TENANTS]:
        click.echo("postfix picks the changed tables up by itself (no reload needed)")
    activate(files, settings, [n for n in changed if n == APPLIED_TENANTS])
    if running:
        reroute_after_apply(settings, ts, reroute)


COMMANDS: tuple[click.Command, ...] = (tenants, render, check, apply)
