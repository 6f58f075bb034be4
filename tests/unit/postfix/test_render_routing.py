"""The rendered defaults of issue 11: requeue routing by seal, bare newlines, error limits, subdomains."""

from __future__ import annotations

import re
import grp
import os

import pytest

from relay_milter.config import Settings, load_tenants
from relay_milter.core import route
from relay_milter.postfix.render import REQUEUE_TABLE, ROUTE_TABLE, render_and_check, render_files
from support.classes import class_of, entry
from support.paths import EXAMPLES


@pytest.fixture(scope="module")
def files():
    return render_files(load_tenants(EXAMPLES), Settings())


def test_no_header_checks_anywhere_but_the_requeue_seal_table(files):
    main, master = files["main.cf"], files["master.cf"]
    for name in ("header_checks", "mime_header_checks", "nested_header_checks", "body_checks"):
        assert f"\n{name} =\n" in main
    requeue = master.split("cleanup_requeue unix", 1)[1].split("\nqmgr", 1)[0] + "\n"
    assert f"-o header_checks=hash:/etc/postfix/{REQUEUE_TABLE}\n" in requeue
    assert "-o mime_header_checks=\n" in requeue and "-o nested_header_checks=\n" in requeue
    assert f"/{ROUTE_TABLE}\n" not in requeue  # the milter's route table never routes requeued mail


def test_requeue_table_routes_only_the_seal(files):
    key = route.parse_route_key(files["relay/requeue/route.key"])
    table = files[REQUEUE_TABLE]
    seal = route.tenant_seal(key, "acme")
    assert f"\nX-Relay-Route-Seal:{seal}\tFILTER {class_of(files[ROUTE_TABLE], 'acme')}:" in table
    assert not re.search(r"^X-Relay-Route:", table, re.M)


def test_smtp_edge_defaults(files):
    main, master = files["main.cf"], files["master.cf"]
    assert "\nsmtpd_forbid_bare_newline = yes\nsmtpd_forbid_bare_newline_exclusions =\n" in main
    assert "relay_domains" not in main.split("parent_domain_matches_subdomains =", 1)[1].split("\n", 1)[0]
    assert "\nlocal_header_rewrite_clients =\n" in main
    assert "{tls_version}" in main.split("milter_mail_macros =", 1)[1].split("\n", 1)[0]
    port25 = re.split(r"\n\S", master.split("      inet  n       -       n       -       -       smtpd\n", 1)[1], maxsplit=1)[0]
    assert "-o smtpd_hard_error_limit=${stress?{1}:{1020}}" in port25
    assert "-o smtpd_soft_error_limit=1010" in port25
    assert "-o smtp_header_checks=regexp:/etc/postfix/relay/strip_route.regexp" in master
    assert files["relay/strip_route.regexp"].count("IGNORE") == 2


def test_apply_creates_the_key_once_and_keeps_it(tmp_path):
    live = tmp_path / "etc"
    live.mkdir()  # a live config directory exists (install refuses to create /etc/postfix itself)
    settings = Settings(config_directory=live, queue_directory=tmp_path / "q", data_directory=tmp_path / "d")
    tenants = load_tenants(EXAMPLES)
    from relay_milter.postfix.render import install

    first, result = render_and_check(tenants, settings)
    assert result.ok, result.problems
    install(first, settings)
    key_file = live / "relay" / "requeue" / "route.key"
    if os.geteuid() == 0:  # install() shares the key with the milter's group (postfix) only
        assert (key_file.stat().st_mode & 0o777, key_file.parent.stat().st_mode & 0o777) == (0o640, 0o750)
        assert key_file.stat().st_gid == key_file.parent.stat().st_gid == grp.getgrnam("postfix").gr_gid
    else:
        assert key_file.stat().st_mode & 0o777 == 0o600
    assert (live / REQUEUE_TABLE).stat().st_mode & 0o777 == 0o600
    again, _ = render_and_check(tenants, settings)
    assert again["relay/requeue/route.key"] == key_file.read_text() == first["relay/requeue/route.key"]
    assert again[REQUEUE_TABLE] == first[REQUEUE_TABLE]
    assert "relay/requeue/route.key" not in install(again, settings)


