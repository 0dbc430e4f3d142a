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
from support.server import new_server, write_config

pytestmark = pytest.mark.e2e

ATTEMPTS = int(os.environ.get("SAFELORA_RACE_ATTEMPTS", "300"))
RACE_DEADLINE_S = float(os.environ.get("SAFELORA_RACE_DEADLINE_S", "240"))
# A swap every ~0.1 ms: the window is open for the whole preparation, both ways round.
SWAP_PERIOD_S = 1e-4
REFUSED_IN_A_RACE = {"outside_namespace", "changed_while_reading"}


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
    config = write_config(
        work / "races.yaml", bank=hardening_world.bank, adapter_dirs=[str(world.root)], cache_dir=work / "cache",
        device="cpu", policy={"select": "all"}, tenants=[{"match": "trusted/*", "shadow": True}],
        shared_adapters=["public/*"],
    )
    server = new_server("races", hardening_world.aligned, config, work).start().wait_ready()
    try:
        yield server, world
    finally:
        server.stop()


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
            if served != (world.attacker_hash, "default", "enforce") or report["outcome"] != "projected":
                bad.append(f"{name} ({via}) served {served} {report['outcome']}")
            outcomes[(via, "200 own, projected")] += 1
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
    served = sum(n for (_, what), n in outcomes.items() if what.startswith("200"))
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
        for attempt in range(2):
            r = server.complete(name, max_tokens=1)
            assert r.status_code == 400 and _reason(r) == "update_overflow" and field in r.text, r.text
            assert value[:40] not in r.text
    m1 = server.metrics()
    assert m1.value("safelora_rejections_total", reason="update_overflow") - \
        m0.value("safelora_rejections_total", reason="update_overflow") == 4
    # the second request of each was answered from the refusal memory, not parsed again
    assert m1.value("safelora_refusal_cache_hits_total") - m0.value("safelora_refusal_cache_hits_total") == 2
    assert m1.value("safelora_adapters_total", outcome="error") == m0.value("safelora_adapters_total", outcome="error")
    assert "OverflowError" not in server.log_text() and "Traceback" not in server.log_text()
    assert server.complete("globex/bot", max_tokens=1).status_code == 200
