"""A hostile tenant racing the live server: its directory exchanged with a symlink
(``renameat2(RENAME_EXCHANGE)``) while its first request is prepared, links out of its
namespace, a 401-digit number in its config.

One plugin server (policy ``select: all``, ``served_names: location``) with the rule
``trusted/*`` shadow (served unprojected) and ``public/*`` shared. Every attempt is over
loopback, bounded by a count and a deadline; the counts are printed (run with ``-s``).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import pytest

import hardening_support as hs
from support.races import Swapper
from support.smallfs import SmallFS, mount_small_fs, unmount
from support.server import new_server, write_config

pytestmark = pytest.mark.e2e

ATTEMPTS = int(os.environ.get("SAFELORA_RACE_ATTEMPTS", "300"))
RACE_DEADLINE_S = float(os.environ.get("SAFELORA_RACE_DEADLINE_S", "240"))
# A swap every ~0.1 ms: the window is open for the whole preparation, both ways round.
SWAP_PERIOD_S = 1e-4
REFUSED_IN_A_RACE = {"outside_namespace", "changed_while_reading"}
CACHE_FS_BYTES = 64 << 20


class RaceWorld:
    def __init__(self, root: Path, outside: Path, template: Path):
        self.root, self.outside, self.template = root, outside, template
        self.trusted = hs.make_valid_adapter(root / "trusted" / "t", template, seed=9001)
        self.public = hs.make_valid_adapter(root / "public" / "base", template, seed=9002)
        self.globex = hs.make_valid_adapter(root / "globex" / "bot", template, seed=9003)
        self.outside_adapter = hs.make_valid_adapter(outside / "x", template, seed=9004)
        # The attacker's content: one for all its directories (the race is about where, not what).
        self.attacker = hs.make_valid_adapter(root / "escal" / "template", template, seed=9005)
        self.attacker_hash = hs.content_id(self.attacker)
        self.foreign_hashes = {hs.content_id(d) for d in (self.trusted, self.globex, self.outside_adapter)}

    def attacker_dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True)
        for f in self.attacker.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d


@pytest.fixture(scope="module")
def races(hardening_world, tmp_path_factory):
    work = tmp_path_factory.mktemp("races")
    world = RaceWorld(work / "adapters", work / "outside", hardening_world.template)
    # The cache on its own small file system, so one test can fill it (None where it cannot be mounted).
    world.cache_fs = mount_small_fs(work / "cachefs", CACHE_FS_BYTES)
    cache_root = world.cache_fs.path if isinstance(world.cache_fs, SmallFS) else work
    config = write_config(
        work / "races.yaml",
        bank=hardening_world.bank,
        adapter_dirs=[str(world.root)],
        cache_dir=cache_root / "cache",
        device="cpu",
        policy={"select": "all"},
        tenants=[{"match": "trusted/*", "shadow": True}],
        shared_adapters=["public/*"],
    )
    server = new_server("races", hardening_world.aligned, config, work).start().wait_ready()
    try:
        yield server, world
    finally:
        server.stop()
        if isinstance(world.cache_fs, SmallFS):
            unmount(world.cache_fs)


def _reason(response) -> str:
    match = re.search(r"refused \((\w+)\)", response.text)
    return match.group(1) if match else "?"


def _attempt(server, world: RaceWorld, name: str, link_text: str, via: str):
    """One first request for a fresh attacker directory, exchanged with a link the whole time."""
    d = world.attacker_dir(name)
    link = d.with_name(d.name + ".link")
    os.symlink(link_text, link)
    with Swapper(d, link, SWAP_PERIOD_S):
        if via == "resolver":
            r = server.complete(name, max_tokens=1)
        else:
            r = server.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(d)})
    return r


def _race(server, world: RaceWorld, prefix: str, link_text: str) -> tuple[Counter, list[str]]:
    outcomes: Counter = Counter()
    bad: list[str] = []
    deadline = time.monotonic() + RACE_DEADLINE_S
    for i in range(ATTEMPTS):
        if time.monotonic() > deadline:
            break
        via = "resolver" if i % 2 == 0 else "load"
        name = f"{prefix}/a{i:03d}"
        r = _attempt(server, world, name, link_text, via)
        if r.status_code == 200:
            report = server.get(f"/safelora/v1/adapters/{name}").json()["summary"]
            served = (report["input_hash"], report["tenant_rule"], report["mode"])
            if served != (world.attacker_hash, "default", "enforce") or report["outcome"] != "modified":
                bad.append(f"{name} ({via}) served {served} {report['outcome']}")
            whose = "own" if served[0] == world.attacker_hash else "FOREIGN"
            outcomes[(via, f"200 {whose} bytes, rule {served[1]} {served[2]}, {report['outcome']}")] += 1
        else:
            reason = _reason(r)
            if r.status_code >= 500 or reason not in REFUSED_IN_A_RACE:
                bad.append(f"{name} ({via}) got {r.status_code}: {r.text[:300]}")
            outcomes[(via, f"{r.status_code} {reason}")] += 1
    return outcomes, bad


def _identities_logged(server, prefix: str) -> set[str]:
    """Where the log says each of ``prefix``'s adapters was read from."""
    return set(re.findall(rf"adapter '{re.escape(prefix)}/a\d+' from (\S+) ", server.log_text()))