def test_one_pass_route_check_catches_a_wrong_or_missing_route(tmp_path, files):
    """route_problems looks every key up with one postmap -q - per table, and still names
    each tenant whose route is wrong or missing, and an unknown tenant that resolves."""
    from relay_milter.postfix.render import route_problems, write_files

    tenants = load_tenants(EXAMPLES)
    good = tmp_path / "good"
    write_files(files, good, require_empty=True)
    (good / "main.cf").write_text("")  # postmap -c reads main.cf
    assert route_problems(good, tenants) == []
    bad = tmp_path / "bad"
    tampered = dict(files)
    acme, globex = class_of(files[ROUTE_TABLE], "acme"), class_of(files[ROUTE_TABLE], "globex")
    tampered[ROUTE_TABLE] = (
        files[ROUTE_TABLE].replace(f"{globex}:", f"{acme}:")
        .replace("X-Relay-Route:acme\t", "X-Relay-Route:acmx\t")
        + f"X-Relay-Route:no-such-tenant\tFILTER {acme}:[x]:25\n"
    )
    key = route.parse_route_key(files["relay/requeue/route.key"])
    tampered[REQUEUE_TABLE] = files[REQUEUE_TABLE] + f"X-Relay-Route:acme\tFILTER {acme}:[x]:25\n"
    write_files(tampered, bad, require_empty=True)
    (bad / "main.cf").write_text("")
    problems = route_problems(bad, tenants)
    assert any(p.startswith("route table: tenant acme resolves to ''") for p in problems), problems
    assert any(p.startswith(f"route table: tenant globex resolves to 'FILTER {acme}:") for p in problems), problems
    assert any(p.startswith(f"route table: an unknown tenant resolves to 'FILTER {acme}:[x]:25'") for p in problems), problems
    assert any(p.startswith(f"requeue table: tenant acme resolves to 'FILTER {acme}:[x]:25', expected ''") for p in problems), problems
    assert route.tenant_seal(key, "acme") in files[REQUEUE_TABLE]


def test_postfix_check_sees_one_tenant_entry_standing_for_all():
    """check_staged runs postfix check on master.cf with the first tenant transport only
    (postconf -M has parsed them all); every other service stays."""
    from relay_milter.postfix.render import one_tenant_entry

    from support.factories import tenant, tenant_set

    ts = tenant_set(*(tenant(t, smarthost={"host": "127.0.0.1", "concurrency": c}) for t, c in (("acme", 2), ("globex", 3), ("initech", 4))))
    files = render_files(ts, Settings())
    master = files["master.cf"]
    names = sorted(class_of(files[ROUTE_TABLE], t) for t in ("acme", "globex", "initech"))
    assert len(set(names)) == 3 and all(f"\n{n} unix" in master for n in names)
    cut = one_tenant_entry(master)
    first = names[0]
    assert f"\n{first} unix" in cut and f"-o smtp_tls_policy_maps=hash:/etc/postfix/relay/tls/{first}.policy" in cut
    assert not any(n in cut for n in names[1:])
    assert cut.count("\nrc_") == 1
    kept = [ln for ln in master.splitlines() if ln and not ln.startswith(("#", " ")) and not ln.startswith("rc_")]
    assert kept and all(ln in cut.splitlines() for ln in kept)


def test_route_tables_are_case_exact_as_cleanup_looks_them_up(tmp_path, files):
    """Cleanup looks a header line up without folding its case; a route table whose keys
    postmap folded to lower case would route nothing, and the check says so."""
    import subprocess

    from relay_milter.postfix.render import route_problems, write_files

    tenants = load_tenants(EXAMPLES)
    staged = tmp_path / "s"
    write_files(files, staged, require_empty=True)
    assert route_problems(staged, tenants) == []
    subprocess.run(["postmap", "-c", str(staged), f"hash:{staged / ROUTE_TABLE}"], check=True)  # folds the keys
    problems = route_problems(staged, tenants)
    assert any(p.startswith("route table: tenant acme resolves to ''") for p in problems), problems
