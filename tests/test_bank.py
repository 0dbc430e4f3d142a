"""The alignment bank: streamed build, manifest, truncation, storage, loading, integrity."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_safelora.bank import (
    BANK_FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    Truncation,
    build_bank,
    dense_bank_bytes,
    load_bank,
    read_manifest,
    resolve_device,
)
from vllm_safelora.bank.checkpoints import INDEX_FILE, Checkpoint, TensorHasher, resolve_checkpoint
from vllm_safelora.errors import BankError

N_LAYERS = 2
DEFAULT_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _build(models, out: Path, **kw):
    return build_bank(str(models.base), str(models.aligned), out, progress=None, **kw)


def _dense_svals(V: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(V.double())


def _write_ckpt(d: Path, tensors: dict[str, torch.Tensor]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    return d


# ---------------------------------------------------------------------------
# Build: streaming


def test_build_reads_each_tensor_once_and_one_module_at_a_time(tiny_models, tmp_path, monkeypatch):
    reads: list[str] = []
    alive = [0]
    max_alive = [0]
    original = Checkpoint.read

    def recording_read(self, name):
        t = original(self, name)
        reads.append(name)
        alive[0] += 1
        max_alive[0] = max(max_alive[0], alive[0])

        def dead():
            alive[0] -= 1

        weakref.finalize(t, dead)
        return t

    monkeypatch.setattr(Checkpoint, "read", recording_read)
    manifest = _build(tiny_models, tmp_path / "bank")
    n = len(manifest.modules)
    assert n == N_LAYERS * len(DEFAULT_LEAVES)
    # every used weight read exactly once from each checkpoint, nothing else read
    assert len(reads) == 2 * n
    assert sorted(set(reads)) == sorted(f"{m.name}.weight" for m in manifest.modules)
    # never more than one module's pair of weights alive at once: not two whole models
    assert max_alive[0] <= 2
    assert alive[0] == 0


# ---------------------------------------------------------------------------
# Manifest


def test_manifest_fields(tiny_models, tiny_bank_dir, tiny_deltas):
    manifest = read_manifest(tiny_bank_dir)
    assert manifest.format_version == BANK_FORMAT_VERSION == 1
    tensors_path = tiny_bank_dir / TENSORS_FILE
    digest = hashlib.sha256(tensors_path.read_bytes()).hexdigest()
    assert manifest.tensors_sha256 == digest
    assert manifest.bank_id == f"sb-{digest[:16]}"
    assert manifest.base.ref == str(tiny_models.base)
    assert manifest.aligned.ref == str(tiny_models.aligned)
    assert manifest.storage_dtype == "float32"
    assert manifest.svd == "full"
    assert manifest.truncation == {"rank": None, "energy": None}
    created = dt.datetime.fromisoformat(manifest.created_at)
    assert created.tzinfo is not None
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 3600

    # identities: sha256 over (name, dtype, shape, bytes) of the weights used, in manifest order
    sd_base = load_file(str(tiny_models.base / "model.safetensors"))
    sd_aligned = load_file(str(tiny_models.aligned / "model.safetensors"))
    hb, ha = TensorHasher(), TensorHasher()
    for m in manifest.modules:
        hb.update(f"{m.name}.weight", sd_base[f"{m.name}.weight"])
        ha.update(f"{m.name}.weight", sd_aligned[f"{m.name}.weight"])
    assert manifest.base.tensors_sha256 == hb.hexdigest()
    assert manifest.aligned.tensors_sha256 == ha.hexdigest()
    assert manifest.base.tensors_sha256 != manifest.aligned.tensors_sha256

    names = [m.name for m in manifest.modules]
    assert names == sorted(
        f"model.layers.{i}.{'self_attn' if leaf in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{leaf}"
        for i in range(N_LAYERS)
        for leaf in DEFAULT_LEAVES
    )
    for m in manifest.modules:
        V = tiny_deltas[m.name]
        assert m.shape == tuple(V.shape)
        S = _dense_svals(V)
        assert m.frobenius_norm == pytest.approx(float(torch.linalg.norm(V.double())), rel=1e-6)
        # untruncated: everything above round-off kept, energy ~ 1, bound at round-off level
        assert m.rank_kept == min(m.shape) and 4 <= m.numerical_rank <= m.rank_kept
        assert m.energy_kept == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= m.approx_error_bound < 1e-6 * float(S[0]) ** 2 / m.frobenius_norm
        # the module's V is in the manifest by reference, not the aligned model's shape from elsewhere
        assert manifest.module(m.name) == m
    assert manifest.module("model.layers.0.self_attn.nope") is None
    assert dense_bank_bytes(manifest) == sum(m.shape[0] ** 2 * 4 for m in manifest.modules)


def test_bank_tensors_reconstruct_dense_operator(tiny_bank, tiny_deltas):
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"):
        sub = tiny_bank.get(name)
        V = tiny_deltas[name].double()
        C = V @ V.T / torch.linalg.norm(V)
        U, S = sub.U.double(), sub.S.double()
        assert torch.allclose(U.T @ U, torch.eye(sub.rank, dtype=torch.float64), atol=1e-5)
        C_bank = U @ torch.diag(S * S / sub.frobenius_norm) @ U.T
        assert float(torch.linalg.norm(C_bank - C) / torch.linalg.norm(C)) < 1e-5


def test_module_selection(tiny_models, tmp_path):
    m = _build(tiny_models, tmp_path / "q", modules=["q_proj"])
    assert [x.name for x in m.modules] == [f"model.layers.{i}.self_attn.q_proj" for i in range(N_LAYERS)]
    m = _build(tiny_models, tmp_path / "all", modules=["all-linear"])
    assert len(m.modules) == N_LAYERS * len(DEFAULT_LEAVES)  # lm_head / embeddings never included
    assert not any("lm_head" in x.name or "embed" in x.name for x in m.modules)
    with pytest.raises(BankError, match="no shared 2-D weights named nope_proj"):
        _build(tiny_models, tmp_path / "none", modules=["nope_proj"])
    assert not (tmp_path / "none").exists()


def test_existing_output_needs_overwrite(tiny_models, tmp_path):
    out = tmp_path / "bank"
    out.mkdir()
    with pytest.raises(BankError, match="already exists"):
        _build(tiny_models, out, modules=["q_proj"])
    _build(tiny_models, out, modules=["q_proj"], overwrite=True)
    assert (out / MANIFEST_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]  # no temp dirs left behind


# ---------------------------------------------------------------------------
# Truncation


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rank_truncation_error_bound_is_dense_next_singular_value(tiny_models, tiny_deltas, tmp_path, k):
    manifest = _build(tiny_models, tmp_path / "bank", truncation=Truncation(rank=k), modules=["q_proj", "gate_proj"])
    assert manifest.truncation == {"rank": k, "energy": None}
    bank = load_bank(tmp_path / "bank")
    for m in manifest.modules:
        V = tiny_deltas[m.name]
        S = _dense_svals(V)
        norm = float(torch.linalg.norm(V.double()))
        assert m.rank_kept == k
        assert m.frobenius_norm == pytest.approx(norm, rel=1e-6)  # untruncated norm
        assert m.energy_kept == pytest.approx(float((S[:k] ** 2).sum()) / norm**2, rel=1e-5)
        assert m.approx_error_bound == pytest.approx(float(S[k]) ** 2 / norm, rel=1e-4)
        sub = bank.get(m.name)
        assert tuple(sub.U.shape) == (m.shape[0], k) and tuple(sub.S.shape) == (k,)
        assert sub.frobenius_norm == pytest.approx(norm, rel=1e-6)
        # the bound really bounds ||C - C_k||_2 (here: equals it)
        C = V.double() @ V.double().T / norm
        C_k = sub.U.double() @ torch.diag(sub.S.double() ** 2 / norm) @ sub.U.double().T
        err = float(torch.linalg.matrix_norm(C - C_k, ord=2))
        assert err == pytest.approx(m.approx_error_bound, rel=1e-3)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_truncation_keeps_fewest_directions(tiny_models, tiny_deltas, tmp_path, energy):
    manifest = _build(tiny_models, tmp_path / "bank", truncation=Truncation(energy=energy), modules=["v_proj"])
    for m in manifest.modules:
        V = tiny_deltas[m.name]
        S = _dense_svals(V)
        norm2 = float((V.double() ** 2).sum())
        cum = torch.cumsum(S**2, 0) / norm2
        if energy >= 1.0:  # --energy 1.0 means keep everything
            expected = min(V.shape)
        else:
            expected = min(int((cum < energy - 1e-9).sum()) + 1, min(V.shape))
        assert m.rank_kept == expected
        assert m.energy_kept >= min(energy, 1.0) - 1e-5
        next_sv = float(S[m.rank_kept]) if m.rank_kept < S.numel() else 0.0
        assert m.approx_error_bound == pytest.approx(next_sv**2 / math.sqrt(norm2), rel=1e-3, abs=1e-9)


def test_truncation_arguments_validated():
    """Errors name the field (the CLI translates it to its flag), never a CLI flag."""
    with pytest.raises(BankError, match="not both") as info:
        Truncation(rank=2, energy=0.5)
    assert "Truncation.rank or Truncation.energy" in str(info.value) and "--" not in str(info.value)
    with pytest.raises(BankError, match=r"Truncation\.rank must be >= 1") as info:
        Truncation(rank=0)
    assert "--" not in str(info.value)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(BankError, match=r"Truncation\.energy must be in") as info:
            Truncation(energy=bad)
        assert "--" not in str(info.value)


def test_lowrank_svd(tiny_models, tiny_deltas, tmp_path):
    torch.manual_seed(0)
    manifest = _build(tiny_models, tmp_path / "bank", truncation=Truncation(rank=3), svd="lowrank", modules=["o_proj"])
    assert manifest.svd == "lowrank"
    bank = load_bank(tmp_path / "bank")
    for m in manifest.modules:
        V = tiny_deltas[m.name]
        S = _dense_svals(V)
        norm = float(torch.linalg.norm(V.double()))
        assert m.rank_kept == 3
        sub = bank.get(m.name)
        assert torch.allclose(sub.S.double(), S[:3], rtol=1e-3)
        assert torch.allclose(sub.U.double().T @ sub.U.double(), torch.eye(3, dtype=torch.float64), atol=1e-4)
        # randomized SVD: the bound is the missed energy / ||V||, an upper bound on S_4^2 / ||V||
        assert m.approx_error_bound >= float(S[3]) ** 2 / norm * (1 - 1e-3)
        assert m.approx_error_bound == pytest.approx(float((S[3:] ** 2).sum()) / norm, rel=1e-2)


def test_lowrank_needs_rank(tiny_models, tmp_path):
    with pytest.raises(BankError, match=r"svd='lowrank' needs Truncation\.rank"):
        _build(tiny_models, tmp_path / "bank", svd="lowrank", modules=["q_proj"])
    assert not (tmp_path / "bank").exists()


# ---------------------------------------------------------------------------
# Storage dtypes and loading


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16"])
def test_storage_dtypes_and_loaded_bytes(tiny_models, tmp_path, storage):
    expected_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[storage]
    manifest = _build(tiny_models, tmp_path / "bank", storage_dtype=storage, modules=["q_proj", "down_proj"])
    assert manifest.storage_dtype == storage
    with safe_open(str(tmp_path / "bank" / TENSORS_FILE), framework="pt") as f:
        for m in manifest.modules:
            assert (
                f.get_slice(f"{m.name}.U").get_dtype()
                == {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[storage]
            )
            assert f.get_slice(f"{m.name}.S").get_dtype() == "F32"
    bank = load_bank(tmp_path / "bank", "cpu")
    assert bank.device == torch.device("cpu")
    assert bank.bank_id == manifest.bank_id
    assert set(bank.subspaces) == {m.name for m in manifest.modules}
    nbytes = 0
    for m in manifest.modules:
        sub = bank.get(m.name)
        assert sub.U.dtype == expected_dtype and sub.S.dtype == torch.float32
        assert sub.U.device.type == "cpu"
        nbytes += m.shape[0] * m.rank_kept * expected_dtype.itemsize + m.rank_kept * 4
    assert bank.nbytes == nbytes > 0


def test_loaded_U_of_one_shape_share_one_stack_in_manifest_order(tiny_models, tiny_bank):
    """load_bank stores same-shape U's side by side, so every layer's q_proj is one strided view
    for the batched scorer (no copy); each U is still its module's own bytes."""
    from safetensors import safe_open as _open

    from vllm_safelora.projection import ModuleInput, _stacked_runs

    by_shape: dict[tuple, list] = {}
    for m in tiny_bank.manifest.modules:
        by_shape.setdefault((m.shape[0], m.rank_kept), []).append(m.name)
    with _open(str(tiny_bank.path / TENSORS_FILE), framework="pt") as f:
        for names in by_shape.values():
            Us = [tiny_bank.get(n).U for n in names]
            assert len({u.untyped_storage().data_ptr() for u in Us}) == 1
            assert [u.storage_offset() for u in Us] == sorted(u.storage_offset() for u in Us)
            for n, u in zip(names, Us):
                assert torch.equal(u, f.get_tensor(f"{n}.U"))
    q = [n for n in tiny_bank.subspaces if n.endswith("q_proj")]
    shapes = {n: tiny_bank.manifest.module(n).shape for n in q}
    items = [
        ModuleInput(n, tiny_bank.get(n), torch.zeros(2, shapes[n][1]), torch.zeros(shapes[n][0], 2), 1.0) for n in q
    ]
    assert len(list(_stacked_runs(items))) == 1


