"""The service pipeline without vLLM: locate -> validate -> project -> cache, tenants, shadow, metrics."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import load_file, save_file

from vllm_safelora.adapters import WEIGHTS_FILE, read_adapter
from vllm_safelora.cache import PatchedAdapterCache
from vllm_safelora.config import SafeLoRASettings
from vllm_safelora.apply_policy import project_adapter
from vllm_safelora.errors import AdapterRefused, RefusalReason
from vllm_safelora.policies import SafeLoRAConfig
from vllm_safelora.serving.service import SafeLoRAService
from vllm_safelora.serving.startup import build_sources


def _metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture()
def adapters_root(tmp_path, tiny_adapter_aligned, tiny_adapter_orthogonal) -> Path:
    root = tmp_path / "adapters"
    shutil.copytree(tiny_adapter_aligned, root / "acme" / "good")
    shutil.copytree(tiny_adapter_orthogonal, root / "globex" / "bad")
    shutil.copytree(tiny_adapter_orthogonal, root / "trusted" / "bad")
    shutil.copytree(tiny_adapter_orthogonal, root / "canary" / "bad")
    return root


def _service(tmp_path, tiny_bank, adapters_root, **overrides) -> SafeLoRAService:
    settings = SafeLoRASettings(
        bank=tiny_bank.path, adapter_dirs=[adapters_root], cache_dir=tmp_path / "cache", device="cpu", **overrides
    )
    cache = PatchedAdapterCache(settings.cache_dir, settings.cache_max_bytes)
    return SafeLoRAService(settings, tiny_bank, build_sources(settings), cache, max_rank=8)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / WEIGHTS_FILE)


def test_prepare_projects_like_the_offline_engine(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root)
    before = _metric("safelora_projections_total", policy="safelora")
    prepared = svc.prepare("globex/bad")
    offline = project_adapter(read_adapter(adapters_root / "globex" / "bad"), tiny_bank, SafeLoRAConfig())
    assert prepared.report.summary.outcome == "modified"
    assert prepared.report.summary.output_hash == offline.report.summary.output_hash
    served = _weights(prepared.path)
    assert served.keys() == _weights(adapters_root / "globex" / "bad").keys()
    assert _metric("safelora_projections_total", policy="safelora") == before + 1
    assert svc.verified(str(prepared.path)) is not None
    assert prepared.path.parent == svc.cache.entries_dir


def test_same_content_two_names_is_projected_once(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root)
    before = _metric("safelora_projections_total", policy="safelora")
    hits = _metric("safelora_cache_requests_total", result="hit")
    a = svc.prepare("globex/bad")
    b = svc.prepare("canary/bad")
    assert a.path == b.path and b.cache_hit
    assert _metric("safelora_projections_total", policy="safelora") == before + 1
    assert _metric("safelora_cache_requests_total", result="hit") == hits + 1


def test_changed_upload_is_projected_again(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root)
    first = svc.prepare("globex/bad")
    tensors = _weights(adapters_root / "globex" / "bad")
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(adapters_root / "globex" / "bad" / WEIGHTS_FILE))
    second = svc.prepare("globex/bad")
    assert second.path != first.path and not second.cache_hit


def test_refusal_is_counted_and_writes_nothing(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root)
    bad = adapters_root / "acme" / "nan"
    shutil.copytree(adapters_root / "acme" / "good", bad)
    tensors = _weights(bad)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / WEIGHTS_FILE))
    before = _metric("safelora_refusals_total", reason="non_finite")
    deprecated = _metric("safelora_rejections_total", reason="non_finite")
    with pytest.raises(AdapterRefused) as err:
        svc.prepare("acme/nan")
    assert err.value.reason is RefusalReason.NON_FINITE and "acme/nan" in str(err.value)
    assert _metric("safelora_refusals_total", reason="non_finite") == before + 1
    # The old name stays an alias for one release, so existing alert rules keep firing.
    assert _metric("safelora_rejections_total", reason="non_finite") == deprecated + 1
    assert list(svc.cache.entries_dir.iterdir()) == []
    assert svc.prepare("acme/good").report.summary.outcome == "unchanged"


def test_explicit_paths_must_be_under_a_root(tmp_path, tiny_bank, adapters_root, tiny_adapter_orthogonal):
    svc = _service(tmp_path, tiny_bank, adapters_root)
    with pytest.raises(AdapterRefused) as err:
        svc.prepare("x", str(tiny_adapter_orthogonal))
    assert err.value.reason is RefusalReason.INVALID_NAME
    assert svc.prepare("globex/bad", str(adapters_root / "globex" / "bad")).report.summary.outcome == "modified"


def test_admission_refuses_without_caching(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root, admission={"max_projected_fraction": 0.5})
    with pytest.raises(AdapterRefused) as err:
        svc.prepare("globex/bad")
    assert err.value.reason is RefusalReason.ADMISSION and "needed projection" in err.value.detail
    assert list(svc.cache.entries_dir.iterdir()) == []
    assert svc.prepare("acme/good").report.summary.outcome == "unchanged"


def test_tenant_rules_pick_policy_and_names_cannot_pose(tmp_path, tiny_bank, adapters_root):
    svc = _service(
        tmp_path,
        tiny_bank,
        adapters_root,
        tenants=[{"match": "trusted/*", "policy": {"select": "threshold", "threshold": -1.0}}],
    )
    trusted = svc.prepare("trusted/bad")
    assert trusted.report.summary.outcome == "unchanged" and trusted.report.summary.tenant_rule == "trusted/*"
    assert svc.prepare("globex/bad").report.summary.outcome == "modified"
    from vllm_safelora.policies.tenant_rules import resolve_tenant

    for lookalike in ("trustedx/bad", "Trusted/bad", "xtrusted/bad", "trusted"):
        assert resolve_tenant(svc.settings, lookalike).rule == "default"


def test_shadow_mode_serves_original_bytes_and_reports(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root, tenants=[{"match": "canary/*", "shadow": True}])
    before = _metric("safelora_adapters_total", outcome="modified", policy="safelora", mode="shadow")
    shadow = svc.prepare("canary/bad")
    svc.mark_loaded("canary/bad", shadow)  # counted once vLLM accepted it
    original = adapters_root / "canary" / "bad"
    assert (shadow.path / WEIGHTS_FILE).read_bytes() == (original / WEIGHTS_FILE).read_bytes()
    assert shadow.report.summary.mode == "shadow"
    assert shadow.report.summary.projected == shadow.report.summary.modules  # what would have happened
    assert _metric("safelora_adapters_total", outcome="modified", policy="safelora", mode="shadow") == before + 1
    # the same content under an enforcing tenant is still projected (separate cache entry)
    enforced = svc.prepare("globex/bad")
    assert enforced.path != shadow.path
    assert (enforced.path / WEIGHTS_FILE).read_bytes() != (original / WEIGHTS_FILE).read_bytes()


def test_altered_entry_is_detected_and_rebuilt(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root)
    prepared = svc.prepare("globex/bad")
    weights = prepared.path / WEIGHTS_FILE
    good_bytes = weights.read_bytes()
    weights.chmod(0o644)
    tampered = bytearray(good_bytes)
    tampered[-1] ^= 0xFF
    weights.write_bytes(bytes(tampered))
    assert svc.verified(str(prepared.path)) is None
    again = svc.prepare("globex/bad", str(prepared.path))
    assert again.path == prepared.path and not again.cache_hit
    assert (again.path / WEIGHTS_FILE).read_bytes() == good_bytes
    assert svc.verified(str(again.path)) is not None


def _rewrite_keeping_size_and_mtime(path: Path) -> None:
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("same_tick", [False, True], ids=["later", "same-tick-as-the-build"])
def test_an_entry_altered_with_its_size_and_mtime_kept_is_caught_before_the_engine(
    tmp_path, tiny_bank, adapters_root, monkeypatch, same_tick
):
    """The per-request check is a stat, and ctime moves with any write. A write in the same
    timestamp tick as the entry's signature (racily clean) is caught by hashing it again."""
    from vllm_safelora import fsutil

    if not same_tick:
        monkeypatch.setattr(fsutil, "RACY_WINDOW_NS", 0)
    svc = _service(tmp_path, tiny_bank, adapters_root)
    prepared = svc.prepare("globex/bad")
    good = (prepared.path / WEIGHTS_FILE).read_bytes()
    if not same_tick:
        time.sleep(0.02)
    _rewrite_keeping_size_and_mtime(prepared.path / WEIGHTS_FILE)
    assert svc.verified(str(prepared.path)) is None
    again, rebuilt = svc.ensure("globex/bad", str(prepared.path))
    assert rebuilt and not again.cache_hit and (again.path / WEIGHTS_FILE).read_bytes() == good


