"""Prometheus metrics, registered in prometheus-client's default registry.

In vLLM's API-server process that registry is what ``/metrics`` serves, so
these appear on vLLM's own port with no second server.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ADAPTERS = Counter(
    "safelora_adapters",
    "Adapter loads by outcome (modified = changed by the policy; unchanged; refused; error = server-side failure); "
    "mode=shadow: what would have happened",
    ["outcome", "policy", "mode"],
)
REFUSALS = Counter("safelora_refusals", "Refused adapters by reason", ["reason"])
# Old names kept as aliases for one release (README "Upgrading"): deprecated name -> current name.
DEPRECATED_ALIASES = {"safelora_rejections": "safelora_refusals"}
REJECTIONS_DEPRECATED = Counter(
    "safelora_rejections", "Deprecated: the same as safelora_refusals_total (removed in the next release)", ["reason"]
)
MODULE_COSINE = Histogram(
    "safelora_module_cosine",
    "Safe LoRA cosine between each module's update and its projection (one observation per module per projection)",
    buckets=(-0.5, 0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
)
MODULES_PROJECTED = Counter("safelora_modules_projected", "Modules whose lora_B was projected")
PROJECTIONS = Counter("safelora_projections", "Adapters actually projected (cache misses that completed)", ["policy"])
PROJECTION_SECONDS = Histogram(
    "safelora_projection_seconds",
    "Wall time to read, validate, project and write one adapter",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CACHE_REQUESTS = Counter("safelora_cache_requests", "Patched-adapter cache lookups", ["result"])
CACHE_BYTES = Gauge("safelora_cache_bytes", "Bytes held by the patched-adapter cache")
BANK_BYTES = Gauge("safelora_bank_bytes", "Bytes of the alignment bank resident on a device", ["device"])
GUARD_EVENTS = Counter(
    "safelora_guard_events",
    "Adapters that reached a last-line guard unprepared (where=process_inputs: projected there, normal for "
    "offline LLM use, a bypass online; where=worker: refused; where=entry_changed: a cache entry handed to vLLM "
    "changed on disk and was rebuilt; where=entry_changed_mid_request: a running request's entry was removed by the "
    "worker, and the request failed with a 503 instead of finishing without the adapter)",
    ["where"],
)
CACHE_MAX_BYTES = Gauge(
    "safelora_cache_max_bytes",
    "Byte budget of the patched-adapter cache (cache_max_bytes); alert when safelora_cache_bytes nears it",
)
PREPARE_INFLIGHT = Gauge("safelora_prepare_inflight", "Adapters being read, validated or projected right now")
PREPARE_CAPACITY = Gauge(
    "safelora_prepare_capacity", "How many adapters may be prepared at once (the throttle's limit)"
)
OVERLOAD = Counter(
    "safelora_overload",
    "Adapter requests answered 503 (Retry-After) because the preparation throttle was full",
    ["where"],
)
CACHE_UNAVAILABLE = Counter(
    "safelora_cache_unavailable",
    "Adapter preparations answered 503 (Retry-After) because the cache's file system was full or read-only "
    "(cached adapters are still served)",
    ["fault"],
)
# Exported at 0 from start-up, so a dashboard or an alert on its rate has a series before the first fault.
for _fault in ("full", "read_only"):
    CACHE_UNAVAILABLE.labels(fault=_fault)
UPLOADS_KNOWN_BY_IDENTITY = Counter(
    "safelora_uploads_known_by_identity",
    "Cache hits decided from the upload's file identity (unchanged since this cache read it): no read, no parse",
)
REFUSAL_CACHE_HITS = Counter(
    "safelora_refusal_cache_hits", "Refusals answered from memory of an earlier refusal of the same content or files"
)
ADAPTER_MEAN_COSINE = Histogram(
    "safelora_adapter_mean_cosine",
    "Mean module cosine of each projected adapter (one observation per projection): the detection score "
    "admission.max_mean_cosine thresholds",
    buckets=(-0.5, 0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.526, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0),
)
REQUEST_OVERHEAD = Histogram(
    "safelora_request_overhead_seconds",
    "Time the plugin's hooks add to one request whose adapter is already prepared (hook=add_request: the online "
    "front end's check and path rewrite; hook=process_inputs: the input processor's, online and offline); "
    "loads and rebuilds are not counted here (safelora_projection_seconds)",
    ["hook"],
    buckets=(1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2),
)


def count_refusal(reason: str) -> None:
    """One refused adapter, under the current name and its deprecated alias."""
    REFUSALS.labels(reason=reason).inc()
    REJECTIONS_DEPRECATED.labels(reason=reason).inc()


SOURCE_FETCH_BYTES = Counter(
    "safelora_source_fetch_bytes",
    "Bytes downloaded from remote adapter sources (object storage), retries included",
    ["source"],
)
SOURCE_FETCH_SECONDS = Histogram(
    "safelora_source_fetch_seconds",
    "Wall time of one successful adapter download (both files, every check)",
    ["source"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
SOURCE_FETCH_FAILURES = Counter(
    "safelora_source_fetch_failures",
    "Adapter downloads that failed, by reason: not_found, missing_weights, pickle_only, too_large, changed "
    "(rewritten while fetched, every attempt), access_denied; and 503s: unreachable, timeout, credentials, "
    "no_such_bucket, store_error",
    ["source", "reason"],
)
SHARED_TIER = Counter(
    "safelora_shared_tier",
    "Fleet-shared tier of projected entries: result=hit (downloaded, not projected), miss, uploaded, and entries "
    "ignored and rebuilt locally: unsigned, bad_mac, mis_bound, bad_file; unavailable/upload_failed: the store "
    "could not be used (the entry is built locally)",
    ["result"],
)
# Exported at 0 from start-up (as the cache faults above), so the dashboard's object-storage and
# fleet-tier panels and any rate() alert have their series on every server, S3 configured or not.
SOURCE_FETCH_BYTES.labels(source="s3")
SOURCE_FETCH_SECONDS.labels(source="s3")
for _reason in ("not_found", "too_large", "changed", "unreachable", "timeout"):
    SOURCE_FETCH_FAILURES.labels(source="s3", reason=_reason)
for _result in ("hit", "miss", "uploaded", "bad_mac"):
    SHARED_TIER.labels(result=_result)
