"""The reader reads an adapter exactly as the served vLLM 0.32 will: tensor names, update bounds, config features and dtypes.

* names: one tensor per module and half, mapped by vLLM's own parser (parity proven here);
  only canonical names are written;
* numbers: s*B*A must run finitely in the dtype vLLM runs LoRA in; alpha and patterns bounded;
* work: header size and tensor count are bounded before anything is parsed;
* config: everything vLLM's PEFTHelper refuses is refused first.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from test_adapters import MOD, MOD_V, base_config, base_tensors, key, refused, write_adapter

import vllm_safelora.adapters as adapters
from vllm_safelora.adapters import bounds, reader
from vllm_safelora.adapters import (
    AdapterFiles,
    ReadLimits,
    canonical_name,
    max_abs_update,
    parse_adapter,
    parse_lora_name,
    read_adapter,
    serialize_adapter,
    unchanged_files,
    update_limit,
)
from vllm_safelora.errors import RefusalReason

R = RefusalReason


def handmade(header_items: list[tuple[str, torch.Tensor]]) -> bytes:
    """safetensors bytes with tensors in exactly this header order (save() sorts them)."""
    header, blobs, offset = {}, [], 0
    for name, t in header_items:
        data = t.contiguous().numpy().tobytes()
        header[name] = {
            "dtype": {torch.float32: "F32", torch.float16: "F16"}[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


# ---------------------------------------------------------------------------
# Class 1: names are read as vLLM reads them


def vllm_parse(name, mapper=None):
    from vllm.lora.utils import parse_fine_tuned_lora_name

    return parse_fine_tuned_lora_name(name, mapper)


def same_outcome(name, mapper=None) -> None:
    try:
        theirs = vllm_parse(name, mapper)
    except ValueError:
        theirs = "ValueError"
    try:
        ours = parse_lora_name(name)
    except ValueError:
        ours = "ValueError"
    assert ours == theirs, name


HOSTILE_NAMES = [
    key(MOD, "A"),
    f"{MOD}.lora_A.weight",
    f"base_model.model.base_model.model.{MOD}.lora_B.weight",
    f"base_model.model.base_model.base_model.model.model.{MOD}.lora_A.weight",
    f"x.base_model.model.{MOD}.lora_A.weight",
    f"base_model.model.{MOD}.lora_A.default.weight",
    f"{MOD}.lora_A.bias",
    "lora_A.weight",
    "base_model.model.lora_B.weight",
    ".lora_A.weight",
    "weight",
    "",
    ".",
    "..",
    "base_model.model.model.embed_tokens.lora_embedding_A",
    "lm_head.lora_embedding_B",
    "model.score.weight",
    "classifier.bias",
    "base_model.model.score.bias",
    f"{MOD}.lora_magnitude_vector",
    "model.embed_tokens.base_layer.weight",
    f"{MOD}.base_layer.lora_A.weight",
    "base_model.model.",
    "base_model.modelXlayers.lora_A.weight",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_parser_equals_vllms_on_hostile_names(name):
    same_outcome(name)


_PARTS = st.sampled_from(
    [
        "base_model",
        "model",
        "lora_A",
        "lora_B",
        "weight",
        "bias",
        "score",
        "classifier",
        "lora_embedding_A",
        "lora_embedding_B",
        "default",
        "layers",
        "0",
        "q_proj",
        "",
        "base_model.model",
        "experts",
        "base_layer",
    ]
)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(_PARTS, st.text(max_size=6)), max_size=9))
def test_parser_equals_vllms_property(parts):
    same_outcome(".".join(parts))


def llama_parser():
    """What the server hands the reader for the tiny Llama: vLLM's parser with the model's rename mapper."""
    import functools

    from vllm.model_executor.models.llama import LlamaForCausalLM

    from vllm_safelora.integration.vllm_rules import _vllm_parse_name

    return functools.partial(_vllm_parse_name, weights_mapper=LlamaForCausalLM.hf_to_vllm_mapper.get_rename_mapper())


def test_served_parser_differs_only_where_the_reader_refuses(tmp_path):
    """With a weights mapper vLLM re-adds ``base_model.model.`` after mapping, so a name whose
    prefix was rebuilt by its replace-all lands on a module the model does not have. The
    reader, given the served parser, refuses every such name (its canonical name would land
    elsewhere); all other names map as with the default parser."""
    served = llama_parser()
    differing = []
    for i, name in enumerate(
        HOSTILE_NAMES + [key(f"model.layers.1.mlp.{p}", w) for p in ("gate_proj", "down_proj") for w in "AB"]
    ):
        try:
            same = served(name) == parse_lora_name(name)
        except ValueError:
            continue
        if not same:
            differing.append(name)
            t = base_tensors()
            t[name] = torch.zeros(4, 16)
            with pytest.raises(adapters.AdapterRefused):
                read_adapter(write_adapter(tmp_path / str(i), tensors=t), limits=ReadLimits(parse_name=served))
    assert differing == [f"base_model.model.base_model.base_model.model.model.{MOD}.lora_A.weight"]


A4, B4 = torch.randn(4, 16), torch.randn(16, 4)
A4v, B4v = torch.randn(4, 16), torch.randn(8, 4)
V_PAIR = [(key(MOD_V, "A"), A4v), (key(MOD_V, "B"), B4v)]
COLLISIONS = {
    # name -> the header (in file order); every one puts two tensors into one module half
    "prefixed-and-bare-A": [(key(MOD, "A"), A4), (f"{MOD}.lora_A.weight", A4 * 100), (key(MOD, "B"), B4)],
    "bare-then-prefixed-A": [(f"{MOD}.lora_A.weight", A4 * 100), (key(MOD, "A"), A4), (key(MOD, "B"), B4)],
    "prefixed-and-bare-B": [(key(MOD, "A"), A4), (key(MOD, "B"), B4), (f"{MOD}.lora_B.weight", B4 * 100)],
    "both-halves": [
        (key(MOD, "A"), A4),
        (key(MOD, "B"), B4),
        (f"{MOD}.lora_A.weight", A4),
        (f"{MOD}.lora_B.weight", B4),
    ],
    "double-prefix": [
        (key(MOD, "A"), A4),
        (f"base_model.model.base_model.model.{MOD}.lora_A.weight", A4),
        (key(MOD, "B"), B4),
    ],
    "prefix-rebuilt-by-replace": [
        (key(MOD, "A"), A4),
        (f"base_model.model.base_model.base_model.model.model.{MOD}.lora_A.weight", A4),
        (key(MOD, "B"), B4),
    ],
    "inner-prefix": [
        (key(MOD, "B"), B4),
        ("base_model.model.model.base_model.model.layers.0.self_attn.q_proj.lora_B.weight", B4),
        (key(MOD, "A"), A4),
    ],
}


@pytest.mark.parametrize("case", sorted(COLLISIONS))
def test_two_tensors_for_one_module_half_are_refused(tmp_path, case):
    d = write_adapter(tmp_path / case, weights=handmade(COLLISIONS[case] + V_PAIR))
    refused(d, R.DUPLICATE_MODULE, must_name=[MOD, "whichever it reads last"])
    # with the served (mapper) parser too; the rebuilt prefix lands elsewhere there, and is refused for that
    with pytest.raises(adapters.AdapterRefused) as info:
        read_adapter(d, limits=ReadLimits(parse_name=llama_parser()))
    assert info.value.reason in (R.DUPLICATE_MODULE, R.UNEXPECTED_TENSOR)


@pytest.mark.parametrize(
    "name,reason,fragment",
    [
        (f"base_model.model.{MOD}.lora_A.default.weight", R.UNEXPECTED_TENSOR, "vLLM can map"),
        ("base_model.model.lora_A.weight", R.UNEXPECTED_TENSOR, "names no module"),
        ("base_model.model.model.score.weight", R.UNSUPPORTED_FEATURE, "full 'score' module"),
        ("classifier.bias", R.UNSUPPORTED_FEATURE, "full 'classifier' module"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", R.UNSUPPORTED_FEATURE, "embedding LoRA"),
        ("model.embed_tokens.base_layer.weight", R.UNEXPECTED_TENSOR, "vLLM can map"),
    ],
)
def test_tensors_vllm_would_skip_or_misplace_are_refused(tmp_path, name, reason, fragment):
    t = base_tensors()
    t[name] = torch.zeros(4, 16)
    refused(write_adapter(tmp_path / "a", tensors=t), reason, must_name=[fragment])


def test_bare_names_are_read_and_written_canonically(tmp_path):
    bare = {k.removeprefix("base_model.model."): v for k, v in base_tensors().items()}
    a = read_adapter(write_adapter(tmp_path / "a", tensors=bare))
    assert not a.canonical_names
    assert sorted(a.tensors) == sorted(base_tensors())  # keyed canonically
    served = st_load(unchanged_files(a).weights_bytes)
    assert sorted(served) == sorted(base_tensors())
    for k, t in base_tensors().items():
        assert torch.equal(served[k], t)
    # canonical uploads are served byte for byte
    b = read_adapter(write_adapter(tmp_path / "b"))
    assert b.canonical_names and unchanged_files(b).weights_bytes == b.weights_bytes


def test_writer_refuses_non_canonical_names():
    with pytest.raises(ValueError, match="canonical"):
        serialize_adapter(b"{}", {f"{MOD}.lora_A.weight": torch.zeros(1, 1)})
    serialize_adapter(b"{}", {canonical_name(MOD, "A"): torch.zeros(1, 1)})


def test_the_served_parser_decides_collisions(tmp_path):
    """ReadLimits.parse_name is what maps names (at serve time: vLLM's parser + the model's mapper)."""

    def merging_mapper(name):  # a weights mapper that folds layers.1 onto layers.0
        module, is_a = parse_lora_name(name)
        return module.replace("layers.1.", "layers.0."), is_a

    t = base_tensors()
    t[key(MOD.replace("layers.0", "layers.1"), "A")] = t[key(MOD, "A")].clone()
    t[key(MOD.replace("layers.0", "layers.1"), "B")] = t[key(MOD, "B")].clone()
    d = write_adapter(tmp_path / "a", tensors=t)
    assert len(read_adapter(d).modules) == 3
    refused(d, R.DUPLICATE_MODULE, must_name=[MOD], limits=ReadLimits(parse_name=merging_mapper))


def test_modules_the_server_does_not_apply_lora_to_are_refused(tmp_path):
    d = write_adapter(tmp_path / "a")
    only_q = ReadLimits(module_served=lambda m: m.endswith("q_proj"))
    refused(d, R.UNKNOWN_MODULE, must_name=[MOD_V, "--lora-target-modules"], limits=only_q)


# ---------------------------------------------------------------------------
# Class 2: the update must run finitely in the served dtype


def rank_one(a: float, b: float, r: int = 4, d_in: int = 16) -> dict[str, torch.Tensor]:
    """max|B A| == a * b exactly (one non-zero entry in each factor)."""
    t = base_tensors(r=r)
    A, B = torch.zeros(r, d_in), torch.zeros(16, r)
    A[0, 0], B[0, 0] = a, b
    t[key(MOD, "A")], t[key(MOD, "B")] = A, B
    return t


@pytest.mark.parametrize(
    "config,fragment",
    [
        (dict(lora_alpha=1e30), "lora_alpha is 1e+30"),
        (dict(lora_alpha=-1e30), "lora_alpha is -1e+30"),
        (dict(lora_alpha=4097), "lora_alpha is 4097"),
        (dict(alpha_pattern={"q_proj": 1e30}), "alpha_pattern['q_proj']"),
        (dict(alpha_pattern={"v_proj": 5e3}), "alpha_pattern['v_proj']"),
    ],
)
def test_alpha_is_bounded(tmp_path, config, fragment):
    refused(write_adapter(tmp_path / "a", config=base_config(**config)), R.UPDATE_OVERFLOW, must_name=[fragment])


@pytest.mark.parametrize(
    "serve,value,fragment",
    [
        (torch.float16, 1e5, "float16"),  # an F32 value that is Inf in F16
        (torch.bfloat16, 3.4e38, "bfloat16"),  # rounds up to Inf in BF16
    ],
)
def test_tensor_infinite_after_vllms_cast(tmp_path, serve, value, fragment):
    t = base_tensors()
    t[key(MOD, "A")][0, 0] = value
    d = write_adapter(tmp_path / "a", tensors=t)
    refused(d, R.UPDATE_OVERFLOW, must_name=[MOD, "not finite", fragment], limits=ReadLimits(serve_dtype=serve))


def test_scaled_lora_b_overflows_f16_though_b_fits(tmp_path):
    # s = 512 / 4 = 128; B = 1000 fits F16, s*B = 128000 does not (vLLM folds s into lora_b in F16).
    d = write_adapter(tmp_path / "a", config=base_config(lora_alpha=512), tensors=rank_one(1e-6, 1000.0))
    refused(d, R.UPDATE_OVERFLOW, must_name=[MOD, "s = 128"], limits=ReadLimits(serve_dtype=torch.float16))
    assert read_adapter(d, limits=ReadLimits(serve_dtype=torch.float32)).modules[MOD]


@pytest.mark.parametrize("serve", [torch.float16, torch.bfloat16, torch.float32])
def test_update_limit_is_exact_at_the_boundary(tmp_path, serve):
    limits = ReadLimits(serve_dtype=serve)
    limit = update_limit(serve, 16, limits)  # d_in = 16; s = 8 / 4 = 2
    assert limit == min(65536.0, torch.finfo(serve).max / (16 * 16))
    b = limit / 2 / 1.0  # a = 1: max|s B A| = 2 * b
    under = write_adapter(tmp_path / "under", tensors=rank_one(1.0, b * 0.99))
    over = write_adapter(tmp_path / "over", tensors=rank_one(1.0, b * 1.02))
    assert read_adapter(under, limits=limits).modules[MOD]
    refused(over, R.UPDATE_OVERFLOW, must_name=[MOD, "the update s*B*A reaches"], limits=limits)


def test_rslora_scale_is_the_one_checked(tmp_path):
    # r = 4: rslora scale = alpha / 2, plain = alpha / 4. Pick b so only the rslora update is over.
    limits = ReadLimits(serve_dtype=torch.float16)
    limit = update_limit(torch.float16, 16, limits)
    b = 0.75 * limit / 2  # plain: 2 * b = 0.75 limit; rslora: 4 * b = 1.5 limit
    t = rank_one(1.0, b)
    assert read_adapter(write_adapter(tmp_path / "plain", tensors=t), limits=limits).modules
    refused(
        write_adapter(tmp_path / "rs", config=base_config(use_rslora=True), tensors=t),
        R.UPDATE_OVERFLOW,
        must_name=["s = 4"],
        limits=limits,
    )


def test_large_lora_a_is_refused_for_the_intermediate(tmp_path):
    # x @ A^T is computed before B: a huge A overflows there however small B is.
    limits = ReadLimits(serve_dtype=torch.float16)
    refused(
        write_adapter(tmp_path / "a", tensors=rank_one(1e3, 1e-9)),
        R.UPDATE_OVERFLOW,
        must_name=["|lora_A| reaches"],
        limits=limits,
    )


@pytest.mark.parametrize(
    "config,reason,fragment",
    [
        (dict(use_rslora="yes"), R.INVALID_CONFIG, "use_rslora must be true or false"),
        (dict(rank_pattern={"nothing_matches": 64}), R.RANK_TOO_LARGE, "rank_pattern['nothing_matches'] is 64"),
        (dict(rank_pattern={"q_proj": 0}), R.INVALID_CONFIG, "must be a positive integer"),
        (dict(alpha_pattern={"q_proj": "x"}), R.INVALID_CONFIG, "must be a finite number"),
    ],
)
def test_rslora_and_pattern_values_are_checked(tmp_path, config, reason, fragment):
    refused(
        write_adapter(tmp_path / "a", config=base_config(**config)),
        reason,
        must_name=[fragment],
        limits=ReadLimits(max_rank=8),
    )


def test_cauchy_schwarz_bound_first_exact_only_when_needed(tmp_path, monkeypatch):
    calls = []
    real = bounds.max_abs_update
    monkeypatch.setattr(bounds, "max_abs_update", lambda *a: calls.append(1) or real(*a))
    limits = ReadLimits(serve_dtype=torch.float16)
    read_adapter(write_adapter(tmp_path / "plain"), limits=limits)
    assert calls == []  # the bound alone decides ordinary adapters
    # Rows of B orthogonal to columns of A: ||B_i|| ||A_j|| is large, B A is 0.
    limit = update_limit(torch.float16, 16, limits)
    t = base_tensors()
    A, B = torch.zeros(4, 16), torch.zeros(16, 4)
    A[0, :] = 1.0  # column norms 1
    B[:, 1] = limit  # row norms = limit, but B A = 0 (B uses rank 1, A only rank 0)
    t[key(MOD, "A")], t[key(MOD, "B")] = A, B
    d = write_adapter(tmp_path / "orth", tensors=t)
    assert read_adapter(d, limits=ReadLimits(serve_dtype=torch.float32)).modules[MOD]
    assert calls == []  # fp32: the bound (2 x 256) is under the cap
    assert read_adapter(d, limits=limits).modules[MOD]
    assert calls == [1]  # fp16: the bound is over the limit, the exact max (0) is not


def test_a_policys_output_is_held_to_the_same_limits(tmp_path):
    """A projection can grow lora_B (C's eigenvalues reach ||V||_F): its output is checked again."""
    from vllm_safelora.adapters import changed_update_problems

    limits = ReadLimits(serve_dtype=torch.float16)
    a = read_adapter(write_adapter(tmp_path / "a"), limits=limits)
    assert changed_update_problems(a, a.tensors) == []  # nothing changed
    grown = dict(a.tensors)
    m = a.modules[MOD]
    grown[m.b_key] = m.lora_B * 1e3
    problems = changed_update_problems(a, grown)
    assert len(problems) == 1 and problems[0].startswith(f"after the policy, module {MOD}")
    del grown[m.a_key], grown[m.b_key]  # pruned: nothing to check
    assert changed_update_problems(a, grown) == []


def test_exact_max_matches_dense():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(8, 300, generator=g), torch.randn(5000, 8, generator=g)
    assert max_abs_update(A, B, -3.0) == pytest.approx(float((3.0 * B.double() @ A.double()).abs().max()), rel=1e-12)


# ---------------------------------------------------------------------------
# Class 5: work and memory are bounded before parsing


def zero_size_flood(n: int) -> bytes:
    header = {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight": {
            "dtype": "F32",
            "shape": [0, 128],
            "data_offsets": [0, 0],
        }
        for i in range(n)
    }
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


