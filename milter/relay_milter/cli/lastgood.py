"""The last good tenant set, for operator commands while a tenant file is broken.

Mid-incident an operator needs `relayctl queue`, `trace`, `requeue`, `status`... most when
someone has just broken a tenant file. Those commands warn, name the broken file(s), and
work from the tenant set `relayctl apply` last checked and activated, which is the set the
milter is serving. `check`, `apply`, `render` and `tenants` never fall back: they exist to
show the error.
"""

from __future__ import annotations

import time

from relay_milter.cli.errors import warn
from relay_milter.config import ConfigError, Settings, TenantSet, applied_tenants_path, load_applied_tenants


def fallback(settings: Settings, error: ConfigError) -> TenantSet:
    """Warn (on stderr) and return the applied set; re-raise ``error`` when there is none."""
    path = applied_tenants_path(settings)
    try:
        tenants = load_applied_tenants(path)
    except ConfigError:
        raise error from None
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
    warn(f"the tenant files are invalid:\n{error}")
    warn(
        f"using the last applied tenant set instead ({path}, applied {when}: "
        f"{', '.join(t.id for t in tenants)}); the milter serves that set too. "
        "Fix the file(s) above, then `relayctl check` and `relayctl apply`."
    )
    return tenants
