"""The Kubernetes deployment guide's manifests (docs/kubernetes): they build with kustomize, every
object validates against the Kubernetes API schemas (strict: an unknown field is an error), and
they agree with the plugin: the configuration they mount is one the plugin accepts, every path it
names is mounted from the right volume, the secrets hold what the plugin reads, the Prometheus
configuration passes promtool. The probe command itself runs against a live server in
tests/hardening/test_auth.py.
"""

from __future__ import annotations

import copy
import re
import shutil
import stat
import subprocess
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml
from support import kubernetes as k8s

from vllm_safelora.integration.compat import QUALIFIED_VLLM_VERSIONS
from vllm_safelora.launcher import PLUGIN_NAMES

pytestmark = pytest.mark.skipif(k8s.kubectl() is None, reason="kubectl (with its kustomize) is not installed")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> k8s.Rendered:
    return k8s.render(tmp_path_factory.mktemp("k8s"))


@pytest.fixture(scope="module")
def settings(rendered, tmp_path_factory):
    from vllm_safelora.config import SafeLoRASettings

    path = tmp_path_factory.mktemp("plugin") / "plugin.yaml"
    path.write_text(rendered.data("ConfigMap", "vllm-safelora-config")["plugin.yaml"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_SAFELORA_CONFIG", str(path))
        from vllm_safelora.config import load_settings

        loaded = load_settings()
    assert isinstance(loaded, SafeLoRASettings)
    return loaded


def pod(rendered) -> dict:
    return rendered.one("Deployment", "vllm-safelora")["spec"]["template"]["spec"]


def mounted(rendered, container: dict, path: Path | str) -> dict:
    """The volume that holds ``path`` in ``container`` (the deepest mount above it)."""
    path = PurePosixPath(path)
    mounts = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is not under any volume mount of container {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod(rendered)["volumes"] if v["name"] == mount["name"]]
    return {"volume": volume, "mount": mount, "file": str(path.relative_to(mount["mountPath"]))}


def env_of(rendered, container: dict) -> dict[str, str]:
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(rendered.data("ConfigMap", _generated(rendered, source["configMapRef"]["name"])))
        if "secretRef" in source:
            env.update(rendered.data("Secret", _generated(rendered, source["secretRef"]["name"])))
    env.update({e["name"]: e.get("value", "") for e in container.get("env", [])})
    return env


def _generated(rendered, name: str) -> str:
    """The generator's name of a reference kustomize rewrote to ``name-<hash>``."""
    return next(k8s._base(d) for d in rendered.docs if d["metadata"]["name"] == name)


def volume_source(rendered, volume: dict) -> tuple[str, str]:
    for kind, field, key in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
        if field in volume:
            return kind, _generated(rendered, volume[field][key])
    return next(iter(k for k in volume if k != "name")), ""


@pytest.mark.parametrize("version", k8s.KUBERNETES_VERSIONS)
def test_every_object_validates_strictly(rendered, version):
    kinds = sorted(d["kind"] for d in rendered.docs)
    assert kinds == sorted(
        ["Namespace", "Deployment", "Service", "PodDisruptionBudget"] + ["ConfigMap"] * 4 + ["Secret"] * 4
    ), kinds
    problems = []
    for doc in rendered.docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert problems == []


@pytest.mark.parametrize(
    "breakage",
    [
        ("misspelled field", lambda spec: spec["containers"][0].update(volumeMount=[])),
        ("wrong type", lambda spec: spec["containers"][0]["ports"][0].update(containerPort="http")),
        ("missing container name", lambda spec: spec["containers"][0].pop("name")),
        ("bad probe", lambda spec: spec["containers"][0]["readinessProbe"].update(exec="python3")),
    ],
    ids=lambda b: b[0],
)
def test_the_validator_catches_a_broken_deployment(rendered, breakage):
    doc = copy.deepcopy(rendered.one("Deployment"))
    breakage[1](doc["spec"]["template"]["spec"])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, k8s.KUBERNETES_VERSIONS[-1], strict=True)


def test_a_guide_that_names_a_missing_file_does_not_build(tmp_path):
    with pytest.raises(RuntimeError, match="kustomize failed"):
        k8s.render(tmp_path, edit=lambda guide: (guide / "secrets" / "fleet.key").unlink())


def test_the_mounted_configuration_is_one_the_plugin_accepts(rendered, settings):
    container = k8s.vllm_container(rendered.one("Deployment"))
    env = env_of(rendered, container)
    config = mounted(rendered, container, env["VLLM_SAFELORA_CONFIG"])
    assert volume_source(rendered, config["volume"]) == ("ConfigMap", "vllm-safelora-config")
    assert config["file"] == "plugin.yaml"
    assert settings.auth.enabled and settings.s3.enabled and settings.shared_cache.enabled


def test_every_path_the_plugin_reads_comes_from_the_right_volume(rendered, settings):
    container = k8s.vllm_container(rendered.one("Deployment"))
    expect = {
        settings.auth.keys_file: ("Secret", "vllm-safelora-keys"),
        settings.shared_cache.mac_key_file: ("Secret", "vllm-safelora-fleet"),
    }
    for path, source in expect.items():
        where = mounted(rendered, container, path)
        assert volume_source(rendered, where["volume"]) == source, path
        assert where["file"] in rendered.data(*source), (path, source)
        assert where["mount"].get("readOnly") is True, path
        mode = where["volume"]["secret"]["defaultMode"]
        assert not mode & (stat.S_IRWXO | stat.S_IWGRP), f"{path}: mode {mode:o} lets others read or write it"

    bank = mounted(rendered, container, settings.bank)
    assert "persistentVolumeClaim" in bank["volume"] and bank["mount"]["readOnly"] is True
    model = container["args"][container["args"].index("--model") + 1]
    assert mounted(rendered, container, model)["volume"] is bank["volume"]

    # the cache's flock and rename need one local filesystem, and the kubelet evicts a pod whose
    # emptyDir outgrows its sizeLimit: the budget must fit
    cache = mounted(rendered, container, settings.cache_dir)
    assert cache["file"] == "." and "emptyDir" in cache["volume"]
    assert _quantity(cache["volume"]["emptyDir"]["sizeLimit"]) > settings.cache_max_bytes


def test_the_fleet_key_and_the_keys_file_are_what_the_plugin_reads(rendered, settings, tmp_path):
    from vllm_safelora.serving.credentials import KeyStore

    fleet = rendered.data("Secret", "vllm-safelora-fleet")["fleet.key"]
    assert len(fleet.strip()) >= 32
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(rendered.data("Secret", "vllm-safelora-keys")["keys.yaml"])
    store = KeyStore(keys_file)
    probe = rendered.data("Secret", "vllm-safelora-probe")["key"].strip()
    assert store.identify(probe).role == "tenant"
    assert store.identify(rendered.keys["prometheus"]).admin
    assert "prometheus" not in rendered.data("Secret", "vllm-safelora-probe")["key"]


def test_the_environment_names_every_plugin_and_no_vllm_api_key(rendered, settings):
    deployment = rendered.one("Deployment")
    spec = pod(rendered)
    (doctor,) = spec["initContainers"]
    vllm = k8s.vllm_container(deployment)
    for container in (doctor, vllm):
        env = env_of(rendered, container)
        assert set(PLUGIN_NAMES) <= set(env["VLLM_PLUGINS"].split(",")), container["name"]
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
        assert "VLLM_API_KEY" not in env, "auth.enabled refuses vLLM's single key"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
        assert container["volumeMounts"] == vllm["volumeMounts"], "doctor must see the files vLLM will"
    assert "--api-key" not in vllm["args"]
    assert doctor["command"][:2] == ["vllm-safelora", "doctor"] and doctor["image"] == vllm["image"]
    assert doctor["command"][doctor["command"].index("--model") + 1] == vllm["args"][vllm["args"].index("--model") + 1]
    # the probe talks to the port vLLM listens on, with the key the probe Secret mounts
    port = vllm["args"][vllm["args"].index("--port") + 1]
    probe = " ".join(vllm["readinessProbe"]["exec"]["command"])
    assert f"127.0.0.1:{port}/health" in probe
    key_path = re.search(r"open\('([^']+)'\)", probe).group(1)
    where = mounted(rendered, vllm, key_path)
    assert volume_source(rendered, where["volume"]) == ("Secret", "vllm-safelora-probe")
    assert where["file"] in rendered.data("Secret", "vllm-safelora-probe")


def test_the_image_is_a_qualified_vllm():
    base = re.search(r"^FROM vllm/vllm-openai:v(\S+)$", (k8s.GUIDE / "Dockerfile").read_text(), re.M)
    assert base and base.group(1) in QUALIFIED_VLLM_VERSIONS


def test_alerts_and_dashboard_are_the_tested_files(rendered):
    repo_configs = k8s.REPO / "configs"
    alerts = rendered.data("ConfigMap", "vllm-safelora-alerts")["safelora-alerts.yaml"]
    assert alerts == (repo_configs / "prometheus-alerts.yaml").read_text()
    dashboard = rendered.data("ConfigMap", "vllm-safelora-dashboard")["safelora.json"]
    assert dashboard == (repo_configs / "grafana-dashboard.json").read_text()
    assert rendered.one("ConfigMap", "vllm-safelora-dashboard")["metadata"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is not installed")
def test_the_prometheus_configuration_passes_promtool(rendered, tmp_path):
    """Debian's promtool is built without Kubernetes service discovery, so the discovery block is
    swapped for a static target here; the rest (authorization, relabelling, the rule file as
    the ConfigMap holds it) is checked as written, including that the key file exists."""
    config = yaml.safe_load((k8s.GUIDE / "prometheus-scrape.yaml").read_text())
    key = tmp_path / "key"
    key.write_text(rendered.keys["prometheus"])
    rules = tmp_path / "safelora-alerts.yaml"
    rules.write_text(rendered.data("ConfigMap", "vllm-safelora-alerts")["safelora-alerts.yaml"])
    assert config["rule_files"] == ["/etc/prometheus/rules/safelora-alerts.yaml"]
    config["rule_files"] = [str(rules)]
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [rendered.one("Namespace")["metadata"]["name"]]
    labels = {r.get("regex") for r in job["relabel_configs"]}
    assert "vllm-safelora" in labels and "http" in labels
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    job["authorization"]["credentials_file"] = str(key)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def _quantity(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", text)
    assert match, f"unsupported quantity {text!r}"
    return int(match.group(1)) * units.get(match.group(2) or "", 1)
