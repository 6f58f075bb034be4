"""Submission users: Cyrus SASL's sasldb, managed with saslpasswd2.

A user can log in when it has a password here; it can send only when a tenant
lists it in ``submission_users`` (the milter enforces that tenant's policy).
Passwords go to saslpasswd2 on its standard input, never on a command line,
never to a log.
"""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from relay_milter.config import ConfigError, Settings, TenantSet

MIN_PASSWORD = 12


class UserError(Exception):
    pass


def _tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.path.exists(path):
        raise UserError(f"{name} not found: install the Debian package sasl2-bin")
    return path


def _realm(settings: Settings) -> str:
    # Postfix passes smtpd_sasl_local_domain (= myhostname, main.cf.j2) as the realm.
    return settings.myhostname


def _secure(db: Path, settings: Settings) -> None:
    """root:<postfix group> 0640: smtpd (running as the mail owner) reads it, nobody else."""
    try:
        gid = grp.getgrnam(settings.mail_owner).gr_gid
    except KeyError:
        gid = -1
    for path in (db, db.with_name(db.name + ".db")):  # Berkeley DB builds may add .db
        if path.exists():
            if os.geteuid() == 0:
                os.chown(path, 0, gid)
            os.chmod(path, 0o640)


def set_password(settings: Settings, tenants: TenantSet, user: str, password: str) -> str:
    """Create or update a user. Returns the tenant id it submits for."""
    tenant = tenants.by_submission_user(user)
    if tenant is None:
        raise ConfigError(f"user {user} is in no tenant's submission_users: add it to a tenant file first")
    if len(password) < MIN_PASSWORD or any(c in password for c in "\r\n\0"):
        raise UserError(f"password must be a single line of at least {MIN_PASSWORD} characters")
    db = settings.sasldb
    db.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [_tool("saslpasswd2"), "-f", str(db), "-u", _realm(settings), "-p", "-c", user],
        input=password.encode(), capture_output=True, timeout=30,
    )
    if r.returncode != 0:
        raise UserError(f"saslpasswd2 failed: {r.stderr.decode(errors='replace').strip()}")
    _secure(db, settings)
    return tenant.id


def delete(settings: Settings, user: str) -> None:
    if user not in {u for u, _ in list_users(settings)}:
        raise UserError(f"user {user} has no password in {settings.sasldb}")
    r = subprocess.run(
        [_tool("saslpasswd2"), "-f", str(settings.sasldb), "-u", _realm(settings), "-d", user],
        capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    if r.returncode != 0:
        raise UserError(f"saslpasswd2 -d failed: {r.stderr.decode(errors='replace').strip()}")


def list_users(settings: Settings) -> list[tuple[str, str]]:
    """(user, realm) pairs with a password in the database."""
    if not settings.sasldb.exists():
        return []
    r = subprocess.run(
        [_tool("sasldblistusers2"), "-f", str(settings.sasldb)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    users = []
    for line in r.stdout.splitlines():
        ident, _, _ = line.partition(":")  # "user@realm: userPassword"
        user, _, realm = ident.strip().rpartition("@")
        if user:
            users.append((user, realm))
    return users


@dataclass(frozen=True)
class UserStatus:
    user: str
    tenant: str | None
    has_password: bool

    @property
    def state(self) -> str:
        if self.tenant and self.has_password:
            return "active"
        if self.tenant:
            return "no-password"  # listed in a tenant but cannot log in yet
        return "orphaned"  # can log in, but the milter refuses everything it sends


def status(settings: Settings, tenants: TenantSet) -> list[UserStatus]:
    realm = _realm(settings)
    with_password = {u for u, r in list_users(settings) if r == realm}
    declared = {u: t.id for t in tenants for u in t.submission_users}
    return [UserStatus(u, declared.get(u), u in with_password) for u in sorted(with_password | set(declared))]