def test_storage_dtype_validated(tiny_models, tmp_path):
    with pytest.raises(BankError, match="storage dtype"):
        _build(tiny_models, tmp_path / "bank", storage_dtype="int8")


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(BankError):
        resolve_device("tpu")
    with pytest.raises(BankError):
        resolve_device("not a device")
    if not torch.cuda.is_available():
        with pytest.raises(BankError, match="CUDA is not available"):
            resolve_device("cuda:0")


# ---------------------------------------------------------------------------
# Integrity


@pytest.fixture
def bank_copy(tiny_bank_dir, tmp_path) -> Path:
    dest = tmp_path / "bank"
    shutil.copytree(tiny_bank_dir, dest)
    return dest


def test_corrupt_bank_refused(bank_copy):
    path = bank_copy / TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit in the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(BankError, match="corrupt"):
        load_bank(bank_copy)


def test_U_in_another_dtype_than_the_manifest_says_refused(bank_copy):
    """The manifest's storage_dtype is what U is loaded as; a file that disagrees is not converted silently."""
    from safetensors.torch import load_file, save_file

    path = bank_copy / TENSORS_FILE
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith(".U"))
    tensors[name] = tensors[name].to(torch.float16)
    save_file(tensors, str(path))
    with pytest.raises(BankError, match=r"stored as torch.float16, the manifest says float32"):
        load_bank(bank_copy, verify=False)


