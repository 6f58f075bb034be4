"""Transport classes (postfix/classes.py): tenants share master.cf transports, never a
next hop within one, and each class's tables give each tenant its own TLS policy and login."""

from __future__ import annotations

import pytest

from relay_milter.config import Settings, TenantSet
from relay_milter.postfix import classes
from relay_milter.postfix.render import (
    APPLIED_TENANTS,
    ROUTE_TABLE,
    check_staged,
    class_problems,
    install,
    needs_reload,
    render_files,
    write_files,
)
from support.classes import class_of, entry
from support.factories import tenant, tenant_set


def auth_tenant(tid: str, host: str, port: int = 587, **smarthost) -> object:
    return tenant(tid, smarthost={"host": host, "port": port, "tls": "verify", "auth": {"username": f"user-{tid}"}, **smarthost})


def secrets_for(tmp_path, *tenants: str):
    path = tmp_path / "secrets.yaml"
    path.write_text("".join(f"{t}: {{smarthost_password: 'pw-of-{t}'}}\n" for t in tenants))  # pragma: allowlist secret
    path.chmod(0o600)
    return path


def test_tenants_with_the_same_settings_share_one_class():
    ts = tenant_set(*(tenant(t, smarthost={"host": f"smtp.{t}.example", "tls": "encrypt"}) for t in ("acme", "globex", "hooli")))
    a = classes.assign(ts, {})
    assert len(a.classes) == 1 and len(set(a.of.values())) == 1
    [c] = a.classes
    assert [t.id for t in c.members] == ["acme", "globex", "hooli"]
    assert c.maxproc == classes.PROCESS_CAP
    files = render_files(ts, Settings())
    assert files["master.cf"].count(f"\n{c.name} unix") == 1
    assert files[f"relay/tls/{c.name}.policy"].splitlines()[-3:] == [
        "[smtp.acme.example]:25\tencrypt", "[smtp.globex.example]:25\tencrypt", "[smtp.hooli.example]:25\tencrypt",
    ]
    for t in ("acme", "globex", "hooli"):
        assert f"X-Relay-Route:{t}\tFILTER {c.name}:[smtp.{t}.example]:25\n" in files[ROUTE_TABLE]


def test_a_class_entry_does_not_depend_on_its_members():
    """maxproc is fixed (each tenant's limit is the destination concurrency limit in main.cf)."""
    one = render_files(tenant_set(tenant("acme", smarthost={"host": "h1.example", "concurrency": 7})), Settings())
    many = render_files(tenant_set(*(tenant(f"t{i:03d}", smarthost={"host": f"h{i}.example", "concurrency": 7}) for i in range(30))), Settings())
    assert one["master.cf"] == many["master.cf"]
    name = class_of(one[ROUTE_TABLE], "acme")
    assert f"\n{name} unix -       -       n       -       {classes.PROCESS_CAP}       smtp\n" in one["master.cf"]
    assert f"\n{name}_destination_concurrency_limit = 7\n" in one["main.cf"]


def test_two_tenants_on_one_smarthost_never_share_a_class_or_a_login(tmp_path):
    """Same host and port, same settings: acme gets the class, globex its sibling _1, each
    with its own transport and password table holding only its own login."""
    ts = tenant_set(auth_tenant("acme", "smtp.shared.example"), auth_tenant("globex", "smtp.shared.example"),
                    auth_tenant("hooli", "smtp.hooli.example"))
    settings = Settings(secrets_file=secrets_for(tmp_path, "acme", "globex", "hooli"))
    files = render_files(ts, settings)
    acme, globex, hooli = (class_of(files[ROUTE_TABLE], t) for t in ("acme", "globex", "hooli"))
    assert globex == acme + "_1" and hooli == acme
    for name in (acme, globex):
        e = entry(files["master.cf"], name)
        assert f"-o smtp_sasl_password_maps=hash:/etc/postfix/relay/smtp_auth/{name}\n" in e
        assert "-o smtp_connection_cache_on_demand=no\n" in e
    assert "pw-of-acme" in files[f"relay/smtp_auth/{acme}"] and "pw-of-globex" not in files[f"relay/smtp_auth/{acme}"]
    assert "pw-of-globex" in files[f"relay/smtp_auth/{globex}"] and "pw-of-acme" not in files[f"relay/smtp_auth/{globex}"]
    assert "pw-of-hooli" in files[f"relay/smtp_auth/{acme}"]
    # The staged check proves it with postmap lookups.
    staged = tmp_path / "staged"
    write_files(files, staged, require_empty=True)
    assert class_problems(staged, classes.assign(ts, {})) == []


