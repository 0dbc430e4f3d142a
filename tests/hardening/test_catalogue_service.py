"""The hostile catalogue through the service in-process (no vLLM): fast, and runs everywhere.

Every case goes through both entry shapes the integration uses: ``prepare(name)`` (the
resolver) and ``prepare(name, lora_path)`` (load endpoint, static modules, offline). The
same catalogue goes through a real server in ``test_catalogue_server.py``.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

import hardening_support as hs
from support.server import MAX_LORA_RANK
from vllm_safelora.errors import AdapterRefused, RefusalReason
from vllm_safelora.sources import LocalDirSource, locate


@pytest.fixture(scope="module")
def service(hardening_world, tmp_path_factory):
    from vllm_safelora.config import SafeLoRASettings
    from vllm_safelora.serving.service import SafeLoRAService

    cache_dir = tmp_path_factory.mktemp("svc_cache")
    settings = SafeLoRASettings(
        bank=hardening_world.bank,
        adapter_dirs=[hardening_world.adapter_root],
        cache_dir=cache_dir,
        device="cpu",
        max_adapter_bytes=hs.SMALL_MAX_ADAPTER_BYTES,
        served_names="label",  # as the shared server (conftest)
    )
    # The limits the catalogue server derives from its vLLM (vllm_rules), so both refuse alike.
    limits = hs.served_read_limits(hardening_world.aligned, hs.SMALL_MAX_ADAPTER_BYTES)
    return SafeLoRAService.start(settings, str(hardening_world.aligned), max_rank=MAX_LORA_RANK, limits=limits)


def test_catalogue_is_large_enough(hardening_world):
    cat = hardening_world.catalogue
    assert len(cat.dir_cases) >= 30
    assert len({c.name for c in cat.dir_cases}) == len(cat.dir_cases)
    reasons = {c.reason for c in cat.dir_cases}
    # Every refusal reason an adapter directory can earn is exercised.
    # (name_in_use is about a served name, not a directory: tests/test_service.py)
    assert reasons >= {r.value for r in RefusalReason} - {
        "not_found",
        "admission",
        "changed_while_reading",
        "name_in_use",
    }, reasons


def test_every_hostile_adapter_is_refused_in_process(service, hardening_world):
    cat = hardening_world.catalogue
    entries0 = hs.entry_dirs(service.cache.root)
    rows, failures = [], []
    for case in cat.dir_cases:
        attempts = [("resolver", cat.resolver_name(case), None, case.reason, case.fragment)]
        attempts.append(
            (
                "lora_path",
                f"load-{case.name}",
                case.load_path or str(case.path),
                case.load_reason or case.reason,
                case.load_fragment or case.fragment,
            )
        )
        for via, name, path, reason, fragment in attempts:
            try:
                service.prepare(name, path)
                got, msg = "ACCEPTED", ""
            except AdapterRefused as exc:
                got, msg = exc.reason.value, str(exc)
            ok = got == reason and fragment in msg
            rows.append((case.name, via, got, "ok" if ok else f"EXPECTED {reason} / {fragment!r}: {msg[:160]}"))
            if not ok:
                failures.append(rows[-1])
    for case in cat.name_cases:
        name = case.model if case.via == "resolver" else case.lora_name
        path = None if case.via == "resolver" else case.lora_path
        try:
            service.prepare(name, path)
            got, msg = "ACCEPTED", ""
        except AdapterRefused as exc:
            got, msg = exc.reason.value, str(exc)
        except Exception as exc:  # anything else is a bug (the server would answer 500)
            got, msg = f"CRASH {type(exc).__name__}", str(exc)
        ok = got == case.reason and case.fragment in msg
        rows.append(
            (case.name, case.via, got, "ok" if ok else f"EXPECTED {case.reason} / {case.fragment!r}: {msg[:160]}")
        )
        if not ok:
            failures.append(rows[-1])
    print("\n" + hs.table(rows, ("case", "path", "refusal", "check")))
    assert not failures, hs.table(failures, ("case", "path", "refusal", "check"))
    assert not cat.marker.exists(), "something unpickled the booby-trapped adapter_model.bin"
    assert hs.entry_dirs(service.cache.root) == entries0
    # ... and a good adapter is still served.
    assert service.prepare(hs.GOOD_NAME).path.is_dir()


def test_directory_swapped_between_config_and_weights_reads(hardening_world, monkeypatch, tmp_path):
    """The reader reads adapter_config.json, then the weights; a tenant swaps the directory in between."""
    from vllm_safelora import adapters
    from vllm_safelora.adapters import reader as adapter_reader

    a = hs.make_valid_adapter(tmp_path / "root" / "t" / "lora", hardening_world.template, seed=7)
    b = hs.make_valid_adapter(tmp_path / "other", hardening_world.template, seed=8)
    real_read = adapter_reader._read_regular_file
    calls = []

    def read_then_swap(directory, name, *args, **kwargs):
        out = real_read(directory, name, *args, **kwargs)
        calls.append(name)
        if name == adapters.CONFIG_FILE:
            os.rename(a, tmp_path / "old")
            os.rename(b, a)
        return out

    monkeypatch.setattr(adapter_reader, "_read_regular_file", read_then_swap)
    with pytest.raises(AdapterRefused) as info:
        adapters.read_adapter(a, name="t/lora", confine_to=tmp_path / "root")
    assert info.value.reason is RefusalReason.CHANGED_WHILE_READING, info.value
    assert calls == [adapters.CONFIG_FILE, adapters.WEIGHTS_FILE]

    # Opened from a descriptor (how the server reads a tenant's directory), both files come from
    # the directory that was opened, whatever is renamed onto its name in between.
    os.rename(a, b)
    os.rename(tmp_path / "old", a)
    want = hs.content_id(a)
    location = locate([LocalDirSource(tmp_path / "root")], "t/lora")
    with location.open() as directory:
        got = adapters.read_adapter_files(directory, name="t/lora")
    assert adapters.content_hash(got.config_bytes, got.weights_bytes) == want


def test_file_replaced_between_reads(hardening_world, monkeypatch, tmp_path):
    """Same, file by file: the config is atomically replaced after it was read."""
    from vllm_safelora import adapters
    from vllm_safelora.adapters import reader as adapter_reader

    a = hs.make_valid_adapter(tmp_path / "lora", hardening_world.template, seed=9)
    real_read = adapter_reader._read_regular_file

    def read_then_replace(directory, name, *args, **kwargs):
        out = real_read(directory, name, *args, **kwargs)
        if name == adapters.WEIGHTS_FILE:
            tmp = a / ".cfg.new"
            tmp.write_bytes((a / adapters.CONFIG_FILE).read_bytes().replace(b'"r": 8', b'"r": 8 '))
            os.replace(tmp, a / adapters.CONFIG_FILE)
        return out

    monkeypatch.setattr(adapter_reader, "_read_regular_file", read_then_replace)
    with pytest.raises(AdapterRefused) as info:
        adapters.read_adapter(a, name="lora")
    assert info.value.reason is RefusalReason.CHANGED_WHILE_READING


def test_renaming_loop_never_yields_a_torn_adapter(service, hardening_world, tmp_path):
    """A thread swaps two versions of one adapter directory in a tight loop while the service
    prepares it: every outcome is a refusal (changed_while_reading / not_found) or a cache entry
    whose content is exactly one of the two versions, never a mix."""
    root = hardening_world.adapter_root
    live = root / "swapper" / "lora"
    v1 = hs.make_valid_adapter(root / "swapper" / "v1", hardening_world.template, seed=31)
    v2 = hs.make_valid_adapter(root / "swapper" / "v2", hardening_world.template, seed=32)
    shutil.copytree(v1, live)
    versions = {hs.content_id(v1): "v1", hs.content_id(v2): "v2"}
    stop = threading.Event()

    def churn():
        spare = root / "swapper" / ".spare"
        i = 0
        while not stop.is_set():
            src = v2 if i % 2 == 0 else v1
            shutil.rmtree(spare, ignore_errors=True)
            shutil.copytree(src, spare)
            os.rename(live, root / "swapper" / ".old")
            os.rename(spare, live)
            shutil.rmtree(root / "swapper" / ".old", ignore_errors=True)
            i += 1

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    outcomes: dict[str, int] = {}
    try:
        for _ in range(150):
            try:
                p = service.prepare("swapper/lora")
                outcomes[versions.get(p.report.summary.input_hash, "TORN")] = (
                    outcomes.get(versions.get(p.report.summary.input_hash, "TORN"), 0) + 1
                )
            except AdapterRefused as exc:
                assert exc.reason in (
                    RefusalReason.CHANGED_WHILE_READING,
                    RefusalReason.NOT_FOUND,
                    RefusalReason.INVALID_CONFIG,
                    RefusalReason.MISSING_TENSOR,
                ), exc
                outcomes[exc.reason.value] = outcomes.get(exc.reason.value, 0) + 1
    finally:
        stop.set()
        t.join(10)
    print(f"\n[hardening] rename loop outcomes: {outcomes}")
    assert "TORN" not in outcomes
    assert not hs.corrupted_entries(service.cache.root)
