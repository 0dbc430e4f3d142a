"""read_adapter: what a tenant's upload may and may not be, and the writer's round trip."""

from __future__ import annotations

import builtins
import json
import math
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save
from safetensors.torch import load as st_load

from vllm_safelora.adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ReadLimits,
    read_adapter,
    read_adapter_files,
    serialize_adapter,
    write_adapter_dir,
)
from vllm_safelora.errors import AdapterRefused, RefusalReason

MOD = "model.layers.0.self_attn.q_proj"
MOD_V = "model.layers.0.self_attn.v_proj"
PREFIX = "base_model.model."


def key(module: str, which: str) -> str:
    return f"{PREFIX}{module}.lora_{which}.weight"


def base_config(**overrides) -> dict:
    cfg = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "org/tiny-aligned",
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    cfg.update(overrides)
    return cfg


def base_tensors(r: int = 4, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        key(MOD, "A"): torch.randn(r, 16, generator=g).to(dtype),
        key(MOD, "B"): torch.randn(16, r, generator=g).to(dtype),
        key(MOD_V, "A"): torch.randn(r, 16, generator=g).to(dtype),
        key(MOD_V, "B"): torch.randn(8, r, generator=g).to(dtype),
    }


def write_adapter(
    d: Path, config: dict | bytes | None = None, tensors: dict | None = None, weights: bytes | None = None
) -> Path:
    """A hand-made adapter directory. ``weights`` (raw bytes) wins over ``tensors``."""
    d.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = base_config()
    (d / CONFIG_FILE).write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    if weights is None:
        weights = st_save(base_tensors() if tensors is None else tensors, metadata={"format": "pt"})
    (d / WEIGHTS_FILE).write_bytes(weights)
    return d


def raw_safetensors(header_json: str, data: bytes) -> bytes:
    h = header_json.encode()
    return struct.pack("<Q", len(h)) + h + data


def refused(path: Path, reason: RefusalReason, *, must_name: list[str], **kw) -> AdapterRefused:
    with pytest.raises(AdapterRefused) as info:
        read_adapter(path, **kw)
    exc = info.value
    assert exc.reason is reason, f"{exc.reason} != {reason}: {exc}"
    message = str(exc)
    for word in must_name:
        assert word in message, f"{word!r} not in {message!r}"
    assert exc.adapter is not None and exc.adapter in message
    return exc


# ---------------------------------------------------------------------------
# Accepted adapters


def test_reads_handmade_adapter(tmp_path):
    a = read_adapter(write_adapter(tmp_path / "a"))
    assert set(a.modules) == {MOD, MOD_V}
    m = a.modules[MOD_V]
    assert (m.rank, m.d_out, m.d_in) == (4, 8, 16)
    assert m.a_key == key(MOD_V, "A") and m.b_key == key(MOD_V, "B")
    assert m.alpha == 8 and m.scale == 2.0
    assert a.base_model == "org/tiny-aligned"
    assert a.dtype == torch.float32
    assert a.nbytes == len(a.config_bytes) + len(a.weights_bytes)
    assert a.metadata == {"format": "pt"}


def test_reads_peft_adapter(tiny_adapter_random, tiny_models):
    a = read_adapter(tiny_adapter_random)
    assert set(a.modules) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert a.base_model == str(tiny_models.aligned)
    for name, m in a.modules.items():
        assert m.rank == 8 and m.scale == 2.0
        assert (m.d_out, m.d_in) == ((128, 128) if "q_proj" in name else (64, 128))  # grouped-query v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reads_half_precision_adapters(tiny_adapter_factory, dtype):
    a = read_adapter(tiny_adapter_factory("random", dtype=dtype))
    assert a.dtype == dtype
    assert all(m.lora_A.dtype == dtype and m.lora_B.dtype == dtype for m in a.modules.values())


