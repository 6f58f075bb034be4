"""Two-phase tenant changes in the milter: an edit of the tenant files is not live until
`relayctl apply` writes the applied set (milter/reloader.py)."""

from __future__ import annotations

import logging

import pytest

from relay_milter.config import Settings, applied_tenants_path, dump_tenant_set, load_tenants
from relay_milter.lab import rsa_key
from relay_milter.milter.reloader import ReloadingPolicy
from support.factories import tenant_doc, write_tenants


@pytest.fixture
def setup(tmp_path):
    key = rsa_key(1024)
    tenants = write_tenants(tmp_path / "tenants", [tenant_doc("acme", key)])
    settings = Settings(config_directory=tmp_path / "postfix")
    applied = applied_tenants_path(settings)
    applied.parent.mkdir(parents=True)
    applied.write_text(dump_tenant_set(load_tenants(tenants)))
    return tenants, settings, applied, key


def ids(source: ReloadingPolicy) -> list[str]:
    return [t.id for t in source.current().tenants]


def test_an_edit_is_not_live_until_applied(setup, caplog):
    tenants, settings, applied, key = setup
    source = ReloadingPolicy(tenants, settings)
    assert ids(source) == ["acme"] and source.source == str(applied)
    write_tenants(tenants, [tenant_doc("initech", key)])
    with caplog.at_level(logging.INFO, logger="relay.milter"):
        source.check()
    assert ids(source) == ["acme"]
    assert "event=reload_pending tenants=acme,initech" in caplog.text
    applied.write_text(dump_tenant_set(load_tenants(tenants)))
    source.check()
    assert ids(source) == ["acme", "initech"]


def test_a_broken_edit_is_logged_and_changes_nothing(setup, caplog):
    tenants, settings, _, _ = setup
    source = ReloadingPolicy(tenants, settings)
    (tenants / "acme.yaml").write_text((tenants / "acme.yaml").read_text() + "bogus: 1\n")
    with caplog.at_level(logging.INFO, logger="relay.milter"):
        source.check()
    assert ids(source) == ["acme"]
    assert "event=reload_failed" in caplog.text and "field bogus: unknown field" in caplog.text


def test_the_snapshot_round_trips(setup):
    tenants, _, applied, _ = setup
    ts = load_tenants(tenants)
    assert dump_tenant_set(ts) == applied.read_text()
    from relay_milter.config import load_applied_tenants

    again = load_applied_tenants(applied)
    assert again.tenants == ts.tenants and again.sources == ts.sources
