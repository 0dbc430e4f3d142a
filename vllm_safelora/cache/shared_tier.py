"""A fleet-shared tier of projected entries in object storage: build once per fleet, not per replica.

A replica that misses its local cache asks the tier for the entry's key before projecting; one
that projected an adapter uploads the entry. Nothing from the tier is trusted for where it came
from (a bucket's permissions are only as good as every credential that can write it): an entry
is used only if its manifest carries a keyed MAC (HMAC-SHA256 under the fleet secret of
``mac_key_file``) over a document binding

* the whole cache key: upload content hash, bank id, policy id (and its digest),
* the fleet context: settings outside the key that decide what a build produces (aliases,
  base-model matching),
* every file's name, size and blake3,

and every file downloaded matches its signed hash. Anything else (no MAC, a MAC under another
key, a manifest for another key or context, a file altered) is ignored, counted in
``safelora_shared_tier_total{result}``, and the entry is built locally, never served. A tier
that cannot be reached only costs the local build. What comes from the tier enters the local
cache like a local build (sealed, verified before vLLM reads it): the local rules are unchanged.

Layout under the tier's prefix: ``<key digest>/manifest.json`` and ``<key digest>/<file>``; the
manifest is uploaded last, so a reader that finds it finds the files it names.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import re
import time
from pathlib import Path
from collections.abc import Mapping

from .. import metrics
from ..errors import ConfigError
from ..fsutil import fast_hash, fsync_dir
from ..objectstore import ObjectHead, ObjectStore, StoreError, StoreRefused
from .entry import FILE_HASH, MANIFEST_NAME, CacheEntry, CacheKey, read_verified

logger = logging.getLogger(__name__)

FORMAT = "vllm-safelora/shared-entry/v1"
SHARED_MANIFEST = "manifest.json"
MIN_KEY_BYTES = 32
MAX_MANIFEST_BYTES = 64 << 10
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _canonical(doc: Mapping) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def read_mac_key(path: Path | None) -> bytes:
    """The fleet secret, or ConfigError: the tier is never enabled without one."""
    if path is None:
        raise ConfigError("shared_cache is enabled but shared_cache.mac_key_file is not set")
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"shared_cache.mac_key_file {str(path)!r} cannot be read ({exc.strerror})") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"shared_cache.mac_key_file {str(path)!r} holds {len(key)} bytes; the fleet secret needs at least "
            f"{MIN_KEY_BYTES} (e.g. head -c 48 /dev/urandom | base64 > FILE)"
        )
    mode = os.stat(path).st_mode
    if mode & 0o004:
        logger.warning(
            "safelora: shared_cache.mac_key_file %s is world-readable: anyone who reads it can sign entries the "
            "fleet will serve; chmod 600 it",
            path,
        )
    return key


def _verified_bytes(entry: CacheEntry, name: str) -> bytes:
    """One file of a local entry, read once and checked against its manifest: the bytes uploaded."""
    buf = read_verified(entry, name)
    try:
        data = bytes(buf)
    finally:
        buf.close()
    # read_verified's buffer is one byte long for an empty file.
    return data if fast_hash(data) == entry.files[name] else b""


class SharedTier:
    """See the module docstring. Thread-safe (the store's client is)."""

    def __init__(self, store: ObjectStore, mac_key: bytes, context: Mapping, max_entry_bytes: int):
        self.store = store
        self._mac_key = mac_key  # never logged or shown
        self.context = dict(context)
        self.max_entry_bytes = max_entry_bytes

    def describe(self) -> str:
        return f"shared tier {self.store.describe()}"

    def _mac(self, document: Mapping) -> str:
        return hmac.new(
            self._mac_key, b"vllm-safelora/shared-entry\0" + _canonical(document), hashlib.sha256
        ).hexdigest()

    def _document(self, key: CacheKey, files: Mapping[str, Mapping]) -> dict:
        return {
            "format": FORMAT,
            "digest": key.digest(),
            "key": key.as_dict(),
            "context": self.context,
            "files": {n: {FILE_HASH: m[FILE_HASH], "size": int(m["size"])} for n, m in sorted(files.items())},
        }

    def _get(self, key: str, size: int, deadline: float) -> bytes:
        out = io.BytesIO()
        # Unpinned: what is read is checked against the signed hash, not against a version.
        self.store.get_capped(ObjectHead(key=key, size=size, etag="", version_id=None), out, size, deadline)
        return out.getvalue()

    # ------------------------------------------------------------------ reading

    def fetch_into(self, key: CacheKey, tmpdir: Path) -> dict[str, str] | None:
        """Download and check ``key``'s entry into ``tmpdir``; {file: blake3} if it was used, else None
        (missing, unusable: counted and logged; ``tmpdir`` is left empty then)."""
        digest = key.digest()
        deadline = time.monotonic() + self.store.timeouts.total_s
        try:
            head = self.store.head(self.store.key(f"{digest}/{SHARED_MANIFEST}"))
        except StoreRefused as exc:
            if exc.reason == "not_found":
                metrics.SHARED_TIER.labels(result="miss").inc()
                return None
            return self._unavailable(digest, exc)
        except StoreError as exc:
            return self._unavailable(digest, exc)
        try:
            if head.size > MAX_MANIFEST_BYTES:
                return self._ignored(digest, "mis_bound", f"its manifest is {head.size} bytes")
            raw = self._get(head.key, head.size, deadline)
            try:
                stored = json.loads(raw)
                document, mac = stored["manifest"], stored.get("mac")
            except (ValueError, TypeError, KeyError):
                return self._ignored(digest, "unsigned", "its manifest is not a signed manifest")
            if not isinstance(mac, str) or not mac:
                return self._ignored(digest, "unsigned", "its manifest carries no MAC")
            if not isinstance(document, dict) or not hmac.compare_digest(mac, self._mac(document)):
                return self._ignored(digest, "bad_mac", "its MAC does not verify under this fleet's key")
            if (
                document.get("format") != FORMAT
                or document.get("digest") != digest
                or document.get("key") != key.as_dict()
                or document.get("context") != self.context
            ):
                return self._ignored(
                    digest, "mis_bound", "its signed manifest is for another key, bank, policy or fleet configuration"
                )
            files = document.get("files")
            if (
                not isinstance(files, dict)
                or not files
                or any(
                    not isinstance(n, str)
                    or not _FILE_NAME.fullmatch(n)
                    or n in (MANIFEST_NAME, SHARED_MANIFEST)
                    or not isinstance(m, dict)
                    or not isinstance(m.get("size"), int)
                    or m["size"] < 0
                    or not isinstance(m.get(FILE_HASH), str)
                    for n, m in files.items()
                )
                or sum(m["size"] for m in files.values()) > self.max_entry_bytes
            ):
                return self._ignored(digest, "mis_bound", "its signed manifest lists unusable files")
            blobs = {}
            for name, meta in files.items():
                data = self._get(self.store.key(f"{digest}/{name}"), meta["size"], deadline)
                # The bytes checked are the bytes written below, from this buffer.
                if fast_hash(data) != meta[FILE_HASH]:
                    return self._ignored(digest, "bad_file", f"{name} does not match its signed {FILE_HASH}")
                blobs[name] = data
        except StoreRefused as exc:
            if exc.reason in ("changed", "too_large", "not_found"):
                return self._ignored(digest, "bad_file", exc.detail)
            return self._unavailable(digest, exc)
        except StoreError as exc:
            return self._unavailable(digest, exc)
        written = {}
        for name, data in blobs.items():
            with open(tmpdir / name, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            written[name] = files[name][FILE_HASH]
        fsync_dir(tmpdir)
        metrics.SHARED_TIER.labels(result="hit").inc()
        logger.info(
            "safelora: entry %s (%s) downloaded from the %s; not projected here",
            digest[:16],
            key.describe(),
            self.describe(),
        )
        return written

    def _ignored(self, digest: str, result: str, why: str) -> None:
        metrics.SHARED_TIER.labels(result=result).inc()
        logger.warning(
            "safelora: the shared tier's entry %s was IGNORED (%s: %s); building it locally. Someone who can write "
            "%s but does not hold the fleet key, or a replica configured differently, put it there",
            digest[:16],
            result,
            why,
            self.store.uri,
        )
        return None

    def _unavailable(self, digest: str, exc: StoreError) -> None:
        metrics.SHARED_TIER.labels(result="unavailable").inc()
        logger.warning(
            "safelora: the %s could not be read for entry %s (%s); building it locally",
            self.describe(),
            digest[:16],
            exc,
        )
        return None

    # ------------------------------------------------------------------ writing

    def publish(self, entry: CacheEntry) -> bool:
        """Upload a locally built, verified entry (its files as read and checked now, then the signed
        manifest). Failures are logged and counted, never raised: the tier is an optimisation."""
        digest = entry.digest
        try:
            files = {}
            for name in sorted(entry.files):
                data = _verified_bytes(entry, name)
                files[name] = {FILE_HASH: entry.files[name], "size": len(data)}
                self.store.put(self.store.key(f"{digest}/{name}"), data)
            document = self._document(entry.key, files)
            self.store.put(
                self.store.key(f"{digest}/{SHARED_MANIFEST}"),
                _canonical({"manifest": document, "mac": self._mac(document)}),
            )
        except Exception as exc:  # never fail a request over the tier: the entry is served from the local cache
            metrics.SHARED_TIER.labels(result="upload_failed").inc()
            logger.warning(
                "safelora: entry %s not uploaded to the %s (%s: %s)",
                digest[:16],
                self.describe(),
                type(exc).__name__,
                exc,
            )
            return False
        metrics.SHARED_TIER.labels(result="uploaded").inc()
        logger.info("safelora: entry %s uploaded to the %s", digest[:16], self.describe())
        return True
