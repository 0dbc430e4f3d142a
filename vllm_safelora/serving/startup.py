"""Starting the service: the sources the settings name, a bank checked against the served
model and every policy, and what start-up tells the operator (logs, gauges).

:meth:`SafeLoRAService.start <vllm_safelora.serving.service.SafeLoRAService.start>` calls these
in order and fails closed: a bank for another model, or a policy the bank cannot serve,
stops the server before it takes a request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .. import metrics
from ..adapters import ReadLimits
from ..bank import AlignmentBank, load_bank
from ..cache import PatchedAdapterCache
from ..config import SafeLoRASettings
from ..errors import BankError, ConfigError
from ..cache.shared_tier import SharedTier, read_mac_key
from ..objectstore import ObjectStore, StoreTimeouts, parse_s3_uri
from ..policies import make_policy
from ..sources import AdapterSource, HubSource, LocalDirSource, S3Source
from ..policies.tenant_rules import all_policies, describe_rules

logger = logging.getLogger("vllm_safelora")


def build_sources(settings: SafeLoRASettings, limits: ReadLimits | None = None) -> list[AdapterSource]:
    """The configured sources; ``limits``: the served vLLM's read limits, which a remote source holds its
    downloads to (default: ``max_adapter_bytes``)."""
    sources: list[AdapterSource] = [LocalDirSource(root, settings.shared_adapters) for root in settings.adapter_dirs]
    if settings.hub.enabled:
        sources.append(
            HubSource(
                prefix=settings.hub.prefix,
                allow=settings.hub.allow,
                revision=settings.hub.revision,
                local_files_only=settings.hub.local_files_only,
            )
        )
    if settings.s3.enabled:
        s3 = settings.s3
        sources.append(
            S3Source(
                s3.uri,
                prefix=s3.prefix,
                endpoint_url=s3.endpoint_url,
                region=s3.region,
                timeouts=StoreTimeouts(s3.connect_timeout_s, s3.read_timeout_s, s3.fetch_timeout_s, s3.retries),
                retry_after_s=s3.retry_after_s,
                staging_dir=s3.staging_dir,
                limits=limits or ReadLimits(max_bytes=settings.max_adapter_bytes),
            )
        )
    prefixes = [s.prefix for s in sources if s.prefix]
    # A name claimed by two sources would be served by whichever is asked first.
    if any(i != j and a.startswith(b) for i, a in enumerate(prefixes) for j, b in enumerate(prefixes)):
        raise ConfigError(f"adapter source name prefixes overlap ({prefixes}); give each its own")
    return sources


def build_shared_tier(settings: SafeLoRASettings) -> SharedTier | None:
    """The fleet-shared tier of projected entries, or None; ConfigError without a usable fleet key."""
    cfg = settings.shared_cache
    if not cfg.enabled:
        return None
    if cfg.uri is None:
        raise ConfigError("shared_cache is enabled but shared_cache.uri is not set (e.g. s3://fleet-cache/entries/)")
    key = read_mac_key(cfg.mac_key_file)
    store = ObjectStore(
        parse_s3_uri(cfg.uri, "shared_cache.uri"),
        endpoint_url=cfg.endpoint_url,
        region=cfg.region,
        timeouts=StoreTimeouts(cfg.connect_timeout_s, cfg.read_timeout_s, cfg.fetch_timeout_s, cfg.retries),
        what="shared_cache",
    )
    # Settings outside the cache key that change what a build produces: replicas that differ
    # in them must not serve each other's entries.
    context = {"aliases": sorted(settings.aliases), "require_base_model_match": settings.require_base_model_match}
    return SharedTier(store, key, context, max_entry_bytes=2 * settings.max_adapter_bytes + (16 << 20))


def load_checked_bank(settings: SafeLoRASettings, served_model: str) -> AlignmentBank:
    """Load the bank, check it protects ``served_model`` and suits every configured policy."""
    if settings.projection_threads is not None:
        import torch

        # The front end does no other torch work; vLLM's engine and workers
        # are other processes with their own thread settings.
        torch.set_num_threads(settings.projection_threads)
    bank = load_bank(settings.bank, settings.device, verify=settings.verify_bank)
    if not bank.manifest.protects(served_model, settings.aliases):
        raise BankError(
            f"the alignment bank {settings.bank} ({bank.bank_id}) was built for aligned model "
            f"'{bank.manifest.aligned.ref}' (aliases {bank.manifest.aliases}), but this server serves "
            f"'{served_model}'. Build a bank for the served model, or add '{served_model}' to the "
            "configuration's aliases if it is the same model under another name"
        )
    for policy in all_policies(settings):
        # e.g. a SaLoRA-style policy on a bank built without --safety-prompts
        make_policy(policy).validate_bank(bank)
    return bank


def announce_start(
    settings: SafeLoRASettings,
    served_model: str,
    bank: AlignmentBank,
    sources: Sequence[AdapterSource],
    cache: PatchedAdapterCache,
) -> None:
    """Set the bank and cache gauges and log what this server protects, and how (warnings for
    an empty hub allow-list and for shadow mode)."""
    metrics.BANK_BYTES.labels(device=str(bank.device)).set(bank.nbytes)
    metrics.CACHE_BYTES.set(cache.total_bytes())
    metrics.CACHE_MAX_BYTES.set(cache.max_bytes)
    logger.info(
        "safelora: protecting '%s' with bank %s (%d modules, %.1f MiB on %s); policies %s; sources %s; cache %s",
        served_model,
        bank.bank_id,
        len(bank.subspaces),
        bank.nbytes / 2**20,
        bank.device,
        describe_rules(settings),
        [s.describe() for s in sources],
        settings.cache_dir,
    )
    if not settings.verify_cache:
        logger.warning(
            "safelora: verify_cache is off: cache entries are checked for structure and sizes only, never "
            "hashed, so an entry altered on disk could be served; turn it on unless the cache directory is "
            "writable by this server alone"
        )
    elif cache.ctime_trusted:
        logger.info(
            "safelora: cache %s is on %s: an entry this process hashed is re-checked by its identity (inode, "
            "size, mtime, ctime) on each use, and hashed again when that changes",
            settings.cache_dir,
            cache.filesystem,
        )
    else:
        logger.warning(
            "safelora: cache %s is on %s, whose ctime cannot be trusted to move with every write: every use "
            "of an entry hashes it in full (slower re-loads); put the cache on a local file system",
            settings.cache_dir,
            cache.filesystem,
        )
    if settings.hub.enabled and not settings.hub.allow:
        logger.warning(
            "safelora: the hub source is enabled but hub.allow is empty, so no hub repository will be served "
            "(deny by default); list the repositories tenants may name, e.g. hub.allow: ['my-org/*']"
        )
    for rule in describe_rules(settings):
        if rule["shadow"]:
            logger.warning(
                "safelora: SHADOW MODE is ON for adapters matching '%s': they are served UNPROJECTED; reports "
                'and metrics (mode="shadow") only show what policy %s would have done. Turn it off once '
                "the roll-out is checked.",
                rule["match"],
                rule["policy"],
            )
