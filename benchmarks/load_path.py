"""The plugin's adapter load path, stage by stage, against vLLM's own load of the same files.

One process, the same files, both sides timed the same way (``time.perf_counter``
around the call, median of ``--repeats``; files in the page cache for both: warm reads,
the disk is not measured). Synthetic Llama-2-7B-shaped PEFT adapters (fp16 safetensors +
adapter_config.json, built here):

* ``llama2-7b-qv-r16``: q_proj + v_proj (4096 x 4096), r = 16, 32 layers (~17 MB);
* ``llama2-7b-all-r64``: q, k, v, o (4096 x 4096), gate, up (11008 x 4096), down
  (4096 x 11008), r = 64, 32 layers (~320 MB).

The bank is SYNTHETIC and TRUNCATED: for each of the adapter's modules a random
orthonormal U (d_out x k, k = ``--bank-rank``, default 256, stored bfloat16) and a decaying
spectrum, written with the bank writer and read with ``load_bank`` (the real Llama-2-7B
bank, untruncated, is 11 GB: more than this machine can spare). Projection time grows
with k, so it is a lower bound for an untruncated bank; see projection_speed.py for that.

vLLM's own load (``vllm``): what its worker's ``_load_adapter`` does for a directory,
``PEFTHelper.from_local_dir`` + ``validate_legal`` + ``LoRAModel.from_local_checkpoint(dir,
expected_modules, peft_helper, lora_model_id, device="cpu", dtype=float16)``. The guarded
load (``guarded``) is the same method wrapped by the plugin's real worker guard
(``patches._wrap_worker_load_adapter``: verify the entry, read the weights once, hash them,
hand vLLM those bytes).

Two baselines, because vLLM's ``_load_adapter`` reads no weight bytes: safetensors maps
the file and the tensors it returns are views of the page cache (on CPU with the file's
dtype nothing is converted), so it costs milliseconds whatever the size. The bytes are
read when vLLM copies the tensors into its LoRA slots (``set_lora``: into preallocated
stacks, on a GPU over PCIe). ``vllm (entry) + copy`` is the load plus one copy of every
tensor, a lower bound for that; the ratios are given against both.

Plugin stages (the service's own functions, in the order a cache miss runs them):

* ``read+hash``: ``read_adapter_files`` + ``content_hash`` (blake3) of the upload;
* ``parse``: ``parse_adapter`` (validation, safetensors parse, module pairing);
* ``project``: ``project_for_tenant`` (bank compatibility, Safe LoRA policy, serialising
  the patched adapter to bytes);
* ``write``: ``PatchedAdapterCache.get_or_create`` with the service's build (write +
  fsync files, seal the manifest from the in-memory hashes, publish, index);
* ``prepare (miss)``: the whole ``SafeLoRAService.prepare`` with an empty cache (the sum
  of the above, plus locating, tenancy and bookkeeping);
* ``prepare (hit)``: ``SafeLoRAService.prepare`` with the entry in the cache (a new name or
  a new server: read + hash + parse the upload, verify the entry);
* ``cache.get``: ``PatchedAdapterCache.get`` of the existing entry alone (verify: blake3 of its files);
* ``guard overhead``: ``guarded`` - ``vllm`` (what a re-load after vLLM's own eviction adds).

Ratios (the issue's goals; for each baseline): first-load overhead = (prepare (miss) + guard overhead) / vllm
(goal <= 1); cache hit = (prepare (hit) + guard overhead) / vllm and cache.get / vllm (goal
<= 0.1); re-load after eviction = guard overhead / vllm (goal <= 0.1).

Per-request overhead (issue item 5): the plugin's ``process_inputs`` and ``add_request``
hooks wrapped around no-op methods, with the real service and an adapter it already
prepared, timed per call (and read back from ``safelora_request_overhead_seconds``);
reported in microseconds and as a fraction of the resident-adapter TTFT measured by
``load_latency.py`` (its stored result on this machine; the tiny model's TTFT is the smallest
there is, so the fraction is an upper bound for real models).

    python benchmarks/load_path.py            # both sizes, ~3-6 minutes on 2 shared cores
    python benchmarks/load_path.py --quick    # the small adapter only, 2 repeats
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, machine_info, print_table  # noqa: E402
from vllm_safelora import metrics  # noqa: E402
from vllm_safelora.adapters import WEIGHTS_FILE, parse_adapter, read_adapter_files, write_adapter_files  # noqa: E402
from vllm_safelora.bank import load_bank  # noqa: E402
from vllm_safelora.bank.build import _write_bank  # noqa: E402
from vllm_safelora.bank.manifest import BankModule, SourceIdentity  # noqa: E402
from vllm_safelora.cache import CacheKey, PatchedAdapterCache, read_verified, verify_entry  # noqa: E402
from vllm_safelora.config import SafeLoRASettings  # noqa: E402
from vllm_safelora.apply_policy import project_for_tenant  # noqa: E402
from vllm_safelora.serving.service import SafeLoRAService  # noqa: E402
from vllm_safelora.serving.startup import build_sources  # noqa: E402
from vllm_safelora.policies.tenant_rules import resolve_tenant  # noqa: E402

MODEL = "meta-llama/Llama-2-7b-chat-hf"
SHAPES = {  # module -> (d_out, d_in), Llama-2-7B
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}
PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
SUITES = {
    "llama2-7b-qv-r16": {"modules": ["q_proj", "v_proj"], "rank": 16, "what": "q_proj + v_proj, r = 16, 32 layers"},
    "llama2-7b-all-r64": {"modules": list(SHAPES), "rank": 64, "what": "all seven modules, r = 64, 32 layers"},
}
LAYERS = 32
GOALS = {"first_load_overhead": 1.0, "cache_hit": 0.1, "reload_after_eviction": 0.1}


def module_name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{PARENT[module]}.{module}"


def make_adapter(out: Path, modules: list[str], rank: int, seed: int) -> int:
    """A PEFT adapter directory; returns its weights' size in bytes."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for m in modules:
            d_out, d_in = SHAPES[m]
            base = f"base_model.model.{module_name(layer, m)}"
            tensors[f"{base}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) / d_in**0.5).to(torch.float16)
            tensors[f"{base}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.01).to(torch.float16)
    out.mkdir(parents=True)
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {
        "base_model_name_or_path": MODEL,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": modules,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return (out / WEIGHTS_FILE).stat().st_size


def make_bank(out: Path, modules: list[str], k: int) -> None:
    """A bank for ``modules`` of every layer, U truncated to k columns, bfloat16, via the bank writer."""
    g = torch.Generator().manual_seed(1)
    per_shape: dict[int, torch.Tensor] = {}
    tensors, entries = {}, []
    s = torch.exp(-8 * torch.arange(k, dtype=torch.float32) / k)
    for d_out in sorted({SHAPES[m][0] for m in modules}):
        q, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g))
        per_shape[d_out] = q
    for layer in range(LAYERS):
        for m in modules:
            d_out, d_in = SHAPES[m]
            name = module_name(layer, m)
            # A different row order per module: same orthonormality, own memory.
            perm = torch.randperm(d_out, generator=g)
            tensors[f"{name}.U"] = per_shape[d_out][perm].to(torch.bfloat16).contiguous()
            tensors[f"{name}.S"] = s.clone()
            norm = float(s.norm())
            entries.append(
                BankModule(
                    name=name,
                    shape=(d_out, d_in),
                    rank_kept=k,
                    numerical_rank=k,
                    frobenius_norm=norm,
                    energy_kept=1.0,
                    approx_error_bound=0.0,
                )
            )
    ident = SourceIdentity(ref=MODEL, tensors_sha256="0" * 64)
    _write_bank(
        out,
        tensors,
        entries,
        overwrite=True,
        base=SourceIdentity(ref="meta-llama/Llama-2-7b-hf", tensors_sha256="0" * 64),
        aligned=ident,
        storage_dtype="bfloat16",
        svd="lowrank",
        truncation={"rank": k},
    )


def timed(fn, repeats: int, before=None) -> tuple[float, list[float], object]:
    """Median seconds over ``repeats`` calls of fn() (``before()`` untimed before each); last result."""
    samples, result = [], None
    for _ in range(repeats):
        if before is not None:
            before()
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples, result


class _Worker:
    """What vLLM's ``WorkerLoRAManager._load_adapter`` does for a local directory (vllm 0.32.0), on CPU."""

    def __init__(self, modules: list[str], max_rank: int):
        from vllm.config.lora import LoRAConfig

        self.expected = set(modules)
        self.lora_config = LoRAConfig(max_lora_rank=max_rank, max_loras=1, lora_dtype=torch.float16)
        self.max_position_embeddings = 4096

    def _load_adapter(self, lora_request):
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        helper = PEFTHelper.from_local_dir(lora_request.lora_path, self.max_position_embeddings)
        helper.validate_legal(self.lora_config)
        return LoRAModel.from_local_checkpoint(
            lora_request.lora_path,
            self.expected,
            peft_helper=helper,
            lora_model_id=lora_request.lora_int_id,
            device="cpu",
            dtype=self.lora_config.lora_dtype,
        )


def copied(lora) -> None:
    """Copy every tensor once, as vLLM's set_lora copies them into its stacked LoRA slots."""
    for weights in lora.loras.values():
        weights.lora_a.clone()
        weights.lora_b.clone()


def guarded_worker_class():
    """_Worker with the plugin's real worker guard around _load_adapter."""
    from vllm_safelora.integration import patches

    class Guarded(_Worker):
        pass

    patches._wrap_worker_load_adapter(Guarded)
    return Guarded


def run_suite(name: str, spec: dict, work: Path, repeats: int, bank_rank: int, bar) -> dict:
    from vllm.lora.request import LoRARequest

    from vllm_safelora.integration import state

    suite_dir = work / name
    root = suite_dir / "adapters"
    upload = root / "acme" / "adapter"
    nbytes = make_adapter(upload, spec["modules"], spec["rank"], seed=7)
    bar.set_postfix_str(f"{name}: bank")
    make_bank(suite_dir / "bank", spec["modules"], bank_rank)
    bank = load_bank(suite_dir / "bank", "cpu", verify=False)
    settings = SafeLoRASettings(
        bank=suite_dir / "bank",
        adapter_dirs=[root],
        cache_dir=suite_dir / "cache",
        device="cpu",
        max_adapter_bytes=1 << 30,
    )
    state.set_settings(settings)
    cache = PatchedAdapterCache(settings.cache_dir, settings.cache_max_bytes, verify=settings.verify_cache)
    svc = SafeLoRAService(settings, bank, build_sources(settings), cache, max_rank=spec["rank"])
    adapter_name = "acme/adapter"
    location = svc._locate(adapter_name, None)
    tenant = resolve_tenant(settings, location.identity)
    out: dict = {
        "what": spec["what"],
        "weights_bytes": nbytes,
        "bank_rank": bank_rank,
        "bank_dtype": "bfloat16",
        "bank_bytes": bank.nbytes,
        "repeats": repeats,
        "seconds": {},
        "samples": {},
    }

    def record(stage: str, fn, before=None) -> object:
        bar.set_postfix_str(f"{name}: {stage}")
        med, samples, result = timed(fn, repeats, before)
        out["seconds"][stage] = med
        out["samples"][stage] = samples
        bar.update(1)
        return result

    # -- plugin stages, one at a time
    def read_and_hash():
        files = read_adapter_files(upload, name=adapter_name, limits=svc.limits)
        files.content_hash  # noqa: B018 - computed once, on the bytes read (cached on the object)
        return files

    files = record("read+hash", read_and_hash)
    adapter = record("parse", lambda: parse_adapter(files, limits=svc.limits))
    outcome = record(
        "project", lambda: project_for_tenant(adapter, bank, tenant, name=adapter_name, require_base_model_match=True)
    )
    out["projected_modules"] = outcome.report.summary.projected
    out["modules"] = outcome.report.summary.modules
    key = CacheKey(adapter_hash=adapter.content_hash, bank_id=bank.bank_id, policy_id=tenant.cache_policy_id(bank))
    record(
        "write",
        lambda: cache.get_or_create(key, lambda tmp: write_adapter_files(tmp, outcome.adapter)),
        before=lambda: cache.remove(key),
    )
    files = adapter = outcome = None  # free them before the whole-path runs
    gc.collect()

    # -- the whole service path: miss, then hit
    def fresh_miss():
        cache.remove(key)

    prepared = record("prepare (miss)", lambda: svc.prepare(adapter_name), before=fresh_miss)
    assert not prepared.cache_hit
    prepared = record("prepare (hit)", lambda: svc.prepare(adapter_name))
    assert prepared.cache_hit
    record("cache.get", lambda: cache.get(key))
    entry = verify_entry(prepared.path)
    record(
        "guard: verify + read + blake3 (no vLLM)",
        lambda: (
            verify_entry(entry.path, hashed_by_caller=frozenset({WEIGHTS_FILE})),
            read_verified(entry, WEIGHTS_FILE),
        ),
    )

    # -- vLLM's own load of the upload and of the entry, plain and guarded, interleaved
    max_rank = spec["rank"]
    plain, Guarded = _Worker(spec["modules"], max_rank), guarded_worker_class()
    guarded = Guarded(spec["modules"], max_rank)
    entry_request = LoRARequest(lora_name=adapter_name, lora_int_id=1, lora_path=str(prepared.path))
    upload_request = LoRARequest(lora_name=adapter_name, lora_int_id=1, lora_path=str(upload))
    plain._load_adapter(entry_request), guarded._load_adapter(entry_request)  # warm both (imports, page cache)
    samples: dict[str, list[float]] = {
        "vllm (upload)": [],
        "vllm (entry)": [],
        "guarded (entry)": [],
        "vllm (entry) + copy": [],
        "guarded (entry) + copy": [],
    }
    bar.set_postfix_str(f"{name}: vLLM load")
    for _ in range(repeats):
        for label, fn in (
            ("vllm (upload)", lambda: plain._load_adapter(upload_request)),
            ("vllm (entry)", lambda: plain._load_adapter(entry_request)),
            ("guarded (entry)", lambda: guarded._load_adapter(entry_request)),
            ("vllm (entry) + copy", lambda: copied(plain._load_adapter(entry_request))),
            ("guarded (entry) + copy", lambda: copied(guarded._load_adapter(entry_request))),
        ):
            gc.collect()
            t0 = time.perf_counter()
            lora = fn()
            samples[label].append(time.perf_counter() - t0)
            del lora
    for label, s in samples.items():
        out["seconds"][label] = statistics.median(s)
        out["samples"][label] = s
    bar.update(1)

    sec = out["seconds"]
    # Two baselines: vLLM's _load_adapter as timed (safetensors maps the file: the tensors are
    # views of the page cache, no byte is read yet), and the same plus one copy of every
    # tensor, which is what vLLM does next when it puts the adapter in its LoRA slots.
    out["ratios"] = {}
    for base, guarded_label, suffix in (
        ("vllm (entry)", "guarded (entry)", ""),
        ("vllm (entry) + copy", "guarded (entry) + copy", " + copy"),
    ):
        vllm = sec[base]
        guard_overhead = max(0.0, sec[guarded_label] - vllm)
        sec["guard overhead" + suffix] = guard_overhead
        out["ratios"]["vs " + base] = {
            "first_load_overhead": (sec["prepare (miss)"] + guard_overhead) / vllm,
            "cache_hit": (sec["prepare (hit)"] + guard_overhead) / vllm,
            "cache_get": sec["cache.get"] / vllm,
            "reload_after_eviction": guard_overhead / vllm,
        }

    # -- per-request overhead with this service and its prepared adapter
    out["request_overhead"] = request_overhead(svc, prepared, repeats=2000)
    bar.update(1)
    cache.close()
    return out


def request_overhead(svc, prepared, repeats: int) -> dict:
    """The plugin's process_inputs and add_request hooks around no-op methods: per-call cost (us)."""
    from vllm.lora.request import LoRARequest

    from vllm_safelora.integration import patches, state

    state._service = svc  # what the front end holds once started
    svc.mark_loaded(prepared.name, prepared)

    class Plain:
        def process_inputs(self, request_id, prompt, params, lora_request=None):
            return None

        async def add_request(self, request_id, prompt, params, lora_request=None):
            return None

    class Hooked(Plain):
        pass

    patches._wrap_process_inputs(Hooked)
    patches._wrap_async_add_request(Hooked)
    lora = LoRARequest(lora_name=prepared.name, lora_int_id=1, lora_path=str(prepared.path))
    result = {}
    for hook in ("process_inputs", "add_request"):
        per_call = []
        for obj in (Plain(), Hooked()):
            if hook == "process_inputs":

                def call(obj=obj):
                    obj.process_inputs("r", "p", None, lora_request=lora)
            else:
                loop = asyncio.new_event_loop()

                def call(obj=obj, loop=loop):
                    loop.run_until_complete(obj.add_request("r", "p", None, lora_request=lora))

            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            per_call.append(times)
        plain_t, hooked_t = (statistics.median(t) for t in per_call)
        hooked_sorted = sorted(per_call[1])
        result[hook] = {
            "median_us": (hooked_t - plain_t) * 1e6,
            "p99_us": (hooked_sorted[int(0.99 * len(hooked_sorted))] - plain_t) * 1e6,
        }
    # The histogram the server exports, for the same calls.
    hist = {}
    for metric in metrics.REQUEST_OVERHEAD.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum") or sample.name.endswith("_count"):
                hist[f"{sample.labels['hook']}{sample.name[len('safelora_request_overhead_seconds') :]}"] = sample.value
    for hook in ("process_inputs", "add_request"):
        if hist.get(f"{hook}_count"):
            result[hook]["histogram_mean_us"] = hist[f"{hook}_sum"] / hist[f"{hook}_count"] * 1e6
    result["per_online_request_us"] = result["process_inputs"]["median_us"] + result["add_request"]["median_us"]
    return result


def ttft_reference() -> dict:
    """Resident-adapter TTFT from load_latency.py's stored result (tiny model, this machine)."""
    path = RESULTS_DIR / "load_latency.json"
    try:
        doc = json.loads(path.read_text())
        med = doc["summary"]["baseline"]["median_ms"]
        return {
            "source": f"{path.relative_to(RESULTS_DIR.parents[1])} ({doc.get('date')})",
            "resident_ms": med["resident"],
            "base_ms": med["base"],
        }
    except (OSError, KeyError, ValueError, TypeError):
        return {"source": None}


def measure(
    suites: list[str],
    *,
    repeats: int | None = None,
    bank_rank: int = 256,
    work_dir: Path | None = None,
    quick: bool = False,
) -> dict:
    """Run the suites (torch threads as the caller set them) and return the result document."""
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="safelora-load-path-", dir=work_dir))
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = {}
    try:
        with tqdm(total=len(suites) * 10, desc="load path", unit="stage") as bar:
            for name in suites:
                n = repeats or (2 if quick else (3 if "all" in name else 5))
                results[name] = run_suite(name, SUITES[name], work, n, bank_rank, bar)
                gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ttft = ttft_reference()
    if ttft.get("resident_ms"):
        for n in suites:
            results[n]["request_overhead"]["fraction_of_resident_ttft"] = (
                results[n]["request_overhead"]["per_online_request_us"] / 1e3 / ttft["resident_ms"]
            )
    return {
        "benchmark": "load_path",
        "date": started,
        "command": "python " + " ".join(sys.argv),
        "machine": machine_info(),
        "note": (
            "one process; warm page cache for every read (disk not measured); synthetic Llama-2-7B-shaped "
            f"adapters; synthetic bank truncated to k = {bank_rank} (bfloat16), so projection is a lower "
            "bound for an untruncated bank; vLLM side = WorkerLoRAManager._load_adapter's calls on CPU "
            "(PEFTHelper.from_local_dir, validate_legal, LoRAModel.from_local_checkpoint, dtype float16)"
        ),
        "bank_rank": bank_rank,
        "torch_threads": torch.get_num_threads(),
        "goals": GOALS,
        "ttft_reference": ttft,
        "suites": results,
    }


