"""Tenants added to a running lab for one test module, and taken away again.

Both the addition and the removal go through ``relayctl apply`` (the only way a tenant
change goes live) and wait for every milter worker's ``event=reload`` line naming the new set."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from relay_milter.lab import Lab, Sink, TenantSpec, wait_for


def _wait_for_reload(lab: Lab, mark: int) -> None:
    wanted = ",".join(sorted(lab.tenants))
    wait_for(
        lambda: lab.milter_reloaded(rf"tenants={re.escape(wanted)}(\s|$)", mark),
        15,
        what=f"every milter worker reloading with tenants {wanted}",
    )


@contextmanager
def live_tenants(lab: Lab, *specs: TenantSpec) -> Iterator[None]:
    """Add ``specs`` (each with its own started sink) to the running ``lab`` until the block ends."""
    mark = len(lab.milter_log_text())
    for spec in specs:
        lab.add_tenant(spec, Sink(spec.id).start())
    lab.relayctl("apply")
    _wait_for_reload(lab, mark)
    try:
        yield
    finally:
        mark = len(lab.milter_log_text())
        for spec in specs:
            (lab.tenants_dir / f"{spec.id}.yaml").unlink()
            lab.tenants.pop(spec.id)
            lab.sinks.pop(spec.id).stop()
        lab.relayctl("apply")
        _wait_for_reload(lab, mark)