@pytest.mark.parametrize("target", ["trusted", "outside"])
def test_an_exchange_race_never_serves_under_another_rule_or_from_outside(races, target):
    """A tenant exchanges its directory ``escal/aNNN`` with a link to the shadow tenant's adapter
    (``trusted/t``) or to a directory outside every root, during its first request (resolver and
    load endpoint alternately). Every answer is its own weights, projected under its own (default)
    rule, or a 400 naming the race; never a 5xx, never another tenant's rule or bytes."""
    server, world = races
    prefix = f"escal-{target}"
    link_text = "../trusted/t" if target == "trusted" else str(world.outside_adapter)
    m0 = server.metrics()
    outcomes, bad = _race(server, world, prefix, link_text)
    total = sum(outcomes.values())
    print(f"\n[race] {prefix}: {total} attempts in {RACE_DEADLINE_S:.0f}s budget: {dict(outcomes)}")
    assert not bad, "\n".join(bad[:20])
    assert total >= min(ATTEMPTS, 150), f"only {total} attempts within the deadline"
    served = sum(n for (_, what), n in outcomes.items() if what.startswith("200 own"))
    refused = sum(n for (_, what), n in outcomes.items() if "outside_namespace" in what)
    assert served and refused, f"the race never went both ways: {dict(outcomes)}"
    # the log's identity for every preparation is the attacker's own directory
    logged = _identities_logged(server, prefix)
    assert logged and all(re.fullmatch(rf"{re.escape(prefix)}/a\d+", x) for x in logged), logged
    m1 = server.metrics()
    assert m1.value("safelora_adapters_total", outcome="error") == m0.value("safelora_adapters_total", outcome="error")
    assert "Traceback" not in server.log_text()
    # the shadow rule is live (so the checks above could fail): the trusted tenant's own adapter is shadowed
    assert server.complete("trusted/t", max_tokens=1).status_code == 200
    own = server.get("/safelora/v1/adapters/trusted/t").json()["summary"]
    assert (own["tenant_rule"], own["mode"]) == ("trusted/*", "shadow")
    assert server.healthy()


def test_links_out_of_the_namespace_are_refused_without_an_existence_oracle(races):
    """A weights file linked to another tenant's weights is refused (it used to be served as the
    linking tenant's own), whether the target exists or not, by both load paths; a link into the
    shared area is served with the shared adapter's rule; the other tenant keeps being served."""
    server, world = races
    cases = {}
    for name, target in (("evil/link_globex", "../../globex/bot/"), ("evil/link_nothing", "../../globex/none/")):
        d = world.root / name
        d.mkdir(parents=True)
        (d / hs.CONFIG).write_bytes((world.attacker / hs.CONFIG).read_bytes())
        os.symlink(target + hs.WEIGHTS, d / hs.WEIGHTS)
        cases[name] = d
    os.symlink("../public/base", world.root / "evil" / "base")
    answers = {}
    for name, d in cases.items():
        r1 = server.complete(name, max_tokens=1)
        r2 = server.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(d)})
        for r in (r1, r2):
            assert r.status_code == 400 and _reason(r) == "outside_namespace", r.text
            assert "'evil/'" in r.text
        answers[name] = r1.json()["error"]["message"].replace(name, "N").replace("bot", "T").replace("none", "T")
    assert len(set(answers.values())) == 1, answers  # the same answer whether the target exists or not
    assert server.complete("evil/base", max_tokens=1).status_code == 200
    shared = server.get("/safelora/v1/adapters/evil/base").json()["summary"]
    assert shared["input_hash"] == hs.content_id(world.public)
    assert server.complete("globex/bot", max_tokens=1).status_code == 200


def test_a_401_digit_number_is_a_named_400_and_remembered(races):
    server, world = races
    m0 = server.metrics()
    for i, field in enumerate(("lora_alpha", "alpha_pattern")):
        name = f"numbers/n{i}"
        d = world.attacker_dir(name)
        config = json.loads((d / hs.CONFIG).read_text())
        value = str(10**400)
        if field == "lora_alpha":
            config["lora_alpha"] = "@NUMBER@"
        else:
            config["alpha_pattern"] = {"q_proj": "@NUMBER@"}
        (d / hs.CONFIG).write_text(json.dumps(config).replace('"@NUMBER@"', value))
        for _attempt in range(2):
            r = server.complete(name, max_tokens=1)
            assert r.status_code == 400 and _reason(r) == "update_overflow" and field in r.text, r.text
            assert value[:40] not in r.text
    m1 = server.metrics()
    assert (
        m1.value("safelora_refusals_total", reason="update_overflow")
        - m0.value("safelora_refusals_total", reason="update_overflow")
        == 4
    )
    # the second request of each was answered from the refusal memory, not parsed again
    assert m1.value("safelora_refusal_cache_hits_total") - m0.value("safelora_refusal_cache_hits_total") == 2
    assert m1.value("safelora_adapters_total", outcome="error") == m0.value("safelora_adapters_total", outcome="error")
    assert "OverflowError" not in server.log_text() and "Traceback" not in server.log_text()
    assert server.complete("globex/bot", max_tokens=1).status_code == 200