def test_rslora_rank_and_alpha_patterns(tiny_adapter_factory):
    path = tiny_adapter_factory(
        "random",
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        use_rslora=True,
        rank_pattern={"q_proj": 4, "layers.1.self_attn.v_proj": 2},
        alpha_pattern={"v_proj": 4},
    )
    a = read_adapter(path)
    expect = {
        "model.layers.0.self_attn.q_proj": (4, 16.0),
        "model.layers.1.self_attn.q_proj": (4, 16.0),
        "model.layers.0.self_attn.k_proj": (8, 16.0),
        "model.layers.0.self_attn.v_proj": (8, 4.0),
        "model.layers.1.self_attn.v_proj": (2, 4.0),
        "model.layers.1.self_attn.o_proj": (8, 16.0),
    }
    for name, (r, alpha) in expect.items():
        m = a.modules[name]
        assert (m.rank, m.alpha) == (r, alpha), name
        assert m.scale == pytest.approx(alpha / math.sqrt(r))  # rslora
    assert a.modules["model.layers.0.self_attn.k_proj"].d_out == 64


def test_scale_matches_peft(tiny_adapter_factory, tiny_models):
    """The scale read from the config is the one PEFT applies."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    path = tiny_adapter_factory(
        "random",
        target_modules=("q_proj", "v_proj"),
        use_rslora=True,
        rank_pattern={"q_proj": 4},
        alpha_pattern={"layers.1.self_attn.v_proj": 3},
    )
    a = read_adapter(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_models.aligned)), str(path))
    seen = 0
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            module = name.removeprefix(PREFIX)
            assert a.modules[module].scale == pytest.approx(mod.scaling["default"]), module
            assert a.modules[module].rank == mod.r["default"]
            seen += 1
    assert seen == len(a.modules) == 4


# ---------------------------------------------------------------------------
# Refusals: files and config


def test_not_a_directory(tmp_path):
    refused(tmp_path / "nope", RefusalReason.NOT_FOUND, must_name=["nope"])


def test_missing_config(tmp_path):
    d = write_adapter(tmp_path / "a")
    (d / CONFIG_FILE).unlink()
    refused(d, RefusalReason.INVALID_CONFIG, must_name=[CONFIG_FILE, "missing"])


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe", b"[1, 2]", b'"LORA"'])
def test_empty_or_invalid_config(tmp_path, content):
    d = write_adapter(tmp_path / "a", config=content)
    refused(d, RefusalReason.INVALID_CONFIG, must_name=[CONFIG_FILE])


def test_not_lora(tmp_path):
    d = write_adapter(tmp_path / "a", config=base_config(peft_type="PREFIX_TUNING"))
    refused(d, RefusalReason.NOT_LORA, must_name=[CONFIG_FILE, "PREFIX_TUNING"])


@pytest.mark.parametrize("r", [0, -1, "8", True, None])
def test_invalid_rank_in_config(tmp_path, r):
    d = write_adapter(tmp_path / "a", config=base_config(r=r))
    refused(d, RefusalReason.INVALID_CONFIG, must_name=[CONFIG_FILE, "r must be"])


def test_invalid_alpha(tmp_path):
    d = write_adapter(tmp_path / "a", config=base_config(lora_alpha="big"))
    refused(d, RefusalReason.INVALID_CONFIG, must_name=[CONFIG_FILE, "lora_alpha"])


def test_dora_config(tmp_path):
    d = write_adapter(tmp_path / "a", config=base_config(use_dora=True))
    refused(d, RefusalReason.UNSUPPORTED_FEATURE, must_name=[CONFIG_FILE, "use_dora"])


def test_dora_magnitude_tensors(tmp_path):
    tensors = base_tensors()
    tensors[f"{PREFIX}{MOD}.lora_magnitude_vector"] = torch.ones(16)
    d = write_adapter(tmp_path / "a", tensors=tensors)
    refused(d, RefusalReason.UNSUPPORTED_FEATURE, must_name=[f"{MOD}.lora_magnitude_vector", "DoRA"])


def test_modules_to_save(tmp_path):
    d = write_adapter(tmp_path / "a", config=base_config(modules_to_save=["lm_head"]))
    refused(d, RefusalReason.UNSUPPORTED_FEATURE, must_name=[CONFIG_FILE, "modules_to_save", "lm_head"])


def test_trained_bias(tmp_path):
    d = write_adapter(tmp_path / "a", config=base_config(bias="all"))
    refused(d, RefusalReason.UNSUPPORTED_FEATURE, must_name=[CONFIG_FILE, "bias"])


def test_problems_are_collected_together(tmp_path):
    d = write_adapter(tmp_path / "a", config=base_config(peft_type="IA3", use_dora=True, modules_to_save=["x"]))
    exc = refused(d, RefusalReason.NOT_LORA, must_name=["IA3", "use_dora", "modules_to_save"])
    assert exc.detail.count(";") >= 2


def test_refusal_names_the_served_adapter(tmp_path):
    d = write_adapter(tmp_path / "a", config=base_config(peft_type="IA3"))
    exc = refused(d, RefusalReason.NOT_LORA, must_name=["tenant/bot"], name="tenant/bot")
    assert exc.adapter == "tenant/bot"
    assert str(exc).startswith("adapter 'tenant/bot' refused (not_lora)")


# ---------------------------------------------------------------------------
# Refusals: tensors


def test_lora_a_without_lora_b(tmp_path):
    tensors = base_tensors()
    del tensors[key(MOD_V, "B")]
    d = write_adapter(tmp_path / "a", tensors=tensors)
    refused(d, RefusalReason.MISSING_TENSOR, must_name=[MOD_V, "lora_B"])


def test_lora_b_without_lora_a(tmp_path):
    tensors = base_tensors()
    del tensors[key(MOD, "A")]
    d = write_adapter(tmp_path / "a", tensors=tensors)
    refused(d, RefusalReason.MISSING_TENSOR, must_name=[MOD, "lora_A"])


def test_rank_mismatch_between_a_and_b(tmp_path):
    tensors = base_tensors()
    tensors[key(MOD, "B")] = torch.randn(16, 3)
    d = write_adapter(tmp_path / "a", tensors=tensors)
    refused(d, RefusalReason.RANK_MISMATCH, must_name=[MOD, "rank 4", "rank 3"])


def test_rank_differs_from_config(tmp_path):
    d = write_adapter(tmp_path / "a", config=base_config(r=8))
    refused(d, RefusalReason.RANK_MISMATCH, must_name=[MOD, CONFIG_FILE, "declares 8"])


def test_rank_pattern_mismatch(tmp_path):
    d = write_adapter(tmp_path / "a", config=base_config(rank_pattern={"v_proj": 2}))
    exc = refused(d, RefusalReason.RANK_MISMATCH, must_name=[MOD_V, CONFIG_FILE, "declares 2"])
    assert MOD + ":" not in exc.detail  # q_proj follows the default r and is fine


def test_rank_pattern_accepted_when_it_matches(tmp_path):
    tensors = base_tensors()
    tensors[key(MOD_V, "A")] = torch.randn(2, 16)
    tensors[key(MOD_V, "B")] = torch.randn(8, 2)
    d = write_adapter(tmp_path / "a", config=base_config(rank_pattern={"v_proj": 2}), tensors=tensors)
    a = read_adapter(d)
    assert a.modules[MOD_V].rank == 2 and a.modules[MOD_V].scale == 4.0
    assert a.modules[MOD].rank == 4


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(tmp_path, value):
    tensors = base_tensors()
    tensors[key(MOD_V, "B")][3, 1] = value
    d = write_adapter(tmp_path / "a", tensors=tensors)
    refused(d, RefusalReason.NON_FINITE, must_name=[MOD_V])


@pytest.mark.parametrize(
    "dtype,code",
    [(torch.int32, "I32"), (torch.int64, "I64"), (torch.bool, "BOOL"), (torch.float64, "F64"), (torch.uint8, "U8")],
)
def test_bad_dtypes(tmp_path, dtype, code):
    tensors = base_tensors()
    tensors[key(MOD, "A")] = torch.ones(4, 16).to(dtype)
    d = write_adapter(tmp_path / "a", tensors=tensors)
    refused(d, RefusalReason.BAD_DTYPE, must_name=[key(MOD, "A"), code])


def test_mixed_a_b_dtypes(tmp_path):
    tensors = base_tensors()
    tensors[key(MOD, "A")] = tensors[key(MOD, "A")].half()
    d = write_adapter(tmp_path / "a", tensors=tensors)
    refused(d, RefusalReason.BAD_DTYPE, must_name=[MOD])


def test_zero_sized_tensors(tmp_path):
    tensors = base_tensors()
    tensors[key(MOD, "A")] = torch.zeros(4, 0)
    d = write_adapter(tmp_path / "a", tensors=tensors)
    refused(d, RefusalReason.EMPTY, must_name=[MOD])


def test_zero_rank(tmp_path):
    tensors = base_tensors()
    tensors[key(MOD, "A")] = torch.zeros(0, 16)
    tensors[key(MOD, "B")] = torch.zeros(16, 0)
    d = write_adapter(tmp_path / "a", tensors=tensors)
    refused(d, RefusalReason.EMPTY, must_name=[MOD])


def test_not_two_dimensional(tmp_path):
    tensors = base_tensors()
    tensors[key(MOD, "A")] = torch.zeros(4, 16, 1)
    d = write_adapter(tmp_path / "a", tensors=tensors)
    refused(d, RefusalReason.SHAPE_MISMATCH, must_name=[MOD, "2-D"])


def test_unexpected_tensor(tmp_path):
    tensors = base_tensors()
    tensors[f"{PREFIX}model.embed_tokens.weight"] = torch.zeros(4, 4)
    d = write_adapter(tmp_path / "a", tensors=tensors)
    refused(d, RefusalReason.UNEXPECTED_TENSOR, must_name=["model.embed_tokens.weight"])


def test_no_lora_weights(tmp_path):
    d = write_adapter(tmp_path / "a", weights=raw_safetensors('{"__metadata__":{"format":"pt"}}', b""))
    refused(d, RefusalReason.EMPTY, must_name=[WEIGHTS_FILE])


def test_rank_above_limit(tmp_path):
    d = write_adapter(tmp_path / "a")
    # vLLM refuses on the config's r (validate_legal) before it looks at tensors; so does the reader.
    refused(d, RefusalReason.RANK_TOO_LARGE, must_name=["r is 4", "at most 2"], limits=ReadLimits(max_rank=2))
    assert read_adapter(d, limits=ReadLimits(max_rank=4)).modules[MOD].rank == 4


def test_adapter_larger_than_limit(tmp_path):
    d = write_adapter(tmp_path / "a")
    size = (d / WEIGHTS_FILE).stat().st_size
    refused(
        d,
        RefusalReason.TOO_LARGE,
        must_name=[WEIGHTS_FILE, str(size), "limit is 200"],
        limits=ReadLimits(max_bytes=200),
    )
    assert read_adapter(d, limits=ReadLimits(max_bytes=size)).modules


def test_config_larger_than_limit(tmp_path):
    cfg = base_config(padding="x" * (1 << 20))
    d = write_adapter(tmp_path / "a", config=cfg)
    refused(d, RefusalReason.TOO_LARGE, must_name=[CONFIG_FILE])


# ---------------------------------------------------------------------------
# Refusals: malformed safetensors (checked before safetensors sees the bytes)


def test_truncated_safetensors(tmp_path):
    good = st_save(base_tensors())
    d = write_adapter(tmp_path / "a", weights=good[:-10])
    refused(d, RefusalReason.MALFORMED_TENSORS, must_name=[WEIGHTS_FILE])


@pytest.mark.parametrize("data", [b"", b"\x01\x02"])
def test_too_short_for_safetensors(tmp_path, data):
    d = write_adapter(tmp_path / "a", weights=data)
    refused(d, RefusalReason.MALFORMED_TENSORS, must_name=[WEIGHTS_FILE])


def test_header_claiming_gigabytes(tmp_path):
    d = write_adapter(tmp_path / "a", weights=struct.pack("<Q", 5 << 30) + b'{"a": 1}' + b"\0" * 64)
    refused(d, RefusalReason.MALFORMED_TENSORS, must_name=[WEIGHTS_FILE, str(5 << 30)])


def test_invalid_header_json(tmp_path):
    d = write_adapter(tmp_path / "a", weights=raw_safetensors('{"x": {"dtype": "F32", ', b"\0" * 8))
    refused(d, RefusalReason.MALFORMED_TENSORS, must_name=[WEIGHTS_FILE, "not valid JSON"])


def test_header_not_an_object(tmp_path):
    d = write_adapter(tmp_path / "a", weights=raw_safetensors("[1, 2, 3]", b""))
    refused(d, RefusalReason.MALFORMED_TENSORS, must_name=[WEIGHTS_FILE])


def test_overlapping_offsets(tmp_path):
    a, b = key(MOD, "A"), key(MOD, "B")
    header = json.dumps(
        {
            a: {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
            b: {"dtype": "F32", "shape": [2, 1], "data_offsets": [4, 12]},
        }
    )
    d = write_adapter(tmp_path / "a", config=base_config(r=1), weights=raw_safetensors(header, b"\0" * 12))
    refused(d, RefusalReason.MALFORMED_TENSORS, must_name=[WEIGHTS_FILE, a, b, "overlap"])


def test_offsets_not_matching_shape(tmp_path):
    a = key(MOD, "A")
    header = json.dumps({a: {"dtype": "F32", "shape": [4, 16], "data_offsets": [0, 8]}})
    d = write_adapter(tmp_path / "a", weights=raw_safetensors(header, b"\0" * 8))
    refused(d, RefusalReason.MALFORMED_TENSORS, must_name=[WEIGHTS_FILE, a])


def test_negative_sizes(tmp_path):
    a = key(MOD, "A")
    header = json.dumps({a: {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}})
    d = write_adapter(tmp_path / "a", weights=raw_safetensors(header, b"\0" * 8))
    refused(d, RefusalReason.MALFORMED_TENSORS, must_name=[WEIGHTS_FILE, a])


def test_duplicate_tensor_names(tmp_path):
    a = key(MOD, "A")
    entry = '{"dtype": "F32", "shape": [1, 2], "data_offsets": [%d, %d]}'
    header = "{" + f'"{a}": {entry % (0, 8)}, "{a}": {entry % (8, 16)}' + "}"
    d = write_adapter(tmp_path / "a", config=base_config(r=1), weights=raw_safetensors(header, b"\0" * 16))
    refused(d, RefusalReason.MALFORMED_TENSORS, must_name=[WEIGHTS_FILE, a, "twice"])


# ---------------------------------------------------------------------------
# Pickle is never loaded


class _Booby:
    """Unpickling this creates ``marker`` (via builtins.open)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture
