"""Render Postfix configuration from tenants, check it in a staging directory, install it.

Files rendered (relative to the Postfix config directory):

    main.cf, master.cf            one master.cf transport per transport class (postfix/classes.py)
    relay/route                   milter_header_checks (hash:, exact match): route marker -> FILTER
    relay/relay_domains           relay_domains (hash:): the tenants' relay and bounce domains
    relay/strip_route.regexp      smtp_header_checks on tenant transports
    relay/bounce_transport        transport_maps (hash:) for relay-generated mail
    relay/smarthost_status.regexp smtp_delivery_status_filter of the tenant transports: an
                                  unresolvable smarthost name defers (4.4.4), never bounces
    relay/tenants.applied.json    the checked tenant set the milter serves (two-phase changes)
    relay/tls/<class>.policy      smtp_tls_policy_maps of a transport class (hash:, by next hop)
    relay/smtp_auth/<class>       smtp_sasl_password_maps of a class with smarthost.auth (hash:,
                                  by next hop; mode 0600)
    relay/requeue/route           header_checks of cleanup_requeue (hash:): route seal -> FILTER,
                                  for mail requeued with postsuper -r (mode 0600: the seals)
    relay/requeue/route.key       the route-seal key (core/route.py): a new one only when there is
                                  none, else the live one as it is (install() makes it 0640 and its
                                  directory 0750, group milter_socket_group, for the milter)
    sasl/smtpd.conf               Cyrus SASL (Debian reads $config_directory/sasl) for the submission listeners

Every table that changes with the tenants is a ``hash:`` table: ``write_files`` builds its
``.db`` with ``postmap`` under a temporary name and renames it into place, and Postfix's
daemons notice the new file and restart by themselves before their next client. So a
change that touches only such tables (a tenant's smarthost host, port, TLS match or
password) needs no ``postfix reload`` (``needs_reload``); a new or removed tenant reloads
because of relay_domains, and a new transport class because of master.cf. The route tables are exact-match: one hash lookup per header whatever
the number of tenants, and ``check_staged`` verifies every tenant's route, TLS policy and
login with one ``postmap -q -`` per table (docs/scale.md).
"""

from __future__ import annotations

import grp
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from relay_milter import defaults
from relay_milter.core import bounces, route
from relay_milter.postfix import classes as transport_classes
from relay_milter.postfix import fds
from relay_milter.postfix.runner import PostfixToolError, run_postfix, run_postfix_tool
from relay_milter.config import APPLIED_TENANTS, NOTIFY_TRANSPORT, ConfigError, Settings, TenantSet, dump_tenant_set, load_secrets
from relay_milter.core import reputation
from relay_milter.postfix import drain