def test_a_racy_signature_of_an_intact_entry_is_proven_by_a_hash_not_rebuilt(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root)
    prepared = svc.prepare("globex/bad")
    assert not prepared.unchanged_on_disk()  # signed in the tick it was written: proves nothing yet
    known = svc.verified(str(prepared.path))
    assert known is not None and known.digest == prepared.digest
    again, rebuilt = svc.ensure("globex/bad", str(prepared.path))
    assert again.digest == prepared.digest and not rebuilt


def test_client_supplied_cache_paths_are_not_trusted(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root)
    entry = svc.prepare("globex/bad").path
    # internal callers (add_lora, process_inputs) may hand back a path this service issued
    assert svc.prepare("globex/bad", str(entry)).path == entry
    # an API client may not load another tenant's entry by its path
    with pytest.raises(AdapterRefused) as err:
        svc.prepare_client_path("mallory/x", str(entry))
    assert err.value.reason is RefusalReason.INVALID_NAME


def test_forget_drops_the_name_but_keeps_the_entry(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root)
    prepared = svc.prepare("globex/bad")
    svc.forget("globex/bad")
    assert "globex/bad" not in svc.loaded()
    assert svc.verified(str(prepared.path)) is not None


# --------------------------------------------------------------------------- issue: untrusted tenants


