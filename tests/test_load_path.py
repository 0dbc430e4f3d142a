"""The load path's worker-side read (verified_read) and the per-request overhead histogram.

Pure: vLLM's LoRA checkpoint loader runs on CPU tensors, no engine is started.
"""

from __future__ import annotations

import asyncio
import json
import types
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import save, save_file

from vllm_safelora.adapters import CONFIG_FILE, WEIGHTS_FILE, SerializedAdapter, write_adapter_files
from vllm_safelora.cache import CorruptEntry, PatchedAdapterCache, read_verified, verify_entry
from vllm_safelora.integration import patches, state, verified_read

from test_cache import key


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(2):
        base = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        out[f"{base}.lora_A.weight"] = torch.randn(4, 16, generator=g, dtype=torch.float32).to(torch.float16)
        out[f"{base}.lora_B.weight"] = torch.randn(16, 4, generator=g, dtype=torch.float32).to(torch.float16)
    return out


def _entry(tmp_path: Path, tensors: dict[str, torch.Tensor]):
    config = json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"}).encode()
    adapter = SerializedAdapter(config, save(tensors, metadata={"format": "pt"}), {})
    cache = PatchedAdapterCache(tmp_path / "cache", 10**9)
    entry, _ = cache.get_or_create(key(), lambda tmp: write_adapter_files(tmp, adapter))
    return entry


