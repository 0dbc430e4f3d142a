"""``vllm-safelora doctor``: what a platform engineer checks before and after a deploy, without starting vLLM.

Each check calls the same code the plugin runs at start-up (configuration loading,
bank manifest and hashes, the bank's model identity, policy validation, adapter
sources, the version gate), so a problem is reported here in the words the server
would stop with. Checks go on after a failure so that every problem is listed at
once. No vLLM import: the version comes from package metadata and the hooks are
read from source (:mod:`vllm_safelora.integration.qualify`).

Status per check: ok, warn (works, but look at it), fail (the server would refuse
to start or to protect adapters), skip (nothing to check it against).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Iterator, Mapping

from .errors import BankError, ConfigError, SafeLoRAError

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

PLUGIN_ENTRY_POINTS = {
    "vllm.general_plugins": ("safelora", "vllm_safelora.integration.plugin:register"),
    "vllm.endpoint_plugins": ("safelora_routes", "vllm_safelora.integration.routes:SafeLoRARoutes"),
}
_FALSE = ("", "0", "false", "no", "off")


@dataclass
class Check:
    name: str
    status: str
    detail: str


@contextlib.contextmanager
def _config_env(config: Path | None) -> Iterator[None]:
    """Load the configuration exactly as the plugin does: from VLLM_SAFELORA_CONFIG plus the environment."""
    from .config import CONFIG_ENV

    if config is None:
        yield
        return
    old = os.environ.get(CONFIG_ENV)
    os.environ[CONFIG_ENV] = str(Path(config).resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = old


def check_config(config: Path | None) -> tuple[object | None, list[Check]]:
    """(settings or None, one check per configuration problem)."""
    from pydantic import ValidationError

    from .config import load_settings

    with _config_env(config):
        try:
            settings = load_settings()
        except ConfigError as exc:
            cause = exc.__cause__
            if isinstance(cause, ValidationError):
                source = str(config) if config else "environment"
                return None, [
                    Check(
                        "config",
                        FAIL,
                        f"invalid vllm-safelora configuration ({source}): "
                        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}",
                    )
                    for err in cause.errors()
                ]
            return None, [Check("config", FAIL, str(exc))]
    overrides = sorted(k for k in os.environ if k.startswith("VLLM_SAFELORA_") and k != "VLLM_SAFELORA_CONFIG")
    detail = f"valid ({config or 'environment'})"
    if overrides:
        detail += f"; overridden by the environment: {', '.join(overrides)}"
    return settings, [Check("config", OK, detail)]


def check_bank(settings, model: str | None) -> tuple[object | None, list[Check]]:
    from .bank import AlignmentBank, read_manifest, verify_bank_files

    try:
        manifest = read_manifest(settings.bank)
    except BankError as exc:
        return None, [Check("bank", FAIL, str(exc))]
    checks = [
        Check(
            "bank",
            OK,
            f"{manifest.bank_id} at {settings.bank}: {len(manifest.modules)} modules, aligned "
            f"model {manifest.aligned.path or manifest.aligned.hub_id or manifest.aligned.ref}",
        )
    ]
    try:
        verify_bank_files(settings.bank, manifest)
        checks.append(Check("bank intact", OK, "sha256 of every bank file matches the manifest"))
    except BankError as exc:
        checks.append(Check("bank intact", FAIL, str(exc)))
    if model is None:
        checks.append(Check("bank protects model", SKIP, "pass --model MODEL (the server's --model) to check it"))
    else:
        ok, why = manifest.identify(model, settings.aliases)
        if ok:
            checks.append(Check("bank protects model", OK, why))
        else:
            checks.append(
                Check(
                    "bank protects model",
                    FAIL,
                    (
                        f"the alignment bank {settings.bank} ({manifest.bank_id}) was built for aligned model "
                        f"'{manifest.aligned.ref}', but this server serves '{model}': {why}. Build a bank for the served "
                        f"model, or add '{model}' to the configuration's aliases if it is the same model under another name"
                    ),
                )
            )
    if manifest.aligned.fingerprint is None:
        checks.append(
            Check(
                "bank model identity",
                WARN,
                "the bank records no weights fingerprint: servers are "
                "matched by name only; rebuild it with this version's build-bank",
            )
        )
    return AlignmentBank.described(settings.bank, manifest), checks


def check_policies(settings, bank) -> list[Check]:
    from .policies import make_policy
    from .policies.tenant_rules import all_policies

    if bank is None:
        return [Check("policies", SKIP, "no readable bank to check them against")]
    checks = []
    for i, policy in enumerate(all_policies(settings)):
        where = "(default)" if i == 0 else f"tenants[{i - 1}]"
        try:
            make_policy(policy).validate_bank(bank)
            checks.append(Check(f"policy {where}", OK, f"{policy.kind} ({policy.policy_id()}) valid for the bank"))
        except SafeLoRAError as exc:
            checks.append(Check(f"policy {where}", FAIL, str(exc)))
    return checks


def check_sources(settings) -> list[Check]:
    from .serving.startup import build_sources

    try:
        sources = build_sources(settings)
    except SafeLoRAError as exc:
        return [Check("adapter sources", FAIL, str(exc))]
    if not sources:
        return [
            Check(
                "adapter sources",
                WARN,
                "no adapter_dirs, hub or s3: every adapter name and lora_path will be refused; configure adapter_dirs",
            )
        ]
    return [Check("adapter sources", OK, "; ".join(s.describe() for s in sources))]


def _store_check(name: str, store) -> Check:
    """One listing under the store's prefix. Details name the bucket, prefix, endpoint and the failure's
    kind only: credentials come from boto3's chain and are never read back or shown here."""
    from .objectstore import StoreError

    try:
        store.check_readable()
    except StoreError as exc:
        hint = {
            "credentials": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the host/pod a role",
            "access_denied": "the credentials need s3:ListBucket and s3:GetObject on it",
            "no_such_bucket": "create the bucket or fix the uri",
            "unreachable": "check endpoint_url, DNS and the network path",
            "timeout": "the store answered too slowly",
        }.get(exc.reason, "")
        return Check(name, FAIL, f"{store.describe()}: {exc}" + (f"; {hint}" if hint else ""))
    return Check(name, OK, f"{store.describe()}: reachable, credentials accepted, bucket readable")


