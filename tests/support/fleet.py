"""A fleet for the tests: plugin replicas reading adapters from a real S3 server process and sharing the
fleet tier of projected entries in the same store, optionally behind ``vllm-router``.

* :func:`open_fleet` starts the store (``support/s3.py``), creates its two buckets and writes the fleet
  key; the test uploads its adapters; :meth:`Fleet.start_replicas` then starts the plugin servers
  (``support/server.py``) at once, each with its own cache directory, all on the same tier.
* :class:`Router` is ``vllm-router`` (vllm-project's Rust load balancer, the ``fleet`` extra) in front
  of replicas, on loopback, as a :class:`vllm_safelora.launcher.ServerProcess` (whole tree ended on
  ``stop()``, the same HTTP helpers, so ``e2e.complete`` talks to it like to a server).
* :func:`audit_tier` checks every entry in the tier on its own (the MAC and every file's blake3
  re-computed here, not by the plugin), so a bug in the tier cannot hide a partial or altered entry.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence

import blake3

from vllm_safelora.launcher import Metrics, ServerProcess, free_port, spawn

from .s3 import S3TestStore, aws_env
from .server import Server, clean_env, new_server, start_all, write_config

TENANTS_BUCKET, FLEET_BUCKET = "adapters", "fleet"
TENANTS_PREFIX, FLEET_PREFIX = "tenants/", "entries/"
# Short timeouts: the tests make the store slow or take it down, and a request must not wait on it long.
S3_SETTINGS = {
    "connect_timeout_s": 1,
    "read_timeout_s": 2,
    "fetch_timeout_s": 8,
    "retries": 1,
    "retry_after_s": 3,
}
TIER_SETTINGS = {"read_timeout_s": 5, "retries": 1}


@dataclass
class Fleet:
    root: Path
    store: S3TestStore
    key_file: Path
    replicas: dict[str, Server] = field(default_factory=dict)
    caches: dict[str, Path] = field(default_factory=dict)

    def create_buckets(self) -> None:
        """Both buckets (again after a restart of the store: moto keeps objects in memory)."""
        c = self.store.client()
        for bucket in (TENANTS_BUCKET, FLEET_BUCKET):
            c.create_bucket(Bucket=bucket)

    def upload_adapter(self, name: str, src: Path, files=None) -> None:
        """``src`` as the s3 adapter ``s3:<name>``."""
        self.store.upload_dir(TENANTS_BUCKET, f"{TENANTS_PREFIX}{name}", src, files)

    def replica_config(self, replica: str, world, **overrides) -> Path:
        """The config of replica ``replica``: ``world``'s bank, policy and adapter_dirs, its own cache
        directory, adapters from ``s3://adapters/tenants/``, the tier at ``s3://fleet/entries/``."""
        self.caches[replica] = self.root / f"cache-{replica}"
        doc = dict(
            bank=str(world.bank),
            adapter_dirs=[str(world.adapter_root)],
            cache_dir=str(self.caches[replica]),
            device="cpu",
            policy=dict(world.policy),
            admission={"max_projected_fraction": None, "min_cosine": None},
            s3={
                "enabled": True,
                "uri": f"s3://{TENANTS_BUCKET}/{TENANTS_PREFIX}",
                "endpoint_url": self.store.endpoint,
                **S3_SETTINGS,
            },
            shared_cache={
                "enabled": True,
                "uri": f"s3://{FLEET_BUCKET}/{FLEET_PREFIX}",
                "endpoint_url": self.store.endpoint,
                "mac_key_file": str(self.key_file),
                **TIER_SETTINGS,
            },
        )
        doc.update(overrides)
        return write_config(self.root / f"{replica}.yaml", **doc)

    def start_replicas(self, world, names: Sequence[str] = ("a", "b"), **overrides) -> list[Server]:
        """Plugin servers named ``s3-<name>``, started at once (their start-ups overlap)."""
        configs = {r: self.replica_config(r, world, **overrides) for r in names}
        started = start_all([new_server(f"s3-{r}", world.aligned, configs[r], self.root, env=aws_env()) for r in names])
        self.replicas.update(zip(names, started))
        return started

    def stop(self) -> None:
        for server in self.replicas.values():
            server.stop()
        self.store.stop()


def open_fleet(root: Path) -> Fleet:
    """The store started with both buckets, and the fleet key (0600); no replica yet."""
    root = Path(root)
    store = S3TestStore(root / "store").start()
    key_file = root / "fleet.key"
    key_file.write_bytes(b"fleet-secret-" + b"k" * 40)
    key_file.chmod(0o600)
    fleet = Fleet(root=root, store=store, key_file=key_file)
    try:
        fleet.create_buckets()
    except BaseException:
        store.stop()
        raise
    return fleet


