"""Fail-closed start-up, the cases tests/e2e/test_startup_failures.py does not cover.

(There: no config, missing bank, corrupt bank, bank for another model.) Here: a cache
directory that cannot be created (a path under a regular file), bad policy values, an
unknown key, invalid YAML, a missing adapter directory, a zero size limit, a bogus
device, and authentication set up so it could not hold (no keys file, vLLM's own key as
well, the routes plugin left out, an upload root that is not served). Each real API server must exit non-zero quickly, before loading the model, with
a message that names what to fix. The starts run concurrently (each only imports vLLM).
"""

from __future__ import annotations

import pytest

from support.server import run_startups

pytestmark = pytest.mark.e2e

TIMEOUT_S = 240
FAST_S = 180  # "fast": well under a normal start-up plus model load on this machine
MODEL_LOAD_MARKERS = ("Model loading took", "Loading weights took", "Starting to load model")

# case: (config overrides, or raw YAML text; fragments the output must contain)
CASES = {
    "cache_dir_under_file": (
        {"cache_dir": "{file}/sub"},
        ("patched-adapter cache directory", "cannot be created", "make it writable"),
    ),
    "threshold_out_of_range": (
        {"policy": {"select": "threshold", "threshold": 2.0}},
        ("invalid vllm-safelora configuration", "threshold", "less than or equal to 1"),
    ),
    "select_bogus": (
        {"policy": {"select": "bogus"}},
        ("invalid vllm-safelora configuration", "select", "'threshold', 'topk' or 'all'"),
    ),
    "unknown_key": (
        {"polcy": {"select": "all"}},
        ("invalid vllm-safelora configuration", "polcy", "Extra inputs are not permitted"),
    ),
    "invalid_yaml": (
        "bank: [unclosed\n  cache_dir: {\n",
        ("cannot read vllm-safelora configuration", "expected ',' or ']'"),
    ),
    "adapter_dir_missing": (
        {"adapter_dirs": ["{work}/no-such-adapter-dir"]},
        ("adapter directory", "does not exist", "create it"),
    ),
    "max_adapter_bytes_zero": (
        {"max_adapter_bytes": 0},
        ("invalid vllm-safelora configuration", "max_adapter_bytes", "greater than 0"),
    ),
    "device_bogus": (
        {"device": "tpu"},
        ("invalid vllm-safelora configuration", "device must be auto, cpu, cuda or cuda:N"),
    ),
    "auth_without_keys_file": (
        {"auth": {"enabled": True}},
        ("auth.enabled needs auth.keys_file", "issue-key --admin"),
    ),
    "auth_keys_file_missing": (
        {"auth": {"enabled": True, "keys_file": "{work}/no-keys.yaml"}},
        ("no-keys.yaml does not exist", "issue-key --admin"),
    ),
    "auth_upload_root_not_served": (
        {"auth": {"enabled": True, "keys_file": "{work}/keys.yaml", "upload_root": "{work}"}},
        ("auth.upload_root", "is not one of adapter_dirs"),
    ),
    "auth_and_vllm_api_key": (
        {"auth": {"enabled": True, "keys_file": "{work}/keys.yaml"}},
        ("auth.enabled and vLLM's --api-key (or VLLM_API_KEY) are both set", "unset vLLM's key"),
    ),
    "auth_and_vllm_api_key_env": (
        {"auth": {"enabled": True, "keys_file": "{work}/keys.yaml"}},
        ("auth.enabled and vLLM's --api-key (or VLLM_API_KEY) are both set",),
    ),
    "auth_without_routes_plugin": (
        {"auth": {"enabled": True, "keys_file": "{work}/keys.yaml"}},
        ("auth.enabled needs the routes plugin", "safelora_routes"),
    ),
}
EXTRA_ARGS = {"auth_and_vllm_api_key": ["--api-key", "one-key-for-everyone"]}
EXTRA_ENV = {
    "auth_and_vllm_api_key_env": {"VLLM_API_KEY": "one-key-for-everyone"},
    "auth_without_routes_plugin": {"VLLM_PLUGINS": "safelora"},
}


def _fill(value, **subst):
    if isinstance(value, str):
        return value.format(**subst)
    if isinstance(value, list):
        return [_fill(v, **subst) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, **subst) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def startups(hardening_world, tmp_path_factory):
    work = tmp_path_factory.mktemp("fail_closed")
    a_file = work / "a-regular-file"
    a_file.write_text("not a directory\n")
    from vllm_safelora.serving.credentials import issue_key

    issue_key(work / "keys.yaml", "ops", "admin")
    configs = {}
    for case, (doc, _) in CASES.items():
        path = work / f"{case}.yaml"
        if isinstance(doc, str):
            path.write_text(doc)
        else:
            overrides = _fill(doc, file=a_file, work=work)
            cache_dir = overrides.pop("cache_dir", work / f"cache-{case}")
            hardening_world.config(path, cache_dir, **overrides)
        configs[case] = path

    return run_startups(
        hardening_world.aligned,
        {case: configs[case] for case in CASES},
        work,
        TIMEOUT_S,
        extra_args=EXTRA_ARGS,
        extra_env=EXTRA_ENV,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_configuration_stops_the_server(startups, case):
    rc, out, secs = startups[case]
    tail = "\n".join(out.splitlines()[-30:])
    assert rc is not None, f"{case}: still running after {TIMEOUT_S}s (did not fail closed):\n{tail}"
    assert rc != 0, f"{case}: exited 0:\n{tail}"
    for fragment in CASES[case][1]:
        assert fragment in out, f"{case}: {fragment!r} not in the output:\n{tail}"
    for marker in MODEL_LOAD_MARKERS:
        assert marker not in out, f"{case}: got as far as loading the model ({marker!r}):\n{tail}"
    assert "Application startup complete" not in out
    assert secs < FAST_S, f"{case}: took {secs:.0f}s to fail"
    print(f"[hardening] fail-closed {case}: exit {rc} after {secs:.1f}s")
