"""Opening a tenant's adapter from the root's descriptor: namespace rules for links, the identity
from what was opened, files read relative to it, and a directory/symlink exchange race."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from support.races import Swapper
from vllm_safelora.adapters import CONFIG_FILE, WEIGHTS_FILE, read_adapter_files
from vllm_safelora.errors import AdapterRefused, RefusalReason
from vllm_safelora.sources import LocalDirSource, locate, locate_path
from vllm_safelora.sources.confined import MAX_LINK_HOPS


def _adapter(d: Path, tag: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_FILE).write_text(f'{{"tag": "{tag}"}}')
    (d / WEIGHTS_FILE).write_bytes(tag.encode() * 8)
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    for name in ("acme/v1", "acme/v2", "globex/bot", "public/base", "trusted/t"):
        _adapter(r / name, name)
    _adapter(tmp_path / "outside" / "x", "outside")
    return r


def _read(src: LocalDirSource, name: str):
    location = locate([src], name)
    with location.open() as directory:
        files = read_adapter_files(directory, name=name)
    return location.identity, files.config_bytes


def _refusal(src: LocalDirSource, name: str) -> AdapterRefused:
    with pytest.raises(AdapterRefused) as info:
        _read(src, name)
    return info.value


LINKS = {  # link under the root -> its text; None: followed to that identity
    "acme/current": ("v2", "acme/v2"),
    "acme/abs": ("{root}/acme/v1", "acme/v1"),
    "acme/updown": ("../acme/./v1", "acme/v1"),
    "acme/chain": ("abs", "acme/v1"),
    "acme/shared": ("../public/base", "public/base"),
    "acme/other": ("../globex/bot", RefusalReason.OUTSIDE_NAMESPACE),
    "acme/other-missing": ("../globex/nothing-here", RefusalReason.OUTSIDE_NAMESPACE),
    "acme/up": ("../../outside/x", RefusalReason.OUTSIDE_NAMESPACE),
    "acme/absout": ("{tmp}/outside/x", RefusalReason.OUTSIDE_NAMESPACE),
    "acme/root": ("..", RefusalReason.OUTSIDE_NAMESPACE),
    "acme/hidden": (".git", RefusalReason.INVALID_NAME),
    "acme/dangling": ("gone", None),
}


@pytest.mark.parametrize("link", list(LINKS))
def test_a_link_is_followed_only_inside_the_namespace_or_into_shared_areas(root, tmp_path, link):
    text, expected = LINKS[link]
    os.symlink(text.format(root=root, tmp=tmp_path), root / link)
    if link == "acme/chain":
        os.symlink(LINKS["acme/abs"][0].format(root=root), root / "acme" / "abs")
    src = LocalDirSource(root, shared=["public/*"])
    if expected is None:
        assert src.locate(link) is None
    elif isinstance(expected, RefusalReason):
        assert _refusal(src, link).reason is expected
    else:
        identity, config = _read(src, link)
        assert identity == expected and expected.encode() in config


def test_a_refused_link_says_nothing_about_its_target(root):
    """The decision is made on the link's text: an existing and a missing target read the same."""
    os.symlink("../globex/bot", root / "acme" / "a")
    os.symlink("../globex/nothing", root / "acme" / "b")
    src = LocalDirSource(root)
    a, b = _refusal(src, "acme/a"), _refusal(src, "acme/b")
    assert a.reason is b.reason is RefusalReason.OUTSIDE_NAMESPACE
    assert a.detail.replace("bot", "X").replace("'acme/a'", "L") == b.detail.replace("nothing", "X").replace(
        "'acme/b'", "L"
    )


def test_a_weights_link_into_another_tenant_is_refused_inside_the_namespace_followed(root):
    d = root / "evil" / "link_globex"
    d.mkdir(parents=True)
    (d / CONFIG_FILE).write_text("{}")
    (d / WEIGHTS_FILE).symlink_to("../../globex/bot/" + WEIGHTS_FILE)
    assert _refusal(LocalDirSource(root), "evil/link_globex").reason is RefusalReason.OUTSIDE_NAMESPACE
    mine = root / "acme" / "split"
    mine.mkdir()
    (mine / CONFIG_FILE).write_text("{}")
    (mine / WEIGHTS_FILE).symlink_to(root / "acme" / "v1" / WEIGHTS_FILE)
    location = locate([LocalDirSource(root)], "acme/split")
    with location.open() as directory:
        assert read_adapter_files(directory).weights_bytes == b"acme/v1" * 8


