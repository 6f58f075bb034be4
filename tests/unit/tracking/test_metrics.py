"""tracking.metrics stands on its own: it names Postfix's queues itself and takes any queue
row with tenant/counts/oldest_deferred_age (tracking does not import relay_milter.postfix)."""

from __future__ import annotations

from dataclasses import dataclass, field

from relay_milter.postfix import queue as ops
from relay_milter.tracking import metrics


@dataclass(frozen=True)
class Row:
    tenant: str
    counts: dict[str, int] = field(default_factory=dict)
    oldest_deferred_age: float | None = None


def test_queue_names_are_postfixs():
    assert metrics.QUEUES == ops.QUEUES


def test_any_queue_row_renders_with_missing_queues_as_zero():
    snap = metrics.Snapshot(tenants=("acme", "globex"), queue=[Row("acme", {"deferred": 3, "active": 1}, 42.5)])
    text = metrics.render(snap)
    assert 'relay_queue_messages{tenant="acme",queue="deferred"} 3\n' in text
    assert 'relay_queue_messages{tenant="acme",queue="active"} 1\n' in text
    assert 'relay_queue_messages{tenant="acme",queue="hold"} 0\n' in text
    assert 'relay_queue_messages{tenant="globex",queue="maildrop"} 0\n' in text
    assert 'relay_queue_oldest_deferred_seconds{tenant="acme"} 42.5\n' in text
    assert 'relay_queue_oldest_deferred_seconds{tenant="globex"} 0\n' in text



def test_thousands_of_tenants_write_only_series_in_use():
    """Past defaults.METRICS_ZERO_FILL_TENANTS configured tenants, unused label combinations
    are not written as zeros (issue 17: 10,000 tenants would make ~350,000 series)."""
    from relay_milter import defaults
    from relay_milter.tracking.metrics import Snapshot, render

    few = [f"t{i}" for i in range(3)]
    many = [f"t{i}" for i in range(defaults.METRICS_ZERO_FILL_TENANTS + 1)]
    used = {("t1", "RELAYED"): 4}
    small = render(Snapshot(tenants=tuple(few), event_counts=used, webhook_backlog={}))
    assert 'relay_events_total{tenant="t0",event="RELAYED"} 0' in small
    big = render(Snapshot(tenants=tuple(many), event_counts=used, webhook_backlog={"t2": 1}))
    assert 'relay_events_total{tenant="t1",event="RELAYED"} 4' in big
    assert 'relay_webhook_backlog{tenant="t2"} 1' in big
    assert 'tenant="t0"' not in big and 'tenant="t3"' not in big
