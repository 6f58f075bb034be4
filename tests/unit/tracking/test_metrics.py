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

