"""The Kubernetes deployment in docs/kubernetes, rendered as an operator would render it.

``render`` copies the kustomization (and the configs/ files it takes the alert rules and the
dashboard from) into a scratch folder, makes the secret files the guide tells an operator to
make (keys from the real ``issue-key``, a fleet key, a probe key, object-store credentials),
and runs ``kubectl kustomize``: the same command the guide gives, so a manifest the guide
would fail to build fails here.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from .keys import issue_key

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "kubernetes"
# The API versions the manifests must validate against: the oldest and newest minor releases
# with upstream support at the time of writing, and the kubectl shipped on these machines.
KUBERNETES_VERSIONS = ("1.32.0", "1.34.0", "1.37.0")


@dataclass
class Rendered:
    docs: list[dict]
    keys: dict[str, str]  # name -> key as issued (admin "prometheus", tenant "probe")
    work: Path

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [d for d in self.docs if d["kind"] == kind and (name is None or _base(d) == name)]
        assert len(found) == 1, (kind, name, [(d["kind"], d["metadata"]["name"]) for d in self.docs])
        return found[0]

    def data(self, kind: str, name: str) -> dict[str, str]:
        """A ConfigMap's or Secret's files and values, decoded."""
        doc = self.one(kind, name)
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()}
        return dict(doc.get("data", {}))


def _base(doc: dict) -> str:
    """A generated object's name without the content hash kustomize appends."""
    name = doc["metadata"]["name"]
    generated = doc["kind"] in ("ConfigMap", "Secret") and "-" in name
    return name.rsplit("-", 1)[0] if generated else name


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(work: Path, edit=None) -> Rendered:
    """The manifests as ``kubectl kustomize`` builds them; ``edit(folder)`` may change the
    copied guide first (a test that breaks it on purpose)."""
    guide = work / "docs" / "kubernetes"
    shutil.copytree(GUIDE, guide)
    shutil.copytree(REPO / "configs", work / "configs")
    secrets = guide / "secrets"
    secrets.mkdir()
    keys = {
        "prometheus": issue_key(secrets / "keys.yaml", "prometheus", admin=True),
        "probe": issue_key(secrets / "keys.yaml", "probe"),
    }
    (secrets / "probe.key").write_text(keys["probe"] + "\n")
    (secrets / "fleet.key").write_bytes(base64.b64encode(os.urandom(48)) + b"\n")
    (secrets / "s3.env").write_text("AWS_ACCESS_KEY_ID=AKIAEXAMPLE\nAWS_SECRET_ACCESS_KEY=example-secret\n")
    if edit is not None:
        edit(guide)
    out = subprocess.run(
        [kubectl(), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(guide)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize failed: {out.stderr.strip()}")
    return Rendered([d for d in yaml.safe_load_all(out.stdout) if d], keys, work)


def probe_command(deployment: dict, port: int, key_file: Path) -> list[str]:
    """The vLLM container's readiness probe, pointed at a server on ``port`` with the key in ``key_file``."""
    container = copy.deepcopy(vllm_container(deployment))
    command = container["readinessProbe"]["exec"]["command"]
    return [
        part.replace("http://127.0.0.1:8000/", f"http://127.0.0.1:{port}/").replace(
            "/etc/vllm-safelora/probe/key", str(key_file)
        )
        for part in command
    ]


def vllm_container(deployment: dict) -> dict:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm"]
    return container
