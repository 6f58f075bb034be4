"""Reading transport classes back from rendered files (postfix/classes.py)."""

from __future__ import annotations

import re


def class_of(route_table: str, tenant: str) -> str:
    """The transport class the route table gives ``tenant`` (relay/route's text)."""
    m = re.search(rf"^X-Relay-Route:{re.escape(tenant)}\tFILTER ([^:\s]+):", route_table, re.M)
    assert m, f"no route for tenant {tenant}"
    return m.group(1)


def entry(master_cf: str, transport: str) -> str:
    """The master.cf entry of ``transport`` with its -o lines (up to the next comment or entry)."""
    m = re.search(rf"^{re.escape(transport)} +unix .*?(?=^\S|\Z)", master_cf, re.M | re.S)
    assert m, f"no master.cf entry {transport}"
    return m.group(0)
