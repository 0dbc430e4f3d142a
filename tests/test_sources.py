"""Adapter sources: name validation, path containment, hub resolution from a local cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_safelora.errors import AdapterRefused, ConfigError, RefusalReason
from vllm_safelora.sources import (
    HubSource,
    LocalDirSource,
    locate_adapter,
    validate_adapter_name,
)


def _make_adapter(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (d / "adapter_model.safetensors").write_bytes(b"not really tensors")
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "adapters"
    _make_adapter(r / "plain")
    _make_adapter(r / "acme" / "lora-1.v2_x")
    (r / "a_file").write_text("not a dir")
    return r


# ---------------------------------------------------------------- local names

GOOD = ["plain", "acme/lora-1.v2_x", "A", "x" * 64, "t" * 64 + "/" + "a" * 64, "a.b", "9-z_"]

BAD = [
    "",
    "..",
    ".",
    "../x",
    "a/../b",
    "a/..",
    "a..b",
    "/etc/passwd",
    "/plain",
    "plain/",
    "a//b",
    "a/b/c",
    "%2e%2e",
    "%2e%2e/%2fetc",
    "..%2fetc",
    "a\0b",
    "plain\0",
    "plain\n",
    "a\tb",
    "a\\b",
    "..\\..\\windows",
    "x" * 65,
    "t" * 65 + "/a",
    "a" * 200,
    ".hidden",
    "-rf",
    "_x",
    "a b",
    "a:b",
    "hub:acme/x",
    "é",
    "plain\u2044x",  # fraction slash, a look-alike
    "~root",
    "a*",
]


@pytest.mark.parametrize("name", GOOD)
def test_valid_local_names(name):
    validate_adapter_name(name)


@pytest.mark.parametrize("name", BAD)
def test_invalid_local_names_refused(name, root):
    with pytest.raises(AdapterRefused) as ei:
        validate_adapter_name(name)
    assert ei.value.reason is RefusalReason.INVALID_NAME
    with pytest.raises(AdapterRefused) as ei:
        LocalDirSource(root).locate(name)
    assert ei.value.reason is RefusalReason.INVALID_NAME
    # Control characters never reach the message unescaped.
    assert "\0" not in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("name", [None, 3, b"plain", Path("plain")])
def test_non_string_names_refused(name):
    with pytest.raises(AdapterRefused) as ei:
        validate_adapter_name(name)
    assert ei.value.reason is RefusalReason.INVALID_NAME


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=140))
def test_any_accepted_name_stays_inside_root(name):
    try:
        validate_adapter_name(name)
    except AdapterRefused as exc:
        assert exc.reason is RefusalReason.INVALID_NAME
        return
    root = "/srv/adapters"
    joined = os.path.normpath(os.path.join(root, *name.split("/")))
    assert joined.startswith(root + "/")
    assert name.isascii() and ".." not in name and len(name.split("/")) <= 2


# ---------------------------------------------------------------- local source


def test_local_locate(root):
    src = LocalDirSource(root)
    assert src.locate("plain") == root / "plain"
    assert src.locate("acme/lora-1.v2_x") == root / "acme" / "lora-1.v2_x"
    assert src.locate("missing") is None
    assert src.locate("acme/missing") is None
    assert src.locate("nobody/missing") is None


def test_local_target_must_be_directory(root):
    with pytest.raises(AdapterRefused) as ei:
        LocalDirSource(root).locate("a_file")
    assert ei.value.reason is RefusalReason.NOT_FOUND
    assert "not a directory" in ei.value.detail


def test_symlink_out_of_root_refused(root, tmp_path):
    outside = _make_adapter(tmp_path / "outside" / "secret")
    (root / "escape").symlink_to(outside)
    (root / "acme" / "escape").symlink_to(outside)
    (root / "evil").symlink_to(tmp_path / "outside")  # a namespace dir pointing outside
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    src = LocalDirSource(root)
    for name in ["escape", "acme/escape", "evil/secret", "dangling"]:
        with pytest.raises(AdapterRefused) as ei:
            src.locate(name)
        assert ei.value.reason is RefusalReason.OUTSIDE_NAMESPACE, name
        assert "outside" in ei.value.detail


def test_symlink_to_root_itself_refused(root):
    (root / "self").symlink_to(root)
    with pytest.raises(AdapterRefused) as ei:
        LocalDirSource(root).locate("self")
    assert ei.value.reason is RefusalReason.OUTSIDE_NAMESPACE


def test_symlink_inside_namespace_ok_into_another_refused(root):
    (root / "acme" / "current").symlink_to(root / "acme" / "lora-1.v2_x")
    (root / "acme" / "rel").symlink_to("lora-1.v2_x")
    (root / "alias").symlink_to("acme")  # a namespace that is a link to another tenant's
    src = LocalDirSource(root)
    target = root / "acme" / "lora-1.v2_x"
    assert src.locate("acme/current") == target
    assert src.locate("acme/rel") == target
    assert src.location("acme/current", target).identity == "acme/lora-1.v2_x"
    with pytest.raises(AdapterRefused) as ei:
        src.locate("alias/lora-1.v2_x")
    assert ei.value.reason is RefusalReason.OUTSIDE_NAMESPACE


def test_root_itself_a_symlink(tmp_path, root):
    link = tmp_path / "link-root"
    link.symlink_to(root)
    src = LocalDirSource(link)
    assert src.locate("plain") == link / "plain"
    assert src.location("plain", src.locate("plain")).identity == "plain"


def test_missing_root_is_config_error(tmp_path):
    with pytest.raises(ConfigError):
        LocalDirSource(tmp_path / "nope")


# ---------------------------------------------------------------- hub source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hand_built_hub_cache(cache: Path, repo_id: str, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """The hub cache layout: models--org--repo/{blobs,snapshots/<commit>,refs/<ref>}."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    blobs = repo_dir / "blobs"
    blobs.mkdir()
    # Real caches symlink snapshot files to blobs; reproduce that for one file.
    (blobs / "deadbeef").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (snap / "adapter_config.json").symlink_to(Path("..", "..", "blobs", "deadbeef"))
    (snap / "adapter_model.safetensors").write_bytes(b"weights")
    if ref:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / ref).write_text(commit)
    return snap