# ----------------------------------------------------------------------------- the tier, audited


@dataclass
class TierAudit:
    entries: dict[str, dict]  # digest -> signed manifest document, for entries that verify
    unpublished: dict[str, list[str]]  # digest -> files under it, where no manifest was uploaded
    problems: list[str]  # manifests that do not verify, files that do not match


def _canonical(doc: Mapping) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def audit_tier(fleet: Fleet) -> TierAudit:
    """Every object under ``s3://fleet/entries/``: each digest with a manifest must carry a MAC under the
    fleet key and list files present with their size and blake3; a digest without a manifest is an upload
    that never finished (a reader treats it as missing)."""
    c = fleet.store.client()
    key = fleet.key_file.read_bytes().strip()
    by_digest: dict[str, dict[str, int]] = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=FLEET_BUCKET, Prefix=FLEET_PREFIX):
        for obj in page.get("Contents", []):
            digest, _, name = obj["Key"][len(FLEET_PREFIX) :].partition("/")
            by_digest.setdefault(digest, {})[name] = obj["Size"]
    audit = TierAudit(entries={}, unpublished={}, problems=[])
    for digest, files in sorted(by_digest.items()):
        if "manifest.json" not in files:
            audit.unpublished[digest] = sorted(files)
            continue
        body = c.get_object(Bucket=FLEET_BUCKET, Key=f"{FLEET_PREFIX}{digest}/manifest.json")["Body"].read()
        try:
            stored = json.loads(body)
            document, mac = stored["manifest"], stored["mac"]
        except (ValueError, KeyError, TypeError) as exc:
            audit.problems.append(f"{digest[:16]}: manifest unreadable ({exc})")
            continue
        want = hmac.new(key, b"vllm-safelora/shared-entry\0" + _canonical(document), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(str(mac), want) or document.get("digest") != digest:
            audit.problems.append(f"{digest[:16]}: manifest not signed for this digest by the fleet key")
            continue
        bad = []
        for name, meta in document["files"].items():
            if name not in files:
                bad.append(f"{name} missing")
                continue
            data = c.get_object(Bucket=FLEET_BUCKET, Key=f"{FLEET_PREFIX}{digest}/{name}")["Body"].read()
            if len(data) != meta["size"] or blake3.blake3(data).hexdigest() != meta["blake3"]:
                bad.append(f"{name} does not match its signed size and blake3")
        if bad:
            audit.problems.append(f"{digest[:16]}: {', '.join(bad)}")
        else:
            audit.entries[digest] = document
    return audit


# ----------------------------------------------------------------------------- vllm-router


def router_version() -> str:
    from importlib.metadata import version

    return version("vllm-router")


@dataclass
class Router(ServerProcess):
    """``vllm-router`` in front of ``workers``: ``args`` are its flags besides host, ports and workers.
    Its own counters are on a second port (``metrics()``); ``/metrics`` on the main port is a worker's."""

    workers: Sequence[str] = ()
    prometheus_port: int = field(default_factory=free_port)
    name: str = "router"

    def start(self) -> Router:
        cmd = [
            sys.executable,
            "-m",
            "vllm_router.launch_router",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(self.prometheus_port),
            "--worker-urls",
            *self.workers,
            *self.args,
        ]
        self._t0 = time.monotonic()
        self.proc = spawn(cmd, self.env, Path(self.log_path), cwd=self.cwd, die_with_parent=self.die_with_parent)
        return self

    def wait_ready(self, timeout: float = 120.0) -> Router:
        # /v1/models is answered by a worker: the router is up and has a healthy worker to send it to.
        super().wait_ready(timeout)
        print(f"\n[router] {self.name} up on {self.base_url} in {self.startup_s:.1f}s (log {self.log_path})")
        return self

    def metrics(self) -> Metrics:
        import requests

        r = requests.get(f"http://127.0.0.1:{self.prometheus_port}/metrics", timeout=10)
        r.raise_for_status()
        return Metrics(r.text)


def start_router(name: str, workers: Sequence[Server], workdir: Path, policy: str, flags: Sequence[str] = ()) -> Router:
    """A router with ``policy`` in front of ``workers`` (running servers), up; its log in ``workdir``."""
    router = Router(
        args=["--policy", policy, *flags],
        env=clean_env(),
        log_path=Path(workdir) / f"{name}.log",
        cwd=Path(workdir),
        die_with_parent=True,
        workers=[w.base_url for w in workers],
        name=name,
    )
    router.start()
    try:
        return router.wait_ready()
    except BaseException:
        router.stop()
        raise
