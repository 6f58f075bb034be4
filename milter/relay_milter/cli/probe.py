"""`relayctl check --probe`: print what each smarthost answers (postfix/probe.py)."""

from __future__ import annotations

import click

from relay_milter.cli.errors import warn
from relay_milter.config import ConfigError, Settings, TenantSet, load_secrets
from relay_milter.postfix.probe import probe


def probe_all(tenants: TenantSet, settings: Settings) -> bool:
    """Probe every tenant's smarthost; print the findings; True if none is an error."""
    try:
        secrets = load_secrets(settings.secrets_file, tenants)
    except (ConfigError, OSError) as exc:
        warn(f"secrets unavailable, AUTH is checked without logging in: {exc}")
        secrets = {}
    ok = True
    for t in tenants:
        s = secrets.get(t.id)
        res = probe(t, s.smarthost_password if s else None, timeout=max(settings.dns.timeout, 10), helo=settings.myhostname,
                    dns=settings.dns)
        click.echo(f"probe {t.id} ({res.target}, tls: {t.smarthost.tls}):")
        for level, text in res.findings:
            click.echo(f"  {level}: {text}", err=level == "error")
        ok = ok and res.ok
    return ok
