"""Fuzzing ``vllm_safelora.adapters.read_adapter`` with hypothesis.

Valid adapter bytes (a real PEFT adapter for the tiny model) are mutated three ways:
raw bytes of the safetensors file, its JSON header (dtypes, shapes, offsets, entries,
length field), and adapter_config.json (random JSON values for the keys the reader
looks at, or random bytes). For every example:

* nothing but ``AdapterRefused`` escapes (a stray exception is a 500 in the server);
* it finishes within ``PER_EXAMPLE_S`` (SIGALRM: a hang fails the test instead of
  stalling CI; hypothesis' own deadline only measures examples that finish);
* Python-heap peak (tracemalloc) stays under ``PEAK_BYTES``: a header claiming
  gigabytes must not make the reader allocate them;
* an adapter the reader accepts is also taken through the compatibility check and the
  projection, which must refuse it or produce finite tensors.

CI runs ``SAFELORA_FUZZ_EXAMPLES`` (default 200) examples per strategy, well under a
minute; ``SAFELORA_FUZZ_EXAMPLES=20000 pytest tests/hardening/test_fuzz_reader.py`` for a
long run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hardening_support as hs
from support.server import MAX_LORA_RANK
from vllm_safelora.adapters import ReadLimits, read_adapter
from vllm_safelora.errors import AdapterRefused

EXAMPLES = int(os.environ.get("SAFELORA_FUZZ_EXAMPLES", "200"))
PER_EXAMPLE_S = 10
PEAK_BYTES = 32 << 20  # the valid adapter is ~30 KB; the limit below is 1 MiB
LIMITS = ReadLimits(max_bytes=1 << 20, max_rank=MAX_LORA_RANK)

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # enforced by SIGALRM below (covers hangs too)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
)


class _Hang(Exception):
    pass


@contextlib.contextmanager
def bounded(seconds: float):
    def on_alarm(signum, frame):
        raise _Hang(f"read_adapter did not finish within {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Fuzzer:
    def __init__(self, template: Path, aligned: str, bank):
        config, tensors = hs.load_template(template)
        config["base_model_name_or_path"] = aligned
        self.config = config
        self.config_bytes = json.dumps(config).encode()
        self.weights = hs.safetensors_bytes(hs.random_tensors(tensors, seed=5))
        (n,) = struct.unpack("<Q", self.weights[:8])
        self.header = json.loads(self.weights[8 : 8 + n])
        self.body = self.weights[8 + n :]
        self.names = sorted(k for k in self.header if k != "__metadata__")
        self.bank = bank
        self.dir = Path(tempfile.mkdtemp(prefix="safelora-fuzz-"))
        self.stats = {"examples": 0, "refused": 0, "accepted": 0, "projected_or_refused": 0}

    def check(self, config_bytes: bytes, weights_bytes: bytes) -> None:
        d = self.dir / "adapter"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        (d / hs.CONFIG).write_bytes(config_bytes)
        (d / hs.WEIGHTS).write_bytes(weights_bytes)
        self.stats["examples"] += 1
        tracemalloc.start()
        try:
            with bounded(PER_EXAMPLE_S):
                try:
                    adapter = read_adapter(d, name="fuzz", limits=LIMITS, confine_to=self.dir)
                except AdapterRefused:
                    self.stats["refused"] += 1
                    return
                self.stats["accepted"] += 1
                self._project(adapter)
            _, peak = tracemalloc.get_traced_memory()
            assert peak < PEAK_BYTES, f"reader peaked at {peak} bytes of Python heap"
        finally:
            tracemalloc.stop()

    def _project(self, adapter) -> None:
        from vllm_safelora.apply_policy import project_adapter
        from vllm_safelora.policies import SafeLoRAConfig

        try:
            outcome = project_adapter(adapter, self.bank, SafeLoRAConfig(select="all"), name="fuzz")
        except AdapterRefused:
            self.stats["projected_or_refused"] += 1
            return
        from safetensors.torch import load

        for k, t in load(outcome.adapter.weights_bytes).items():
            assert torch.isfinite(t).all(), f"projection of an accepted adapter produced non-finite values in {k}"
        self.stats["projected_or_refused"] += 1


@pytest.fixture(scope="module")
def fuzzer(hardening_world, tiny_bank):
    f = Fuzzer(hardening_world.template, str(hardening_world.aligned), tiny_bank)
    yield f
    print(f"\n[hardening] fuzz: {f.stats}")
    shutil.rmtree(f.dir, ignore_errors=True)


def test_valid_adapter_is_accepted(fuzzer):
    """The fuzz seeds themselves are valid (else every mutation is trivially refused)."""
    fuzzer.check(fuzzer.config_bytes, fuzzer.weights)
    assert fuzzer.stats["accepted"] == 1


# ---------------------------------------------------------------------------- raw bytes

byte_ops = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 512)),
        st.tuples(st.just("length"), st.integers(0, (1 << 64) - 1), st.just(0)),
    ),
    min_size=1,
    max_size=8,
)


def apply_byte_ops(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        if not b and op != "insert":
            continue
        p = pos % (len(b) + 1)
        if op == "flip" and p < len(b):
            b[p] ^= arg
        elif op == "truncate":
            del b[p:]
        elif op == "insert":
            b[p:p] = arg
        elif op == "delete":
            del b[p : p + arg]
        elif op == "length" and len(b) >= 8:
            b[:8] = struct.pack("<Q", pos)
    return bytes(b)


@FUZZ
@given(ops=byte_ops, where=st.sampled_from(["weights", "header-region", "config"]))
def test_fuzz_raw_bytes(fuzzer, ops, where):
    if where == "config":
        fuzzer.check(apply_byte_ops(fuzzer.config_bytes, ops), fuzzer.weights)
    elif where == "header-region":
        # Aim the mutations at the first 2 KB (length field and JSON header).
        head = apply_byte_ops(fuzzer.weights[:2048], [(op, pos % 2048, arg) for op, pos, arg in ops])
        fuzzer.check(fuzzer.config_bytes, head + fuzzer.weights[2048:])
    else:
        fuzzer.check(fuzzer.config_bytes, apply_byte_ops(fuzzer.weights, ops))


# ---------------------------------------------------------------------------- header

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)
dtypes = st.one_of(
    st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "X", ""]),
    json_values,
)
shapes = st.one_of(
    st.lists(st.integers(-4, 1 << 40), max_size=4), st.lists(st.integers(0, 300), max_size=3), json_values
)
offsets = st.one_of(
    st.lists(st.integers(-10, 1 << 62), min_size=2, max_size=2),
    st.lists(st.integers(0, 40000), min_size=0, max_size=3),
    json_values,
)

header_edits = st.lists(
    st.one_of(
        st.tuples(st.just("dtype"), st.integers(0, 99), dtypes),
        st.tuples(st.just("shape"), st.integers(0, 99), shapes),
        st.tuples(st.just("data_offsets"), st.integers(0, 99), offsets),
        st.tuples(st.just("entry"), st.integers(0, 99), json_values),
        st.tuples(st.just("drop"), st.integers(0, 99), st.none()),
        st.tuples(st.just("add"), st.integers(0, 99), st.tuples(st.text(max_size=60), json_values)),
        st.tuples(st.just("rename"), st.integers(0, 99), st.text(max_size=80)),
        st.tuples(st.just("metadata"), st.integers(0, 99), json_values),
    ),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(edits=header_edits, length_delta=st.sampled_from([0, 0, 0, -1, 1, 8, -8, 1 << 33]), body_cut=st.integers(0, 64))
def test_fuzz_header(fuzzer, edits, length_delta, body_cut):
    h = json.loads(json.dumps(fuzzer.header))
    for op, i, arg in edits:
        names = [k for k in h if k != "__metadata__"]
        name = names[i % len(names)] if names else None
        if op in ("dtype", "shape", "data_offsets") and name is not None and isinstance(h[name], dict):
            h[name][op] = arg
        elif op == "entry" and name is not None:
            h[name] = arg
        elif op == "drop" and name is not None:
            del h[name]
        elif op == "add":
            h[arg[0]] = arg[1]
        elif op == "rename" and name is not None:
            h[arg] = h.pop(name)
        elif op == "metadata":
            h["__metadata__"] = arg
    text = json.dumps(h, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    length = max(0, len(text) + length_delta) % (1 << 64)
    body = fuzzer.body[: len(fuzzer.body) - body_cut]
    fuzzer.check(fuzzer.config_bytes, struct.pack("<Q", length) + text + body)


# ---------------------------------------------------------------------------- config

CONFIG_KEYS = [
    "peft_type",
    "r",
    "lora_alpha",
    "use_dora",
    "modules_to_save",
    "fan_in_fan_out",
    "bias",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
    "base_model_name_or_path",
    "use_rslora",
    "target_modules",
    "exclude_modules",
]
pattern_dicts = st.dictionaries(
    st.one_of(
        st.sampled_from(["q_proj", "v_proj", "layers.1.self_attn.v_proj", "(.|.)*Z", "(a+)+$", "[", ""]),
        st.text(max_size=20),
    ),
    st.one_of(st.integers(-2, 20), st.floats(), st.text(max_size=3), st.none()),
    max_size=4,
)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(CONFIG_KEYS), st.one_of(json_values, pattern_dicts, st.integers(-3, 70))),
        min_size=1,
        max_size=5,
    ),
    drop=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2),
    raw=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_fuzz_config(fuzzer, edits, drop, raw):
    if raw is not None and len(raw) % 7 == 0:  # now and then, pure garbage
        fuzzer.check(raw, fuzzer.weights)
        return
    cfg = dict(fuzzer.config)
    for k, v in edits:
        cfg[k] = v
    for k in drop:
        cfg.pop(k, None)
    fuzzer.check(json.dumps(cfg).encode(), fuzzer.weights)


# ---------------------------------------------------------------------------- values


@FUZZ
@given(
    values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=6),
    which=st.integers(0, 7),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_fuzz_tensor_values(fuzzer, values, which, dtype):
    """Extreme but finite values (1e38, subnormals) must be refused or projected to finite values."""
    from safetensors.torch import load

    tensors = load(fuzzer.weights)
    key = sorted(tensors)[which % len(tensors)]
    flat = tensors[key].flatten().clone()
    flat[: len(values)] = torch.tensor(values, dtype=torch.float32)
    tensors[key] = flat.reshape(tensors[key].shape)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    fuzzer.check(fuzzer.config_bytes, hs.safetensors_bytes(tensors))
