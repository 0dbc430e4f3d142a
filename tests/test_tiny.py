"""Tests for vllm_safelora.tiny: tiny local models and PEFT adapters."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_safelora.tiny import (
    LINEAR_MODULES,
    TINY_LLAMA_CONFIG,
    TinyModels,
    alignment_deltas,
    load_state_dict,
    make_tiny_adapter,
    make_tiny_models,
    safelora_cosine,
)

pytest.importorskip("transformers")
pytest.importorskip("peft")


def _digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


def _lora_pairs(adapter_dir: Path):
    """Yield (hf_module_name, lora_A, lora_B) from a saved adapter."""
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for k in sorted(sd):
        if k.endswith("lora_A.weight"):
            mod = k[: -len(".lora_A.weight")].removeprefix("base_model.model.")
            yield mod, sd[k], sd[k.replace("lora_A", "lora_B")]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> TinyModels:
    return make_tiny_models(tmp_path_factory.mktemp("tiny") / "models")


@pytest.fixture(scope="module")
def deltas(models):
    return alignment_deltas(models.aligned, models.base)


def test_files_and_config(models):
    for d in (models.base, models.aligned):
        for f in (
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ):
            assert (d / f).is_file(), f
        cfg = json.loads((d / "config.json").read_text())
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            assert cfg[k] == TINY_LLAMA_CONFIG[k]
        assert cfg["tie_word_embeddings"] is False
        assert cfg["head_dim"] == 64
        assert 200 <= cfg["vocab_size"] <= 1024
        tcfg = json.loads((d / "tokenizer_config.json").read_text())
        assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_deterministic_models(models, tmp_path):
    again = make_tiny_models(tmp_path / "again")
    assert _digest(models.base) == _digest(again.base)
    assert _digest(models.aligned) == _digest(again.aligned)
    other = make_tiny_models(tmp_path / "other", seed=1)
    assert _digest(other.base)["model.safetensors"] != _digest(models.base)["model.safetensors"]


def test_tokenizer_deterministic_across_processes(models, tmp_path):
    # Rust hash maps are randomly seeded per process: make sure BPE training is not affected.
    code = (
        "from pathlib import Path; from vllm_safelora.tiny import make_tiny_tokenizer;"
        f"make_tiny_tokenizer(Path({str(tmp_path / 'tok')!r}))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (models.base / "tokenizer.json").read_bytes()


def test_alignment_delta_structure(models, deltas):
    a, b = load_state_dict(models.aligned), load_state_dict(models.base)
    assert a.keys() == b.keys()
    for k in a:
        if any(k.endswith(f".{m}.weight") for m in LINEAR_MODULES):
            assert not torch.equal(a[k], b[k]), k
        else:
            assert torch.equal(a[k], b[k]), k
    n_layers = TINY_LLAMA_CONFIG["num_hidden_layers"]
    assert len(deltas) == n_layers * len(LINEAR_MODULES)
    shapes = {
        "q_proj": (128, 128),
        "k_proj": (64, 128),
        "v_proj": (64, 128),
        "o_proj": (128, 128),
        "gate_proj": (256, 128),
        "up_proj": (256, 128),
        "down_proj": (128, 256),
    }
    for name, v in deltas.items():
        assert tuple(v.shape) == shapes[name.rsplit(".", 1)[1]]
        s = torch.linalg.svdvals(v.double())
        # decaying spectrum: top 4 halve, then a much smaller tail, but full rank
        assert torch.allclose(s[1:4] / s[:3], torch.full((3,), 0.5, dtype=torch.float64), rtol=1e-3)
        assert s[4] < 1e-2 * s[3]
        assert s[-1] > 0


def test_models_load_and_generate(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.aligned))
    assert tok.bos_token and tok.eos_token and tok.pad_token and tok.unk_token
    ids = tok("Hello, the cat can read a book.", return_tensors="pt")
    assert ids.input_ids[0, 0].item() == tok.bos_token_id
    assert tok.decode(ids.input_ids[0], skip_special_tokens=True) == "Hello, the cat can read a book."
    chat = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<s><|user|> hello\n<|assistant|>"
    outs = []
    for d in (models.base, models.aligned):
        model = AutoModelForCausalLM.from_pretrained(str(d))
        with torch.no_grad():
            logits = model(**ids).logits
            assert torch.isfinite(logits).all()
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids.input_ids.shape[1]
        outs.append(logits)
    assert not torch.allclose(outs[0], outs[1])


def test_adapter_loads_with_peft(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad = make_tiny_adapter(models.aligned, tmp_path / "rand", seed=3)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(models.aligned)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(str(models.aligned))
    x = torch.tensor([[1, 10, 20, 30, 40]])
    with torch.no_grad():
        ref = base(x).logits
    pm = PeftModel.from_pretrained(base, str(ad))
    saved = {m: (a, b) for m, a, b in _lora_pairs(ad)}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            a, b = saved[name.removeprefix("base_model.model.")]
            assert torch.equal(mod.lora_A["default"].weight, a)
            assert torch.equal(mod.lora_B["default"].weight, b)
    with torch.no_grad():
        out = pm(x).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    # deterministic
    again = make_tiny_adapter(models.aligned, tmp_path / "rand2", seed=3)
    assert _digest(ad) == _digest(again)


def test_update_scale(models, tmp_path):
    a_sd = load_state_dict(models.aligned)
    ad = make_tiny_adapter(models.aligned, tmp_path / "s", scale=0.5, alpha=32, rank=4)
    for mod, a, b in _lora_pairs(ad):
        dw = (32 / 4) * b.double() @ a.double()
        rel = torch.linalg.norm(dw) / torch.linalg.norm(a_sd[mod + ".weight"].double())
        assert abs(rel.item() - 0.5) < 1e-3


def test_cosine_aligned_vs_orthogonal(models, deltas, tmp_path):
    al = make_tiny_adapter(
        models.aligned, tmp_path / "al", direction="aligned", base_dir=models.base, target_modules=LINEAR_MODULES
    )
    orth = make_tiny_adapter(
        models.aligned, tmp_path / "or", direction="orthogonal", base_dir=models.base, target_modules=LINEAR_MODULES
    )
    cos_al = {m: safelora_cosine(deltas[m], b, a) for m, a, b in _lora_pairs(al)}
    cos_or = {m: safelora_cosine(deltas[m], b, a) for m, a, b in _lora_pairs(orth)}
    assert len(cos_al) == len(cos_or) == len(deltas)
    assert min(cos_al.values()) > 0.6, cos_al
    assert max(cos_or.values()) < 0.3, cos_or
    # orthogonal: B is orthogonal to the top delta_rank left singular vectors of V
    for m, _a, b in _lora_pairs(orth):
        u = torch.linalg.svd(deltas[m].double(), full_matrices=False)[0][:, :4]
        assert torch.linalg.norm(u.T @ b.double()) < 1e-5 * torch.linalg.norm(b.double())


def test_safelora_cosine_matches_reference_formula(deltas):
    g = torch.Generator().manual_seed(0)
    v = deltas["model.layers.0.self_attn.v_proj"]
    b, a = torch.randn(64, 8, generator=g), torch.randn(8, 128, generator=g)
    c = v @ v.T / torch.linalg.norm(v)
    x, y = (c @ b @ a).flatten(), (b @ a).flatten()
    ref = torch.nn.functional.cosine_similarity(x, y, dim=0).item()
    assert abs(safelora_cosine(v, b, a) - ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_cast(models, tmp_path, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad32 = make_tiny_adapter(models.aligned, tmp_path / "f32")
    ad = make_tiny_adapter(models.aligned, tmp_path / "cast", dtype=dtype)
    sd32 = load_file(str(ad32 / "adapter_model.safetensors"))
    sd = load_file(str(ad / "adapter_model.safetensors"))
    assert sd.keys() == sd32.keys()
    for k in sd:
        assert sd[k].dtype == dtype
        assert torch.equal(sd[k], sd32[k].to(dtype))
    base = AutoModelForCausalLM.from_pretrained(str(models.aligned))
    PeftModel.from_pretrained(base, str(ad))


def test_rank_and_alpha_pattern(models, tmp_path):
    ad = make_tiny_adapter(
        models.aligned,
        tmp_path / "rp",
        rank=8,
        alpha=16,
        target_modules=("q_proj", "v_proj", "down_proj"),
        rank_pattern={"v_proj": 4, "model.layers.1.self_attn.q_proj": 2},
        alpha_pattern={"down_proj": 4},
        use_rslora=True,
    )
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["rank_pattern"] and cfg["alpha_pattern"]
    ranks = {m: a.shape[0] for m, a, _ in _lora_pairs(ad)}
    assert ranks["model.layers.0.self_attn.q_proj"] == 8
    assert ranks["model.layers.1.self_attn.q_proj"] == 2
    assert ranks["model.layers.0.self_attn.v_proj"] == 4
    assert ranks["model.layers.1.self_attn.v_proj"] == 4
    assert ranks["model.layers.0.mlp.down_proj"] == 8
    for _m, a, b in _lora_pairs(ad):
        assert b.shape[1] == a.shape[0]


def test_bad_arguments(models, tmp_path):
    with pytest.raises(ValueError):
        make_tiny_adapter(models.aligned, tmp_path / "x", direction="aligned")
    with pytest.raises(ValueError):
        make_tiny_adapter(models.aligned, tmp_path / "x", direction="sideways")
