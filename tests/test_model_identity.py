"""A bank knows its aligned model by content.

The bank records the aligned model's absolute path / hub id and a fingerprint of its
weights; a server whose --model names the same weights differently (relative path,
another directory, a symlink, a copy, a hub id in the local cache) is accepted, other
weights are refused, aliases stay a name-only check, and banks built before the
fingerprint existed still load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from vllm_safelora.bank import MANIFEST_FILE, build_bank, read_manifest
from vllm_safelora.errors import BankError
from vllm_safelora.bank.model_identity import fingerprint_directory, fingerprint_model

from test_bank import offline_hub  # noqa: F401  (fixture: org/tiny-base, org/tiny-aligned in an offline hub cache)


@pytest.fixture(scope="module")
def bank(tiny_bank_dir):
    return read_manifest(tiny_bank_dir)


def _copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_one_value(model_dir: Path, tensor_fragment: str = "layers.1.mlp.down_proj") -> None:
    """Change one float in the middle of one tensor (between the sampled chunks)."""
    st = model_dir / "model.safetensors"
    tensors = load_file(str(st))
    key = next(k for k in sorted(tensors) if tensor_fragment in k)
    flat = tensors[key].view(-1)
    flat[flat.numel() // 2 + 3] += 1.0
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(st), metadata={"format": "pt"})


def test_manifest_records_resolved_path_and_fingerprint(bank, tiny_models):
    assert bank.aligned.path == str(Path(tiny_models.aligned).resolve())
    assert bank.aligned.hub_id is None
    fp = bank.aligned.fingerprint
    assert fp is not None and fp.mode == "sample" and fp.tensors > 0
    assert fp.sha256 == fingerprint_directory(tiny_models.aligned, "sample").sha256
    assert bank.base.fingerprint.sha256 != fp.sha256


def test_fingerprint_does_not_depend_on_sharding(tiny_models, tmp_path):
    tensors = load_file(str(Path(tiny_models.aligned) / "model.safetensors"))
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / shard))
        weight_map.update({k: shard for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for mode in ("sample", "full"):
        assert fingerprint_directory(sharded, mode).sha256 == fingerprint_directory(tiny_models.aligned, mode).sha256


def test_full_fingerprint_sees_every_byte_sample_does_not(tiny_models, tmp_path):
    edited = _copy_model(tiny_models.aligned, tmp_path / "edited")
    _edit_one_value(edited)
    assert fingerprint_directory(edited, "full").sha256 != fingerprint_directory(tiny_models.aligned, "full").sha256
    # The documented limit of 'sample': one value between the sampled chunks goes unnoticed.
    assert fingerprint_directory(edited, "sample").sha256 == fingerprint_directory(tiny_models.aligned, "sample").sha256


def test_same_weights_under_other_names_are_protected(bank, tiny_models, tmp_path, monkeypatch):
    aligned = Path(tiny_models.aligned)
    link = tmp_path / "link-to-aligned"
    link.symlink_to(aligned)
    copy = _copy_model(aligned, tmp_path / "elsewhere" / "chat-model")
    monkeypatch.chdir(aligned.parent)
    for served in (str(aligned), str(link), str(copy), aligned.name, f"./{aligned.name}", str(copy) + "/"):
        ok, why = bank.identify(served)
        assert ok, f"{served}: {why}"
        assert "weights" in why


def test_other_weights_are_refused_even_under_the_banks_own_name(bank, tiny_models, tmp_path):
    assert not bank.protects(str(tiny_models.base))
    ok, why = bank.identify(str(tiny_models.base))
    assert not ok and "other weights" in why and "fingerprint" in why
    # A different model copied into a directory named like the aligned one.
    impostor = _copy_model(tiny_models.base, tmp_path / Path(tiny_models.aligned).name)
    assert not bank.protects(str(impostor))


def test_aliases_stay_a_name_only_check(bank, tiny_models):
    assert bank.protects("meta-llama/Llama-2-7b-chat-hf", ["meta-llama/Llama-2-7b-chat-hf"])
    assert not bank.protects("meta-llama/Llama-2-7b-chat-hf")  # no local copy: names decide
    # An alias is accepted by name even when it is a directory with other weights: the operator said so.
    assert bank.protects(str(tiny_models.base), [str(tiny_models.base)])


def test_hub_id_and_local_path_are_the_same_model(tiny_models, tmp_path, offline_hub):  # noqa: F811 (fixture from test_bank)
    """Bank built from a local directory; served by a hub id whose snapshot (already cached) has the same weights."""
    local_bank = build_bank(
        str(tiny_models.base), str(tiny_models.aligned), tmp_path / "local-bank", modules=["q_proj"], progress=None
    )
    assert local_bank.protects("org/tiny-aligned")
    assert not local_bank.protects("org/tiny-base")
    assert not local_bank.protects("org/not-cached")  # nothing is downloaded
    hub_bank = build_bank("org/tiny-base", "org/tiny-aligned", tmp_path / "hub-bank", modules=["q_proj"], progress=None)
    assert hub_bank.aligned.hub_id == "org/tiny-aligned" and hub_bank.aligned.revision == "b" * 40
    assert hub_bank.aligned.path is None
    assert hub_bank.protects(str(tiny_models.aligned))


def test_full_mode_bank(tiny_models, tmp_path):
    manifest = build_bank(
        str(tiny_models.base),
        str(tiny_models.aligned),
        tmp_path / "bank",
        modules=["q_proj"],
        progress=None,
        fingerprint="full",
    )
    assert manifest.aligned.fingerprint.mode == "full"
    assert manifest.aligned.fingerprint.bytes_hashed == manifest.aligned.fingerprint.bytes_total
    edited = _copy_model(tiny_models.aligned, tmp_path / "edited")
    _edit_one_value(edited)
    assert not manifest.protects(str(edited))
    assert manifest.protects(str(_copy_model(tiny_models.aligned, tmp_path / "copy")))


def test_bank_without_fingerprint_keeps_the_name_check(tiny_models, tmp_path):
    manifest = build_bank(
        str(tiny_models.base),
        str(tiny_models.aligned),
        tmp_path / "bank",
        modules=["q_proj"],
        progress=None,
        fingerprint=None,
    )
    assert manifest.aligned.fingerprint is None
    assert manifest.protects(str(tiny_models.aligned))
    assert not manifest.protects(str(_copy_model(tiny_models.aligned, tmp_path / "copy")))


def test_manifest_from_before_fingerprints_still_loads(tiny_bank_dir, tiny_models, tmp_path):
    old = tmp_path / "old-bank"
    shutil.copytree(tiny_bank_dir, old)
    doc = json.loads((old / MANIFEST_FILE).read_text())
    for side in ("base", "aligned"):
        doc[side] = {"ref": doc[side]["ref"], "tensors_sha256": doc[side]["tensors_sha256"]}
    (old / MANIFEST_FILE).write_text(json.dumps(doc))
    manifest = read_manifest(old)
    assert manifest.aligned.fingerprint is None and manifest.aligned.path is None
    assert manifest.protects(str(tiny_models.aligned))
    ok, why = manifest.identify(str(tiny_models.base))
    assert not ok and "rebuild it" in why


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_safelora.cli", *args], cwd=str(cwd), capture_output=True, text=True, timeout=300
    )


def test_relative_path_bank_protects_the_absolute_model(tiny_models, tmp_path, monkeypatch):
    """The issue's case: build-bank --aligned world/models/aligned (relative), then a service whose --model is the
    absolute path, started from another directory, through SafeLoRAService.start (the server's start-up call)."""
    from vllm_safelora.config import SafeLoRASettings
    from vllm_safelora.serving.service import SafeLoRAService

    world = tmp_path / "world"
    (world / "models").mkdir(parents=True)
    shutil.copytree(tiny_models.aligned, world / "models" / "aligned")
    shutil.copytree(tiny_models.base, world / "models" / "base")
    res = _cli(
        "build-bank",
        "--base",
        "world/models/base",
        "--aligned",
        "world/models/aligned",
        "--out",
        "world/bank",
        "--modules",
        "q_proj,v_proj",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    manifest = read_manifest(world / "bank")
    assert manifest.aligned.ref == "world/models/aligned"
    assert manifest.aligned.path == str((world / "models" / "aligned").resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for key in [k for k in os.environ if k.startswith("VLLM_SAFELORA_")]:
        monkeypatch.delenv(key)
    settings = SafeLoRASettings(bank=world / "bank", cache_dir=tmp_path / "cache", device="cpu")
    t0 = time.perf_counter()
    service = SafeLoRAService.start(settings, str((world / "models" / "aligned").resolve()))
    print(f"service start with the content check: {time.perf_counter() - t0:.3f}s")
    assert service.bank.bank_id == manifest.bank_id
    # A copy elsewhere: same weights, accepted; the base model: refused as before.
    SafeLoRAService.start(settings, str(_copy_model(world / "models" / "aligned", tmp_path / "copy")))
    with pytest.raises(BankError, match="was built for aligned model"):
        SafeLoRAService.start(settings, str(world / "models" / "base"))


def test_fingerprint_model_is_memoised_and_sees_changes(tiny_models, tmp_path):
    copy = _copy_model(tiny_models.aligned, tmp_path / "m")
    first = fingerprint_model(str(copy), "full")
    assert fingerprint_model(str(copy), "full") is first
    _edit_one_value(copy)
    assert fingerprint_model(str(copy), "full").sha256 != first.sha256
    assert fingerprint_model(str(tmp_path / "missing"), "sample") is None
