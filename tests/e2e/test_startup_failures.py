"""Fail closed at start-up: a misconfigured plugin stops the real API server before it
loads the model, with a message that says what to fix.

The four starts run concurrently (each only imports vLLM and exits), so together they
cost about one start.
"""

from __future__ import annotations

import shutil

import pytest
from support.server import run_startups

pytestmark = pytest.mark.e2e

TIMEOUT_S = 240
# vLLM logs these once it gets as far as loading the model; a fail-closed start never does.
MODEL_LOAD_MARKERS = ("Model loading took", "Loading weights took", "Starting to load model")

CASES = {
    # case: (fragments the output must contain, all of them)
    "no_config": ("not configured", "VLLM_SAFELORA_CONFIG", "Refusing to serve adapters unprotected"),
    "bank_missing": ("no alignment bank at", "vllm-safelora build-bank"),
    "bank_corrupt": ("is corrupt", "bank.safetensors", "rebuild the bank"),
    "bank_other_model": ("was built for aligned model", "Build a bank for the served model"),
}


@pytest.fixture(scope="module")
def startup_failures(e2e_world, tmp_path_factory):
    work = tmp_path_factory.mktemp("startup_failures")
    w = e2e_world

    corrupt_bank = work / "corrupt-bank"
    shutil.copytree(w.bank, corrupt_bank)
    tensors = corrupt_bank / "bank.safetensors"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the tensor data, header intact
    tensors.write_bytes(bytes(data))

    configs = {
        "no_config": None,
        "bank_missing": w.config(work / "missing.yaml", work / "cache-missing", bank=work / "no-such-bank"),
        "bank_corrupt": w.config(work / "corrupt.yaml", work / "cache-corrupt", bank=corrupt_bank),
        "bank_other_model": w.config(work / "other.yaml", work / "cache-other", bank=w.other_bank),
    }

    return run_startups(w.aligned, configs, work, TIMEOUT_S, workers=len(configs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_misconfigured_server_refuses_to_start(startup_failures, case):
    rc, out, secs = startup_failures[case]
    tail = "\n".join(out.splitlines()[-40:])
    assert rc is not None, f"{case}: server still running after {TIMEOUT_S}s (did not fail closed):\n{tail}"
    assert rc != 0, f"{case}: exited 0:\n{tail}"
    for fragment in CASES[case]:
        assert fragment in out, f"{case}: {fragment!r} not in the output:\n{tail}"
    for marker in MODEL_LOAD_MARKERS:
        assert marker not in out, f"{case}: the server got as far as loading the model ({marker!r}):\n{tail}"
    assert "Application startup complete" not in out
    print(f"[e2e] {case}: exit {rc} after {secs:.1f}s")