def no_unpickling(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("something tried to unpickle an adapter")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)


def _booby_trap(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Booby(str(marker))))


def test_booby_trap_works(tmp_path):
    """Sanity: the trap really fires when unpickled (so its absence below means something)."""
    marker = tmp_path / "fired"
    _booby_trap(tmp_path / "x.bin", marker)
    pickle.loads((tmp_path / "x.bin").read_bytes()).close()
    assert marker.exists()


@pytest.mark.parametrize("fname", ["adapter_model.bin", "adapter_model.pt", "pytorch_model.bin"])
def test_pickle_only_adapter_never_unpickled(tmp_path, fname, no_unpickling):
    d = tmp_path / "a"
    d.mkdir()
    (d / CONFIG_FILE).write_text(json.dumps(base_config()))
    marker = tmp_path / "unpickled"
    _booby_trap(d / fname, marker)
    refused(d, RefusalReason.PICKLE_ONLY, must_name=[fname, "safe_serialization"])
    assert not marker.exists()


def test_pickle_beside_safetensors(tmp_path, no_unpickling):
    d = write_adapter(tmp_path / "a")
    marker = tmp_path / "unpickled"
    _booby_trap(d / "adapter_model.bin", marker)
    refused(d, RefusalReason.PICKLE_ONLY, must_name=["adapter_model.bin", WEIGHTS_FILE])
    assert not marker.exists()


