"""A flood of new and hostile adapters: what it does to other tenants' latency, with and without limits.

One process run starts two plugin servers on the tiny Llama, one after the other, with the
same adapters and flags (``--max-loras 2``):

* ``unlimited``: the preparation throttle opened wide (64 at once, no queue limit that
  matters) and no memory of refusals (``refusal_cache_entries: 0``): what the plugin did
  before the untrusted-tenants work;
* ``limited``: the defaults (2 adapters prepared at once, 32 waiting, beyond that 503 +
  Retry-After; refusals remembered by content and files).

On each, a *victim* tenant sends sequential 1-token completions to its resident adapter:
first alone (``quiet``), then while ``--flooders`` threads send, as fast as they can for
``--flood-seconds`` (bounded by time and by ``--flood-requests``), requests naming
adapters the server has never seen (half new valid adapters, half hostile ones: a
safetensors header of ``--hostile-tensors`` zero-size tensors, refused). Reported per
server: the victim's median and p95 latency quiet and under flood, flood requests by
status, and the plugin's own counters (projections, refusals, refusal-cache hits,
overloads). Every request loop is bounded in count and time and talks to 127.0.0.1 only.

    python benchmarks/flood.py                # about 5 minutes on 2 shared cores
    python benchmarks/flood.py --quick        # shorter flood, fewer adapters
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS_DIR,
    fmt,
    machine_info,
    now_iso,
    plugin_env,
    print_table,
    save_json,
    served,
    server_args,
    write_safelora_config,
)

PROMPT = "Hello, the safety rule is"
SIDES = {
    "unlimited": "max_concurrent_preparations: 64\nmax_queued_preparations: 100000\nrefusal_cache_entries: 0\n",
    "limited": "",  # the defaults
}


def hostile_adapter(out: Path, template: Path, n_tensors: int) -> None:
    """A valid config and a safetensors file whose header lists ``n_tensors`` zero-size tensors."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_bytes((template / "adapter_config.json").read_bytes())
    header = {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight": {
            "dtype": "F32",
            "shape": [0, 128],
            "data_offsets": [0, 0],
        }
        for i in range(n_tensors)
    }
    raw = json.dumps(header).encode()
    (out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)


def make_world(work: Path, n_new: int, n_hostile: int, hostile_tensors: int) -> dict:
    from tqdm import tqdm

    from vllm_safelora.bank import build_bank
    from vllm_safelora.tiny import make_tiny_adapter, make_tiny_models

    models = make_tiny_models(work / "models")
    root = work / "adapters"
    make_tiny_adapter(models.aligned, root / "victim" / "resident", seed=1, direction="random", base_dir=models.base)
    for i in tqdm(range(n_new), desc="new adapters", unit="adapter"):
        make_tiny_adapter(
            models.aligned, root / "flood" / f"new{i:04d}", seed=1000 + i, direction="random", base_dir=models.base
        )
    for i in range(n_hostile):
        hostile_adapter(root / "flood" / f"bad{i:04d}", root / "victim" / "resident", hostile_tensors)
    bank = work / "bank"
    build_bank(str(models.base), str(models.aligned), bank, overwrite=True, progress=None)
    return {"models": models, "root": root, "bank": bank, "n_new": n_new, "n_hostile": n_hostile}