def test_corrupt_header_without_verification_still_bank_error(bank_copy):
    path = bank_copy / TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[0:8] = (len(data) * 4).to_bytes(8, "little")  # header length past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(BankError):
        load_bank(bank_copy, verify=False)


def test_missing_manifest_refused(bank_copy):
    (bank_copy / MANIFEST_FILE).unlink()
    with pytest.raises(BankError, match="manifest.json missing"):
        load_bank(bank_copy)


def test_missing_bank_dir_refused(tmp_path):
    with pytest.raises(BankError, match="no alignment bank"):
        load_bank(tmp_path / "nowhere")


def test_invalid_manifest_refused(bank_copy):
    (bank_copy / MANIFEST_FILE).write_text('{"format_version": 1, "bank_id": ')
    with pytest.raises(BankError, match="invalid"):
        load_bank(bank_copy)


def test_future_format_version_refused(bank_copy):
    raw = json.loads((bank_copy / MANIFEST_FILE).read_text())
    raw["format_version"] = 99
    (bank_copy / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BankError, match="format version 99"):
        load_bank(bank_copy)


def test_missing_tensors_file_refused(bank_copy):
    (bank_copy / TENSORS_FILE).unlink()
    with pytest.raises(BankError, match=TENSORS_FILE):
        load_bank(bank_copy)