OUTPUTS = {
    "main.cf": "main.cf.j2",
    "master.cf": "master.cf.j2",
    "relay/route": "route.hash.j2",
    "relay/relay_domains": "relay_domains.j2",
    "relay/strip_route.regexp": "strip_route.regexp.j2",
    "relay/bounce_transport": "bounce_transport.j2",
    "relay/smarthost_status.regexp": "smarthost_status.regexp.j2",
    "sasl/smtpd.conf": "cyrus_smtpd.conf.j2",
}
# Per-class tables live in these directories; files of removed classes are deleted on install.
# (and relay/drain, the drained node's client table: removed again by undrain).
PER_TENANT_DIRS = ("relay/tls", "relay/smtp_auth", drain.TABLE_DIR)
SECRET_DIR = "relay/smtp_auth"
REQUEUE_DIR = "relay/requeue"
ROUTE_TABLE = "relay/route"
REQUEUE_TABLE = REQUEUE_DIR + "/route"
RELAY_DOMAINS_TABLE = "relay/relay_domains"
BOUNCE_TABLE = "relay/bounce_transport"
TLS_DIR = "relay/tls"
# hash: tables (write_files runs postmap; Postfix picks a new one up without a reload).
HASH_TABLES = (ROUTE_TABLE, REQUEUE_TABLE, RELAY_DOMAINS_TABLE, BOUNCE_TABLE)
# Header-check tables: cleanup looks a header line up as it is, without folding it to lower
# case (other lookups fold), so postmap must not fold their keys either (postmap -f); their
# keys are spelled exactly as the milter adds the header ("X-Relay-Route:acme").
CASE_EXACT_TABLES = (ROUTE_TABLE, REQUEUE_TABLE)
# Files of earlier releases that install() deletes: the regexp route tables, replaced by the
# exact-match ones above (a regexp table tested every tenant's pattern for every header).
RETIRED = ("relay/route.regexp", REQUEUE_DIR + "/route.regexp")
# Signed-ingress listeners: every RCPT for another tenant gets a 452 and Postfix counts it as
# an error. Postfix's defaults (soft 10, hard 20) would slow the session down after ten and end
# it with 421 after twenty, losing the accepted recipients of the transaction with it. A
# transaction may draw up to smtpd_recipient_limit (1000) such refusals; the usual allowance
# for real errors comes on top. Postfix resets the count after each delivered message, and
# under stress (anvil/overload) the limit stays 1, as Postfix has it.
ERROR_LIMITS = {"soft": 1010, "hard": "${stress?{1}:{1020}}"}
# main.cf: settings postfix_extra follow this line; everything above is the relay's own.
EXTRA_MARKER = "# -- postfix_extra (relay.yaml): operator additions, checked by relayctl check"


def is_hash_table(name: str) -> bool:
    """Rendered files that are hash: tables: postmap builds ``<name>.db`` next to them."""
    return name in HASH_TABLES or name.startswith((TLS_DIR + "/", SECRET_DIR + "/"))


def needs_reload(changed: list[str]) -> bool:
    """Whether Postfix must reload to use the installed changes: not when only hash: tables
    (Postfix's daemons re-read those by themselves), the milter's tenant set or the keys
    changed. Except relay_domains: trivial-rewrite checks its tables only every 10 s and
    smtpd remembers its last answer, so a new or removed tenant (its relay domain) reloads,
    for mail to be accepted within seconds. Removed files (`` (removed)``) of retired
    classes come with a master.cf change."""
    quiet = (APPLIED_TENANTS, defaults.ROUTE_KEY_FILE, defaults.VERP_KEY_FILE)
    names = [n.removesuffix(" (removed)") for n in changed]
    return any(n == RELAY_DOMAINS_TABLE or not (is_hash_table(n) or n in quiet) for n in names)


def is_secret(name: str) -> bool:
    """Rendered files holding credentials: written mode 0600, never printed."""
    return name.startswith((SECRET_DIR + "/", REQUEUE_DIR + "/"))


def template_dir(explicit: Path | None = None) -> Path:
    candidates = [explicit] if explicit else []
    if os.environ.get("RELAY_TEMPLATES"):
        candidates.append(Path(os.environ["RELAY_TEMPLATES"]))
    candidates += list(defaults.TEMPLATE_DIRS)
    for c in candidates:
        if c and (c / "main.cf.j2").is_file():
            return c
    raise ConfigError("cannot find the Postfix templates (set --templates or RELAY_TEMPLATES)")


def source_addresses(tenants: TenantSet, settings: Settings, reputation_state: dict | None = None) -> dict:
    """tenant id -> the pool address its transport binds to (None: the host's default),
    with the failovers of the reputation state. The caller reads the state
    (``reputation.state.state_for``): without one, no failover is in force."""
    state = reputation.empty_state() if reputation_state is None else reputation_state
    return reputation.assignments(tenants, settings.reputation, state)


