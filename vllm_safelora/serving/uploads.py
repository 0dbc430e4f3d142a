"""Tenant uploads: a multipart body streamed to a staging directory under caps, then published
atomically into the tenant's namespace under ``auth.upload_root``.

Nothing reaches the namespace before the whole body arrived, both files are within their
limits and the validation and the tenant's policy accepted the adapter (the caller runs
them on the staged copy). Staging lives in ``upload_root/.safelora-uploads``, on the same
file system as the namespace (so publishing is a rename) and under a name no adapter
name can reach (components start with a letter or digit). A replaced version is swapped
out in one ``renameat2(RENAME_EXCHANGE)``: a reader of the name sees the old adapter or
the new one, never a mix.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import CONFIG_FILE, WEIGHTS_FILE
from ..cache import remove_tree
from ..fsutil import exchange_paths, fsync_dir
from ..sources.base import AdapterSource, Location
from ..sources.names import namespace_of, shown_name

logger = logging.getLogger("vllm_safelora")

STAGING = ".safelora-uploads"
PARTS = (CONFIG_FILE, WEIGHTS_FILE)
_MAX_PART_HEADERS = 4096
MULTIPART_SLACK = 64 << 10  # boundaries and part headers around the two files


class UploadRefused(Exception):
    """An upload the server will not take; ``status`` is its 4xx, the message names the limit."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


# ----------------------------------------------------------------------------- the body


class StagedParts:
    """Feeds a multipart/form-data body into files in ``directory`` as it arrives, refusing
    any part that is not exactly one of the two adapter files, a repeated one, and any byte
    over its cap before it is written."""

    def __init__(self, directory: Path, boundary: bytes, caps: dict[str, tuple[int, str]]):
        from python_multipart.multipart import MultipartParser

        self.directory = directory
        self.caps = caps
        self.sizes: dict[str, int] = {}
        self._name: str | None = None
        self._fd: int | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition: bytes | None = None
        self._parts = 0
        self._ended = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_size=_MAX_PART_HEADERS,
        )

    def feed(self, chunk: bytes) -> None:
        from python_multipart.exceptions import MultipartParseError

        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise UploadRefused(400, f"the multipart body is malformed: {exc}") from None

    def finish(self) -> None:
        if not self._ended:
            raise UploadRefused(400, "the multipart body ended before its closing boundary")
        missing = [p for p in PARTS if p not in self.sizes]
        if missing:
            raise UploadRefused(
                400, f"the upload has no part named {missing[0]!r} (send both {PARTS[0]} and {PARTS[1]})"
            )

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > len(PARTS):
            raise UploadRefused(
                400, f"the upload has more than {len(PARTS)} parts: send only {PARTS[0]} and {PARTS[1]}"
            )
        self._disposition = None
        self._header_field.clear()
        self._header_value.clear()

    def _header_end(self) -> None:
        if bytes(self._header_field).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        kind, options = parse_options_header(self._disposition or b"")
        raw = options.get(b"name")
        name = raw.decode("utf-8", "replace") if raw is not None else None
        if kind != b"form-data" or name not in PARTS:
            raise UploadRefused(
                400,
                f"part {shown_name(name)} is not one of the adapter's files: name the parts exactly "
                f"{PARTS[0]} and {PARTS[1]}",
            )
        if name in self.sizes:
            raise UploadRefused(400, f"part {name!r} appears twice")
        self._name = name
        self.sizes[name] = 0
        self._fd = os.open(
            self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640
        )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        size = self.sizes[self._name] + n
        cap, why = self.caps[self._name]
        if size > cap:
            raise UploadRefused(413, f"part {self._name!r} is larger than {cap} bytes ({why})")
        self.sizes[self._name] = size
        view = memoryview(data)[start:end]
        while view:
            view = view[os.write(self._fd, view) :]

    def _part_end(self) -> None:
        os.fsync(self._fd)
        self.close()
        self._name = None

    def _end(self) -> None:
        self._ended = True


# ----------------------------------------------------------------------------- the staged adapter


class StagedSource(AdapterSource):
    """The staged copy, read for validation as the adapter it will become: its location's name
    and identity are the published ones, so the tenant rule that will apply is the one that runs.
    Only the server writes staging, so reading it by path is safe."""

    kind = "upload"

    def locate(self, name: str) -> Path | None:
        return None

    def describe(self) -> str:
        return "upload"

    def location(self, name: str, path: Path) -> Location:
        return Location(source=self, path=path, name=name, identity=name, confine=path, namespace=namespace_of(name))


# ----------------------------------------------------------------------------- the namespace


@dataclass
class _Rate:
    starts: collections.deque = field(default_factory=collections.deque)


