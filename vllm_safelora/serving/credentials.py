"""API keys: issued once, stored only as hashes in the operator's keys file, re-read when it changes.

A key is ``sl-<id>-<secret>``: ``id`` (12 hex digits) picks the file's entry without a
scan; ``secret`` is 32 random bytes. The file stores HMAC-SHA256(id, secret). A slow
password hash (bcrypt, argon2) exists to make guessing low-entropy secrets expensive;
a 256-bit random secret cannot be guessed at any speed, so a slow hash would only cost
~100 ms of CPU per request on the event loop. The HMAC is keyed by the id so an entry's
digest cannot be moved to another id. Comparison is ``hmac.compare_digest``, and an
unknown id is compared against a dummy digest so both take the same time.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from ..errors import ConfigError

logger = logging.getLogger("vllm_safelora")

FORMAT = "vllm-safelora-keys/1"
HASH = "hmac-sha256"
Role = Literal["tenant", "admin"]
_KEY_RE = re.compile(r"sl-([0-9a-f]{12})-([A-Za-z0-9_-]{43})")
# Tenants are namespaces: the first component of their adapters' names.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DUMMY = hashlib.sha256(b"no such key").hexdigest()


def digest(key_id: str, secret: str) -> str:
    return hmac.new(key_id.encode(), secret.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Who a request is from: a tenant (its namespace) or an operator."""

    role: Role
    name: str
    via: str  # "key" | "header" | "auth off"

    @property
    def admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class KeyEntry:
    id: str
    name: str
    role: Role
    digest: str
    issued: str


def check_name(name: str, role: Role) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        what = "a tenant (the first component of its adapters' names)" if role == "tenant" else "an operator"
        raise ConfigError(f"{name!r} cannot name {what}: 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")


def parse_keys(text: str, source: str) -> dict[str, KeyEntry]:
    """The keys file's entries by id, or ConfigError saying what is wrong (never echoing a digest)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"keys file {source} is not valid YAML: {exc}") from None
    if doc is None:
        doc = {"format": FORMAT, "hash": HASH, "keys": []}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("hash") != HASH:
        raise ConfigError(f"keys file {source} is not a {FORMAT} file with hash {HASH} (write it with issue-key)")
    entries: dict[str, KeyEntry] = {}
    for i, raw in enumerate(doc.get("keys") or []):
        try:
            entry = KeyEntry(
                id=str(raw["id"]),
                name=str(raw["name"]),
                role=raw["role"],
                digest=str(raw["digest"]),
                issued=str(raw.get("issued", "")),
            )
        except (KeyError, TypeError):
            raise ConfigError(f"keys file {source}: entry {i} needs id, name, role and digest") from None
        if (
            entry.role not in ("tenant", "admin")
            or not re.fullmatch(r"[0-9a-f]{12}", entry.id)
            or not re.fullmatch(r"[0-9a-f]{64}", entry.digest)
        ):
            raise ConfigError(f"keys file {source}: entry {i} ({entry.name!r}) is malformed")
        check_name(entry.name, entry.role)
        if entry.id in entries:
            raise ConfigError(f"keys file {source}: key id {entry.id} appears twice")
        entries[entry.id] = entry
    roles = {}
    for e in entries.values():
        if roles.setdefault(e.name, e.role) != e.role:
            raise ConfigError(f"keys file {source}: {e.name!r} is both a tenant and an operator")
    return entries


class KeyStore:
    """The keys file as the server sees it: checked on every request by one stat, re-read when
    it changed. A file that becomes unreadable or invalid refuses every key (fail closed) and
    says so once per change; start-up refuses a missing or invalid file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._entries: dict[str, KeyEntry] = {}
        self._reload(first=True)

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _reload(self, first: bool = False) -> None:
        stamp = self._stat()
        try:
            if stamp is None:
                raise ConfigError(f"keys file {self.path} cannot be read")
            entries = parse_keys(self.path.read_text(), str(self.path))
        except (ConfigError, OSError, UnicodeDecodeError) as exc:
            if first:
                raise ConfigError(
                    f"{exc}" if isinstance(exc, ConfigError) else f"keys file {self.path}: {exc}"
                ) from None
            logger.error("vllm-safelora: %s; every API key is refused until it is fixed", exc)
            self._entries, self._stamp = {}, stamp
            return
        tenants = sorted({e.name for e in entries.values() if e.role == "tenant"})
        admins = sum(e.role == "admin" for e in entries.values())
        logger.info(
            "vllm-safelora: %s keys file %s: %d tenant(s) %s, %d operator key(s)",
            "read" if first else "re-read",
            self.path,
            len(tenants),
            tenants[:20],
            admins,
        )
        self._entries, self._stamp = entries, stamp

    def entries(self) -> dict[str, KeyEntry]:
        if self._stat() != self._stamp:
            self._reload()
        return self._entries

    def identify(self, key: str) -> Identity | None:
        """The identity a presented key proves, or None. Never logs the key."""
        entries = self.entries()
        m = _KEY_RE.fullmatch(key) if isinstance(key, str) and len(key) < 128 else None
        key_id, secret = (m.group(1), m.group(2)) if m else ("0" * 12, "x" * 43)
        entry = entries.get(key_id)
        ok = hmac.compare_digest(digest(key_id, secret), entry.digest if entry else _DUMMY)
        if not (ok and m and entry):
            return None
        return Identity(role=entry.role, name=entry.name, via="key")


# ----------------------------------------------------------------------------- the operator's side


@contextlib.contextmanager
def _locked(path: Path):
    """One issue-key / revoke-key at a time per keys file, so none loses another's update."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_doc(path: Path) -> dict:
    if not path.exists():
        return {"format": FORMAT, "hash": HASH, "keys": []}
    text = path.read_text()
    parse_keys(text, str(path))  # refuse to rewrite a file we do not understand
    return yaml.safe_load(text) or {"format": FORMAT, "hash": HASH, "keys": []}


def _write_doc(path: Path, doc: dict) -> None:
    """Atomically (a reader sees the old file or the new one), readable by the owner only."""
    header = "# vllm-safelora keys: hashes only (HMAC-SHA256). Manage with `vllm-safelora issue-key / revoke-key`.\n"
    fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(header + yaml.safe_dump(doc, sort_keys=False))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def issue_key(path: Path, name: str, role: Role) -> str:
    """Add a new key for ``name`` and return it (the only time it exists outside the client)."""
    check_name(name, role)
    path = Path(path)
    with _locked(path):
        doc = _read_doc(path)
        for e in doc.get("keys") or []:
            if e["name"] == name and e["role"] != role:
                raise ConfigError(f"{name!r} is already {'an operator' if e['role'] == 'admin' else 'a tenant'}")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        doc.setdefault("keys", [])
        doc["keys"] = list(doc["keys"] or []) + [
            {
                "id": key_id,
                "name": name,
                "role": role,
                "digest": digest(key_id, secret),
                "issued": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
        ]
        _write_doc(path, doc)
    return f"sl-{key_id}-{secret}"


def revoke_keys(path: Path, name: str) -> int:
    """Remove every key of ``name`` (tenant or operator); how many were removed."""
    path = Path(path)
    with _locked(path):
        doc = _read_doc(path)
        keys = list(doc.get("keys") or [])
        kept = [e for e in keys if e["name"] != name]
        if len(kept) != len(keys):
            doc["keys"] = kept
            _write_doc(path, doc)
        return len(keys) - len(kept)