def assignment_for(
    tenants: TenantSet, settings: Settings, reputation_state: dict | None = None
) -> transport_classes.Assignment:
    """The transport classes of ``tenants``: named after the source address each tenant's
    configuration gives it, bound to the one it sends from now (failovers applied)."""
    homes = {t.id: reputation.configured_address(t, settings.reputation) for t in tenants}
    return transport_classes.assign(tenants, source_addresses(tenants, settings, reputation_state), homes)


def render_files(
    tenants: TenantSet,
    settings: Settings,
    templates: Path | None = None,
    reputation_state: dict | None = None,
    assignment: transport_classes.Assignment | None = None,
) -> dict[str, str]:
    if assignment is None:
        assignment = assignment_for(tenants, settings, reputation_state)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir(templates))),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    context = {
        "s": settings,
        "tenants": sorted(tenants, key=lambda t: t.id),
        "route_header": defaults.ROUTE_HEADER,
        "route_seal_header": defaults.ROUTE_SEAL_HEADER,
        "route_table": ROUTE_TABLE,
        "requeue_table": REQUEUE_TABLE,
        "error_limits": ERROR_LIMITS,
        "private_instance": settings.config_directory != Path(defaults.CONFIG_DIRECTORY),
        "classes": assignment.classes,
        "routes": {t.id: assignment.route(t) for t in tenants},
        "relay_domains_table": RELAY_DOMAINS_TABLE,
        "notify_transport": NOTIFY_TRANSPORT,
        "extra_marker": EXTRA_MARKER,
        # relayctl drain: the listeners answer 421 until undrain (postfix/drain.py).
        "drain": drain.render_context(settings.config_directory),
    }
    files = {name: env.get_template(tpl).render(**context) for name, tpl in OUTPUTS.items()}
    key_text = _read(settings.config_directory / defaults.ROUTE_KEY_FILE)
    if key_text is None or route.parse_route_key(key_text) is None:
        key_text = route.new_route_key()  # installed with the rest; an existing key is kept
    files[defaults.ROUTE_KEY_FILE] = key_text
    if any(t.bounce_tracking for t in tenants):  # bounce tracking (issue 15 A): the VERP keys
        verp_text = _read(settings.config_directory / defaults.VERP_KEY_FILE)
        if verp_text is None or not bounces.parse_keys(verp_text):
            verp_text = bounces.new_key_file()  # an existing file (and its rotation) is kept
        files[defaults.VERP_KEY_FILE] = verp_text
    key = route.parse_route_key(key_text)
    seals = {t.id: route.tenant_seal(key, t.id) for t in tenants}
    files[REQUEUE_TABLE] = env.get_template("requeue_route.hash.j2").render(**context, seals=seals)
    secrets = load_secrets(settings.secrets_file, tenants)
    tls_policy, sasl_passwd = env.get_template("tls_policy.j2"), env.get_template("sasl_passwd.j2")
    for c in assignment.classes:
        files[f"{TLS_DIR}/{c.name}.policy"] = tls_policy.render(c=c)
        if c.settings.auth:
            passwords = {t.id: secrets[t.id].smarthost_password for t in c.members}
            files[f"{SECRET_DIR}/{c.name}"] = sasl_passwd.render(c=c, passwords=passwords)
    if context["drain"]:
        files[drain.TABLE] = drain.table_text()
    if settings.notify:
        files["relay/notify.policy"] = f"{settings.notify.smarthost.nexthop}\t{settings.notify.smarthost.tls_policy}\n"
    # Written last by install(): the milter switches to it only after Postfix has its tables.
    files[APPLIED_TENANTS] = dump_tenant_set(tenants)
    return files


class UnsafeDirectory(ConfigError):
    """An output directory root should not write into (owned or writable by someone else)."""


