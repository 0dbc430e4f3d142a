"""S3-compatible object storage for the adapter source and the fleet-shared cache tier.

One client per configured store, made with boto3's standard credential chain (environment,
shared profile, instance or pod role): credentials never come from the plugin's config file
and are never logged or shown (``describe`` prints the bucket, prefix and endpoint only).

What both users need, and nothing else:

* :func:`parse_s3_uri`: ``s3://bucket/prefix/`` checked once at start-up;
* :meth:`ObjectStore.head` / :meth:`ObjectStore.get_capped`: one object's advertised size and
  version, then its bytes streamed under a byte cap and a wall-clock deadline, pinned to that
  version (``If-Match`` on the ETag, or the version id), so a rewrite between the two is seen;
* :class:`StoreUnavailable` / :class:`StoreRefused`: every botocore failure sorted into "try again
  later" (unreachable, slow, throttled, credentials) or "this object cannot be had" (missing,
  denied, changed), each with a short ``reason`` for metrics.

boto3 is imported only when a store is opened: servers without S3 never pay for it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import BinaryIO

from .errors import ConfigError

# S3's bucket naming rules (3-63 lowercase letters, digits, dots, hyphens); path-style
# endpoints (MinIO, Ceph, moto) accept the same set.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_KEY_PREFIX_RE = re.compile(r"[A-Za-z0-9._/-]*")
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    prefix: str  # "" or ends with "/"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_s3_uri(uri: object, what: str) -> S3Uri:
    """``s3://bucket/some/prefix/`` -> S3Uri, or ConfigError naming ``what`` (the config key)."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ConfigError(f"{what} must be an s3://bucket/prefix/ URI, got {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"{what}: {bucket!r} is not a valid bucket name (3-63 of a-z 0-9 . -)")
    if not _KEY_PREFIX_RE.fullmatch(prefix) or any(p in ("..", ".") for p in prefix.split("/")) or "//" in prefix:
        raise ConfigError(
            f"{what}: key prefix {prefix!r} must be plain path components (A-Z a-z 0-9 . _ - /, no '.' or '..')"
        )
    if prefix.startswith("/"):
        raise ConfigError(f"{what}: key prefix {prefix!r} must not start with '/'")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return S3Uri(bucket, prefix)


class StoreError(Exception):
    """A request to the store failed; ``reason`` is a short metrics label."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{detail} ({reason})")


class StoreUnavailable(StoreError):
    """The store cannot answer now (unreachable, slow, throttled, credentials): try again later."""


class StoreRefused(StoreError):
    """This object cannot be had: ``reason`` is not_found, access_denied, changed or too_large."""


@dataclass(frozen=True)
class ObjectHead:
    key: str
    size: int
    etag: str
    version_id: str | None


@dataclass(frozen=True)
class StoreTimeouts:
    connect_s: float = 5.0
    read_s: float = 20.0
    total_s: float = 120.0
    """Wall clock for one fetch (every request and byte of it): a store that trickles bytes
    cannot hold a preparation slot longer than this."""
    retries: int = 2
    """botocore's retries of one request on connection errors, throttling and 5xx."""