def parse_bytes(config: dict, weights: bytes, limits: ReadLimits):
    return parse_adapter(
        AdapterFiles(path=None, name="flood", config_bytes=json.dumps(config).encode(), weights_bytes=weights),
        limits=limits,
    )


def refused_parse(reason, fragment, config, weights, limits):
    with pytest.raises(adapters.AdapterRefused) as info:
        parse_bytes(config, weights, limits)
    assert info.value.reason is reason and fragment in str(info.value), str(info.value)


@pytest.fixture
def no_tensor_parsing(monkeypatch):
    """Fails the test if anything materialises tensors or parses the safetensors header JSON."""
    real = json.loads
    header_parses = []

    def loads(text, **kw):
        if "object_pairs_hook" in kw:
            header_parses.append(len(text))
        return real(text, **kw)

    monkeypatch.setattr(json, "loads", loads)
    monkeypatch.setattr(reader, "load_safetensors_bytes", lambda *a: pytest.fail("tensors were materialised"))
    return header_parses


def test_100k_zero_size_tensors_refused_before_parsing(no_tensor_parsing):
    flood = zero_size_flood(100_000)
    tracemalloc.start()
    refused_parse(R.TOO_LARGE, "header is", base_config(), flood, ReadLimits())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert no_tensor_parsing == []
    assert peak < 1 << 20, peak  # measured: a few KB (the 7 MB file is not copied)