def test_manifest_shape_disagreeing_with_tensors_refused(bank_copy):
    raw = json.loads((bank_copy / MANIFEST_FILE).read_text())
    raw["modules"][0]["rank_kept"] += 1
    (bank_copy / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BankError, match="shapes"):
        load_bank(bank_copy)


def test_bank_protects_only_its_aligned_model(tiny_models, tiny_bank, tmp_path):
    manifest = tiny_bank.manifest
    assert manifest.protects(str(tiny_models.aligned))
    assert manifest.protects(str(tiny_models.aligned) + "/")
    assert not manifest.protects(str(tiny_models.base))
    assert not manifest.protects("meta-llama/Llama-2-7b-chat-hf")
    assert manifest.protects("meta-llama/Llama-2-7b-chat-hf", ["meta-llama/Llama-2-7b-chat-hf"])
    link = tmp_path / "served-model"
    link.symlink_to(tiny_models.aligned)
    assert manifest.protects(str(link))  # same directory under another path


def test_aliases_recorded(tiny_models, tmp_path):
    manifest = _build(tiny_models, tmp_path / "bank", modules=["q_proj"], aliases=["org/tiny-chat"])
    assert manifest.aliases == ["org/tiny-chat"]
    assert read_manifest(tmp_path / "bank").protects("org/tiny-chat")