class ObjectStore:
    """One bucket and key prefix of an S3-compatible store (thread-safe: boto3 clients are)."""

    def __init__(
        self,
        uri: S3Uri,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        timeouts: StoreTimeouts = StoreTimeouts(),
        max_connections: int = 10,
        what: str = "s3",
    ):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ConfigError(
                f"{what} is enabled but boto3 is not installed: pip install 'vllm-safelora[s3]'"
            ) from None
        if endpoint_url is not None and not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", endpoint_url):
            raise ConfigError(f"{what}.endpoint_url must be an http(s):// URL, got {endpoint_url!r}")
        self.uri = uri
        self.endpoint_url = endpoint_url
        self.region = region
        self.timeouts = timeouts
        config = Config(
            connect_timeout=timeouts.connect_s,
            read_timeout=timeouts.read_s,
            retries={"max_attempts": 1 + timeouts.retries, "mode": "standard"},
            max_pool_connections=max_connections,
            # S3-compatible stores (MinIO, Ceph, moto) address buckets by path; AWS by host.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            user_agent_extra="vllm-safelora",
        )
        # A session of its own: the process-wide default session may be configured by others.
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=config,
        )

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"{self.uri}{where}"

    def key(self, relative: str) -> str:
        return self.uri.prefix + relative

    # ------------------------------------------------------------------ requests

    def _classify(self, exc: BaseException, key: str) -> StoreError:
        from botocore import exceptions as bx

        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed",) or status == 412:
                return StoreRefused("changed", f"{key} was rewritten while it was fetched")
            if code == "NoSuchBucket":
                return StoreUnavailable("no_such_bucket", f"bucket {self.uri.bucket!r} does not exist")
            if code in ("NoSuchKey", "NotFound", "404") or status == 404:
                return StoreRefused("not_found", f"{key} does not exist")
            if code in ("AccessDenied", "403", "Forbidden") or status == 403:
                # S3 answers 403 for a missing object when the credentials lack ListBucket.
                return StoreRefused("access_denied", f"the store denies this server access to {key}")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
                return StoreUnavailable("credentials", f"the store rejected this server's credentials ({code})")
            if status == 304:
                return StoreRefused("changed", f"{key} was rewritten while it was fetched")
            return StoreUnavailable("store_error", f"the store answered {status} {code} for {key}")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
            return StoreUnavailable(
                "credentials", "no usable AWS credentials (environment, shared profile, instance or pod role)"
            )
        if isinstance(exc, (bx.ConnectTimeoutError, bx.ReadTimeoutError)):
            return StoreUnavailable("timeout", f"the store did not answer in time for {key}")
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ConnectionError)):
            return StoreUnavailable("unreachable", f"the store at {self.endpoint_url or 'AWS'} cannot be reached")
        if isinstance(exc, (bx.HTTPClientError, bx.BotoCoreError, OSError)):
            return StoreUnavailable("unreachable", f"the connection to the store failed ({type(exc).__name__})")
        raise exc

    def head(self, key: str) -> ObjectHead:
        try:
            resp = self._client.head_object(Bucket=self.uri.bucket, Key=key)
        except Exception as exc:
            raise self._classify(exc, key) from None
        return ObjectHead(
            key=key,
            size=int(resp.get("ContentLength", -1)),
            etag=str(resp.get("ETag", "")),
            version_id=resp.get("VersionId") if resp.get("VersionId") not in (None, "null") else None,
        )

    def get_capped(self, head: ObjectHead, out: BinaryIO, limit: int, deadline: float) -> int:
        """Stream the version ``head`` names into ``out``: at most ``limit`` bytes and exactly
        the advertised size, before ``deadline`` (time.monotonic). Returns the bytes written."""
        kwargs = {"Bucket": self.uri.bucket, "Key": head.key}
        # Pin the version the size was checked on: a version id where the bucket keeps
        # versions, else the ETag (the store answers 412 if the object changed since).
        if head.version_id:
            kwargs["VersionId"] = head.version_id
        if head.etag:
            kwargs["IfMatch"] = head.etag
        try:
            resp = self._client.get_object(**kwargs)
        except Exception as exc:
            raise self._classify(exc, head.key) from None
        body = resp["Body"]
        got = 0
        try:
            if head.etag and str(resp.get("ETag", head.etag)) != head.etag:
                raise StoreRefused("changed", f"{head.key} was rewritten while it was fetched")
            while True:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        "timeout", f"{head.key} took longer than {self.timeouts.total_s:g}s to download"
                    )
                try:
                    block = body.read(min(CHUNK_BYTES, limit + 1 - got))
                except Exception as exc:
                    raise self._classify(exc, head.key) from None
                if not block:
                    break
                got += len(block)
                if got > limit or got > head.size:
                    raise StoreRefused("too_large", f"{head.key} sent more than its advertised {head.size} bytes")
                out.write(block)
        finally:
            body.close()
        if got != head.size:
            raise StoreRefused("changed", f"{head.key} ended after {got} of its advertised {head.size} bytes")
        return got

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.uri.bucket, Key=key, Body=data)
        except Exception as exc:
            raise self._classify(exc, key) from None

    def check_readable(self) -> None:
        """One cheap listing under the prefix: reachable, credentials accepted, bucket readable."""
        try:
            self._client.list_objects_v2(Bucket=self.uri.bucket, Prefix=self.uri.prefix, MaxKeys=1)
        except Exception as exc:
            raise self._classify(exc, str(self.uri)) from None