@pytest.mark.parametrize("header", ["long", "many"])
def test_a_huge_file_with_a_hostile_header_is_not_read(tmp_path, header):
    """The header is checked after its first bytes are read: a 256 MiB (sparse) file costs ~100 KB."""
    limits = ReadLimits(max_tensors=56, max_header_bytes=56 * 512 + 65536)
    head = struct.pack("<Q", 200_000) if header == "long" else zero_size_flood(400)
    d = write_adapter(tmp_path / "a", weights=head)
    with open(d / adapters.WEIGHTS_FILE, "r+b") as f:
        f.truncate(256 << 20)
    tracemalloc.start()
    refused(
        d, R.TOO_LARGE, must_name=["header is 200000 bytes" if header == "long" else "holds 400 tensors"], limits=limits
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_tensor_count_refused_before_json(no_tensor_parsing):
    # a compact header within max_header_bytes but with more tensors than the model can have
    limits = ReadLimits(max_tensors=56, max_header_bytes=56 * 512 + 65536)
    flood = zero_size_flood(400)
    assert len(flood) < limits.max_header_bytes
    refused_parse(R.TOO_LARGE, "holds 400 tensors", base_config(), flood, limits)
    assert no_tensor_parsing == []


def test_tensor_count_after_json_counts_entries(tmp_path):
    t = base_tensors()
    refused(
        write_adapter(tmp_path / "a", tensors=t),
        R.TOO_LARGE,
        must_name=["holds 4 tensors", "at most 3"],
        limits=ReadLimits(max_tensors=3),
    )
    assert read_adapter(tmp_path / "a", limits=ReadLimits(max_tensors=4)).modules


def test_per_tensor_elements_are_bounded(tmp_path):
    refused(
        write_adapter(tmp_path / "a"),
        R.TOO_LARGE,
        must_name=["64 elements", "at most 63"],
        limits=ReadLimits(max_tensor_elements=63),
    )


@pytest.mark.parametrize(
    "config,fragment",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests JSON too deeply"),
        (json.dumps({**base_config(), "x": json.loads("[" * 20 + "]" * 20)}).encode(), "more than 16 levels"),
    ],
)
def test_config_depth_is_bounded(tmp_path, config, fragment):
    refused(write_adapter(tmp_path / "a", config=config), R.INVALID_CONFIG, must_name=[fragment])