def check_object_stores(settings) -> list[Check]:
    """The S3 adapter source and the fleet-shared tier: reachable, credentials accepted, bucket readable."""
    from .serving.startup import build_shared_tier, build_sources
    from .sources import S3Source

    checks = []
    if settings.s3.enabled:
        with contextlib.suppress(SafeLoRAError):  # a configuration problem is check_sources' to report
            for source in build_sources(settings):
                if isinstance(source, S3Source):
                    checks.append(_store_check("s3 adapter store", source.store))
    if settings.shared_cache.enabled:
        try:
            tier = build_shared_tier(settings)
        except SafeLoRAError as exc:
            checks.append(Check("shared cache tier", FAIL, str(exc)))
        else:
            checks.append(_store_check("shared cache tier", tier.store))
    return checks


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _cache_bytes(root: Path) -> int:
    """Bytes under the cache's entries, counted by its own helper (what it holds against its budget)."""
    from .cache.layout import CacheLayout, dir_bytes

    return dir_bytes(CacheLayout(root).entries_dir)


def check_cache(settings) -> list[Check]:
    """Writable (or creatable), and its size against the budget; creates nothing."""
    root = Path(settings.cache_dir)
    fix = "create it (or its parent) and make it writable by the server's user, or configure another cache directory"
    anchor = _nearest_existing(root)
    if not anchor.is_dir():
        return [
            Check(
                "cache",
                FAIL,
                f"patched-adapter cache directory {str(root)!r} cannot be created ({anchor} is not a directory); {fix}",
            )
        ]
    if not os.access(anchor, os.W_OK | os.X_OK):
        what = "is not writable" if anchor == root else f"cannot be created ({anchor} is not writable)"
        return [Check("cache", FAIL, f"patched-adapter cache directory {str(root)!r} {what}; {fix}")]
    budget = settings.cache_max_bytes
    used = _cache_bytes(root) if root.is_dir() else 0
    detail = (
        f"{root} {'writable' if root.exists() else 'will be created'}; {used / 2**20:.1f} MiB of "
        f"{budget / 2**30:.2f} GiB budget ({used / budget:.0%})"
    )
    checks = [
        Check(
            "cache",
            WARN if used > budget else OK,
            detail + (" - over budget: entries in use cannot be evicted" if used > budget else ""),
        )
    ]
    from .fsutil import ctime_trusted

    trusted, fstype = ctime_trusted(anchor)
    if trusted:
        checks.append(
            Check(
                "cache identity",
                OK,
                f"{fstype}: entries are re-checked by identity (ctime) on each use, hashed again when it changes",
            )
        )
    else:
        checks.append(
            Check(
                "cache identity",
                WARN,
                f"{fstype}: ctime cannot be trusted here, so every use of an "
                "entry hashes it in full; put cache_dir on a local file system",
            )
        )
    return checks


def check_vllm(settings) -> list[Check]:
    from .integration.compat import check_vllm_version
    from .integration.qualify import installed_version

    version = installed_version()
    if version is None:
        return [Check("vllm", FAIL, "vLLM is not installed (pip install 'vllm-safelora[cpu]' or '[gpu]')")]
    try:
        check_vllm_version(version, allow_untested=bool(settings and settings.allow_untested_vllm))
    except ConfigError as exc:
        return [Check("vllm", FAIL, str(exc))]
    return [Check("vllm", OK, f"vLLM {version} is qualified")]