def test_a_link_loop_is_refused(root):
    os.symlink("b", root / "acme" / "a")
    os.symlink("a", root / "acme" / "b")
    refusal = _refusal(LocalDirSource(root), "acme/a")
    assert refusal.reason is RefusalReason.INVALID_NAME and f"more than {MAX_LINK_HOPS} links" in refusal.detail


def test_a_lora_path_is_confined_the_same_way(root, tmp_path):
    os.symlink("../globex/bot", root / "acme" / "other")
    src = LocalDirSource(root)
    assert locate_path([src], str(root / "acme" / "v1")).identity == "acme/v1"
    with pytest.raises(AdapterRefused) as info:
        locate_path([src], str(root / "acme" / "other"))
    assert info.value.reason is RefusalReason.OUTSIDE_NAMESPACE
    # spelled with '..' it is another tenant's path (and its own name), not acme's
    assert locate_path([src], str(root / "acme" / ".." / "globex" / "bot")).name == "globex/bot"
    with pytest.raises(AdapterRefused) as info:
        locate_path([src], str(root / ".." / "outside" / "x"))
    assert (
        info.value.reason is RefusalReason.INVALID_NAME and "outside the configured adapter_dirs" in info.value.detail
    )


def test_a_directory_swapped_for_a_link_after_it_was_located_is_not_read(root):
    location = locate([LocalDirSource(root)], "acme/v1")
    os.rename(root / "acme" / "v1", root / "acme" / "v1.old")
    os.symlink("v2", root / "acme" / "v1")
    with pytest.raises(AdapterRefused) as info, location.open():
        pass
    assert info.value.reason is RefusalReason.CHANGED_WHILE_READING


@pytest.mark.parametrize("target", ["../trusted/t", "{tmp}/outside/x"])
def test_exchange_race_never_reads_outside_the_namespace(root, tmp_path, target):
    """A thread exchanges the tenant's directory with a link (renameat2) while it is located and
    read, 300 times: every outcome is the tenant's own bytes under its own identity, or a refusal."""
    link = root / "escal" / "swap"
    _adapter(root / "escal" / "a", "escal/a")
    os.symlink(target.format(tmp=tmp_path), link)
    src = LocalDirSource(root)
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + 60
    with Swapper(root / "escal" / "a", link) as swapper:
        for _ in range(300):
            if time.monotonic() > deadline:
                break
            try:
                identity, config = _read(src, "escal/a")
            except AdapterRefused as exc:
                key = exc.reason.value
            else:
                assert identity == "escal/a" and config == b'{"tag": "escal/a"}', (identity, config)
                key = "own"
            outcomes[key] = outcomes.get(key, 0) + 1
    print(f"\n[race] {target}: {outcomes} ({swapper.swaps} swaps)")
    assert sum(outcomes.values()) >= 100
    assert set(outcomes) <= {"own", "outside_namespace", "changed_while_reading"}, outcomes
    assert outcomes.get("own") and outcomes.get("outside_namespace"), outcomes


def test_a_relative_lora_path_outside_the_roots_is_no_existence_oracle(root, tmp_path, monkeypatch):
    """Whether a path outside the roots exists does not change the answer."""
    monkeypatch.chdir(tmp_path)
    src = LocalDirSource(root)
    answers = []
    for path in ("outside/x", "outside/nothing-here"):
        with pytest.raises(AdapterRefused) as info:
            locate_path([src], path)
        answers.append((info.value.reason, info.value.detail.replace("nothing-here", "x")))
    assert answers[0] == answers[1] and answers[0][0] is RefusalReason.NOT_FOUND
    assert locate_path([src], "root/acme/v1").identity == "acme/v1"  # relative, under the root