def test_deep_header_json_is_refused():
    text = b"[" * 50_000 + b"]" * 50_000
    refused_parse(
        R.MALFORMED_TENSORS,
        "too deeply",
        base_config(),
        struct.pack("<Q", len(text)) + text,
        ReadLimits(max_header_bytes=1 << 20),
    )


def test_config_size_limit_is_a_field(tmp_path):
    d = write_adapter(tmp_path / "a")
    size = (d / adapters.CONFIG_FILE).stat().st_size
    refused(d, R.TOO_LARGE, must_name=[f"the limit is {size - 1}"], limits=ReadLimits(max_config_bytes=size - 1))


# ---------------------------------------------------------------------------
# Class 6: what vLLM's PEFTHelper refuses is refused first


def vllm_refuses(config: dict, max_rank: int = 8) -> bool:
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    try:
        PEFTHelper.from_dict(config).validate_legal(LoRAConfig(max_lora_rank=max_rank))
    except Exception:
        return True
    return False


def without(key: str) -> dict:
    cfg = base_config()
    cfg.pop(key)
    return cfg


VLLM_REFUSED = {
    "init-pissa": base_config(init_lora_weights="pissa"),
    "init-pissa-niter": base_config(init_lora_weights="pissa_niter_4"),
    "init-olora": base_config(init_lora_weights="olora"),
    "init-corda": base_config(init_lora_weights="corda"),
    "init-loftq": base_config(init_lora_weights="loftq"),
    "init-upper-case": base_config(init_lora_weights="PiSSA"),
    "alora": base_config(alora_invocation_tokens=[1, 2, 3]),
    "layer-replication": base_config(layer_replication=[[0, 1], [0, 1]]),
    "qalora": base_config(use_qalora=True),
    "bdlora": base_config(use_bdlora={"block": 2}),
    "lora-bias": base_config(lora_bias=True),
    "bias-all": base_config(bias="all"),
    "dora": base_config(use_dora=True),
    "modules-to-save": base_config(modules_to_save=["lm_head"]),
    "no-target-modules": without("target_modules"),
    "no-lora-alpha": without("lora_alpha"),
    "no-r": without("r"),
    "rank-pattern-over-max": base_config(rank_pattern={"unused": 16}),
    "r-over-max": base_config(r=16),
}