def test_policy_follows_the_location_not_the_served_name(tmp_path, tiny_bank, adapters_root):
    """A client cannot pick a tenant's policy by naming its adapter like that tenant."""
    rules = [
        {"match": "trusted/*", "policy": {"select": "threshold", "threshold": -1.0}},
        {"match": "canary/*", "shadow": True},
    ]
    svc = _service(tmp_path, tiny_bank, adapters_root, tenants=rules, served_names="label")
    evil = str(adapters_root / "globex" / "bad")
    for label in ("trusted/x", "canary/y", "trusted/bad", "canary/bad"):
        prepared = svc.prepare_client_path(label, evil)
        s = prepared.report.summary
        assert (s.outcome, s.mode, s.tenant_rule) == ("modified", "enforce", "default"), label
    # the trusted tenant's own directory still gets its rule, whatever the label
    assert svc.prepare("anything", str(adapters_root / "trusted" / "bad")).report.summary.tenant_rule == "trusted/*"


def test_a_link_into_another_tenant_is_refused(tmp_path, tiny_bank, adapters_root):
    (adapters_root / "trusted" / "current").symlink_to(adapters_root / "globex" / "bad")
    svc = _service(tmp_path, tiny_bank, adapters_root)
    for lora_path in (None, str(adapters_root / "trusted" / "current")):
        with pytest.raises(AdapterRefused) as err:
            svc.prepare("trusted/current", lora_path)
        assert err.value.reason is RefusalReason.OUTSIDE_NAMESPACE and "'trusted/'" in err.value.detail


def test_a_link_into_a_shared_area_gets_the_policy_of_where_it_leads(tmp_path, tiny_bank, adapters_root):
    (adapters_root / "trusted" / "current").symlink_to(adapters_root / "globex" / "bad")
    svc = _service(
        tmp_path,
        tiny_bank,
        adapters_root,
        shared_adapters=["globex/*"],
        tenants=[{"match": "trusted/*", "policy": {"select": "threshold", "threshold": -1.0}}],
    )
    for prepared in (
        svc.prepare("trusted/current"),
        svc.prepare("trusted/current", str(adapters_root / "trusted" / "current")),
    ):
        assert prepared.report.summary.tenant_rule == "default" and prepared.report.summary.outcome == "modified"