def _check_dir(fd: int, path: Path, require_empty: bool = False) -> None:
    """Root writes only into directories that only it (the caller's identity) controls."""
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise UnsafeDirectory(
            f"{path}: owned by uid {st.st_uid}, not by uid {os.geteuid()}: refusing to write there "
            "(use a new directory, or one you own that only you can write to)"
        )
    if st.st_mode & 0o022:
        raise UnsafeDirectory(
            f"{path}: mode {st.st_mode & 0o777:04o}: group or others can write there; refusing to write "
            "(chmod go-w, or use a new directory)"
        )
    if require_empty and os.listdir(fd):
        raise UnsafeDirectory(f"{path}: not empty: render into a new or empty directory")


def _open_dir(path: Path, create: bool, mode: int = 0o755) -> int:
    """Open (and with ``create`` make, if missing) a directory without following a symlink."""
    if create:
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        # Any other failure to create is I/O, not a safety refusal: the caller reports it
        # as "cannot write" (exit 4), with the OS's reason.
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UnsafeDirectory(f"{path}: cannot open as a directory ({exc.strerror}); a symlink is not followed") from None


def _subdir(parent_fd: int, parent: Path, name: str, mode: int) -> int:
    """Open (create if need be) ``name`` under ``parent_fd`` and check it like the top."""
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:
        raise UnsafeDirectory(f"{parent / name}: cannot open as a directory ({exc.strerror})") from None
    try:
        _check_dir(fd, parent / name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_at(dir_fd: int, name: str, text: str, mode: int, postmap: list[str] | None = None) -> None:
    """Write a file in the directory ``dir_fd`` by a fresh temporary name (O_EXCL|O_NOFOLLOW:
    never an existing file or a planted symlink), then rename it over ``name``.

    ``postmap`` (the command up to the table, e.g. ``["postmap", "-c", dir]``): the file is a
    hash: table; its ``.db`` is built from the temporary file and renamed over ``name.db``
    first, then the text over ``name`` (so the .db is never older than its source, and a
    Postfix daemon reading the old .db sees it replaced and restarts)."""
    data = text.encode("utf-8")
    for _ in range(100):
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    else:
        raise UnsafeDirectory(f"cannot create a temporary file for {name}")
    made = [tmp]
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if postmap is not None:
            made.append(tmp + ".db")
            _postmap(dir_fd, tmp, name, mode, postmap)
            os.replace(tmp + ".db", name + ".db", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            made.pop()
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        for leftover in made:
            try:
                os.unlink(leftover, dir_fd=dir_fd)
            except OSError:
                pass
        raise


class PostmapFailed(ConfigError):
    """postmap could not build a table (the file's text is in the error)."""


def _postmap(dir_fd: int, tmp: str, name: str, mode: int, postmap: list[str]) -> None:
    """Build ``tmp.db`` from ``tmp`` (both in ``dir_fd``), mode ``mode``. The path goes
    through /proc/<pid>/fd/<dir_fd>: the directory already opened and checked, never a
    path an unprivileged user could redirect."""
    path = f"/proc/{os.getpid()}/fd/{dir_fd}/{tmp}"
    argv = [*postmap, f"hash:{path}"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PostmapFailed(f"postmap {name}: {exc}") from None
    bad = [ln for ln in (r.stderr + r.stdout).splitlines() if "fatal:" in ln or "error:" in ln]
    if r.returncode != 0 or bad:
        text = (bad[0] if bad else (r.stderr or r.stdout).strip() or f"exit {r.returncode}").replace(path, name)
        raise PostmapFailed(f"postmap {name}: {text}")
    db = os.open(tmp + ".db", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fchmod(db, mode)
    finally:
        os.close(db)


def write_files(files: dict[str, str], out: Path, require_empty: bool = False) -> list[Path]:
    """Write rendered files under ``out``, which must be owned by the caller (root) and not
    writable by group or others (``require_empty``: also new or empty, as for ``render --out``).

    Every directory is opened without following symlinks and checked the same way, and every
    file is created under a fresh name with O_EXCL|O_NOFOLLOW and renamed into place, so
    nothing planted in the directory is ever opened for writing. hash: tables
    (``is_hash_table``) get their ``.db`` built by postmap the same way."""
    out = Path(out)
    top = _open_dir(out, create=require_empty)
    postmap: list[str] | None = None
    written = []
    written_names: set[str] = set()
    try:
        _check_dir(top, out, require_empty=require_empty)
        for name, text in files.items():
            *parts, base = name.split("/")
            secret = is_secret(name)
            fds = [top]
            try:
                where = out
                for i, part in enumerate(parts):
                    last = i == len(parts) - 1
                    mode = 0o700 if secret and last else 0o755
                    fds.append(_subdir(fds[-1], where, part, mode))
                    where = where / part
                if secret:
                    os.fchmod(fds[-1], 0o700)
                if is_hash_table(name) and postmap is None:
                    # postmap reads main.cf for its defaults: the one being written, if any.
                    has_main = "main.cf" in written_names or (out / "main.cf").is_file()
                    postmap = ["postmap", "-c", str(out)] if has_main else ["postmap"]
                table_postmap = None
                if is_hash_table(name):
                    table_postmap = [*postmap, "-f"] if name in CASE_EXACT_TABLES else postmap
                _write_at(fds[-1], base, text, 0o600 if secret else 0o644, table_postmap)
                if name == "main.cf":
                    # Postfix's tools wait (300 ms at a time) while main.cf's mtime is the
                    # current second, in case it is still being written: date it 2 s back, so
                    # the postmap and postconf runs that follow do not wait a second each.
                    past = time.time() - 2
                    os.utime(base, (past, past), dir_fd=fds[-1], follow_symlinks=False)
            finally:
                for fd in fds[1:]:
                    os.close(fd)
            written.append(out / name)
            written_names.add(name)
    finally:
        os.close(top)
    return written


@dataclass
class CheckResult:
    ok: bool
    problems: list[str]
    warnings: list[str] = field(default_factory=list)


_DIAGNOSTIC = re.compile(r"^\S+: (warning|fatal|error|panic): ")


def check_staged(
    staging: Path,
    tenants: TenantSet,
    run_postfix_check: bool = True,
    assignment: transport_classes.Assignment | None = None,
) -> CheckResult:
    """postconf (any warning is a failure), master.cf parse, route and class table lookups,
    postfix check. ``assignment``: the transport classes rendered (default: without source
    addresses)."""
    problems: list[str] = []
    # postconf's time grows with the square of the tenant transports (docs/scale.md): minutes
    # of CPU at 10,000 tenants.
    timeout = max(120.0, 0.1 * len(tenants))
    for argv, what in (
        (["postconf", "-c", str(staging), "-n"], "main.cf"),
        (["postconf", "-c", str(staging), "-M"], "master.cf"),
    ):
        try:
            r = run_postfix(argv, timeout=timeout)
        except subprocess.TimeoutExpired:
            problems.append(f"{what}: {shlex.join(argv)} timed out after {timeout:g} s ({len(tenants)} tenants: docs/scale.md)")
            continue
        out = r.stdout.replace("\r", "")
        bad = [line for line in out.splitlines() if _DIAGNOSTIC.match(line)]
        if r.returncode != 0 or bad:
            problems.append(f"{what}: {' | '.join(bad) or out.strip() or f'exit {r.returncode}'}")
    problems += route_problems(staging, tenants, assignment)
    if run_postfix_check:
        # postfix check runs postconf a score of times, and postconf's time grows with the
        # square of the master.cf services that carry -o options (docs/scale.md: 3.4 s of CPU per
        # run at 2,000 tenants). postconf -M above has parsed every tenant entry; postfix check
        # adds the checks of files and directories, which do not depend on them. So it sees
        # master.cf with the first class entry standing for all (one template renders them).
        master = staging / "master.cf"
        full = master.read_text(encoding="utf-8")
        try:
            master.write_text(one_tenant_entry(full), encoding="utf-8")
            r = run_postfix(["postfix", "-c", str(staging), "check"])
        finally:
            master.write_text(full, encoding="utf-8")
        if r.returncode != 0 or "fatal:" in r.stdout:
            problems.append(f"postfix check: {r.stdout.strip() or f'exit {r.returncode}'}")
    return CheckResult(not problems, problems)


def one_tenant_entry(master_cf: str) -> str:
    """master.cf with its tenant transports (transport class entries ``rc_...`` and the
    comment line before each) cut down to the first one."""
    out: list[str] = []
    seen = 0
    skipping = False
    lines = master_cf.splitlines(keepends=True)
    for n, line in enumerate(lines):
        if line[:1].isspace() and line.strip():
            if not skipping:
                out.append(line)
            continue
        nxt = lines[n + 1] if n + 1 < len(lines) else ""
        is_tenant = _TENANT_ENTRY.match(line) is not None
        if line.startswith("# Transport class ") and _TENANT_ENTRY.match(nxt):
            skipping = seen >= 1
        elif is_tenant:
            seen += 1
            skipping = seen > 1
        else:
            skipping = False
        if not skipping:
            out.append(line)
    return "".join(out)


_TENANT_ENTRY = re.compile(rf"^{transport_classes.PREFIX}[0-9a-f]+(?:_[0-9]+)? ")


def lookup_all(staging: Path, table: str, keys: list[str]) -> tuple[dict[str, str], str | None]:
    """Look every key up in the hash: table ``table`` (relative to ``staging``) with one
    ``postmap -q -`` (keys on standard input): key -> value for the keys found, and an
    error text if postmap failed."""
    exact = ["-f"] if table in CASE_EXACT_TABLES else []  # looked up as cleanup does: no folding
    argv = ["postmap", "-c", str(staging), *exact, "-q", "-", f"hash:{staging / table}"]
    try:
        r = run_postfix_tool(argv, input="".join(k + "\n" for k in keys), what=f"postmap -q - hash:{table}", not_found_ok=True)
    except PostfixToolError as exc:
        return {}, str(exc)
    found: dict[str, str] = {}
    for line in r.stdout.splitlines():
        key, sep, value = line.partition("\t")
        if sep:
            found[key] = value.strip()
    return found, None


def route_problems(
    staging: Path, tenants: TenantSet, assignment: transport_classes.Assignment | None = None
) -> list[str]:
    """What the staged tables prove, in one postmap run per table (linear in the tenant
    count): every tenant's marker resolves to its own transport class and next hop, an
    unknown tenant's to nothing; in the requeue table, only the tenant's seal made with the
    relay's key routes (neither the plain marker nor a seal made without the key); no
    class holds a next hop twice; in its class's tables, each tenant's next hop resolves to
    its own TLS policy and (with smarthost.auth) its own login."""
    if assignment is None:
        assignment = transport_classes.assign(tenants, {})
    problems: list[str] = []
    want = {t.id: f"FILTER {assignment.route(t)}" for t in tenants}
    unknown = route.table_key(defaults.ROUTE_HEADER, route.marker_value("no-such-tenant"))
    expect = {route.table_key(defaults.ROUTE_HEADER, route.marker_value(tid)): (tid, w) for tid, w in want.items()}
    expect[unknown] = ("an unknown tenant", "")
    found, error = lookup_all(staging, ROUTE_TABLE, list(expect))
    if error:
        return [f"route table: {error}"]
    for key, (who, w) in expect.items():
        got = found.get(key, "")
        if got != w:
            label = who if who == "an unknown tenant" else f"tenant {who}"
            problems.append(f"route table: {label} resolves to {got!r}, expected {w!r}")
    key = route.parse_route_key(_read(staging / defaults.ROUTE_KEY_FILE) or "")
    if key is None:
        problems.append(f"{defaults.ROUTE_KEY_FILE}: missing or not a 256-bit hex key")
    probes: dict[str, tuple[str, str]] = {}
    for tid, w in want.items():
        # The plain marker never routes a requeued message, nor a seal made without the key.
        probes[route.table_key(defaults.ROUTE_HEADER, route.marker_value(tid))] = (tid, "")
        probes[route.table_key(defaults.ROUTE_SEAL_HEADER, f"{tid}.{'0' * 40}")] = (tid, "")
        if key is not None:
            probes[route.table_key(defaults.ROUTE_SEAL_HEADER, route.tenant_seal(key, tid))] = (tid, w)
    found, error = lookup_all(staging, REQUEUE_TABLE, list(probes))
    if error:
        return problems + [f"requeue table: {error}"]
    for probe, (tid, w) in probes.items():
        got = found.get(probe, "")
        if got != w:
            problems.append(f"requeue table: tenant {tid} resolves to {got!r}, expected {w!r}")
    return problems + class_problems(staging, assignment)


def class_problems(staging: Path, assignment: transport_classes.Assignment) -> list[str]:
    """Per transport class: every next hop once; each member's next hop resolves to the
    member's own TLS policy and login in the class's tables."""
    problems: list[str] = []
    for c in assignment.classes:
        hops = [t.smarthost.nexthop for t in c.members]
        shared = sorted({h for h in hops if hops.count(h) > 1}) if len(set(hops)) != len(hops) else []
        for h in shared:
            problems.append(f"transport class {c.name}: next hop {h} appears twice (tenants would share a connection)")
        tables = [(f"{TLS_DIR}/{c.name}.policy", "TLS policy", lambda t: t.smarthost.tls_policy, False)]
        if c.settings.auth:
            tables.append((f"{SECRET_DIR}/{c.name}", "login", lambda t: t.smarthost.auth.username + ":", True))
        for table, what, expected, prefix in tables:
            found, error = lookup_all(staging, table, hops)
            if error:
                problems.append(f"transport class {c.name}: {what} table: {error}")
                continue
            for t in c.members:
                got, want = found.get(t.smarthost.nexthop, ""), expected(t)
                if not (got.startswith(want) if prefix else got == want):
                    shown = got.partition(":")[0] + ":..." if prefix and got else got  # never print a password
                    problems.append(f"transport class {c.name}: tenant {t.id}'s {what} for {t.smarthost.nexthop} is {shown!r}, expected {want!r}")
    return problems


class _Signalled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _cleanup_on_signals():
    """SIGTERM and SIGINT unwind the stack (so ``with`` blocks clean up: the staging
    directory holds the password tables), then the process dies of the same signal, as
    the sender expects. Only in the main thread (the only place Python runs handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise _Signalled(signum)

    sigs = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    except _Signalled as exc:
        for sig in sigs:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), exc.signum)
        raise SystemExit(128 + exc.signum)  # not reached: the default action ends the process
    finally:
        for sig, old in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, old)


def render_and_check(
    tenants: TenantSet, settings: Settings, templates: Path | None = None, reputation_state: dict | None = None
) -> tuple[dict[str, str], CheckResult]:
    assignment = assignment_for(tenants, settings, reputation_state)
    files = render_files(tenants, settings, templates, reputation_state, assignment)
    with _cleanup_on_signals(), tempfile.TemporaryDirectory(prefix="relay-staging-") as tmp:
        staging = Path(tmp)
        try:
            write_files(files, staging, require_empty=True)
        except PostmapFailed as exc:
            return files, CheckResult(False, [str(exc)])
        # postfix check inspects the queue directory; it must exist to be checked.
        result = check_staged(staging, tenants, settings.queue_directory.is_dir(), assignment)
    result.problems += [f"source address {a}: not configured on this host ({why})" for a, why in unbound_addresses(settings)]
    fd_warning = fds.fit_warning(files["master.cf"], settings.queue_directory)
    if fd_warning:
        result.warnings.append(fd_warning)
    result.ok = not result.problems
    return files, result


def address_is_local(address: str) -> str | None:
    """None if this host has ``address`` (a socket can bind to it), else why not."""
    import ipaddress
    import socket

    family = socket.AF_INET if ipaddress.ip_address(address).version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def unbound_addresses(settings: Settings) -> list[tuple[str, str]]:
    """Pool addresses this host cannot send from (an error for check and apply)."""
    return [(a.address, why) for a in settings.reputation.pool if (why := address_is_local(a.address))]


def install(files: dict[str, str], settings: Settings, hold: tuple[str, ...] = ()) -> list[str]:
    """Swap the checked files into the live config directory; returns the names that changed.

    The previous versions are kept in <config>/relay/previous/ for rollback. Names in
    ``hold`` are reported when they changed but not written: the caller writes them with
    ``activate`` once Postfix has reloaded (the milter's tenant set, so that it serves a
    new tenant only when Postfix has the new tenant's transport).
    """
    live = settings.config_directory
    # Nothing is written (backups included) unless root alone controls the directories.
    for path in (live, live / "relay", live / "relay" / "previous"):
        if path == live or path.exists() or path.is_symlink():
            fd = _open_dir(path, create=False)
            try:
                _check_dir(fd, path)
            finally:
                os.close(fd)
    changed = [
        name for name, text in files.items()
        if _read(live / name) != text or (is_hash_table(name) and not (live / (name + ".db")).is_file())
    ]
    stale = [
        str(p.relative_to(live))
        for d in PER_TENANT_DIRS
        if (live / d).is_dir()
        for p in (live / d).iterdir()
        if str(p.relative_to(live)) not in files and str(p.relative_to(live)).removesuffix(".db") not in files
    ]
    stale += [name for name in RETIRED if (live / name).is_file()]
    if not changed and not stale:
        return []
    backup = live / "relay" / "previous"
    backup.mkdir(parents=True, exist_ok=True)
    for name in changed:
        # Credentials are not kept around in backups.
        if (live / name).exists() and not is_secret(name):
            dst = backup / name.replace("/", "_")
            shutil.copy2(live / name, dst)
    write_files({n: files[n] for n in changed if n not in hold}, live)
    for name in stale:
        (live / name).unlink()
    share_route_key(live, settings.milter_socket_group)
    return changed + [f"{name} (removed)" for name in stale]


def activate(files: dict[str, str], settings: Settings, names: list[str]) -> None:
    """Write the files ``install`` held back (``hold``)."""
    if names:
        write_files({n: files[n] for n in names}, settings.config_directory)


def share_route_key(config_directory: Path, group: str) -> None:
    """Let the milter (it runs in ``group``) read the route key, and nothing else there:
    relay/requeue/ 0750 and route.key 0640 in that group; the requeue table stays 0600.
    Root only; without such a group the key stays root-only (a milter running as root)."""
    directory, key = config_directory / REQUEUE_DIR, config_directory / defaults.ROUTE_KEY_FILE
    if os.geteuid() != 0 or not key.is_file() or key.is_symlink():
        return
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return
    verp = config_directory / defaults.VERP_KEY_FILE  # bounce tracking (issue 15 A)
    shared = [(directory, 0o750), (key, 0o640)] + ([(verp, 0o640)] if verp.is_file() and not verp.is_symlink() else [])
    for path, mode in shared:
        os.chown(path, -1, gid, follow_symlinks=False)
        os.chmod(path, mode)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def postfix_running(settings: Settings) -> bool:
    return run_postfix(["postfix", "-c", str(settings.config_directory), "status"]).returncode == 0


def reload_postfix(settings: Settings) -> None:
    r = run_postfix(["postfix", "-c", str(settings.config_directory), "reload"])
    if r.returncode != 0:
        raise ConfigError(f"postfix reload failed: {r.stdout.strip()}")
