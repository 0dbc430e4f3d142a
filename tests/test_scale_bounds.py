"""Thousands of distinct adapters through one service: fds, memory maps and cache bytes stay
bounded, per-adapter cost stays flat, and no code path lists the cache's entries/ per prepare.

SAFELORA_SCALE_ADAPTERS sets how many distinct adapters the main test prepares (default 2000).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_safelora.adapters import CONFIG_FILE, WEIGHTS_FILE
from vllm_safelora.cache import PatchedAdapterCache
from vllm_safelora.config import SafeLoRASettings
from support.procstats import fd_count
from vllm_safelora.serving.service import SafeLoRAService
from vllm_safelora.serving.startup import build_sources

N_ADAPTERS = int(os.environ.get("SAFELORA_SCALE_ADAPTERS", "2000"))
TRACKED = 32


class _Variants:
    """Distinct tiny adapters made on demand from one real one (each lora_B scaled by its own factor)."""

    def __init__(self, template: Path, root: Path):
        self.config = (template / CONFIG_FILE).read_bytes()
        self.tensors = load_file(template / WEIGHTS_FILE)
        self.root = root

    def make(self, i: int) -> str:
        name = f"t{i // 1000}/a{i}"
        out = self.root / name
        out.mkdir(parents=True)
        (out / CONFIG_FILE).write_bytes(self.config)
        scaled = {k: (v * (1.0 + i * 1e-4) if ".lora_B." in k else v) for k, v in self.tensors.items()}
        save_file(scaled, str(out / WEIGHTS_FILE))
        return name


def _service(tmp_path: Path, bank, adapters_root: Path, max_bytes: int) -> SafeLoRAService:
    settings = SafeLoRASettings(
        bank=bank.path,
        adapter_dirs=[adapters_root],
        cache_dir=tmp_path / "cache",
        device="cpu",
        cache_max_bytes=max_bytes,
        max_tracked_adapters=TRACKED,
    )
    cache = PatchedAdapterCache(settings.cache_dir, settings.cache_max_bytes)
    return SafeLoRAService(settings, bank, build_sources(settings), cache, max_rank=8)


@pytest.fixture()
def world(tmp_path, tiny_bank, tiny_adapter_random):
    root = tmp_path / "adapters"
    root.mkdir()
    variants = _Variants(tiny_adapter_random, root)
    probe_root = tmp_path / "probe"
    probe = _service(probe_root, tiny_bank, root, 10**9)
    probe.prepare(variants.make(10**6))
    # Room for 3x the tracked adapters (paths + names: at most 2x are leased), so the
    # budget is never exceeded by leased entries and eviction must keep up.
    budget = int(3 * TRACKED * probe.cache.total_bytes() * 1.1)
    return variants, _service(tmp_path, tiny_bank, root, budget)


def test_thousands_of_adapters_keep_fds_maps_and_bytes_bounded(world):
    variants, svc = world
    torch.set_num_threads(1)
    warmup = min(200, N_ADAPTERS // 2)  # the cache is full (eviction running) from about 4 * TRACKED on
    fds, sizes, latency = [], [], []
    for i in range(N_ADAPTERS):
        name = variants.make(i)
        t0 = time.perf_counter()
        prepared = svc.prepare(name)
        latency.append(time.perf_counter() - t0)
        svc.mark_loaded(name, prepared)  # vLLM accepted it
        assert svc.verified(str(prepared.path)) is not None
        if i % 3 == 0:
            svc.forget(name)  # and unloaded some
        assert svc.cache.total_bytes() <= svc.cache.max_bytes, i
        if i >= warmup and i % 50 == 0:
            fds.append(fd_count())
            sizes.append((svc.tracking()["paths"], svc.tracking()["names"], len(svc.cache.leases.held())))
    tracking = svc.tracking()
    stats = svc.cache.stats()
    early = statistics.median(latency[warmup : warmup + 100])
    late = statistics.median(latency[-100:])
    print(
        f"\n[scale] {N_ADAPTERS} distinct adapters: prepare median {early * 1e3:.1f} ms after {warmup}, "
        f"{late * 1e3:.1f} ms at the end (ratio {late / early:.2f}); fds {min(fds)}..{max(fds)}; "
        f"tracked {tracking}; cache {stats.entries} entries, {stats.nbytes} of {svc.cache.max_bytes} bytes, "
        f"{stats.leases} leases; index file {stats.file_bytes} bytes"
    )
    assert max(fds) - min(fds) <= 2, fds  # one fd per adapter ever served would add ~N
    assert all(p <= TRACKED and n <= TRACKED and leases <= 2 * TRACKED for p, n, leases in sizes), sizes
    assert tracking["paths"] == TRACKED and tracking["names"] <= TRACKED
    assert stats.leases <= 2 * TRACKED and stats.nbytes <= svc.cache.max_bytes
    assert stats.entries <= 4 * TRACKED < N_ADAPTERS  # eviction ran while serving
    # Flat cost: the last adapters cost about what the early ones did (loose: shared machine).
    assert late <= 3 * early + 0.005, (early, late)
    dropped = svc.drain_dropped_names()
    assert len(dropped) <= TRACKED and svc.drain_dropped_names() == []


def test_an_adapter_that_dropped_out_is_prepared_again_as_a_hit(world):
    """vLLM still holds the entry path of an adapter the service stopped tracking: the next
    request re-prepares it from its upload (a cache hit) instead of refusing it."""
    variants, svc = world
    first = variants.make(0)
    prepared = svc.prepare(first)
    svc.mark_loaded(first, prepared)
    for i in range(1, TRACKED + 5):
        svc.prepare(variants.make(i))
    assert svc.verified(str(prepared.path)) is None  # dropped out of the bounded map
    again, rebuilt = svc.ensure(first, str(prepared.path))
    assert again.path == prepared.path and again.cache_hit and not rebuilt
    # The same under served_names: label (the entry's recorded origin is used).
    label_svc = _service(Path(str(svc.settings.cache_dir.parent)), svc.bank, svc.settings.adapter_dirs[0], 10**9)
    label_svc.settings = label_svc.settings.model_copy(update={"served_names": "label"})
    again, rebuilt = label_svc.ensure("any-label", str(prepared.path))
    assert again.path == prepared.path and not rebuilt


def test_no_listing_of_entries_per_prepare(world, monkeypatch):
    variants, svc = world
    names = [variants.make(i) for i in range(40)]
    for name in names[:10]:
        svc.prepare(name)
    entries_dir = os.path.realpath(svc.cache.entries_dir)
    calls: list[str] = []

    def counting(real):
        def wrapper(path=".", *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and os.path.realpath(path) == entries_dir:
                calls.append(real.__name__)
            return real(path, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(os, "listdir", counting(os.listdir))
    monkeypatch.setattr(os, "scandir", counting(os.scandir))
    for name in names:  # 30 misses (with evictions) and 10 hits
        svc.prepare(name)
        svc.verified(str(svc.prepare(name).path))
    assert calls == []