@pytest.mark.parametrize("label", ["trusted/bad", "x", "acme/good", "hub:acme/bad"])
def test_by_path_loads_are_served_under_their_location_by_default(tmp_path, tiny_bank, adapters_root, label):
    svc = _service(tmp_path, tiny_bank, adapters_root)
    with pytest.raises(AdapterRefused) as err:
        svc.prepare_client_path(label, str(adapters_root / "globex" / "bad"))
    assert err.value.reason is RefusalReason.INVALID_NAME and "lora_name='globex/bad'" in err.value.detail
    assert svc.prepare_client_path("globex/bad", str(adapters_root / "globex" / "bad"))


def test_an_operators_static_label_is_served_unless_it_shadows_a_tenant(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root, hub={"enabled": True})
    path = str(adapters_root / "globex" / "bad")
    assert svc.prepare_client_path("mybot", path, operator_label=True).report.summary.modules
    for label, shadowed in (
        ("acme", "'acme'"),
        ("acme/other", "'acme'"),
        ("trusted", "'trusted'"),
        ("hub:acme/x", "'hub:acme/x'"),
    ):
        with pytest.raises(AdapterRefused) as err:
            svc.prepare_client_path(label, path, operator_label=True)
        assert (
            err.value.reason is RefusalReason.INVALID_NAME and f"shadow tenant namespace {shadowed}" in err.value.detail
        )
    with pytest.raises(AdapterRefused, match="served_names: location"):  # the same label from a client
        svc.prepare_client_path("mybot2", path)


def test_a_loaded_name_cannot_be_taken_over_from_another_location(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root, served_names="label")
    svc.mark_loaded("shared", svc.prepare_client_path("shared", str(adapters_root / "acme" / "good")))
    for other in ("globex/bad", "trusted/bad", "canary/bad"):
        with pytest.raises(AdapterRefused) as err:
            svc.prepare_client_path("shared", str(adapters_root / other))
        assert err.value.reason is RefusalReason.NAME_IN_USE and "acme/good" in err.value.detail
    # the same location may be loaded again (in place) under its name
    assert svc.prepare_client_path("shared", str(adapters_root / "acme" / "good"))
    svc.forget("shared")
    assert svc.prepare_client_path("shared", str(adapters_root / "globex" / "bad"))


def test_refusals_are_remembered_by_content_and_by_files(tmp_path, tiny_bank, adapters_root, monkeypatch):
    import vllm_safelora.serving.preparer as service_module

    bad = adapters_root / "globex" / "nan"
    shutil.copytree(adapters_root / "globex" / "bad", bad)
    tensors = _weights(bad)
    next(iter(tensors.values()))[0, 0] = float("nan")
    (bad / WEIGHTS_FILE).chmod(0o644)
    save_file(tensors, bad / WEIGHTS_FILE)
    svc = _service(tmp_path, tiny_bank, adapters_root, served_names="label")
    parses = []
    real_parse = service_module.parse_adapter
    monkeypatch.setattr(service_module, "parse_adapter", lambda *a, **k: parses.append(1) or real_parse(*a, **k))
    reads = []
    real_read = service_module.read_adapter_files
    monkeypatch.setattr(service_module, "read_adapter_files", lambda *a, **k: reads.append(1) or real_read(*a, **k))
    hits = _metric("safelora_refusal_cache_hits_total")
    for name in ("globex/nan", "globex/nan", "x1", "x2"):
        with pytest.raises(AdapterRefused) as err:
            svc.prepare_client_path(name, str(bad) if name.startswith("x") else None)
        assert err.value.reason is RefusalReason.NON_FINITE
    assert (len(parses), len(reads)) == (1, 1)  # the files' identity answered the repeats
    assert _metric("safelora_refusal_cache_hits_total") == hits + 3
    # a copy (other files, same bytes) is read but not parsed again
    shutil.copytree(bad, adapters_root / "globex" / "nan2")
    with pytest.raises(AdapterRefused):
        svc.prepare("globex/nan2")
    assert (len(parses), len(reads)) == (1, 2)
    # the memory is bounded
    small = _service(tmp_path / "s", tiny_bank, adapters_root, refusal_cache_entries=1)
    for name in ("globex/nan", "globex/nan2"):
        with pytest.raises(AdapterRefused):
            small.prepare(name)
    assert len(small.refusals) == 1