def test_missing_weights(tmp_path):
    d = write_adapter(tmp_path / "a")
    (d / WEIGHTS_FILE).unlink()
    refused(d, RefusalReason.MISSING_TENSOR, must_name=[WEIGHTS_FILE, "missing"])


# ---------------------------------------------------------------------------
# Links


def test_symlink_outside_source_refused(tmp_path):
    root = tmp_path / "root"
    outside = write_adapter(tmp_path / "elsewhere")
    d = root / "tenant"
    d.mkdir(parents=True)
    (d / CONFIG_FILE).write_bytes((outside / CONFIG_FILE).read_bytes())
    (d / WEIGHTS_FILE).symlink_to(outside / WEIGHTS_FILE)
    refused(d, RefusalReason.OUTSIDE_NAMESPACE, must_name=[WEIGHTS_FILE, "outside"], confine_to=root)
    # without confinement the link is followed
    assert read_adapter(d).modules


def test_symlink_inside_source_allowed(tmp_path):
    root = tmp_path / "root"
    real = write_adapter(root / "blobs")
    d = root / "tenant"
    d.mkdir()
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        (d / f).symlink_to(real / f)
    assert set(read_adapter(d, confine_to=root).modules) == {MOD, MOD_V}


def test_config_that_is_a_directory(tmp_path):
    d = write_adapter(tmp_path / "a")
    (d / CONFIG_FILE).unlink()
    (d / CONFIG_FILE).mkdir()
    with pytest.raises(AdapterRefused) as info:
        read_adapter(d)
    assert CONFIG_FILE in str(info.value)


