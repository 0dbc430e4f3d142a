"""Where a vLLM worker's CPU goes per request, with and without the plugin (py-spy, sampled).

    python benchmarks/worker_profile.py [--requests 120] [--new-adapters | --same-adapter]

One tiny-Llama server per side (plain vLLM with its filesystem resolver, then the plugin),
the same requests on each: by default every request names a new adapter (what the scale
round measured as the plugin's "+30 ms of worker CPU per new adapter"). py-spy samples the
worker process (``--nonblocking``, 250 Hz) during the request loop; the samples are
attributed to the innermost frame of the plugin's own code on the stack (``vllm_safelora``),
or else to the vLLM function the sample is in. The worker's CPU time per request (from
/proc) is printed beside, so the share of samples can be read as milliseconds. Results:
``benchmarks/results/worker_profile.json``. Needs py-spy (``pip install py-spy``), ptrace
permission, and a machine where sampling is allowed.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS_DIR,
    SHARED_NOTE,
    baseline_env,
    machine_info,
    now_iso,
    plugin_env,
    save_json,
    served,
    server_args,
    write_safelora_config,
)
from scale import PROMPT, make_world  # noqa: E402


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = _children(p)
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pid(server_pid: int) -> int:
    """The process that runs the model (vLLM names it VllmWorker / EngineCore on CPU: the busiest one)."""
    candidates = [p for p in _descendants(server_pid) if "resource_tracker" not in _cmdline(p)]
    named = [p for p in candidates if "Worker" in _comm(p) or "Worker" in _cmdline(p)]
    return (named or candidates)[-1]


def attribute(collapsed: Path) -> dict[str, int]:
    """Samples by the innermost vllm_safelora frame on the stack, else by the innermost frame."""
    counts: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        ours = [f for f in frames if "vllm_safelora" in f]
        key = ("plugin: " + ours[-1]) if ours else ("vllm/other: " + (frames[-1] if frames else "?"))
        counts[key] += int(n)
    return dict(counts)


def side(name: str, world: dict, root: Path, names: list[str], work: Path, a) -> dict:
    import requests

    model = str(world["models"].aligned)
    args = server_args(model, max_loras=2, max_num_seqs=8)
    if name == "baseline":
        env = baseline_env("lora_filesystem_resolver", runtime_lora=True, VLLM_LORA_RESOLVER_CACHE_DIR=str(root))
    else:
        config = write_safelora_config(
            work / "safelora.yaml", bank=world["bank"], adapter_dirs=[root], cache_dir=work / "cache"
        )
        env = plugin_env(config)
    with served(args, env, work / f"{name}.log") as server:
        http = requests.Session()

        def complete(m: str) -> int:
            return http.post(
                f"{server.base_url}/v1/completions",
                json={"model": m, "prompt": PROMPT, "max_tokens": 1, "temperature": 0},
                timeout=120,
            ).status_code

        for m in (model, model, names[0]):
            assert complete(m) == 200, f"[{name}] warm-up request for {m} failed"
        worker = worker_pid(server.proc.pid)
        out = work / f"{name}.collapsed"
        spy = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(worker),
                "--rate",
                "250",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
                "--duration",
                str(a.max_seconds),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(2.0)  # py-spy attaches
        cpu0, t0 = _cpu_s(worker), time.perf_counter()
        failed = sum(complete(m) != 200 for m in (names[1:] if a.new_adapters else [names[0]] * (len(names) - 1)))
        cpu1, wall = _cpu_s(worker), time.perf_counter() - t0
        spy.send_signal(2)
        _, err = spy.communicate(timeout=60)
    n = len(names) - 1
    samples = attribute(out) if out.exists() else {}
    total = sum(samples.values()) or 1
    ms_per_req = (cpu1 - cpu0) * 1e3 / n
    top = sorted(samples.items(), key=lambda kv: -kv[1])[: a.top]
    ours = sorted(((k, v) for k, v in samples.items() if k.startswith("plugin: ")), key=lambda kv: -kv[1])[: a.top]
    idle = sum(v for k, v in samples.items() if "sched_yield" in k or "shm_broadcast" in k)
    return {
        "worker_pid_comm": _comm(worker),
        "requests": n,
        "failed": failed,
        "wall_s": wall,
        "worker_cpu_ms_per_request": ms_per_req,
        "samples": total,
        "plugin_share": sum(v for k, v in samples.items() if k.startswith("plugin: ")) / total,
        "idle_wait_share": idle / total,
        "top": [{"where": k, "share": v / total, "ms_per_request": ms_per_req * v / total} for k, v in top],
        "plugin_top": [{"where": k, "share": v / total, "ms_per_request": ms_per_req * v / total} for k, v in ours],
        "py_spy_stderr": err.decode(errors="replace")[-500:],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=120)
    p.add_argument(
        "--same-adapter",
        dest="new_adapters",
        action="store_false",
        help="every request names one adapter (default: a new adapter per request)",
    )
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--max-seconds", type=int, default=600)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "worker_profile.json")
    a = p.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="safelora-worker-profile-"))
    try:
        world = make_world(work / "world", ["q_proj", "v_proj"])
        root = work / "adapters"
        names = [f"t{i}/a" for i in range(a.requests + 1)]
        for i, name in enumerate(names):
            world["factory"].write(root / name, seed=i)
        result = {"when": now_iso(), "machine": machine_info(), "note": SHARED_NOTE, "new_adapters": a.new_adapters}
        for name in ("baseline", "plugin"):
            print(f"[{name}] serving, profiling the worker over {a.requests} requests ...", flush=True)
            (work / name).mkdir()
            result[name] = r = side(name, world, root, names, work / name, a)
            print(
                f"[{name}] worker CPU {r['worker_cpu_ms_per_request']:.1f} ms/request, {r['samples']} samples: "
                f"waiting for work (sched_yield / shm queue) {r['idle_wait_share']:.1%}, plugin code "
                f"{r['plugin_share']:.1%}"
            )
            for row in r["top"] + (
                [{"where": "-- the plugin's own frames --", "share": 0, "ms_per_request": 0}] + r["plugin_top"]
                if r["plugin_top"]
                else []
            ):
                print(f"    {row['share']:6.1%}  {row['ms_per_request']:6.2f} ms  {row['where'][:150]}")
        save_json(a.out, result)
        print(f"saved {a.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