def test_not_found_and_bad_names_are_not_remembered(tmp_path, tiny_bank, adapters_root):
    svc = _service(tmp_path, tiny_bank, adapters_root)
    for name in ("acme/missing", "../etc", "acme/missing"):
        with pytest.raises(AdapterRefused):
            svc.prepare(name)
    assert len(svc.refusals) == 0
    shutil.copytree(adapters_root / "acme" / "good", adapters_root / "acme" / "missing")
    assert svc.prepare("acme/missing").report.summary.outcome == "unchanged"


def test_the_throttle_bounds_preparations_and_refuses_beyond_the_queue(tmp_path, tiny_bank, adapters_root, monkeypatch):
    import threading

    import vllm_safelora.serving.preparer as service_module
    from vllm_safelora.errors import Overloaded

    svc = _service(tmp_path, tiny_bank, adapters_root, max_concurrent_preparations=1, max_queued_preparations=1)
    gate, inside = threading.Event(), threading.Event()
    real_read = service_module.read_adapter_files

    def slow_read(*a, **k):
        inside.set()
        gate.wait(30)
        return real_read(*a, **k)

    monkeypatch.setattr(service_module, "read_adapter_files", slow_read)
    results: dict[str, object] = {}

    def run(name):
        try:
            results[name] = svc.prepare(name).report.summary.outcome
        except Exception as exc:  # noqa: BLE001 - recorded for the assertions
            results[name] = exc

    first = threading.Thread(target=run, args=("acme/good",))
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=run, args=("globex/bad",))  # waits in the queue
    second.start()
    for _ in range(100):
        if svc.throttle.admitted == 2:
            break
        threading.Event().wait(0.01)
    overloaded = _metric("safelora_overload_total", where="resolver")
    with pytest.raises(Overloaded) as err:
        svc.prepare("trusted/bad")
    assert err.value.retry_after_s > 0 and "limit 1 at once" in str(err.value)
    assert _metric("safelora_overload_total", where="resolver") == overloaded + 1
    gate.set()
    first.join(30)
    second.join(30)
    assert results == {"acme/good": "unchanged", "globex/bad": "modified"}
    assert svc.throttle.admitted == 0 and svc.prepare("trusted/bad")


def test_hub_is_deny_by_default(tmp_path):
    from vllm_safelora.config import HubConfig
    from vllm_safelora.sources import HubSource

    assert HubConfig().allow == []
    with pytest.raises(AdapterRefused) as err:
        HubSource(cache_dir=tmp_path, local_files_only=True).repo_id("hub:acme/lora")
    assert err.value.reason is RefusalReason.INVALID_NAME and "allow-list is empty" in err.value.detail


def test_refusals_before_the_content_is_known_are_remembered_by_files(tmp_path, tiny_bank, adapters_root, monkeypatch):
    import vllm_safelora.serving.preparer as service_module

    svc = _service(tmp_path, tiny_bank, adapters_root, max_adapter_bytes=1000)
    reads = []
    real_read = service_module.read_adapter_files
    monkeypatch.setattr(service_module, "read_adapter_files", lambda *a, **k: reads.append(1) or real_read(*a, **k))
    hits = _metric("safelora_refusal_cache_hits_total")
    for _ in range(3):
        with pytest.raises(AdapterRefused) as err:
            svc.prepare("acme/good")
        assert err.value.reason is RefusalReason.TOO_LARGE
    assert len(reads) == 1 and _metric("safelora_refusal_cache_hits_total") == hits + 2


def test_admission_can_refuse_updates_along_the_alignment_subspace(tmp_path, tiny_bank, adapters_root):
    """admission.max_mean_cosine (off by default): the aligned-direction adapter scores a high mean
    cosine and is refused; the orthogonal one is admitted (and projected)."""
    svc = _service(tmp_path, tiny_bank, adapters_root, admission={"max_mean_cosine": 0.5})
    with pytest.raises(AdapterRefused) as err:
        svc.prepare("acme/good")
    assert err.value.reason is RefusalReason.ADMISSION and "mean module cosine" in err.value.detail
    assert svc.prepare("globex/bad").report.summary.mean_cosine < 0.5
    from vllm_safelora.config import AdmissionConfig

    assert AdmissionConfig().max_mean_cosine is None