@pytest.mark.parametrize("case", sorted(VLLM_REFUSED))
def test_configs_vllm_refuses_are_refused_offline(tmp_path, case):
    config = VLLM_REFUSED[case]
    assert vllm_refuses(config), "vLLM accepts it: the case is wrong"
    with pytest.raises(adapters.AdapterRefused):
        read_adapter(write_adapter(tmp_path / case, config=config), limits=ReadLimits(max_rank=8))


@pytest.fixture
def served_check():
    from vllm.config.lora import LoRAConfig

    from vllm_safelora.integration.vllm_rules import peft_helper_problems

    return lambda max_rank=8: ReadLimits(
        max_rank=max_rank,
        check_config=lambda cfg: peft_helper_problems(
            cfg, lora_config=LoRAConfig(max_lora_rank=max_rank), max_position_embeddings=256
        ),
    )


@pytest.mark.parametrize("config", [base_config(bias=None)])
def test_served_check_runs_vllms_own_validation(tmp_path, served_check, config):
    """Configs only vLLM's PEFTHelper catches (bias: null is 'not none' to vLLM) are refused with its words."""
    assert vllm_refuses(config)
    d = write_adapter(tmp_path / "a", config=config)
    refused(d, R.VLLM_UNSUPPORTED, must_name=["vLLM refuses it"], limits=served_check())