def test_hub_offline_from_hand_built_cache(tmp_path):
    cache = tmp_path / "hub"
    snap = _hand_built_hub_cache(cache, "acme/my-lora")
    src = HubSource(cache_dir=cache, local_files_only=True, allow=["acme/*"])
    path = src.locate("hub:acme/my-lora")
    assert path == snap
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert src.locate("hub:acme/other") is None
    # pinned commit and a tag that is not cached
    assert (
        HubSource(cache_dir=cache, local_files_only=True, allow=["acme/*"], revision=COMMIT).locate("hub:acme/my-lora")
        == snap
    )
    assert (
        HubSource(cache_dir=cache, local_files_only=True, allow=["acme/*"], revision="v9").locate("hub:acme/my-lora")
        is None
    )


def test_hub_offline_via_hf_hub_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snap = _hand_built_hub_cache(cache, "acme/my-lora")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    src = HubSource(cache_dir=cache, allow=["*"])  # local_files_only=None: follow HF_HUB_OFFLINE
    assert src.locate("hub:acme/my-lora") == snap
    assert src.locate("hub:acme/not-cached") is None


def test_hub_through_locate_adapter(tmp_path, root):
    cache = tmp_path / "hub"
    snap = _hand_built_hub_cache(cache, "acme/my-lora")
    local, hub = LocalDirSource(root), HubSource(cache_dir=cache, local_files_only=True, allow=["acme/*"])
    assert locate_adapter([local, hub], "hub:acme/my-lora") == (hub, snap)
    assert locate_adapter([local, hub], "plain") == (local, Path(os.path.realpath(root / "plain")))
    with pytest.raises(AdapterRefused) as ei:
        locate_adapter([local, hub], "hub:acme/missing")
    assert ei.value.reason is RefusalReason.NOT_FOUND
    assert "Hugging Face hub" in ei.value.detail and ei.value.adapter == "hub:acme/missing"
    with pytest.raises(AdapterRefused) as ei:
        locate_adapter([local, hub], "missing")
    assert ei.value.reason is RefusalReason.NOT_FOUND and "local directory" in ei.value.detail


