"""Shared fixtures: generated DKIM keys, tenant definitions, and a real relay lab.

The lab is a private Postfix instance (own config/queue under /var/tmp), the
real milter process, dnsmasq on a loopback port and aiosmtpd sinks. It needs
root and the Debian postfix package; in CI (CI=true) a missing prerequisite
fails the run instead of skipping.
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign
from support.dns import LoopbackDns
from support.factories import unavailable
from support.lablogs import LogWatch, labs_in


@functools.cache
def _e2e_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "end-to-end tests need root (Postfix starts as root)"
    for tool in ("postfix", "postconf", "postqueue", "dnsmasq", "script"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"end-to-end tests need {tool} (run scripts/bootstrap.sh)"
    return None


# -- in parallel: scripts/test.sh runs pytest-xdist workers with --dist loadgroup --------
#
# A test module is the unit of scheduling (its module-scoped lab is started once, on one
# worker, and its tests run there in file order). Modules that change the host itself (the
# Ansible role converges private relays but creates system accounts; network namespaces)
# share one group, so they run one after another. Each worker takes only its own residue
# class of loopback ports and DNS addresses (RELAY_LAB_SLOT, relay_milter.lab.harness.lab_slot).
#
# The groups are given to xdist's scheduler directly (pytest_xdist_make_scheduler), not as
# xdist_group marks: xdist (3.8) passes a mark to the scheduler by appending "@group" to
# item._nodeid on the worker, and pytest 9.2 no longer reads _nodeid, so marks were lost
# and every test was scheduled on its own (one module's tests on both workers, each with
# its own module-scoped lab or deployment). tests/unit/test_parallel.py checks the split.

HOST_GROUP = "host"  # modules that change the host: never two at once


def xdist_scope(nodeid: str) -> str:
    """The scheduling unit of a test: its module, or HOST_GROUP for tests/ansible/."""
    module = nodeid.split("::", 1)[0]
    return HOST_GROUP if module.startswith("tests/ansible/") else module


def pytest_configure(config):
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if worker and count:
        os.environ["RELAY_LAB_SLOT"] = f"{int(worker.removeprefix('gw'))}/{count}"


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without xdist nothing calls it
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return ModuleScheduling(config, log)


# -- every e2e test: no Postfix fatal/panic, no milter traceback (support/lablogs.py) -----
#
# Labs are created by fixtures of any scope. Each one is remembered when its fixture
# returns it; before an e2e test's fixtures are set up, where each live lab's logs end
# is noted (a lab started by this test's own fixtures starts at 0); after the test body,
# what the labs the test used appended is checked, and the test fails with the lines.
# A test that provokes such a line on purpose names it: @pytest.mark.allow_log("regex").

_LIVE_LABS: list[Lab] = []
_LOG_WATCHES = pytest.StashKey[dict[int, LogWatch]]()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    value = yield
    for lab in labs_in(value):
        if not any(lab is known for known in _LIVE_LABS):
            _LIVE_LABS.append(lab)
    return value


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of an e2e test starts a lab: skip it locally, fail it under CI;
    then note where the logs of the labs alive now end."""
    if "e2e" not in item.keywords:
        return
    reason = _e2e_unavailable()
    if reason is not None:
        unavailable(reason)
    _LIVE_LABS[:] = [lab for lab in _LIVE_LABS if lab.base.exists()]
    item.stash[_LOG_WATCHES] = {id(lab): LogWatch(lab) for lab in _LIVE_LABS}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield  # a test that failed already reports that
    if "e2e" in item.keywords:
        watches = item.stash.get(_LOG_WATCHES, {})
        used = {id(lab): lab for value in item.funcargs.values() for lab in labs_in(value)}
        allowed = [pattern for mark in item.iter_markers("allow_log") for pattern in mark.args]
        problems = [p for key, lab in used.items() for p in watches.get(key, LogWatch(lab, fresh=True)).problems(allowed)]
        if problems:
            pytest.fail(
                "the lab logged a Postfix fatal/panic or a milter traceback during this test "
                "(if the test provokes it on purpose, mark it @pytest.mark.allow_log(\"regex\")):\n"
                + "\n".join(problems),
                pytrace=False,
            )
    return result