def print_report(doc: dict) -> None:
    results = doc["suites"]
    suites = list(results)
    stages = [
        "read+hash",
        "parse",
        "project",
        "write",
        "prepare (miss)",
        "prepare (hit)",
        "cache.get",
        "guard: verify + read + blake3 (no vLLM)",
        "vllm (upload)",
        "vllm (entry)",
        "guarded (entry)",
        "guard overhead",
        "vllm (entry) + copy",
        "guarded (entry) + copy",
        "guard overhead + copy",
    ]
    print(
        f"\nLoad path, ms (median; warm page cache; synthetic bank truncated to k = {doc.get('bank_rank', 256)}, "
        f"bfloat16; torch threads {doc['torch_threads']})"
    )
    print_table(["stage", *suites], [[s, *(f"{results[n]['seconds'][s] * 1e3:.1f}" for n in suites)] for s in stages])
    print("\nRatios to vLLM's own load of the entry (goal); '+ copy': vLLM's load with every tensor copied once")
    rows = []
    for base in ("vllm (entry)", "vllm (entry) + copy"):
        for r, goal in (
            ("first_load_overhead", GOALS["first_load_overhead"]),
            ("cache_hit", GOALS["cache_hit"]),
            ("cache_get", GOALS["cache_hit"]),
            ("reload_after_eviction", GOALS["reload_after_eviction"]),
        ):
            rows.append(
                [f"{r} vs {base} (<= {goal}x)", *(f"{results[n]['ratios']['vs ' + base][r]:.2f}x" for n in suites)]
            )
    print_table(["ratio", *suites], rows)
    print("\nPer-request overhead of the hooks, adapter already prepared (us)")
    rows = []
    for hook in ("process_inputs", "add_request"):
        for stat in ("median_us", "p99_us", "histogram_mean_us"):
            rows.append(
                [
                    f"{hook} {stat}",
                    *(f"{results[n]['request_overhead'][hook].get(stat, float('nan')):.1f}" for n in suites),
                ]
            )
    rows.append(
        [
            "per online request (median)",
            *(f"{results[n]['request_overhead']['per_online_request_us']:.1f}" for n in suites),
        ]
    )
    ttft = doc["ttft_reference"]
    if ttft.get("resident_ms"):
        rows.append(
            [
                f"fraction of TTFT {ttft['resident_ms']:.1f} ms",
                *(f"{results[n]['request_overhead']['fraction_of_resident_ttft'] * 100:.3f}%" for n in suites),
            ]
        )
    print_table(["hook", *suites], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="the small adapter only, 2 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per stage (default 5, 3 for ~320 MB)")
    ap.add_argument("--bank-rank", type=int, default=256, help="k of the synthetic truncated bank (bfloat16)")
    ap.add_argument("--suites", nargs="*", default=None, choices=list(SUITES))
    ap.add_argument("--work-dir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "load_path.json")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both sides (default 1: on a small shared machine OpenMP's "
        "spinning under contention makes the many small tensor ops of validation and projection "
        "10-50x slower; 0 = torch's default)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    suites = args.suites or (["llama2-7b-qv-r16"] if args.quick else list(SUITES))
    doc = measure(suites, repeats=args.repeats, bank_rank=args.bank_rank, work_dir=args.work_dir, quick=args.quick)
    print_report(doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