def test_verified_safetensors_matches_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = _tensors()
    save_file(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    buf = bytearray((tmp_path / "w.safetensors").read_bytes())  # any buffer; the guard passes an mmap
    with safe_open(tmp_path / "w.safetensors", framework="pt") as real, verified_read.VerifiedSafetensors(buf) as ours:
        assert ours.keys() == sorted(real.keys()) and ours.metadata() == real.metadata()
        for name in real.keys():  # noqa: SIM118 (safe_open handles are not dicts)
            assert torch.equal(ours.get_tensor(name), real.get_tensor(name))
            assert ours.get_tensor(name).dtype == torch.float16


def test_read_verified_refuses_altered_bytes(tmp_path):
    entry = _entry(tmp_path, _tensors())
    assert bytes(read_verified(entry, WEIGHTS_FILE)) == (entry.path / WEIGHTS_FILE).read_bytes()
    weights = entry.path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    # Sizes still match: only the hash catches it.
    verify_entry(entry.path, hashed_by_caller=frozenset({WEIGHTS_FILE}))
    with pytest.raises(CorruptEntry, match="blake3"):
        read_verified(entry, WEIGHTS_FILE)


def test_vllm_reads_the_verified_bytes_not_the_file(tmp_path):
    """While serving(), vLLM's from_local_checkpoint gets the verified bytes, even if the
    file on disk changed after the check: nothing can be swapped in between."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    verified_read.install()
    entry = _entry(tmp_path, _tensors(0))
    verified = read_verified(entry, WEIGHTS_FILE)
    weights = entry.path / WEIGHTS_FILE
    weights.chmod(0o644)
    save_file(_tensors(1), weights, metadata={"format": "pt"})  # what an attacker swaps in after the check
    helper = PEFTHelper.from_dict(
        {**json.loads((entry.path / CONFIG_FILE).read_text()), "vllm_max_position_embeddings": 128}
    )

    def load():
        return LoRAModel.from_local_checkpoint(str(entry.path), {"q_proj"}, helper, lora_model_id=1, device="cpu")

    with verified_read.serving(weights, verified) as pending:
        lora = load()
    assert pending.served
    expected = _tensors(0)
    got = lora.loras["model.layers.0.self_attn.q_proj"]
    assert torch.equal(got.lora_a, expected["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    # Outside serving() vLLM reads the file as usual.
    swapped = load().loras["model.layers.0.self_attn.q_proj"]
    assert torch.equal(swapped.lora_a, _tensors(1)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


# ----------------------------------------------------------------------------- per-request overhead


def _count(hook: str) -> float:
    return REGISTRY.get_sample_value("safelora_request_overhead_seconds_count", {"hook": hook}) or 0.0


class _Service:
    """Stands in for SafeLoRAService: the adapter is already prepared at ``path``."""

    def __init__(self, path: str):
        self.prepared = types.SimpleNamespace(path=Path(path), signature=())
        self.marked = []
        # authentication off: every caller may name the adapter (add_request asks)
        self.settings = types.SimpleNamespace(auth=types.SimpleNamespace(enabled=False), shared_adapters=[])

    def verified(self, lora_path):
        return self.prepared if lora_path == str(self.prepared.path) else None

    def mark_loaded(self, name, prepared):
        self.marked.append(name)

    def ensure(self, name, lora_path):  # pragma: no cover - the prepared path never gets here
        raise AssertionError("an already prepared adapter must not be prepared again")


def test_request_overhead_is_observed_for_prepared_adapters(monkeypatch):
    from vllm.lora.request import LoRARequest

    svc = _Service("/cache/entries/" + "a" * 64)
    monkeypatch.setattr(state, "_service", svc)
    seen = []

    class InputProcessor:
        def process_inputs(self, request_id, prompt, params, lora_request=None):
            seen.append(lora_request.lora_path if lora_request else None)
            return "processed"

    class AsyncLLM:
        async def add_request(self, request_id, prompt, params, lora_request=None):
            seen.append(lora_request.lora_path if lora_request else None)
            return "queued"

    patches._wrap_process_inputs(InputProcessor)
    patches._wrap_async_add_request(AsyncLLM)
    lora = LoRARequest(lora_name="t/a", lora_int_id=1, lora_path=str(svc.prepared.path))
    before = _count("process_inputs"), _count("add_request")
    sum_before = REGISTRY.get_sample_value("safelora_request_overhead_seconds_sum", {"hook": "process_inputs"}) or 0.0

    assert InputProcessor().process_inputs("r1", "hi", None, lora_request=lora) == "processed"
    assert asyncio.run(AsyncLLM().add_request("r2", "hi", None, lora_request=lora)) == "queued"
    assert InputProcessor().process_inputs("r3", "hi", None) == "processed"  # no adapter: nothing observed

    assert (_count("process_inputs"), _count("add_request")) == (before[0] + 1, before[1] + 1)
    spent = REGISTRY.get_sample_value("safelora_request_overhead_seconds_sum", {"hook": "process_inputs"}) - sum_before
    assert 0 < spent < 0.1
    assert seen == [str(svc.prepared.path)] * 2 + [None] and svc.marked == ["t/a"]


# ----------------------------------------------------------------------------- update bounds, fast form


def _update_problems_reference(A, B, scale, limits):
    """The bound check as it was before the one-reduction form (full-size float64 copies)."""
    from vllm_safelora.adapters.bounds import max_abs_update, update_limit

    dtype = limits.serve_dtype or A.dtype
    if not (torch.isfinite(A.to(dtype)).all() and torch.isfinite(B.to(dtype) * scale).all()):
        return ["non-finite"]
    limit = update_limit(dtype, int(A.shape[1]), limits)
    problems = []
    if float(A.double().abs().max()) > limit:
        problems.append("lora_A")
    A64, B64 = A.double(), B.double()
    if (
        abs(scale) * float(B64.norm(dim=1).max()) * float(A64.norm(dim=0).max()) > limit
        and max_abs_update(A64, B64, scale) > limit
    ):
        problems.append("update")
    return problems


def test_fast_update_bounds_decide_as_the_full_precision_check():
    import random

    from vllm_safelora.adapters import ReadLimits
    from vllm_safelora.adapters.bounds import update_problems

    rng = random.Random(0)
    torch.manual_seed(0)
    seen = set()
    for _ in range(400):
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
        limits = ReadLimits(serve_dtype=rng.choice([None, torch.float16, torch.bfloat16, torch.float32]))
        d_in, d_out, r = rng.choice([8, 64, 300]), rng.choice([8, 64, 300]), rng.choice([1, 4, 16])
        mag = 10 ** rng.uniform(-3, 6)
        A = (torch.randn(r, d_in) * mag / 10).to(dtype)
        B = (torch.randn(d_out, r) * mag).to(dtype)
        if rng.random() < 0.1:
            A.view(-1)[rng.randrange(A.numel())] = rng.choice([float("nan"), float("inf")])
        if rng.random() < 0.1:
            B.view(-1)[rng.randrange(B.numel())] = rng.choice([float("nan"), -float("inf"), 70000.0])
        scale = rng.choice([0.5, 2.0, 16.0, 1e4, -3.0])
        expected = _update_problems_reference(A, B, scale, limits)
        got = update_problems("m", A, B, scale, limits)
        kinds = ["non-finite" if "not finite" in p else "lora_A" if "|lora_A|" in p else "update" for p in got]
        assert kinds == expected, (dtype, limits.serve_dtype, scale, got)
        seen.update(expected or ["ok"])
    assert seen == {"ok", "non-finite", "lora_A", "update"}