ACME = dict(id="acme", relay_domain="acme.relay.test", signing_domain="hop.acme.test", selector="r2026", sender_domains=["acme.example"])
GLOBEX = dict(id="globex", relay_domain="globex.relay.test", signing_domain="hop.globex.test", selector="g1", sender_domains=["globex.example"])


@pytest.fixture(scope="session")
def loopback_dns(tmp_path_factory):
    """A dnsmasq on loopback that knows only support.dns.HOSTS (NXDOMAIN for any other
    name): point settings ``dns`` at it (``loopback_dns.settings`` / ``.yaml()``) in every
    test that runs check/apply, so no lookup goes to the system resolver."""
    if not shutil.which("dnsmasq") and not os.path.exists("/usr/sbin/dnsmasq"):
        unavailable("dnsmasq is not installed")
    server = LoopbackDns(tmp_path_factory.mktemp("dns"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def acme_key():
    return rsa_key(2048)


@pytest.fixture(scope="session")
def globex_key():
    return rsa_key(2048)


@pytest.fixture(scope="session")
def lab(acme_key, globex_key):
    """Two tenants: acme (pinned key, header rules) and globex (key from DNS via dnsmasq)."""
    lab = Lab()
    lab.add_tenant(
        TenantSpec(
            **ACME,
            key=acme_key,
            extra={
                "headers": {
                    "strip": ["X-Platform-Trace", "X-Platform-Campaign"],
                    "reply_to": "replies@acme.example",
                    "envelope_sender": "bounces@acme.example",
                }
            },
        ),
        Sink("acme"),
    )
    lab.add_tenant(TenantSpec(**GLOBEX, key=globex_key, pin_key=False), Sink("globex"))
    try:
        lab.start()
        yield lab
    finally:
        if os.environ.get("RELAY_KEEP_LAB"):
            print(f"\nlab kept at {lab.base}")
            lab.stop()
        else:
            lab.destroy()


@pytest.fixture
def clean_sinks(lab):
    for sink in lab.sinks.values():
        with sink.lock:
            sink.messages.clear()
    yield lab


class Mailer:
    """Builds, signs and sends messages for a tenant in the lab."""

    def __init__(self, lab: Lab, tenant: dict, key):
        self.lab, self.t, self.key = lab, tenant, key

    def rcpt(self, address: str) -> str:
        return encode_recipient(address, self.t["relay_domain"])

    def message(self, to="alice@example.org", sender=None, **kw) -> bytes:
        return make_message(sender or f"news@{self.t['sender_domains'][0]}", to, **kw)

    def signed(self, to="alice@example.org", sender=None, key=None, domain=None, selector=None, headers=None, **kw) -> bytes:
        msg = self.message(to, sender, **kw)
        extra = {"headers": headers} if headers else {}
        return sign(msg, key or self.key, domain or self.t["signing_domain"], selector or self.t["selector"], **extra)

    def send(self, raw: bytes, to="alice@example.org", mail_from=None, rcpts=None):
        return self.lab.send(raw, mail_from or f"news@{self.t['sender_domains'][0]}", rcpts or [self.rcpt(to)])


@pytest.fixture
def acme(clean_sinks, acme_key):
    return Mailer(clean_sinks, ACME, acme_key)


@pytest.fixture
def globex(clean_sinks, globex_key):
    return Mailer(clean_sinks, GLOBEX, globex_key)


# -- event store: a private PostgreSQL cluster (tests/pgcluster.py) --------------------


@pytest.fixture(scope="session")
def pg_dsn():
    """DSN of a fresh database in a private PostgreSQL cluster for this test session.
    Skips only when no PostgreSQL server is installed (CI installs it: deps/apt/tracking.txt)."""
    import glob

    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        unavailable("PostgreSQL server not installed (/usr/lib/postgresql/*/bin/initdb): scripts/bootstrap.sh installs deps/apt/tracking.txt")
    from support.pgcluster import PgCluster

    cluster = PgCluster().start()
    try:
        yield cluster.create_database("relay_events")
    finally:
        cluster.destroy()