def check_entry_points() -> list[Check]:
    checks = []
    for group, (name, target) in PLUGIN_ENTRY_POINTS.items():
        found = [ep for ep in importlib.metadata.entry_points(group=group) if ep.name == name]
        if not found:
            checks.append(
                Check(
                    f"entry point {name}",
                    FAIL,
                    f"{group} has no '{name}': reinstall vllm-safelora "
                    "(pip install vllm-safelora) in the environment vLLM runs in",
                )
            )
        elif found[0].value != target:
            checks.append(
                Check(
                    f"entry point {name}",
                    FAIL,
                    f"{group} '{name}' points to {found[0].value}, expected {target}: another package claims the name",
                )
            )
        else:
            checks.append(Check(f"entry point {name}", OK, f"{group}: {target}"))
    return checks


def check_environment(environ: Mapping[str, str]) -> list[Check]:
    checks = []
    plugins = environ.get("VLLM_PLUGINS")
    if plugins is None:
        checks.append(
            Check(
                "VLLM_PLUGINS",
                OK,
                "unset: vLLM loads every installed plugin, safelora included "
                "(the audit API safelora_routes needs it named)",
            )
        )
    else:
        named = {p.strip() for p in plugins.split(",") if p.strip()}
        if "safelora" not in named:
            checks.append(
                Check(
                    "VLLM_PLUGINS",
                    FAIL,
                    f"VLLM_PLUGINS={plugins!r} does not name safelora: vLLM will "
                    "not load the plugin and serves adapters UNPROJECTED; add safelora",
                )
            )
        else:
            routes = "" if "safelora_routes" in named else " (without safelora_routes: no audit API)"
            checks.append(Check("VLLM_PLUGINS", OK, f"{plugins}{routes}"))
    runtime = environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    if runtime is None:
        checks.append(
            Check(
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
                WARN,
                "unset: the resolver and /v1/load_lora_adapter "
                "are off (only --lora-modules); `vllm-safelora serve` sets it, plain vLLM needs =1",
            )
        )
    elif runtime.strip().lower() in _FALSE:
        checks.append(
            Check("VLLM_ALLOW_RUNTIME_LORA_UPDATING", WARN, f"={runtime!r}: the resolver and the load endpoint are off")
        )
    else:
        checks.append(Check("VLLM_ALLOW_RUNTIME_LORA_UPDATING", OK, f"={runtime}"))
    if environ.get("VLLM_USE_RUST_FRONTEND", "0").strip().lower() not in _FALSE:
        checks.append(
            Check(
                "VLLM_USE_RUST_FRONTEND",
                FAIL,
                "set: it replaces the Python front end that vllm-safelora guards; unset it",
            )
        )
    return checks


def check_auth(settings, environ: Mapping[str, str]) -> list[Check]:
    """What the server checks at start-up about authentication (integration/plugin.py, auth.py)."""
    from .errors import ConfigError
    from .serving.credentials import KeyStore

    auth = settings.auth
    if not auth.enabled:
        return [Check("auth", OK, "off: every client may use every adapter (a single-tenant server)")]
    if environ.get("VLLM_API_KEY"):
        return [
            Check(
                "auth",
                FAIL,
                "auth.enabled and VLLM_API_KEY are both set: unset VLLM_API_KEY (and vLLM's "
                "--api-key); the operator's key from `issue-key --admin` replaces it on every route",
            )
        ]
    try:
        entries = KeyStore(auth.keys_file).entries()
    except ConfigError as exc:
        return [Check("auth", FAIL, f"{exc} (create it with `vllm-safelora issue-key --admin NAME --keys-file FILE`)")]
    tenants = {e.name for e in entries.values() if e.role == "tenant"}
    admins = sum(e.role == "admin" for e in entries.values())
    checks = [
        Check(
            "auth",
            OK if admins else WARN,
            f"keys file {auth.keys_file}: {len(tenants)} tenant(s), {admins} "
            "operator key(s)" + ("" if admins else "; with none, operator routes are closed to everyone"),
        )
    ]
    if auth.upload_root is not None:
        checks.append(
            Check("uploads", OK, f"written under {auth.upload_root} (the one adapter root the server writes)")
        )
    return checks


def run_checks(config: Path | None, model: str | None, environ: Mapping[str, str] | None = None) -> list[Check]:
    environ = os.environ if environ is None else environ
    settings, checks = check_config(config)
    if settings is not None:
        bank, bank_checks = check_bank(settings, model)
        checks += bank_checks + check_policies(settings, bank) + check_sources(settings) + check_cache(settings)
        checks += check_object_stores(settings)
        checks += check_auth(settings, environ)
    else:
        checks.append(Check("bank, policies, sources, cache", SKIP, "need a valid configuration"))
    return checks + check_vllm(settings) + check_entry_points() + check_environment(environ)


def render_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{c.status.upper():<4}  {c.name:<{width}}  {c.detail}" for c in checks]
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    lines.append(f"\n{failed} problem(s), {warned} warning(s)" + ("" if failed else ": ready to serve"))
    return "\n".join(lines)


def render_json(checks: list[Check]) -> str:
    return json.dumps(
        {"ok": not any(c.status == FAIL for c in checks), "checks": [asdict(c) for c in checks]}, indent=2
    )
