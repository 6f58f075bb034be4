"""Render Postfix configuration from tenants, check it in a staging directory, install it.

Files rendered (relative to the Postfix config directory):

    main.cf, master.cf
    relay/route.regexp            milter_header_checks: route marker -> FILTER
    relay/strip_route.regexp      smtp_header_checks on tenant transports
    relay/bounce_transport        transport_maps (texthash) for relay-generated mail
    relay/tls/<tenant>.policy     smtp_tls_policy_maps of the tenant's transport
    relay/smtp_auth/<tenant>   smtp_sasl_password_maps (only with smarthost.auth; mode 0600)
    relay/requeue/route.regexp    header_checks of cleanup_requeue: route seal -> FILTER, for
                                  mail requeued with postsuper -r (mode 0600: the seals)
    relay/requeue/route.key       the route-seal key (core/route.py): a new one only when there is
                                  none, else the live one as it is (install() makes it 0640 and its
                                  directory 0750, group milter_socket_group, for the milter)
    sasl/smtpd.conf               Cyrus SASL (Debian reads $config_directory/sasl) for the submission listeners

No table needs postmap (regexp and texthash are read as text), so a reload is
all it takes to pick up a change.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from relay_milter import defaults
from relay_milter.core import route
from relay_milter.postfix.runner import run_postfix
from relay_milter.config import ConfigError, Settings, TenantSet, load_secrets

OUTPUTS = {
    "main.cf": "main.cf.j2",
    "master.cf": "master.cf.j2",
    "relay/route.regexp": "route.regexp.j2",
    "relay/strip_route.regexp": "strip_route.regexp.j2",
    "relay/bounce_transport": "bounce_transport.j2",
    "sasl/smtpd.conf": "cyrus_smtpd.conf.j2",
}
# Per-tenant tables live in these directories; files of removed tenants are deleted on install.
PER_TENANT_DIRS = ("relay/tls", "relay/smtp_auth")
SECRET_DIR = "relay/smtp_auth"
REQUEUE_DIR = "relay/requeue"
REQUEUE_TABLE = REQUEUE_DIR + "/route.regexp"
# Signed-ingress listeners: every RCPT for another tenant gets a 452 and Postfix counts it as
# an error. Postfix's defaults (soft 10, hard 20) would slow the session down after ten and end
# it with 421 after twenty, losing the accepted recipients of the transaction with it. A
# transaction may draw up to smtpd_recipient_limit (1000) such refusals; the usual allowance
# for real errors comes on top. Postfix resets the count after each delivered message, and
# under stress (anvil/overload) the limit stays 1, as Postfix has it.
ERROR_LIMITS = {"soft": 1010, "hard": "${stress?{1}:{1020}}"}


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


def render_files(tenants: TenantSet, settings: Settings, templates: Path | None = None) -> dict[str, str]:
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
        "requeue_table": REQUEUE_TABLE,
        "error_limits": ERROR_LIMITS,
        "private_instance": settings.config_directory != Path(defaults.CONFIG_DIRECTORY),
    }
    files = {name: env.get_template(tpl).render(**context) for name, tpl in OUTPUTS.items()}
    key_text = _read(settings.config_directory / defaults.ROUTE_KEY_FILE)
    if key_text is None or route.parse_route_key(key_text) is None:
        key_text = route.new_route_key()  # installed with the rest; an existing key is kept
    files[defaults.ROUTE_KEY_FILE] = key_text
    key = route.parse_route_key(key_text)
    seals = {t.id: route.tenant_seal(key, t.id) for t in tenants}
    files[REQUEUE_TABLE] = env.get_template("requeue_route.regexp.j2").render(**context, seals=seals)
    secrets = load_secrets(settings.secrets_file, tenants)
    for t in context["tenants"]:
        files[f"relay/tls/{t.id}.policy"] = env.get_template("tls_policy.j2").render(t=t)
        if t.smarthost.auth:
            password = secrets[t.id].smarthost_password
            files[f"{SECRET_DIR}/{t.id}"] = env.get_template("sasl_passwd.j2").render(t=t, password=password)
    return files


def write_files(files: dict[str, str], out: Path) -> list[Path]:
    written = []
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        if is_secret(name):
            os.chmod(path.parent, 0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # an old tmp file may have had another mode
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            tmp.write_text(text, encoding="utf-8")
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)
    return written


@dataclass
class CheckResult:
    ok: bool
    problems: list[str]


_DIAGNOSTIC = re.compile(r"^\S+: (warning|fatal|error|panic): ")


def check_staged(staging: Path, tenants: TenantSet, run_postfix_check: bool = True) -> CheckResult:
    """postconf (any warning is a failure), master.cf parse, route table lookups, postfix check."""
    problems: list[str] = []
    for argv, what in (
        (["postconf", "-c", str(staging), "-n"], "main.cf"),
        (["postconf", "-c", str(staging), "-M"], "master.cf"),
    ):
        r = run_postfix(argv)
        out = r.stdout.replace("\r", "")
        bad = [line for line in out.splitlines() if _DIAGNOSTIC.match(line)]
        if r.returncode != 0 or bad:
            problems.append(f"{what}: {' | '.join(bad) or out.strip() or f'exit {r.returncode}'}")
    route_table = staging / "relay" / "route.regexp"
    for t in tenants:
        r = run_postfix(["postmap", "-c", str(staging), "-q", f"{defaults.ROUTE_HEADER}: {t.id}", f"regexp:{route_table}"])
        want = f"FILTER {t.transport}:{t.smarthost.nexthop}"
        if r.stdout.strip() != want:
            problems.append(f"route table: tenant {t.id} resolves to {r.stdout.strip()!r}, expected {want!r}")
    r = run_postfix(["postmap", "-c", str(staging), "-q", f"{defaults.ROUTE_HEADER}: no-such-tenant", f"regexp:{route_table}"])
    if r.stdout.strip():
        problems.append(f"route table: an unknown tenant resolves to {r.stdout.strip()!r}")
    requeue_table = staging / REQUEUE_TABLE
    key = route.parse_route_key(_read(staging / defaults.ROUTE_KEY_FILE) or "")
    if key is None:
        problems.append(f"{defaults.ROUTE_KEY_FILE}: missing or not a 256-bit hex key")
    for t in tenants:
        want = f"FILTER {t.transport}:{t.smarthost.nexthop}"
        probes = [
            (f"{defaults.ROUTE_HEADER}: {t.id}", ""),  # the plain marker never routes a requeued message
            (f"{defaults.ROUTE_SEAL_HEADER}: {t.id}.{'0' * 40}", ""),  # nor a seal made without the key
        ]
        if key is not None:
            probes.append((f"{defaults.ROUTE_SEAL_HEADER}: {route.tenant_seal(key, t.id)}", want))
        for probe, expect in probes:
            r = run_postfix(["postmap", "-c", str(staging), "-q", probe, f"regexp:{requeue_table}"])
            if r.stdout.strip() != expect:
                problems.append(f"requeue table: tenant {t.id} resolves to {r.stdout.strip()!r}, expected {expect!r}")
    if run_postfix_check:
        r = run_postfix(["postfix", "-c", str(staging), "check"])
        if r.returncode != 0 or "fatal:" in r.stdout:
            problems.append(f"postfix check: {r.stdout.strip() or f'exit {r.returncode}'}")
    return CheckResult(not problems, problems)


def render_and_check(tenants: TenantSet, settings: Settings, templates: Path | None = None) -> tuple[dict[str, str], CheckResult]:
    files = render_files(tenants, settings, templates)
    with tempfile.TemporaryDirectory(prefix="relay-staging-") as tmp:
        staging = Path(tmp)
        write_files(files, staging)
        # postfix check inspects the queue directory; it must exist to be checked.
        result = check_staged(staging, tenants, run_postfix_check=settings.queue_directory.is_dir())
    return files, result


def install(files: dict[str, str], settings: Settings) -> list[str]:
    """Swap the checked files into the live config directory; returns the names that changed.

    The previous versions are kept in <config>/relay/previous/ for rollback.
    """
    live = settings.config_directory
    changed = [name for name, text in files.items() if _read(live / name) != text]
    stale = [
        str(p.relative_to(live))
        for d in PER_TENANT_DIRS
        if (live / d).is_dir()
        for p in (live / d).iterdir()
        if str(p.relative_to(live)) not in files
    ]
    if not changed and not stale:
        return []
    backup = live / "relay" / "previous"
    backup.mkdir(parents=True, exist_ok=True)
    for name in changed:
        # Credentials are not kept around in backups.
        if (live / name).exists() and not is_secret(name):
            dst = backup / name.replace("/", "_")
            shutil.copy2(live / name, dst)
    write_files({n: files[n] for n in changed}, live)
    for name in stale:
        (live / name).unlink()
    share_route_key(live, settings.milter_socket_group)
    return changed + [f"{name} (removed)" for name in stale]


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
    for path, mode in ((directory, 0o750), (key, 0o640)):
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