def test_config_hook_problems_are_refused_with_their_words(tmp_path):
    limits = ReadLimits(check_config=lambda cfg: ["the served vLLM says no"] if cfg.get("r") == 4 else [])
    refused(write_adapter(tmp_path / "a"), R.VLLM_UNSUPPORTED, must_name=["the served vLLM says no"], limits=limits)


def test_served_check_accepts_what_vllm_accepts(tmp_path, served_check):
    for i, cfg in enumerate(
        [
            base_config(),
            base_config(init_lora_weights="gaussian"),
            base_config(use_rslora=True),
            base_config(rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 3.5}),
        ]
    ):
        assert not vllm_refuses(cfg)
        assert read_adapter(write_adapter(tmp_path / str(i), config=cfg), limits=served_check()).modules


def test_scale_equals_vllms(tmp_path):
    """rank/alpha patterns and rslora give the scale vLLM's PEFTHelper gives each module."""
    from vllm.lora.peft_helper import PEFTHelper

    for rs in (False, True):
        cfg = base_config(use_rslora=rs, alpha_pattern={"layers.0.self_attn.v_proj": 3.5})
        a = read_adapter(write_adapter(tmp_path / f"rs{rs}", config=cfg))
        helper = PEFTHelper.from_dict(cfg)
        for name, m in a.modules.items():
            assert (m.rank, m.scale) == helper.get_rank_and_scaling(name), name
    assert math.isclose(a.modules[MOD_V].scale, 3.5 / 2)