# ---------------------------------------------------------------------------
# Round trip and content hash


def test_round_trip_keeps_names_and_config_bytes(tiny_adapter_random, tmp_path):
    a = read_adapter(tiny_adapter_random)
    s = serialize_adapter(a.config_bytes, a.tensors, a.metadata)
    assert s.config_bytes == a.config_bytes == (tiny_adapter_random / CONFIG_FILE).read_bytes()
    back = st_load(s.weights_bytes)
    assert sorted(back) == sorted(a.tensors)
    for k, t in a.tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)
    out = write_adapter_dir(tmp_path / "out", s)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    again = read_adapter(out)
    assert again.content_hash == s.content_hash
    assert again.config_bytes == a.config_bytes
    assert sorted(again.tensors) == sorted(a.tensors)
    assert again.metadata == a.metadata


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_half_precision(tiny_adapter_factory, dtype):
    a = read_adapter(tiny_adapter_factory("random", dtype=dtype))
    back = st_load(serialize_adapter(a.config_bytes, a.tensors).weights_bytes)
    assert all(back[k].dtype == dtype and torch.equal(back[k], t) for k, t in a.tensors.items())


def test_content_hash_stable_and_sensitive(tmp_path):
    d = write_adapter(tmp_path / "a")
    h1 = read_adapter(d).content_hash
    assert read_adapter(d).content_hash == h1
    # the hash taken before parsing (how refused content is recognised) is the parsed adapter's
    assert read_adapter_files(d).content_hash == h1
    # only the served files count: another file beside them changes nothing
    (d / "README.md").write_text("notes")
    assert read_adapter(d).content_hash == h1
    # a copy elsewhere, under another name: same content, same hash
    copy = write_adapter(tmp_path / "b", weights=(d / WEIGHTS_FILE).read_bytes(), config=(d / CONFIG_FILE).read_bytes())
    assert read_adapter(copy, name="other").content_hash == h1

    # one byte of tensor data (lowest mantissa byte of the first float: stays finite)
    weights = bytearray((d / WEIGHTS_FILE).read_bytes())
    (n,) = struct.unpack("<Q", weights[:8])
    weights[8 + n] ^= 0x01
    (d / WEIGHTS_FILE).write_bytes(bytes(weights))
    h2 = read_adapter(d).content_hash
    assert h2 != h1

    # one byte of the config (whitespace: same JSON, other bytes)
    (d / CONFIG_FILE).write_bytes((d / CONFIG_FILE).read_bytes() + b" ")
    assert read_adapter(d).content_hash not in (h1, h2)


def test_write_adapter_dir_refuses_existing(tmp_path, tiny_adapter_random):
    a = read_adapter(tiny_adapter_random)
    s = serialize_adapter(a.config_bytes, a.tensors)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("x")
    with pytest.raises(FileExistsError):
        write_adapter_dir(out, s)
    write_adapter_dir(out, s, overwrite=True)
    assert not (out / "stale").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]