# ---------------------------------------------------------------------------
# Checkpoints: bad inputs, shards, hub ids


def test_architecture_mismatch_refused(tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    base = _write_ckpt(tmp_path / "base", {name: torch.zeros(8, 16)})
    aligned = _write_ckpt(tmp_path / "aligned", {name: torch.zeros(8, 8)})
    with pytest.raises(BankError, match="not the same architecture"):
        build_bank(str(base), str(aligned), tmp_path / "bank", progress=None)
    assert not (tmp_path / "bank").exists()


def test_non_finite_delta_refused(tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    w = torch.randn(8, 16)
    bad = w.clone()
    bad[0, 0] = float("nan")
    base = _write_ckpt(tmp_path / "base", {name: w})
    aligned = _write_ckpt(tmp_path / "aligned", {name: bad})
    with pytest.raises(BankError, match="NaN/Inf"):
        build_bank(str(base), str(aligned), tmp_path / "bank", progress=None)


def test_identical_module_gives_empty_subspace(tmp_path, caplog):
    w = torch.randn(8, 16)
    q, v = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    base = _write_ckpt(tmp_path / "base", {q: w.clone(), v: w.clone()})
    aligned = _write_ckpt(tmp_path / "aligned", {q: w.clone(), v: w + torch.randn(8, 16)})
    with caplog.at_level("WARNING", logger="vllm_safelora.bank"):
        manifest = build_bank(str(base), str(aligned), tmp_path / "bank", progress=None)
    assert "model.layers.0.self_attn.q_proj is identical" in caplog.text
    empty = manifest.module("model.layers.0.self_attn.q_proj")
    assert (empty.rank_kept, empty.numerical_rank, empty.frobenius_norm, empty.approx_error_bound) == (0, 0, 0.0, 0.0)
    assert manifest.module("model.layers.0.self_attn.v_proj").rank_kept == 8
    bank = load_bank(tmp_path / "bank")
    assert tuple(bank.get("model.layers.0.self_attn.q_proj").U.shape) == (8, 0)


def test_checkpoint_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankError, match="no \\*.safetensors"):
        resolve_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(BankError, match="is a file"):
        resolve_checkpoint(str(tmp_path / "file.safetensors"))
    dup = tmp_path / "dup"
    dup.mkdir()
    save_file({"a.weight": torch.zeros(2, 2)}, str(dup / "one.safetensors"))
    save_file({"a.weight": torch.zeros(2, 2)}, str(dup / "two.safetensors"))
    with pytest.raises(BankError, match="two shards"):
        resolve_checkpoint(str(dup))


def _shard(model_dir: Path, out: Path) -> Path:
    """Rewrite a one-file checkpoint as two shards plus model.safetensors.index.json."""
    out.mkdir(parents=True)
    sd = load_file(str(model_dir / "model.safetensors"))
    names = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: sd[k] for k in keys}, str(out / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in sd.values())}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index))
    shutil.copy(model_dir / "config.json", out / "config.json")
    return out


