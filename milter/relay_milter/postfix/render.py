"""Render Postfix configuration from tenants, check it in a staging directory, install it.

Files rendered (relative to the Postfix config directory):

    main.cf, master.cf
    relay/route.regexp            milter_header_checks: route marker -> FILTER
    relay/strip_route.regexp      smtp_header_checks on tenant transports
    relay/bounce_transport        transport_maps (texthash) for relay-generated mail
    relay/tls/<tenant>.policy     smtp_tls_policy_maps of the tenant's transport
    relay/smtp_auth/<tenant>   smtp_sasl_password_maps (only with smarthost.auth; mode 0600)
    sasl/smtpd.conf               Cyrus SASL (Debian reads $config_directory/sasl) for the submission listeners

No table needs postmap (regexp and texthash are read as text), so a reload is
all it takes to pick up a change.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import jinja2

from relay_milter import defaults
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


def is_secret(name: str) -> bool:
    """Rendered files holding credentials: written mode 0600, never printed."""
    return name.startswith(SECRET_DIR + "/")


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
        "private_instance": settings.config_directory != Path(defaults.CONFIG_DIRECTORY),
    }
    files = {name: env.get_template(tpl).render(**context) for name, tpl in OUTPUTS.items()}
    secrets = load_secrets(settings.secrets_file, tenants)
    for t in context["tenants"]:
        files[f"relay/tls/{t.id}.policy"] = env.get_template("tls_policy.j2").render(t=t)
        if t.smarthost.auth:
            password = secrets[t.id].smarthost_password
            files[f"{SECRET_DIR}/{t.id}"] = env.get_template("sasl_passwd.j2").render(t=t, password=password)
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
        except OSError as exc:
            raise UnsafeDirectory(f"{path}: cannot create ({exc.strerror}); its parent directory must exist") from None
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


def _write_at(dir_fd: int, name: str, text: str, mode: int) -> None:
    """Write a file in the directory ``dir_fd`` by a fresh temporary name (O_EXCL|O_NOFOLLOW:
    never an existing file or a planted symlink), then rename it over ``name``."""
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
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def write_files(files: dict[str, str], out: Path, require_empty: bool = False) -> list[Path]:
    """Write rendered files under ``out``, which must be owned by the caller (root) and not
    writable by group or others (``require_empty``: also new or empty, as for ``render --out``).

    Every directory is opened without following symlinks and checked the same way, and every
    file is created under a fresh name with O_EXCL|O_NOFOLLOW and renamed into place, so
    nothing planted in the directory is ever opened for writing."""
    out = Path(out)
    top = _open_dir(out, create=require_empty)
    written = []
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
                _write_at(fds[-1], base, text, 0o600 if secret else 0o644)
            finally:
                for fd in fds[1:]:
                    os.close(fd)
            written.append(out / name)
    finally:
        os.close(top)
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
    if run_postfix_check:
        r = run_postfix(["postfix", "-c", str(staging), "check"])
        if r.returncode != 0 or "fatal:" in r.stdout:
            problems.append(f"postfix check: {r.stdout.strip() or f'exit {r.returncode}'}")
    return CheckResult(not problems, problems)


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


def render_and_check(tenants: TenantSet, settings: Settings, templates: Path | None = None) -> tuple[dict[str, str], CheckResult]:
    files = render_files(tenants, settings, templates)
    with _cleanup_on_signals(), tempfile.TemporaryDirectory(prefix="relay-staging-") as tmp:
        staging = Path(tmp)
        write_files(files, staging, require_empty=True)
        # postfix check inspects the queue directory; it must exist to be checked.
        result = check_staged(staging, tenants, run_postfix_check=settings.queue_directory.is_dir())
    return files, result


def install(files: dict[str, str], settings: Settings) -> list[str]:
    """Swap the checked files into the live config directory; returns the names that changed.

    The previous versions are kept in <config>/relay/previous/ for rollback.
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
    return changed + [f"{name} (removed)" for name in stale]


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