class UploadArea:
    """``auth.upload_root``: staging, per-tenant quotas and rate, publishing and deleting."""

    def __init__(self, root: Path, *, max_adapters: int, max_bytes: int, per_minute: int):
        self.root = Path(root)
        self.staging = self.root / STAGING
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.per_minute = per_minute
        self._rates: dict[str, _Rate] = {}
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self.staging.mkdir(mode=0o700, exist_ok=True)
        for leftover in self.staging.iterdir():  # a crash mid-upload: never published
            remove_tree(leftover)

    def start(self, tenant: str) -> None:
        """Count one upload against the tenant's rate, or refuse it (429) saying when to retry."""
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            rate = self._rates.setdefault(tenant, _Rate())
            while rate.starts and now - rate.starts[0] >= 60.0:
                rate.starts.popleft()
            if len(rate.starts) >= self.per_minute:
                wait = int(60.0 - (now - rate.starts[0])) + 1
                raise UploadRefused(
                    429,
                    f"tenant {tenant!r} reached the upload rate limit (auth.uploads_per_minute: "
                    f"{self.per_minute}); retry in {wait} s",
                    retry_after=wait,
                )
            rate.starts.append(now)
            if len(self._rates) > 4096:  # bounded: forget the quietest tenants
                for quiet in [t for t, r in self._rates.items() if not r.starts or now - r.starts[-1] >= 60.0]:
                    del self._rates[quiet]

    def path_of(self, name: str) -> Path:
        return self.root / name

    def usage(self, tenant: str, *, excluding: str | None = None) -> tuple[int, int]:
        """(adapters, bytes) the tenant keeps under upload_root; links and their targets are not followed."""
        count = size = 0
        base = self.root / tenant
        try:
            entries = list(os.scandir(base))
        except OSError:
            return 0, 0
        for entry in entries:
            if entry.name.startswith(".") or f"{tenant}/{entry.name}" == excluding:
                continue
            count += 1
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    for f in os.scandir(entry.path):
                        size += f.stat(follow_symlinks=False).st_size
        return count, size

    def caps(self, name: str, max_config: int, max_weights: int) -> dict[str, tuple[int, str]]:
        """What each part may hold: the reader's limits, and the bytes left in the tenant's quota
        (the version being replaced does not count)."""
        tenant = namespace_of(name)
        count, used = self.usage(tenant, excluding=name)
        if count >= self.max_adapters:
            raise UploadRefused(
                403,
                f"tenant {tenant!r} already keeps {count} adapters (auth.max_adapters_per_tenant: "
                f"{self.max_adapters}); delete one first",
            )
        left = self.max_bytes - used
        if left <= 0:
            raise UploadRefused(
                413, f"tenant {tenant!r} uses {used} bytes of its quota (auth.max_bytes_per_tenant: {self.max_bytes})"
            )
        quota = f"what is left of tenant {tenant!r}'s auth.max_bytes_per_tenant ({self.max_bytes})"

        def cap(limit: int, what: str) -> tuple[int, str]:
            return (limit, what) if limit <= left else (left, quota)

        return {
            CONFIG_FILE: cap(max_config, "the largest adapter_config.json read"),
            WEIGHTS_FILE: cap(max_weights, "max_adapter_bytes, or the largest adapter the served model takes"),
        }

    def check_total(self, name: str, new_bytes: int) -> None:
        tenant = namespace_of(name)
        _, used = self.usage(tenant, excluding=name)
        if used + new_bytes > self.max_bytes:
            raise UploadRefused(
                413,
                f"the upload ({new_bytes} bytes) would take tenant {tenant!r} over its quota "
                f"(auth.max_bytes_per_tenant: {self.max_bytes}, {used} in use)",
            )

    @contextlib.contextmanager
    def staged(self):
        """A fresh staging directory, removed afterwards unless it was published."""
        directory = self.staging / secrets.token_hex(8)
        directory.mkdir(mode=0o700)
        try:
            yield directory
        finally:
            if os.path.lexists(directory):
                remove_tree(directory)

    def publish(self, staged: Path, name: str) -> bool:
        """Make ``staged`` the adapter ``name`` in one step; True if it replaced a version. Uploads
        to one name publish one at a time; the last to finish is the one served."""
        target = self.path_of(name)
        with self._publish_lock:
            target.parent.mkdir(mode=0o750, exist_ok=True)
            fsync_dir(staged)
            os.chmod(staged, 0o750)
            replaced = os.path.lexists(target)
            if replaced:
                exchange_paths(staged, target)  # staged now holds the old version, removed by staged()
            else:
                os.rename(staged, target)
            fsync_dir(target.parent)
        logger.info(
            "safelora: upload published as '%s'%s", name, " (replaced the previous version)" if replaced else ""
        )
        return replaced

    def delete(self, name: str) -> bool:
        """Remove adapter ``name`` (one rename out of the namespace, then the files); False if absent."""
        target = self.path_of(name)
        with self._publish_lock:
            if not os.path.lexists(target):
                return False
            trash = self.staging / f"deleted-{secrets.token_hex(8)}"
            os.rename(target, trash)
        if trash.is_symlink() or not trash.is_dir():
            trash.unlink()
        else:
            remove_tree(trash)
        logger.info("safelora: adapter '%s' deleted by its tenant", name)
        return True