@pytest.mark.parametrize(
    "name",
    [
        "acme/my-lora",  # no prefix
        "hub:my-lora",  # no org
        "hub:a/b/c",
        "hub:../etc",
        "hub:acme/..",
        "hub:acme/a--b",
        "hub:acme/x.git",
        "hub:acme/%2e%2e",
        "hub:acme/é",
        "hub:acme/x\0",
        "hub:acme/x\n",
        "hub:/acme/x",
        "hub:acme\\x",
        "hub:" + "a" * 100 + "/x",
        "hub:evil/lora",  # not in the allow-list
    ],
)
def test_hub_names_refused(tmp_path, name):
    src = HubSource(cache_dir=tmp_path, local_files_only=True, allow=["acme/*", "ACME2/*"])
    with pytest.raises(AdapterRefused) as ei:
        src.locate(name)
    assert ei.value.reason is RefusalReason.INVALID_NAME


def test_hub_allow_list_case_insensitive(tmp_path):
    src = HubSource(cache_dir=tmp_path, local_files_only=True, allow=["acme2/*"])
    assert src.repo_id("hub:ACME2/x") == "ACME2/x"


def test_hub_allow_must_be_list():
    with pytest.raises(ConfigError):
        HubSource(allow="acme/*")


def _http_error(cls, status=404):
    import httpx2

    return cls("boom", response=httpx2.Response(status, request=httpx2.Request("GET", "https://hub.invalid/x")))


def test_hub_error_mapping(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors as e

    src = HubSource(cache_dir=tmp_path, revision="nope", local_files_only=False, allow=["*"])

    def raising(exc):
        def fake(*a, **k):
            raise exc

        return fake

    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(_http_error(e.RepositoryNotFoundError)))
    assert src.locate("hub:acme/x") is None
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(e.LocalEntryNotFoundError("not cached")))
    assert src.locate("hub:acme/x") is None
    for exc in [
        _http_error(e.RevisionNotFoundError),
        _http_error(e.GatedRepoError, 401),
        _http_error(e.HfHubHTTPError, 500),
        e.IncompleteSnapshotError("partial", snapshot_path=str(tmp_path)) if _takes_snapshot_path() else None,
    ]:
        if exc is None:
            continue
        monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(exc))
        with pytest.raises(AdapterRefused) as ei:
            src.locate("hub:acme/x")
        assert ei.value.reason is RefusalReason.NOT_FOUND
        assert "acme/x" in ei.value.detail


def _takes_snapshot_path() -> bool:
    import inspect

    from huggingface_hub import errors as e

    return "snapshot_path" in inspect.signature(e.IncompleteSnapshotError.__init__).parameters


def test_hub_passes_expected_arguments(tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    src = HubSource(prefix="hf://", revision="v1", cache_dir=tmp_path, local_files_only=True, token="t", allow=["*"])
    assert src.locate("hf://acme/x") == tmp_path
    assert seen["repo_id"] == "acme/x" and seen["revision"] == "v1" and seen["local_files_only"] is True
    assert set(seen["allow_patterns"]) == {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}
    assert seen["token"] == "t" and Path(seen["cache_dir"]) == tmp_path


def test_locate_adapter_invalid_name_fails_closed(root):
    with pytest.raises(AdapterRefused) as ei:
        locate_adapter([LocalDirSource(root)], "../etc")
    assert ei.value.reason is RefusalReason.INVALID_NAME


def test_locate_adapter_first_source_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _make_adapter(a / "x")
    _make_adapter(b / "x")
    _make_adapter(b / "y")
    sa, sb = LocalDirSource(a), LocalDirSource(b)
    assert locate_adapter([sa, sb], "x")[0] is sa
    assert locate_adapter([sa, sb], "y")[0] is sb
    with pytest.raises(ConfigError):
        locate_adapter([], "x")