def test_the_check_names_a_swapped_login_or_tls_policy_without_printing_a_password(tmp_path):
    ts = tenant_set(auth_tenant("acme", "smtp.acme.example"), auth_tenant("globex", "smtp.globex.example"))
    files = render_files(ts, Settings(secrets_file=secrets_for(tmp_path, "acme", "globex")))
    name = class_of(files[ROUTE_TABLE], "acme")
    tampered = dict(files)
    tampered[f"relay/smtp_auth/{name}"] = files[f"relay/smtp_auth/{name}"].replace("user-globex:pw-of-globex", "user-acme:pw-of-acme")
    tampered[f"relay/tls/{name}.policy"] = files[f"relay/tls/{name}.policy"].replace(
        "[smtp.acme.example]:587\tverify match=smtp.acme.example", "[smtp.acme.example]:587\tmay"
    )
    staged = tmp_path / "staged"
    write_files(tampered, staged, require_empty=True)
    problems = class_problems(staged, classes.assign(ts, {}))
    assert any(f"transport class {name}: tenant globex's login for [smtp.globex.example]:587 is 'user-acme:...'" in p for p in problems), problems
    assert any(f"transport class {name}: tenant acme's TLS policy for [smtp.acme.example]:587 is 'may" in p for p in problems), problems
    assert not any("pw-of" in p for p in problems)


def test_class_names_stay_when_tenants_come_and_go():
    base = [tenant(t, smarthost={"host": f"smtp.{t}.example"}) for t in ("acme", "globex")]
    before = classes.assign(tenant_set(*base), {})
    after = classes.assign(tenant_set(*base, tenant("hooli", smarthost={"host": "smtp.hooli.example"})), {})
    assert before.of["acme"] == after.of["acme"] == after.of["hooli"]
    assert classes.assign(tenant_set(base[1]), {}).of["globex"] == before.of["globex"]


def test_adding_a_tenant_of_an_existing_class_changes_tables_only(tmp_path):
    """install() then reports hash: tables and the milter's tenant set only; relay_domains
    reloads (trivial-rewrite would see it only within 10 s), a smarthost move does not."""
    live = tmp_path / "etc"
    live.mkdir()
    settings = Settings(config_directory=live, queue_directory=tmp_path / "q", data_directory=tmp_path / "d")
    base = [tenant(t, smarthost={"host": f"smtp.{t}.example"}) for t in ("acme", "globex")]
    install(render_files(tenant_set(*base), settings), settings)
    bigger = tenant_set(*base, tenant("hooli", smarthost={"host": "smtp.hooli.example"}))
    changed = install(render_files(bigger, settings), settings, hold=(APPLIED_TENANTS,))
    assert "main.cf" not in changed and "master.cf" not in changed
    assert ROUTE_TABLE in changed and "relay/relay_domains" in changed and APPLIED_TENANTS in changed
    assert needs_reload(changed)
    assert b"hooli" in (live / (ROUTE_TABLE + ".db")).read_bytes()
    # hooli's smarthost moves to another host and port: tables only, no reload.
    moved = tenant_set(*base, tenant("hooli", smarthost={"host": "mx2.hooli.example", "port": 2525}))
    changed = install(render_files(moved, settings), settings)
    assert "master.cf" not in changed and "main.cf" not in changed and "relay/relay_domains" not in changed
    assert ROUTE_TABLE in changed and not needs_reload(changed)
    assert b"[mx2.hooli.example]:2525" in (live / (ROUTE_TABLE + ".db")).read_bytes()
    # A tenant with other settings needs a new class: master.cf changes, Postfix must reload.
    other = tenant_set(*moved, tenant("initech", smarthost={"host": "smtp.initech.example", "concurrency": 3}))
    changed = install(render_files(other, settings), settings)
    assert "master.cf" in changed and needs_reload(changed)


def test_needs_reload():
    assert not needs_reload([ROUTE_TABLE, "relay/requeue/route", "relay/tls/rc_0123456789.policy", APPLIED_TENANTS])
    assert not needs_reload(["relay/smtp_auth/rc_0123456789_1 (removed)", "relay/bounce_transport"])
    assert needs_reload(["relay/relay_domains", ROUTE_TABLE])
    for name in ("main.cf", "master.cf", "relay/strip_route.regexp", "relay/notify.policy", "sasl/smtpd.conf"):
        assert needs_reload([ROUTE_TABLE, name])


def test_full_staged_check_of_shared_classes(tmp_path):
    ts = tenant_set(auth_tenant("acme", "smtp.shared.example"), auth_tenant("globex", "smtp.shared.example"),
                    tenant("hooli", smarthost={"host": "smtp.hooli.example"}))
    settings = Settings(secrets_file=secrets_for(tmp_path, "acme", "globex"))
    staged = tmp_path / "staged"
    write_files(render_files(ts, settings), staged, require_empty=True)
    result = check_staged(staged, ts, run_postfix_check=False, assignment=classes.assign(ts, {}))
    assert result.ok, result.problems