def test_a_full_cache_answers_503_and_keeps_serving_cached_adapters(races):
    """The cache's file system fills up: a new adapter (this tenant's or another's) gets 503 with
    Retry-After and a message naming the cache directory; the same content under another name (a
    cache hit) and adapters already loaded keep being served; once space is freed the new adapter
    is served (the 503 was not remembered as a refusal)."""
    server, world = races
    if not isinstance(world.cache_fs, SmallFS):
        pytest.skip(world.cache_fs)
    cached = world.attacker_dir("disk/cached")
    hs.make_valid_adapter(world.root / "disk" / "new", world.template, seed=9101)
    hs.make_valid_adapter(world.root / "other" / "new", world.template, seed=9102)
    world.attacker_dir("disk/same")  # the attacker's content again: a cache hit
    assert cached and server.complete("disk/cached", max_tokens=1).status_code == 200
    m0 = server.metrics()
    filled = world.cache_fs.fill()
    try:
        for name in ("disk/new", "other/new"):
            r = server.complete(name, max_tokens=1)
            assert r.status_code == 503, (name, r.status_code, r.text)
            assert int(r.headers["Retry-After"]) >= 1, r.headers
            # vLLM writes paths in client-facing errors as <path>; the log names the directory itself
            assert "cache directory (cache_dir" in r.text and "already cached are still served" in r.text
        for name in ("disk/same", "disk/cached"):
            assert server.complete(name, max_tokens=1).status_code == 200, name
        hit = server.get("/safelora/v1/adapters/disk/same").json()["summary"]
        assert hit["input_hash"] == world.attacker_hash
        m1 = server.metrics()
    finally:
        world.cache_fs.drain()
    print(f"\n[full cache] filled {filled / 2**20:.1f} MiB; 2 new adapters 503, 2 cached ones 200")
    assert (
        m1.value("safelora_cache_unavailable_total", fault="full")
        - m0.value("safelora_cache_unavailable_total", fault="full")
        == 2
    )
    assert m1.value("safelora_adapters_total", outcome="error") == m0.value("safelora_adapters_total", outcome="error")
    for name in ("disk/new", "other/new"):
        assert server.complete(name, max_tokens=1).status_code == 200, name
    log = server.log_text()
    assert f"cache directory (cache_dir {world.cache_fs.path / 'cache'}) is full" in log
    assert "Traceback" not in log
    assert server.healthy()


NAME_FLOOD = int(os.environ.get("SAFELORA_NAME_FLOOD", "10000"))
NAME_BYTES = 64 << 10
RSS_BOUND = 16 << 20
FLOOD_DEADLINE_S = 420.0


def _api_server_rss(server) -> int:
    with open(f"/proc/{server.pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _flood(server, first: int, count: int, deadline: float) -> Counter:
    """``count`` completions, each naming a new 64 KB model, on 4 keep-alive connections."""
    import requests
    from concurrent.futures import ThreadPoolExecutor

    def run(worker: int) -> Counter:
        seen: Counter = Counter()
        with requests.Session() as http:
            for i in range(first + worker, first + count, 4):
                if time.monotonic() > deadline:
                    break
                name = f"{i:07d}" + "n" * (NAME_BYTES - 7)
                r = http.post(
                    server.base_url + "/v1/completions",
                    timeout=60,
                    json={"model": name, "prompt": "x", "max_tokens": 1},
                )
                seen[f"{r.status_code} {_reason(r)}"] += 1
        return seen

    with ThreadPoolExecutor(4) as pool:
        return sum(pool.map(run, range(4)), Counter())


def test_distinct_long_names_do_not_grow_the_api_server(races):
    """10,000 requests naming distinct 64 KB models (refused 400 each): vLLM's serving layer used to
    keep a lock per name ever asked (~6.3 MB per 100 such names); the API server's RSS may grow by
    at most 16 MB (after a warm-up of 300 names that settles the allocator)."""
    server, _ = races
    deadline = time.monotonic() + FLOOD_DEADLINE_S
    warm = _flood(server, 0, 300, deadline)
    rss0 = _api_server_rss(server)
    t0 = time.monotonic()
    seen = _flood(server, 300, NAME_FLOOD, deadline)
    rss1 = _api_server_rss(server)
    total = sum(seen.values())
    print(
        f"\n[names] {total} distinct {NAME_BYTES >> 10} KB names in {time.monotonic() - t0:.0f}s: {dict(seen)}; "
        f"API server RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB ({(rss1 - rss0) / 2**20:+.1f})"
    )
    assert set(seen) | set(warm) == {"400 invalid_name"}, (seen, warm)
    assert total == NAME_FLOOD, f"only {total} of {NAME_FLOOD} names sent before the deadline"
    assert rss1 - rss0 <= RSS_BOUND
    assert server.complete("globex/bot", max_tokens=1).status_code == 200