# ---------------------------------------------------------------------------
# The served limits (integration/vllm_rules.py) on a real vLLM config


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_read_limits_follow_the_served_vllm(tiny_models, monkeypatch, dtype):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_safelora.config import SafeLoRASettings
    from vllm_safelora.integration.vllm_rules import read_limits_for

    monkeypatch.setenv("VLLM_PLUGINS", "none")  # this process must not start the plugin itself
    vllm_config = EngineArgs(
        model=str(tiny_models.aligned), enable_lora=True, max_lora_rank=8, dtype=dtype, max_model_len=256
    ).create_engine_config()
    limits = read_limits_for(vllm_config, SafeLoRASettings.model_construct(max_adapter_bytes=256 * 1024))
    # 2 layers x 7 linear modules x 2 tensors x 2 slack; widest projection 256 (intermediate) x 4 x rank 8
    assert (limits.max_rank, limits.max_tensors, limits.max_tensor_elements) == (8, 56, 8192)
    assert limits.max_header_bytes == 56 * 512 + 65536 and limits.max_bytes == 256 * 1024
    assert limits.serve_dtype == getattr(torch, dtype)
    assert limits.parse_name(key(MOD, "A")) == (MOD, True)
    assert limits.check_config(base_config()) == []
    assert "pissa" in limits.check_config(base_config(init_lora_weights="pissa"))[0]
    assert "max_lora_rank" in limits.check_config(base_config(rank_pattern={"x": 9}))[0]