def complete(session, url: str, model: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = session.post(
        f"{url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}, timeout=120
    )
    return r.status_code, time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_side(side: str, world: dict, work: Path, a) -> dict:
    import requests

    cache = work / f"cache-{side}"
    config = write_safelora_config(
        work / f"{side}.yaml", bank=world["bank"], adapter_dirs=[world["root"]], cache_dir=cache
    )
    config.write_text(config.read_text() + "served_names: location\n" + SIDES[side])
    args = server_args(world["models"].aligned, max_loras=2, max_num_seqs=8)
    out: dict = {"side": side, "config_extra": SIDES[side].strip().splitlines()}
    with served(args, plugin_env(config), a.log_dir / f"flood-{side}.log", timeout=a.start_timeout) as server:
        url = server.base_url
        victim = requests.Session()
        for _ in range(5):
            complete(victim, url, "victim/resident")
        quiet = [complete(victim, url, "victim/resident")[1] for _ in range(a.victim_samples)]

        names = [f"flood/new{i:04d}" for i in range(world["n_new"])]
        names += [f"flood/bad{i % world['n_hostile']:04d}" for i in range(world["n_new"])]
        names.sort(key=lambda n: (int(n[-4:]), n))  # interleave new and hostile
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        stop_at = time.monotonic() + a.flood_seconds
        queue = iter(names[: a.flood_requests])

        def flooder() -> None:
            s = requests.Session()
            while time.monotonic() < stop_at:
                with lock:
                    name = next(queue, None)
                if name is None:
                    return
                code, _ = complete(s, url, name)
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1

        threads = [threading.Thread(target=flooder, daemon=True) for _ in range(a.flooders)]
        for t in threads:
            t.start()
        under_flood: list[float] = []
        while any(t.is_alive() for t in threads) and len(under_flood) < 10_000:
            code, dt = complete(victim, url, "victim/resident")
            if code == 200:
                under_flood.append(dt)
        for t in threads:
            t.join(timeout=120)
        metrics = server.metrics()
        out.update(
            quiet_median_s=percentile(quiet, 0.5),
            quiet_p95_s=percentile(quiet, 0.95),
            flood_median_s=percentile(under_flood, 0.5),
            flood_p95_s=percentile(under_flood, 0.95),
            victim_requests_under_flood=len(under_flood),
            flood_statuses=statuses,
            projections=metrics.value("safelora_projections_total"),
            refusals=metrics.value("safelora_refusals_total"),
            refusal_cache_hits=metrics.value("safelora_refusal_cache_hits_total"),
            overloads=metrics.value("safelora_overload_total"),
        )
    print(
        f"[flood] {side}: victim median {fmt(out['quiet_median_s'])} s quiet, {fmt(out['flood_median_s'])} s "
        f"under flood; flood statuses {statuses}",
        flush=True,
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--flooders", type=int, default=48, help="more than the throttle's 2 running + 32 waiting")
    p.add_argument("--flood-seconds", type=float, default=60.0)
    p.add_argument("--flood-requests", type=int, default=400)
    p.add_argument("--hostile-tensors", type=int, default=100_000)
    p.add_argument("--victim-samples", type=int, default=30)
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "flood.json")
    a = p.parse_args()
    if a.quick:
        a.flood_seconds, a.flood_requests, a.victim_samples = 20.0, 120, 10
    n_new = a.flood_requests // 2
    with tempfile.TemporaryDirectory(prefix="safelora-flood-") as tmp:
        work = Path(tmp)
        a.log_dir = work
        world = make_world(work, n_new=n_new, n_hostile=8, hostile_tensors=a.hostile_tensors)
        runs = [run_side(side, world, work, a) for side in SIDES]
    rows = [
        [
            r["side"],
            fmt(r["quiet_median_s"]),
            fmt(r["flood_median_s"]),
            fmt(r["flood_p95_s"]),
            json.dumps(r["flood_statuses"]),
            int(r["projections"]),
            int(r["refusal_cache_hits"]),
            int(r["overloads"]),
        ]
        for r in runs
    ]
    print_table(
        [
            "side",
            "victim median quiet (s)",
            "median under flood (s)",
            "p95 under flood (s)",
            "flood statuses",
            "projections",
            "refusal-cache hits",
            "503s",
        ],
        rows,
    )
    by = {r["side"]: r for r in runs}
    ratio = (
        by["limited"]["flood_median_s"] / by["unlimited"]["flood_median_s"]
        if by["unlimited"]["flood_median_s"] and by["limited"]["flood_median_s"]
        else None
    )
    print(f"victim median under flood, limited / unlimited: {fmt(ratio)}")
    save_json(
        a.out,
        {
            "created": now_iso(),
            "machine": machine_info(),
            "args": {k: str(v) for k, v in vars(a).items()},
            "runs": runs,
            "limited_over_unlimited_flood_median": ratio,
        },
    )
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