# ---------------------------------------------------------------- uploads known by identity


def _counting_reads(monkeypatch) -> list:
    import vllm_safelora.serving.preparer as preparer_module

    reads = []
    real_read = preparer_module.read_adapter_files
    monkeypatch.setattr(preparer_module, "read_adapter_files", lambda *a, **k: reads.append(1) or real_read(*a, **k))
    return reads


def test_a_restarted_server_serves_an_unchanged_upload_without_reading_it(
    tmp_path, tiny_bank, adapters_root, monkeypatch
):
    from vllm_safelora import fsutil

    monkeypatch.setattr(fsutil, "RACY_WINDOW_NS", 0)
    reads = _counting_reads(monkeypatch)
    first = _service(tmp_path, tiny_bank, adapters_root).prepare("globex/bad")
    assert reads == [1] and not first.cache_hit
    known = _metric("safelora_uploads_known_by_identity_total")
    restarted = _service(tmp_path, tiny_bank, adapters_root)  # same cache directory, new process state
    again = restarted.prepare("globex/bad")
    assert reads == [1], "an unchanged upload was read again"
    assert again.cache_hit and again.path == first.path and again.digest == first.digest
    assert _metric("safelora_uploads_known_by_identity_total") == known + 1
    assert restarted.verified(str(again.path)) is not None


@pytest.mark.parametrize("change", ["rewritten-in-place", "pickle-beside", "other-limits"])
def test_a_changed_upload_or_other_rules_are_read_again(tmp_path, tiny_bank, adapters_root, monkeypatch, change):
    from vllm_safelora import fsutil

    monkeypatch.setattr(fsutil, "RACY_WINDOW_NS", 0)
    mine = adapters_root / "globex" / "mine"
    shutil.copytree(adapters_root / "globex" / "bad", mine)
    first = _service(tmp_path, tiny_bank, adapters_root).prepare("globex/mine")
    reads = _counting_reads(monkeypatch)
    time.sleep(0.02)  # past one timestamp tick
    overrides = {}
    if change == "rewritten-in-place":
        st = os.stat(mine / WEIGHTS_FILE)
        data = bytearray((mine / WEIGHTS_FILE).read_bytes())
        data[-4] ^= 0x01  # the lowest mantissa byte of the last float: still finite, other content
        with open(mine / WEIGHTS_FILE, "r+b") as f:  # same inode, same size, mtime put back
            f.write(bytes(data))
        os.utime(mine / WEIGHTS_FILE, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "pickle-beside":
        (mine / "adapter_model.bin").write_bytes(b"not read")
    svc = _service(tmp_path, tiny_bank, adapters_root, **overrides)
    if change == "other-limits":
        svc = SafeLoRAService(svc.settings, tiny_bank, svc.sources, svc.cache, max_rank=16)
    if change == "pickle-beside":
        with pytest.raises(AdapterRefused) as err:
            svc.prepare("globex/mine")
        assert err.value.reason is RefusalReason.PICKLE_ONLY and reads == [1]
        return
    again = svc.prepare("globex/mine")
    assert reads == [1], "the upload was trusted by identity after it changed"
    if change == "rewritten-in-place":
        assert again.digest != first.digest and not again.cache_hit
    else:
        assert again.digest == first.digest and again.cache_hit


def test_an_upload_read_in_the_tick_it_was_written_is_read_again(tmp_path, tiny_bank, adapters_root, monkeypatch):
    fresh = adapters_root / "globex" / "fresh"
    shutil.copytree(adapters_root / "globex" / "bad", fresh)  # ctime: now
    _service(tmp_path, tiny_bank, adapters_root).prepare("globex/fresh")
    reads = _counting_reads(monkeypatch)
    again = _service(tmp_path, tiny_bank, adapters_root).prepare("globex/fresh")
    assert reads == [1] and again.cache_hit  # a racy identity proves nothing: read, then a normal hit
