"""A real S3 server process for the tests (``s3_server.py``: moto's S3 over HTTP on loopback), and a
boto3 client to upload what the plugin will read.

:class:`S3TestStore` starts it, waits until it answers, switches its faults (slow answers,
objects rewritten while read) and can stop and restart it on the same port (a store that is
down, then back: moto keeps objects in memory, so a restart starts empty and tests re-upload).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vllm_safelora.launcher import free_port, kill_tree, spawn

SERVER_SCRIPT = Path(__file__).with_name("s3_server.py")
# Credentials the store is talked to with: moto accepts any, and the tests check that the
# secret never appears in a server log, a response or doctor's output.
ACCESS_KEY = "AKIASAFELORATEST0001"
SECRET_KEY = "s3cr3t-SAFELORA-never-logged-0123456789"
REGION = "us-east-1"


def aws_env() -> dict[str, str]:
    """The standard AWS environment variables a plugin server finds its credentials in."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@dataclass
class S3TestStore:
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: object = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def faults_path(self) -> Path:
        return Path(self.workdir) / "s3-faults.json"

    def start(self, timeout: float = 60.0) -> S3TestStore:
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        if not self.faults_path.exists():
            self.set_faults()
        self.proc = spawn(
            [sys.executable, str(SERVER_SCRIPT), str(self.port), str(self.faults_path)],
            {
                **{k: v for k, v in __import__("os").environ.items() if not k.startswith("AWS_")},
                "PYTHONUNBUFFERED": "1",
            },
            Path(self.workdir) / f"s3-server-{self.port}.log",
            die_with_parent=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().list_buckets()
                return self
            except Exception as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"S3 test server did not start (log {self.workdir})") from exc
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid, grace=5, reap=self.proc)
            self.proc = None

    def set_faults(self, *rules: dict) -> None:
        tmp = self.faults_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rules": list(rules)}))
        tmp.replace(self.faults_path)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30
            ),
        )

    def upload_dir(self, bucket: str, prefix: str, src: Path, files=None) -> None:
        """Put ``src``'s files (or only ``files``) under ``s3://bucket/prefix/``."""
        client = self.client()
        for path in sorted(Path(src).iterdir()):
            if path.is_file() and (files is None or path.name in files):
                client.put_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/{path.name}", Body=path.read_bytes())


@contextlib.contextmanager
def running_store(workdir: Path, bucket: str) -> Iterator[S3TestStore]:
    """A started store holding one empty bucket, stopped on exit."""
    store = S3TestStore(workdir).start()
    try:
        store.client().create_bucket(Bucket=bucket)
        yield store
    finally:
        store.stop()