def test_sharded_checkpoint(tiny_models, tiny_bank_dir, tmp_path):
    sharded = _shard(tiny_models.base, tmp_path / "base-sharded")
    ckpt = resolve_checkpoint(str(sharded))
    assert {p.name for p in ckpt.shards.values()} == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    manifest = build_bank(str(sharded), str(tiny_models.aligned), tmp_path / "bank", progress=None)
    reference = read_manifest(tiny_bank_dir)
    assert manifest.base.ref == str(sharded)
    assert manifest.base.tensors_sha256 == reference.base.tensors_sha256  # same tensors, other layout
    assert manifest.aligned.tensors_sha256 == reference.aligned.tensors_sha256
    assert [m.name for m in manifest.modules] == [m.name for m in reference.modules]
    for a, b in zip(manifest.modules, reference.modules):
        assert a.rank_kept == b.rank_kept
        assert a.frobenius_norm == pytest.approx(b.frobenius_norm, rel=1e-9)


def test_sharded_checkpoint_index_errors(tiny_models, tmp_path):
    sharded = _shard(tiny_models.base, tmp_path / "base-sharded")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BankError, match="missing"):
        resolve_checkpoint(str(sharded))
    (sharded / INDEX_FILE).write_text("{not json")
    with pytest.raises(BankError, match="not a valid safetensors index"):
        resolve_checkpoint(str(sharded))


def _hub_cache(cache: Path, repo_id: str, model_dir: Path, commit: str) -> None:
    """The layout huggingface_hub writes: blobs, snapshots/<commit>/<file> -> blob, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for fname in ("config.json", "model.safetensors"):
        data = (model_dir / fname).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / fname).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_hub(tiny_models, tmp_path, monkeypatch):
    """HF cache holding org/tiny-base and org/tiny-aligned; offline; set after huggingface_hub import."""
    import huggingface_hub.constants  # noqa: F401  (imported first on purpose: env set later must count)

    cache = tmp_path / "hf-cache"
    _hub_cache(cache, "org/tiny-base", tiny_models.base, "a" * 40)
    _hub_cache(cache, "org/tiny-aligned", tiny_models.aligned, "b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def test_hub_id_resolution_offline(offline_hub, tiny_bank_dir, tmp_path):
    ckpt = resolve_checkpoint("org/tiny-aligned")
    assert ckpt.ref == "org/tiny-aligned"
    assert ckpt.directory == offline_hub / "models--org--tiny-aligned" / "snapshots" / ("b" * 40)
    manifest = build_bank("org/tiny-base", "org/tiny-aligned", tmp_path / "bank", progress=None)
    reference = read_manifest(tiny_bank_dir)
    assert manifest.aligned.ref == "org/tiny-aligned"
    assert manifest.base.ref == "org/tiny-base"
    assert manifest.aligned.tensors_sha256 == reference.aligned.tensors_sha256
    assert manifest.base.tensors_sha256 == reference.base.tensors_sha256
    assert manifest.protects("org/tiny-aligned")
    assert not manifest.protects("org/tiny-base")


def test_hub_id_not_cached_offline(offline_hub):
    with pytest.raises(BankError, match="org/not-there"):
        resolve_checkpoint("org/not-there")


def test_hub_id_invalid(offline_hub):
    with pytest.raises(BankError, match="neither a local directory nor a valid hub id"):
        resolve_checkpoint("not//a valid id")
