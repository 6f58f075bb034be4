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
    assert "event=reload_pending tenants=initech removed=-" in caplog.text  # the file that changed
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


def test_a_reload_validates_only_the_tenants_that_changed(tmp_path):
    """Issue 17: with the reloader's cache, unchanged entries keep their validated Tenant
    objects; a changed or new one is validated (and a bad one still refused)."""
    import pytest as _pytest

    from relay_milter.config import ConfigError, dump_tenant_set, load_applied_tenants
    from support.factories import tenant, tenant_set

    path = tmp_path / "applied.json"
    path.write_text(dump_tenant_set(tenant_set(tenant("acme"), tenant("globex"))))
    cache: dict = {}
    first = load_applied_tenants(path, cache)
    path.write_text(dump_tenant_set(tenant_set(tenant("acme"), tenant("globex", smarthost={"host": "mx.globex.example"}), tenant("hooli"))))
    second = load_applied_tenants(path, cache)
    assert second.by_id("acme") is first.by_id("acme")
    assert second.by_id("globex") is not first.by_id("globex") and second.by_id("globex").smarthost.host == "mx.globex.example"
    assert second.by_id("hooli") is not None and len(cache) == 3
    bad = path.read_text().replace('"port": 2525', '"port": 0', 1)
    path.write_text(bad)
    with _pytest.raises(ConfigError, match="unreadable applied tenant set"):
        load_applied_tenants(path, cache)


def test_apply_looks_up_dns_only_for_tenants_changed_since_the_last_apply(tmp_path, monkeypatch):
    from relay_milter.config import changed_since_applied, dump_tenant_set
    from relay_milter.postfix import preflight
    from support.factories import tenant, tenant_set

    path = tmp_path / "applied.json"
    assert changed_since_applied(tenant_set(tenant("acme")), path) is None  # nothing applied yet: all
    path.write_text(dump_tenant_set(tenant_set(tenant("acme"), tenant("globex"))))
    now = tenant_set(tenant("acme"), tenant("globex", smarthost={"host": "mx.globex.example"}), tenant("hooli"))
    assert changed_since_applied(now, path) == {"globex", "hooli"}
    looked_up: list[str] = []
    monkeypatch.setattr(preflight, "check_smarthost_name", lambda t, *a: looked_up.append(t.id))
    monkeypatch.setattr(preflight, "check_pinned_vs_dns", lambda t, *a: looked_up.append(t.id + " key"))
    preflight.run(now, Settings(), dns_for={"globex", "hooli"})
    assert sorted(looked_up) == ["globex", "globex key", "hooli", "hooli key"]


def test_apply_parses_only_the_tenant_files_changed_since_the_last_apply(setup, monkeypatch):
    """The applied set records each file's SHA-256; load_tenants(applied=) parses the files
    whose content changed and takes the others' tenants from the applied set."""
    from relay_milter import config
    from relay_milter.config import load_applied_tenants

    tenants, _, applied, key = setup
    first = load_tenants(tenants, applied=applied)  # the setup's applied set has no digests
    applied.write_text(dump_tenant_set(first))
    assert '"sha256": "' in applied.read_text()
    write_tenants(tenants, [tenant_doc("initech", key)])
    parsed: list[str] = []
    real = config._documents
    monkeypatch.setattr(config, "_documents", lambda path: parsed.append(path.name) or real(path))
    again = load_tenants(tenants, applied=applied)
    assert parsed == ["initech.yaml"]
    assert [t.id for t in again] == ["acme", "initech"] and again.by_id("acme") == first.by_id("acme")
    assert dump_tenant_set(again).count('"sha256"') == 2
    assert [t.id for t in load_applied_tenants(applied)] == ["acme"]
    # An edit of acme's file is parsed (its digest changed), and a broken one is refused.
    (tenants / "acme.yaml").write_text((tenants / "acme.yaml").read_text() + "bogus: 1\n")
    with pytest.raises(config.ConfigError, match="field bogus"):
        load_tenants(tenants, applied=applied)
