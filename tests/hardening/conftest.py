"""Hardening fixtures.

``hardening_world``   session: the hostile catalogue (generated), a valid "good" adapter, a
                      template adapter, the tiny model and its bank (from tests/conftest.py).
``shared_server``     module (test_shared_server.py): ONE plugin-enabled vLLM server (small max_adapter_bytes,
                      --max-lora-rank 8, --max-loras 2) shared by the catalogue, concurrency
                      and soak tests, so the suite pays for one start-up there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import hardening_support as hs
from support.server import Server, new_server, write_config


@dataclass
class HardeningWorld:
    root: Path
    aligned: Path
    bank: Path
    template: Path  # a real PEFT adapter (q_proj + v_proj, r=8, float32): shapes/config for generated ones
    adapter_root: Path  # adapter_dirs of every server here
    catalogue: hs.Catalogue

    def config(self, path: Path, cache_dir: Path, **extra) -> Path:
        doc = dict(
            bank=self.bank,
            adapter_dirs=[str(self.adapter_root)],
            cache_dir=cache_dir,
            device="cpu",
            policy={"select": "threshold", "threshold": 0.35},
        )
        doc.update(extra)
        return write_config(path, **doc)

    def new_adapters(self, prefix: str, n: int, seed0: int) -> list[str]:
        """``n`` new valid adapters with distinct contents under adapter_root/<prefix>/; returns their names."""
        names = []
        for i in range(n):
            name = f"{prefix}/a{i:03d}"
            if not (self.adapter_root / name).exists():
                hs.make_valid_adapter(self.adapter_root / name, self.template, seed=seed0 + i)
            names.append(name)
        return names


@pytest.fixture(scope="session")
def hardening_world(tiny_models, tiny_bank_dir, tiny_adapter_factory, tmp_path_factory) -> HardeningWorld:
    root = tmp_path_factory.mktemp("hardening")
    template = tiny_adapter_factory("random")
    adapter_root = root / "adapters"
    catalogue = hs.build_catalogue(adapter_root, root / "outside", template, str(tiny_models.aligned))
    return HardeningWorld(
        root=root,
        aligned=tiny_models.aligned,
        bank=tiny_bank_dir,
        template=template,
        adapter_root=adapter_root,
        catalogue=catalogue,
    )


@dataclass
class SharedServer:
    server: Server
    cache_dir: Path


@pytest.fixture(scope="module")
def shared_server(hardening_world, tmp_path_factory):
    work = tmp_path_factory.mktemp("shared_server")
    cache_dir = work / "cache"
    # served_names: label: the catalogue loads hostile directories under many labels; what the
    # default (location) mode refuses is tested in tests/hardening/test_tenants.py.
    config = hardening_world.config(
        work / "shared.yaml", cache_dir, max_adapter_bytes=hs.SMALL_MAX_ADAPTER_BYTES, served_names="label"
    )
    server = new_server("hardening-shared", hardening_world.aligned, config, work).start().wait_ready()
    try:
        yield SharedServer(server, cache_dir)
    finally:
        server.stop()
